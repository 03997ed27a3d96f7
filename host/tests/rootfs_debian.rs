//! `debian:bookworm` through mmdebstrap: a bootable rootfs (kernel, GRUB,
//! serial console). Downloads about 130 MB from Debian's archive; nothing
//! is cached.

mod rootfs_common;

use std::process::Command;
use std::time::Instant;

use host::rootfs::{build, DebianOptions, Options, Source};
use rootfs_common::*;

#[test]
fn debian_bookworm_has_a_kernel_and_grub() {
    if !have("mmdebstrap") {
        // scripts/setup.sh installs it: this only happens outside the
        // project's setup.
        println!("SKIPPED: mmdebstrap is not installed (apt-get install mmdebstrap)");
        return;
    }
    let t = tempdir();
    let out = t.path().join("bookworm.tar.zst");
    let src: Source = "debian:bookworm".parse().unwrap();
    let opts = Options {
        debian: DebianOptions {
            hostname: "imgforge-debian".into(),
            ..DebianOptions::default()
        },
        ..Options::default()
    };
    let start = Instant::now();
    let report = build(&src, &out, &opts).unwrap();
    println!(
        "debian:bookworm: {} entries, {} bytes (zstd) in {:?}",
        report.entries,
        report.size,
        start.elapsed()
    );
    assert_eq!(report.sha256, file_sha256(&out));

    // GNU tar reads it (and is faster than a debug build of the crates).
    let tar = |args: &[&str]| {
        let o = Command::new("tar").args(args).arg(&out).output().unwrap();
        assert!(
            o.status.success(),
            "tar {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let listing = tar(&["-tf"]);
    let names: Vec<String> = listing
        .lines()
        .map(|n| n.trim_start_matches("./").to_string())
        .collect();
    let extract = |name: &str| {
        let o = Command::new("tar")
            .arg("-xOf")
            .arg(&out)
            .arg(name)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "tar -xOf {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let grub_cfg = extract("./etc/default/grub.d/50-imgforge-serial.cfg");
    let hostname = extract("./etc/hostname");
    assert_eq!(names.len() as u64, report.entries);
    assert!(
        names.iter().any(|n| n.starts_with("boot/vmlinuz-")),
        "no boot/vmlinuz-*"
    );
    assert!(
        names.iter().any(|n| n.starts_with("boot/initrd.img-")),
        "no boot/initrd.img-*"
    );
    assert!(
        names.iter().any(|n| n == "usr/sbin/grub-install"),
        "no usr/sbin/grub-install"
    );
    assert!(names
        .iter()
        .any(|n| n == "usr/lib/systemd/systemd" || n == "lib/systemd/systemd"));
    assert!(names
        .iter()
        .any(|n| n == "sbin/mke2fs" || n == "usr/sbin/mke2fs"));
    assert!(
        grub_cfg.contains("GRUB_CMDLINE_LINUX=\"console=tty0 console=ttyS0,115200\""),
        "{grub_cfg}"
    );
    assert!(
        grub_cfg.contains("GRUB_TIMEOUT=1")
            && grub_cfg.contains("GRUB_TERMINAL=\"console serial\"")
    );
    assert_eq!(hostname, "imgforge-debian\n");
    assert_eq!(names[0], "", "the root comes first");
}
