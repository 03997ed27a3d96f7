//! `unpartitioned-from-rootfs`: ext4 on the whole volume, no partition
//! table, no bootloader (a data volume, or a root for an external kernel).

use std::path::PathBuf;

use nix::mount::MsFlags;
use uuid::Uuid;

use super::context::{BuildContext, MethodOutcome};
use super::from_rootfs::ROOT_MOUNT;
use super::rootfs_stream::stream_rootfs;
use crate::fs::{self, Mount};
use crate::stage::{StageContext, StageError};
use contract::{LayoutEntry, Method, Stage};

/// Checks the parameters and the volume, formats it whole, streams the
/// rootfs onto it, then unmounts and describes it. Blocking.
pub fn run(ctx: &BuildContext) -> Result<MethodOutcome, StageError> {
    let (url, mut volume) = ctx.input_and_volume(Method::UnpartitionedFromRootfs)?;

    ctx.report(Stage::Fs, 0);
    // A stale partition table would shadow the filesystem for the kernel.
    volume.wipe_signatures().stage(Stage::Disk)?;
    let uuid = Uuid::new_v4();
    fs::format_ext4(&volume.path, "root", uuid).stage(Stage::Fs)?;
    let root = PathBuf::from(ROOT_MOUNT);
    let mount = Mount::new(&volume.path, &root, "ext4", MsFlags::empty()).stage(Stage::Fs)?;
    ctx.report(Stage::Fetch, 0);
    let streamed = stream_rootfs(ctx, &url, &root)?;

    mount.unmount().stage(Stage::Finish)?;
    volume.flush().stage(Stage::Finish)?;
    ctx.report(Stage::Finish, 100);
    Ok(MethodOutcome {
        bytes: streamed.fetched_bytes,
        layout: vec![LayoutEntry {
            device: volume.path.display().to_string(),
            role: "root".into(),
            number: None,
            partuuid: None,
            start_bytes: 0,
            size_bytes: volume.size,
            fs: Some("ext4".into()),
            uuid: Some(uuid.to_string()),
        }],
    })
}
