//! A real Debian bookworm rootfs (mmdebstrap: kernel, grub-efi-amd64,
//! systemd-sysv) built with from-rootfs, GRUB installed from inside the
//! rootfs, then booted under OVMF to a login prompt on the serial console.

use std::ffi::OsStr;
use std::time::Duration;

use tests::http_fixture::HttpFixture;
use tests::{boot_uefi, debian_bookworm_tar, guest_url, judge, BuildServer};

#[tokio::test(flavor = "multi_thread")]
async fn debian_bookworm_boots_to_a_login_prompt() {
    let tar = debian_bookworm_tar();
    let fixture = HttpFixture::start(vec![("/debian.tar".into(), tar.into())]).unwrap();
    let mut server = BuildServer {
        tags: Some(vec![
            "build_method=from-rootfs".into(),
            format!("rootfs_url={}", guest_url("/debian.tar")),
        ]),
        volume_size: 2 << 30,
        artifacts: Some(fixture.addr()),
        ..Default::default()
    }
    .start()
    .unwrap();
    let line = server.wait_done(Duration::from_secs(600)).await.unwrap();
    assert!(line.is_success(), "{line:?}\n{}", server.console());
    let console = server.console();
    assert!(
        console.contains("installed GRUB from the rootfs"),
        "{console}"
    );
    server.vm.kill();
    let disk = server.disk.clone();
    let out = judge("sgdisk", &[OsStr::new("-v"), disk.as_os_str()]).unwrap();
    assert!(out.contains("No problems found"), "{out}");
    let seen = boot_uefi(&disk, r"login:", Duration::from_secs(300)).unwrap();
    assert!(seen.contains("imgforge-debian login:"), "{seen}");
}
