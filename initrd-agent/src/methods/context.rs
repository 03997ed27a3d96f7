//! What a build method is given and what it hands back.

use contract::{LayoutEntry, Stage, StateDetail};

use crate::metadata::MetadataClient;
use crate::params::{CommonParams, Params};

/// What every method gets: the parameters, the async runtime (methods run
/// on a blocking thread; network I/O and state reports go through the
/// runtime) and the metadata client for progress reports.
pub struct BuildContext {
    pub params: Params,
    pub common: CommonParams,
    pub runtime: tokio::runtime::Handle,
    pub metadata: Option<MetadataClient>,
}

impl BuildContext {
    /// Reports `building: <stage> <percent>` without waiting for it.
    pub fn report(&self, stage: Stage, percent: u8) {
        if let Some(md) = self.metadata.clone() {
            let detail = StateDetail::Building { stage, percent };
            self.runtime
                .spawn(async move { md.report_state(&detail).await });
        }
    }
}

/// What a successful build method hands back for the done line.
pub struct MethodOutcome {
    /// Bytes fetched from the network (the compressed size).
    pub bytes: u64,
    pub layout: Vec<LayoutEntry>,
}
