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
use crate::disk::{self, PartitionInfo, Partitioned};
use crate::fs::{self, Mount};
use crate::stage::{StageContext, StageError};
use contract::{LayoutEntry, Method, Stage};

/// Where the agent mounts the root filesystem it builds.
pub const ROOT_MOUNT: &str = "/run/initrd-agent/root";

/// Checks the parameters and the volume, partitions and formats it, streams
/// the rootfs onto the root, writes fstab and the bootloader, then unmounts
/// and describes the layout. Blocking.
pub fn run(ctx: &BuildContext) -> Result<MethodOutcome, StageError> {
    let (url, mut volume) = ctx.input_and_volume(Method::FromRootfs)?;

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
    let streamed = stream_rootfs(ctx, &url, &root)?;

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
    volume.flush().stage(Stage::Finish)?;
    ctx.report(Stage::Finish, 100);
    let esp_uuid = format!("{:04X}-{:04X}", esp_id >> 16, esp_id & 0xffff);
    let entries = vec![
        layout_entry(&layout.esp, "esp", "vfat", esp_uuid),
        layout_entry(&layout.root, "root", "ext4", fs_uuid.to_string()),
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

/// One partition of the new layout, for the done line.
fn layout_entry(part: &PartitionInfo, role: &str, fs: &str, uuid: String) -> LayoutEntry {
    LayoutEntry {
        device: part.device.display().to_string(),
        role: role.into(),
        number: Some(part.number),
        partuuid: Some(part.partuuid.to_string()),
        start_bytes: part.start,
        size_bytes: part.size,
        fs: Some(fs.into()),
        uuid: Some(uuid),
    }
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
