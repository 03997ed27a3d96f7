//! What a build method is given and what it hands back.

use contract::{LayoutEntry, Method, Stage, StateDetail};

use crate::disk::Volume;
use crate::metadata::MetadataClient;
use crate::params::{CommonParams, Params};
use crate::stage::{StageContext, StageError};

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
    /// The checks every method makes before it writes anything: its input's
    /// URL parameter (`rootfs_url`, `disk_img_url`) is set, and the volume
    /// opens. Returns both.
    pub fn input_and_volume(&self, method: Method) -> Result<(String, Volume), StageError> {
        let url = self
            .params
            .required(method.input().url_key(), method.as_str())
            .stage(Stage::Params)?
            .to_string();
        let volume = Volume::open(&self.common.volume).stage(Stage::Disk)?;
        Ok((url, volume))
    }

    /// Reports `building: <stage> <percent>` without waiting for it.
    pub fn report(&self, stage: Stage, percent: u8) {
        if let Some(md) = &self.metadata {
            md.report_state_later(StateDetail::Building { stage, percent });
        }
    }
}

/// What a successful build method hands back for the done line.
pub struct MethodOutcome {
    /// Bytes fetched from the network (the compressed size).
    pub bytes: u64,
    pub layout: Vec<LayoutEntry>,
}
