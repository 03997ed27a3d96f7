//! GRUB EFI for the finished root filesystem.
//!
//! A rootfs that ships `grub-install` gets GRUB installed from inside it, as
//! the original initrd did, so the image's own GRUB packages own the result
//! and later updates work. Otherwise the GRUB EFI image the initrd carries
//! (built with grub-mkimage when the initrd is built) goes to the ESP's
//! removable-media path with a generated grub.cfg.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use tracing::info;
use uuid::Uuid;

use crate::fs::Mount;

/// Where the initrd builder puts the GRUB EFI image.
pub const INITRD_GRUB_EFI: &str = "/usr/lib/imgforge/grub/BOOTX64.EFI";

/// What the bootloader needs to know about the volume.
pub struct BootTarget<'a> {
    /// The mounted root filesystem.
    pub root: &'a Path,
    /// The mounted ESP (`<root>/boot/efi`).
    pub esp: &'a Path,
    pub root_device: &'a Path,
    pub root_fs_uuid: Uuid,
    pub root_partuuid: Uuid,
}

/// Which way GRUB was installed, for the log and the done line.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    FromRootfs,
    InitrdImage { kernel: String },
}

pub fn install(t: &BootTarget<'_>) -> Result<Installed> {
    let kernels = find_kernels(t.root)?;
    if kernels.is_empty() {
        bail!(
            "the rootfs has no kernel (no /boot/vmlinuz*): install a kernel package in it \
             (e.g. linux-image-cloud-amd64), or use unpartitioned-from-rootfs for a volume without a bootloader"
        );
    }
    match grub_install_in(t.root) {
        Some(grub_install) => {
            install_from_rootfs(t, &grub_install)?;
            Ok(Installed::FromRootfs)
        }
        None => {
            let kernel = kernels.last().unwrap().clone();
            install_initrd_image(t, &kernel)?;
            Ok(Installed::InitrdImage { kernel })
        }
    }
}

/// `grub-install` (or Fedora's `grub2-install`) inside the rootfs, as the
/// path seen from inside.
fn grub_install_in(root: &Path) -> Option<String> {
    [
        "usr/sbin/grub-install",
        "sbin/grub-install",
        "usr/sbin/grub2-install",
        "sbin/grub2-install",
    ]
    .into_iter()
    .find(|p| std::fs::symlink_metadata(root.join(p)).is_ok())
    .map(|p| format!("/{p}"))
}

/// Kernel file names in /boot, oldest version first.
fn find_kernels(root: &Path) -> Result<Vec<String>> {
    let boot = root.join("boot");
    let mut names: Vec<String> = match std::fs::read_dir(&boot) {
        Ok(d) => d
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("vmlinuz") && !n.ends_with(".old"))
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort_by_key(|n| version_key(n));
    Ok(names)
}

/// Orders `vmlinuz-6.1.0-9` before `vmlinuz-6.1.0-10`.
fn version_key(name: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut num = String::new();
    let mut text = String::new();
    for c in name.chars() {
        if c.is_ascii_digit() {
            if !text.is_empty() {
                key.push((0, std::mem::take(&mut text)));
            }
            num.push(c);
        } else {
            if !num.is_empty() {
                key.push((num.parse().unwrap_or(0), String::new()));
                num.clear();
            }
            text.push(c);
        }
    }
    if !num.is_empty() {
        key.push((num.parse().unwrap_or(0), String::new()));
    }
    if !text.is_empty() {
        key.push((0, text));
    }
    key
}

/// The matching initrd for `vmlinuz-<version>`, if the rootfs has one.
fn initrd_for(root: &Path, kernel: &str) -> Option<String> {
    let version = kernel.strip_prefix("vmlinuz-").unwrap_or("");
    let candidates = if version.is_empty() {
        vec!["initrd.img".to_string(), "initramfs.img".to_string()]
    } else {
        vec![
            format!("initrd.img-{version}"),
            format!("initramfs-{version}.img"),
            format!("initrd-{version}"),
        ]
    };
    candidates
        .into_iter()
        .find(|c| root.join("boot").join(c).is_file())
}

fn install_initrd_image(t: &BootTarget<'_>, kernel: &str) -> Result<()> {
    let image = std::fs::read(INITRD_GRUB_EFI).with_context(|| {
        format!(
            "the rootfs has no grub-install and this initrd carries no GRUB EFI image at \
             {INITRD_GRUB_EFI}: install grub-efi-amd64 in the rootfs, or rebuild the initrd \
             with `imgforge initrd` on a machine with grub-efi-amd64-bin"
        )
    })?;
    let dir = t.esp.join("EFI/BOOT");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::write(dir.join("BOOTX64.EFI"), image).context("write EFI/BOOT/BOOTX64.EFI")?;
    let cfg = grub_cfg(t, kernel, initrd_for(t.root, kernel).as_deref());
    std::fs::write(dir.join("grub.cfg"), cfg).context("write EFI/BOOT/grub.cfg")?;
    info!("installed the initrd's GRUB EFI image booting /boot/{kernel}");
    Ok(())
}

fn grub_cfg(t: &BootTarget<'_>, kernel: &str, initrd: Option<&str>) -> String {
    let mut cfg = format!(
        "# Written by imgforge initrd-agent.\n\
         set timeout=1\n\
         serial --unit=0 --speed=115200\n\
         terminal_input console serial\n\
         terminal_output console serial\n\
         search --no-floppy --fs-uuid --set=root {uuid}\n\
         menuentry 'Linux' {{\n\
         \x20   linux /boot/{kernel} root=PARTUUID={partuuid} ro rootwait console=tty0 console=ttyS0,115200\n",
        uuid = t.root_fs_uuid,
        partuuid = t.root_partuuid,
    );
    if let Some(i) = initrd {
        cfg.push_str(&format!("    initrd /boot/{i}\n"));
    }
    cfg.push_str("}\n");
    cfg
}

