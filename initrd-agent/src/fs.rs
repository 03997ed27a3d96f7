//! Filesystems on the volume: FAT32 for the ESP (the `fatfs` crate), ext4
//! for the root (the `mke2fs` bundled into the initrd; ext4 is not
//! hand-written), and mounts that undo themselves.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tracing::{info, warn};
use uuid::Uuid;

/// Formats `device` as FAT32. The cluster size is the largest that still
/// gives FAT32's minimum cluster count (an ESP of 100 MiB needs 512-byte
/// clusters; firmware refuses a "FAT32" with too few clusters).
pub fn format_fat32(device: &Path, size: u64, label: &str) -> Result<u32> {
    const MIN_FAT32_CLUSTERS: u64 = 65_525 + 16;
    let cluster = [4096u32, 2048, 1024, 512]
        .into_iter()
        .find(|c| size / u64::from(*c) >= MIN_FAT32_CLUSTERS)
        .with_context(|| {
            format!(
                "the ESP ({} MiB) is too small for FAT32; use efi_size of at least 33M",
                size >> 20
            )
        })?;
    let mut label_bytes = [b' '; 11];
    for (d, s) in label_bytes.iter_mut().zip(label.bytes()) {
        *d = s.to_ascii_uppercase();
    }
    let volume_id = Uuid::new_v4().as_fields().0;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .with_context(|| format!("open {}", device.display()))?;
    let options = fatfs::FormatVolumeOptions::new()
        .fat_type(fatfs::FatType::Fat32)
        .bytes_per_cluster(cluster)
        .volume_id(volume_id)
        .volume_label(label_bytes);
    fatfs::format_volume(&file, options)
        .with_context(|| format!("format {} as FAT32", device.display()))?;
    file.sync_all()?;
    info!(
        "formatted {} as FAT32 ({} B clusters)",
        device.display(),
        cluster
    );
    Ok(volume_id)
}

/// Formats `device` as ext4 with the bundled mke2fs.
pub fn format_ext4(device: &Path, label: &str, uuid: Uuid) -> Result<()> {
    let mke2fs = find_mke2fs()?;
    let out = Command::new(&mke2fs)
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            label,
            "-U",
            &uuid.to_string(),
        ])
        .arg(device)
        .output()
        .with_context(|| format!("run {}", mke2fs.display()))?;
    if !out.status.success() {
        bail!(
            "mke2fs {} failed ({}): {}",
            device.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    info!(
        "formatted {} as ext4 (label {label}, UUID {uuid})",
        device.display()
    );
    Ok(())
}

fn find_mke2fs() -> Result<PathBuf> {
    find_tool("mke2fs")
}

/// A tool bundled into the initrd (there is no PATH to speak of in PID 1's
/// environment, so the usual directories are searched).
pub fn find_tool(name: &str) -> Result<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{name} is not in the initrd: the bootscript's initrd tools must include {name}"
            )
        })
}

/// A mount that is undone when dropped (lazily, so an error path never
/// leaves the volume mounted nor fails on a busy mount).
#[derive(Debug)]
pub struct Mount {
    target: PathBuf,
    active: bool,
}

impl Mount {
    pub fn new(source: &Path, target: &Path, fstype: &str, flags: MsFlags) -> Result<Mount> {
        std::fs::create_dir_all(target).with_context(|| format!("create {}", target.display()))?;
        mount(Some(source), target, Some(fstype), flags, None::<&str>).with_context(|| {
            format!(
                "mount {} ({fstype}) on {}",
                source.display(),
                target.display()
            )
        })?;
        Ok(Mount {
            target: target.to_path_buf(),
            active: true,
        })
    }

    /// A bind mount (for /dev, /proc, /sys inside a chroot).
    pub fn bind(source: &Path, target: &Path) -> Result<Mount> {
        std::fs::create_dir_all(target).with_context(|| format!("create {}", target.display()))?;
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("bind {} on {}", source.display(), target.display()))?;
        Ok(Mount {
            target: target.to_path_buf(),
            active: true,
        })
    }

    /// Unmounts now, reporting errors (the success path uses this so that a
    /// filesystem that cannot be cleanly unmounted fails the build).
    pub fn unmount(mut self) -> Result<()> {
        self.active = false;
        nix::unistd::sync();
        umount2(&self.target, MntFlags::empty())
            .with_context(|| format!("unmount {}", self.target.display()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.active {
            if let Err(e) = umount2(&self.target, MntFlags::MNT_DETACH) {
                warn!("unmount {}: {e}", self.target.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat32_is_clean_by_fsck_fat() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("esp.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(100 << 20)
            .unwrap();
        format_fat32(&img, 100 << 20, "efi").unwrap();
        let out = Command::new("fsck.fat")
            .arg("-n")
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // fatfs reads its own result back as FAT32 with the label.
        let fs =
            fatfs::FileSystem::new(std::fs::File::open(&img).unwrap(), fatfs::FsOptions::new())
                .unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat32);
        assert_eq!(fs.volume_label(), "EFI");
    }

    #[test]
    fn too_small_an_esp_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("tiny.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let err = format_fat32(&img, 8 << 20, "efi").unwrap_err().to_string();
        assert!(err.contains("efi_size"), "{err}");
    }

    #[test]
    fn ext4_is_clean_by_e2fsck() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("root.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let uuid = Uuid::new_v4();
        format_ext4(&img, "root", uuid).unwrap();
        let out = Command::new("e2fsck")
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&uuid.to_string()), "{text}");
        assert!(text.contains("Filesystem volume name:   root"), "{text}");
    }
}
