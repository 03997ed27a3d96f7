//! Build methods: how the volume gets written. The name comes from the
//! `build_method` parameter; each method is one file with a `run` that
//! goes from the parameters to the written volume in straight-line code,
//! and [`run`] dispatches to it.

mod context;
mod download;
mod from_qcow2;
mod from_rootfs;
mod rootfs_stream;
mod unpartitioned_from_rootfs;

use contract::Method;

pub use self::context::BuildContext;
use self::context::MethodOutcome;
use crate::stage::StageError;

/// Runs `method` to the end: each checks its parameters and the volume,
/// writes, and finishes, in order; an error ends the build (mounts are
/// undone by their guards). Blocking: call it from `spawn_blocking`.
pub fn run(method: Method, ctx: &BuildContext) -> Result<MethodOutcome, StageError> {
    match method {
        Method::FromRootfs => from_rootfs::run(ctx),
        Method::UnpartitionedFromRootfs => unpartitioned_from_rootfs::run(ctx),
        Method::FromQcow2 => from_qcow2::run(ctx),
    }
}
