//! Build methods: how the volume gets written. The name comes from the
//! `build_method` parameter; each method is one file implementing
//! [`BuildMethod`], and [`run`] drives the three steps.

mod from_qcow2;
mod from_rootfs;
mod rootfs_stream;
mod unpartitioned_from_rootfs;

use contract::{LayoutEntry, Method, Stage, StateDetail};

use crate::metadata::MetadataClient;
use crate::params::{CommonParams, Params};
use crate::stage::StageError;

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

/// One build method. The steps run in order on a blocking thread; an error
/// in any step ends the build (mounts are undone by their guards).
pub trait BuildMethod {
    /// Checks parameters and the volume before anything is written.
    fn pre_build(&mut self, ctx: &BuildContext) -> Result<(), StageError>;
    /// Writes the volume.
    fn build(&mut self, ctx: &BuildContext) -> Result<(), StageError>;
    /// Unmounts, flushes, and describes the result.
    fn post_build(&mut self, ctx: &BuildContext) -> Result<MethodOutcome, StageError>;
}

/// Runs `method` to the end. Blocking: call it from `spawn_blocking`.
pub fn run(method: Method, ctx: &BuildContext) -> Result<MethodOutcome, StageError> {
    let mut m: Box<dyn BuildMethod> = match method {
        Method::FromRootfs => Box::new(from_rootfs::FromRootfs::default()),
        Method::UnpartitionedFromRootfs => {
            Box::new(unpartitioned_from_rootfs::UnpartitionedFromRootfs::default())
        }
        Method::FromQcow2 => Box::new(from_qcow2::FromQcow2::default()),
    };
    m.pre_build(ctx)?;
    m.build(ctx)?;
    m.post_build(ctx)
}