/// The original's flow: chroot with /dev, /proc, /sys, the ESP at
/// /boot/efi, and /dev/disk/by-uuid so grub-mkconfig writes `root=UUID=`
/// (without udev it would write the build server's device name).
fn install_from_rootfs(t: &BootTarget<'_>, grub_install: &str) -> Result<()> {
    let _links = DiskLinks::create(t)?;
    let mut binds = Vec::new();
    for dir in ["dev", "proc", "sys"] {
        binds.push(Mount::bind(&Path::new("/").join(dir), &t.root.join(dir))?);
    }
    let mkconfig = if grub_install.contains("grub2-") {
        "grub2-mkconfig"
    } else {
        "grub-mkconfig"
    };
    let cfg_path = if grub_install.contains("grub2-") {
        "/boot/grub2/grub.cfg"
    } else {
        "/boot/grub/grub.cfg"
    };
    run_in_chroot(
        t.root,
        grub_install,
        &[
            "--target=x86_64-efi",
            "--removable",
            "--efi-directory=/boot/efi",
            "--no-nvram",
        ],
    )?;
    run_in_chroot(t.root, mkconfig, &["-o", cfg_path])?;
    // Unmount in reverse order, reporting errors.
    while let Some(m) = binds.pop() {
        m.unmount()?;
    }
    info!("installed GRUB from the rootfs ({grub_install}, {mkconfig})");
    Ok(())
}

fn run_in_chroot(root: &Path, program: &str, args: &[&str]) -> Result<()> {
    let root_owned = root.to_path_buf();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8")
        .env("HOME", "/root");
    // SAFETY: chroot and chdir are async-signal-safe and touch no memory
    // shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::chroot(&root_owned)?;
            nix::unistd::chdir("/")?;
            Ok(())
        });
    }
    info!("running {program} {} in the rootfs", args.join(" "));
    let out = cmd
        .output()
        .with_context(|| format!("run {program} in the rootfs"))?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        let tail: Vec<&str> = text.lines().rev().take(8).collect();
        bail!(
            "{program} failed in the rootfs ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(())
}

/// `/dev/disk/by-uuid/<uuid>` and `/dev/disk/by-partuuid/<uuid>` links for
/// the root filesystem, removed again when dropped.
struct DiskLinks(Vec<PathBuf>);

impl DiskLinks {
    fn create(t: &BootTarget<'_>) -> Result<DiskLinks> {
        let mut links = Vec::new();
        for (dir, id) in [
            ("by-uuid", t.root_fs_uuid),
            ("by-partuuid", t.root_partuuid),
        ] {
            let d = Path::new("/dev/disk").join(dir);
            std::fs::create_dir_all(&d)?;
            let link = d.join(id.to_string());
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(t.root_device, &link)
                .with_context(|| format!("create {}", link.display()))?;
            links.push(link);
        }
        Ok(DiskLinks(links))
    }
}

impl Drop for DiskLinks {
    fn drop(&mut self) {
        for l in &self.0 {
            let _ = std::fs::remove_file(l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_kernel_wins_and_its_initrd_is_found() {
        let d = tempfile::tempdir().unwrap();
        let boot = d.path().join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        for f in [
            "vmlinuz-6.1.0-9-amd64",
            "vmlinuz-6.1.0-10-amd64",
            "initrd.img-6.1.0-10-amd64",
            "config-6.1.0-10-amd64",
        ] {
            std::fs::write(boot.join(f), b"x").unwrap();
        }
        let k = find_kernels(d.path()).unwrap();
        assert_eq!(k.last().unwrap(), "vmlinuz-6.1.0-10-amd64");
        assert_eq!(
            initrd_for(d.path(), "vmlinuz-6.1.0-10-amd64").as_deref(),
            Some("initrd.img-6.1.0-10-amd64")
        );
        assert_eq!(initrd_for(d.path(), "vmlinuz-6.1.0-9-amd64"), None);
    }

    #[test]
    fn no_kernel_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let esp = d.path().join("boot/efi");
        std::fs::create_dir_all(&esp).unwrap();
        let t = BootTarget {
            root: d.path(),
            esp: &esp,
            root_device: Path::new("/dev/vda1"),
            root_fs_uuid: Uuid::nil(),
            root_partuuid: Uuid::nil(),
        };
        let err = install(&t).unwrap_err().to_string();
        assert!(
            err.contains("no kernel") && err.contains("unpartitioned-from-rootfs"),
            "{err}"
        );
    }

    #[test]
    fn generated_config_boots_by_fs_uuid_and_partuuid() {
        let d = tempfile::tempdir().unwrap();
        let t = BootTarget {
            root: d.path(),
            esp: d.path(),
            root_device: Path::new("/dev/vda1"),
            root_fs_uuid: Uuid::from_u128(1),
            root_partuuid: Uuid::from_u128(2),
        };
        let cfg = grub_cfg(&t, "vmlinuz", Some("initrd.img"));
        assert!(cfg.contains(
            "search --no-floppy --fs-uuid --set=root 00000000-0000-0000-0000-000000000001"
        ));
        assert!(
            cfg.contains("linux /boot/vmlinuz root=PARTUUID=00000000-0000-0000-0000-000000000002")
        );
        assert!(cfg.contains("initrd /boot/initrd.img"));
    }
}
