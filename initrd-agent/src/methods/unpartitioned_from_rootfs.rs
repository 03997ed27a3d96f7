//! `unpartitioned-from-rootfs`: ext4 on the whole volume, no partition
//! table, no bootloader (a data volume, or a root for an external kernel).

use std::path::PathBuf;

use anyhow::Context;
use nix::mount::MsFlags;
use uuid::Uuid;

use super::context::{BuildContext, BuildMethod, MethodOutcome};
use super::from_rootfs::ROOT_MOUNT;
use super::rootfs_stream::stream_rootfs;
use crate::disk::Volume;
use crate::fs::{self, Mount};
use crate::stage::{StageContext, StageError};
use contract::LayoutEntry;
use contract::Stage;

#[derive(Default)]
pub struct UnpartitionedFromRootfs {
    volume: Option<Volume>,
    fs_uuid: Option<Uuid>,
    root_mount: Option<Mount>,
    fetched_bytes: u64,
}

impl BuildMethod for UnpartitionedFromRootfs {
    fn pre_build(&mut self, ctx: &BuildContext) -> Result<(), StageError> {
        ctx.params
            .required("rootfs_url", "unpartitioned-from-rootfs")
            .stage(Stage::Params)?;
        self.volume = Some(Volume::open(&ctx.common.volume).stage(Stage::Disk)?);
        Ok(())
    }

    fn build(&mut self, ctx: &BuildContext) -> Result<(), StageError> {
        let volume = self.volume.as_mut().expect("pre_build opened the volume");
        ctx.report(Stage::Fs, 0);
        // A stale partition table would shadow the filesystem for the kernel.
        volume.wipe_signatures().stage(Stage::Disk)?;
        let uuid = Uuid::new_v4();
        fs::format_ext4(&volume.path, "root", uuid).stage(Stage::Fs)?;
        let root = PathBuf::from(ROOT_MOUNT);
        let mount = Mount::new(&volume.path, &root, "ext4", MsFlags::empty()).stage(Stage::Fs)?;
        ctx.report(Stage::Fetch, 0);
        self.fetched_bytes = stream_rootfs(ctx, &root)?.fetched_bytes;
        self.fs_uuid = Some(uuid);
        self.root_mount = Some(mount);
        Ok(())
    }

    fn post_build(&mut self, ctx: &BuildContext) -> Result<MethodOutcome, StageError> {
        if let Some(m) = self.root_mount.take() {
            m.unmount().stage(Stage::Finish)?;
        }
        let volume = self.volume.as_ref().expect("pre_build opened the volume");
        volume
            .file
            .sync_all()
            .context("flush the volume")
            .stage(Stage::Finish)?;
        ctx.report(Stage::Finish, 100);
        Ok(MethodOutcome {
            bytes: self.fetched_bytes,
            layout: vec![LayoutEntry {
                device: volume.path.display().to_string(),
                role: "root".into(),
                number: None,
                partuuid: None,
                start_bytes: 0,
                size_bytes: volume.size,
                fs: Some("ext4".into()),
                uuid: self.fs_uuid.map(|u| u.to_string()),
            }],
        })
    }
}
