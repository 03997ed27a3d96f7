//! Build methods: how the volume gets written. The name comes from the
//! `build_method` parameter; each method is one file implementing
//! [`BuildMethod`], and [`run`] drives the three steps.

mod context;
mod from_qcow2;
mod from_rootfs;
mod rootfs_stream;
mod unpartitioned_from_rootfs;

use contract::Method;

pub use self::context::BuildContext;
use self::context::{BuildMethod, MethodOutcome};
use crate::stage::StageError;

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
