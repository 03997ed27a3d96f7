//! The end-to-end flow on the local provider: `imgforge build
//! --rootfs debian:bookworm` (mmdebstrap, then from-rootfs in a QEMU build
//! server, GRUB installed from inside the rootfs), `imgforge boot IMAGE` to
//! a login prompt under OVMF, and `imgforge inspect` on the exported raw
//! disk.

use std::ffi::OsStr;
use std::time::Duration;

use tests::{bootscript_dir, judge, LocalHome};

#[test]
fn debian_bookworm_builds_boots_to_login_and_inspects() {
    let home = LocalHome::new();
    let report = home.json([
        "build",
        "--provider",
        "local",
        "--rootfs",
        "debian:bookworm",
        "--hostname",
        "imgforge-debian",
        "--name",
        "t",
        "--size",
        "2G",
        "--bootscript-dir",
        bootscript_dir().to_str().unwrap(),
    ]);
    assert_eq!(report["done"]["status"], "0", "{report}");
    home.assert_no_servers_left();

    let boot = home.json([
        "boot",
        "t",
        "--expect",
        "login:",
        "--timeout",
        &Duration::from_secs(300).as_secs().to_string(),
    ]);
    assert!(
        boot["matched"]
            .as_str()
            .unwrap()
            .contains("imgforge-debian login:"),
        "{boot}"
    );

    let raw = home.path().join("t.raw");
    home.json([
        "image".as_ref(),
        "export".as_ref(),
        OsStr::new("t"),
        "-o".as_ref(),
        raw.as_os_str(),
        "--format".as_ref(),
        "raw".as_ref(),
    ]);
    let sgdisk = judge("sgdisk", &[OsStr::new("-v"), raw.as_os_str()]).unwrap();
    assert!(sgdisk.contains("No problems found"), "{sgdisk}");

    let facts = home.json(["inspect".as_ref(), raw.as_os_str()]);
    assert_eq!(facts["partition_table"], "gpt", "{facts}");
    let partitions = facts["partitions"].as_array().unwrap();
    let esp = partitions
        .iter()
        .find(|p| p["number"] == 15)
        .expect("partition 15 (ESP)");
    assert_eq!(esp["type_name"], "EFI System");
    let files: Vec<&str> = esp["filesystem"]["fat"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        files
            .iter()
            .any(|f| f.eq_ignore_ascii_case("EFI/BOOT/BOOTX64.EFI")),
        "{files:?}"
    );
    let root = partitions
        .iter()
        .find(|p| p["number"] == 1)
        .expect("partition 1 (root)");
    let ext4 = &root["filesystem"]["ext4"];
    assert_eq!(
        ext4["os_release"]["pretty_name"], "Debian GNU/Linux 12 (bookworm)",
        "{root}"
    );
    assert!(
        ext4["kernels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k.as_str().unwrap().contains("vmlinuz-")),
        "{root}"
    );
    assert_eq!(ext4["hostname"], "imgforge-debian");
}
