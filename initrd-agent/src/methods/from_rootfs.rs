//! `from-rootfs`: GPT with an ESP and an ext4 root, the rootfs tarball
//! streamed onto the root, /etc/fstab by PARTUUID, and GRUB EFI.

use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::mount::MsFlags;
use tracing::info;
use uuid::Uuid;

use super::context::{BuildContext, MethodOutcome};
use super::rootfs_stream::stream_rootfs;
use crate::bootloader::{self, BootTarget};
use crate::disk::{self, Partitioned, Volume};
use crate::fs::{self, Mount};
use crate::stage::{StageContext, StageError};
use contract::LayoutEntry;
use contract::Stage;

/// Where the agent mounts the root filesystem it builds.
pub const ROOT_MOUNT: &str = "/run/initrd-agent/root";

/// Checks the parameters and the volume, partitions and formats it, streams
/// the rootfs onto the root, writes fstab and the bootloader, then unmounts
/// and describes the layout. Blocking.
pub fn run(ctx: &BuildContext) -> Result<MethodOutcome, StageError> {
    ctx.params
        .required("rootfs_url", "from-rootfs")
        .stage(Stage::Params)?;
    let mut volume = Volume::open(&ctx.common.volume).stage(Stage::Disk)?;

    ctx.report(Stage::Disk, 0);
    let layout = disk::partition(&mut volume, ctx.common.efi_size).stage(Stage::Disk)?;

    ctx.report(Stage::Fs, 0);
    let esp_id = fs::format_fat32(&layout.esp.device, layout.esp.size, "efi").stage(Stage::Fs)?;
    let fs_uuid = Uuid::new_v4();
    fs::format_ext4(&layout.root.device, "root", fs_uuid).stage(Stage::Fs)?;
    let root = PathBuf::from(ROOT_MOUNT);
    let root_mount =
        Mount::new(&layout.root.device, &root, "ext4", MsFlags::empty()).stage(Stage::Fs)?;

    ctx.report(Stage::Fetch, 0);
    let streamed = stream_rootfs(ctx, &root)?;

    write_fstab(&root, &layout).stage(Stage::Fstab)?;
    let esp_dir = root.join("boot/efi");
    let esp_mount = Mount::new(&layout.esp.device, &esp_dir, "vfat", MsFlags::empty())
        .context("mount the ESP (the initrd must carry the fat, vfat and nls modules)")
        .stage(Stage::Bootloader)?;
    ctx.report(Stage::Bootloader, 0);
    let how = bootloader::install(&BootTarget {
        root: &root,
        esp: &esp_dir,
        root_device: &layout.root.device,
        root_fs_uuid: fs_uuid,
        root_partuuid: layout.root.partuuid,
    })
    .stage(Stage::Bootloader)?;
    info!("bootloader: {how:?}");

    // The ESP is mounted inside the root: unmount it first.
    esp_mount.unmount().stage(Stage::Finish)?;
    root_mount.unmount().stage(Stage::Finish)?;
    volume
        .file
        .sync_all()
        .context("flush the volume")
        .stage(Stage::Finish)?;
    ctx.report(Stage::Finish, 100);
    let entries = vec![
        LayoutEntry {
            device: layout.esp.device.display().to_string(),
            role: "esp".into(),
            number: Some(layout.esp.number),
            partuuid: Some(layout.esp.partuuid.to_string()),
            start_bytes: layout.esp.start,
            size_bytes: layout.esp.size,
            fs: Some("vfat".into()),
            uuid: Some(format!("{:04X}-{:04X}", esp_id >> 16, esp_id & 0xffff)),
        },
        LayoutEntry {
            device: layout.root.device.display().to_string(),
            role: "root".into(),
            number: Some(layout.root.number),
            partuuid: Some(layout.root.partuuid.to_string()),
            start_bytes: layout.root.start,
            size_bytes: layout.root.size,
            fs: Some("ext4".into()),
            uuid: Some(fs_uuid.to_string()),
        },
    ];
    for e in &entries {
        info!(
            "layout: {} {} #{} {} MiB at {} MiB, {} {}",
            e.device,
            e.role,
            e.number.unwrap_or(0),
            e.size_bytes >> 20,
            e.start_bytes >> 20,
            e.fs.as_deref().unwrap_or("-"),
            e.uuid.as_deref().unwrap_or("-")
        );
    }
    Ok(MethodOutcome {
        bytes: streamed.fetched_bytes,
        layout: entries,
    })
}

/// /etc/fstab by PARTUUID, like the original (stable across device names:
/// the image boots as vda, sda or nvme0n1).
fn write_fstab(root: &Path, layout: &Partitioned) -> anyhow::Result<()> {
    let text = format!(
        "# Written by imgforge initrd-agent.\n\
         PARTUUID={root}\t/\text4\tdefaults,errors=remount-ro\t0\t1\n\
         PARTUUID={esp}\t/boot/efi\tvfat\tumask=0077\t0\t2\n",
        root = layout.root.partuuid,
        esp = layout.esp.partuuid,
    );
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(etc.join("fstab"), text).context("write /etc/fstab")?;
    std::fs::create_dir_all(root.join("boot/efi")).context("create /boot/efi")?;
    Ok(())
}
