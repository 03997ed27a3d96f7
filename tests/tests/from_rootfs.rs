//! from-rootfs and unpartitioned-from-rootfs end to end: the agent, booted
//! in a build server (QEMU, TCG), streams a rootfs tarball from the host
//! onto a blank volume; independent tools judge the result, and the result
//! boots under UEFI.

use std::ffi::OsStr;
use std::time::Duration;

use contract::{LayoutEntry, Method};
use test_support::http_fixture::HttpFixture;
use tests::{boot_uefi, busybox_rootfs_tar_gz, guest_url, judge, slice_to_file, BuildServer};

const BUILD_TIMEOUT: Duration = Duration::from_secs(240);

fn layout_entry<'a>(layout: &'a [LayoutEntry], role: &str) -> &'a LayoutEntry {
    layout
        .iter()
        .find(|e| e.role == role)
        .unwrap_or_else(|| panic!("no {role} in {layout:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn from_rootfs_builds_a_disk_that_boots_under_uefi() {
    let marker = "IMGFORGE-E2E-FROM-ROOTFS-OK";
    let tarball = busybox_rootfs_tar_gz(marker, true);
    let digest = initrd::sha256_hex(&tarball);
    let fixture =
        HttpFixture::start(vec![("/rootfs.tar.gz".into(), tarball.clone().into())]).unwrap();
    let mut server = BuildServer {
        tags: Some(vec![
            "build_method=from-rootfs".into(),
            format!("rootfs_url={}", guest_url("/rootfs.tar.gz")),
            format!("rootfs_sha256={digest}"),
        ]),
        volume_size: 512 << 20,
        artifacts: Some(fixture.addr()),
        ..Default::default()
    }
    .start()
    .unwrap();
    let line = server.wait_done(BUILD_TIMEOUT).await.unwrap();
    assert!(line.is_success(), "{line:?}\n{}", server.console());
    assert_eq!(line.method, Some(Method::FromRootfs));
    assert_eq!(line.bytes, Some(tarball.len() as u64));
    let layout = line.layout.clone().unwrap();
    server.vm.kill();

    // Independent judges: sgdisk for the table, e2fsck and fsck.fat for the
    // filesystems (read at the offsets the done line reports).
    let disk = server.disk.clone();
    let out = judge("sgdisk", &[OsStr::new("-v"), disk.as_os_str()]).unwrap();
    assert!(out.contains("No problems found"), "{out}");
    let root = layout_entry(&layout, "root");
    let esp = layout_entry(&layout, "esp");
    assert_eq!(root.number, Some(1));
    assert_eq!(esp.number, Some(15));
    let root_img = server.dir.path().join("root.img");
    slice_to_file(&disk, root.start_bytes, root.size_bytes, &root_img).unwrap();
    judge("e2fsck", &[OsStr::new("-fn"), root_img.as_os_str()]).unwrap();
    let esp_img = server.dir.path().join("esp.img");
    slice_to_file(&disk, esp.start_bytes, esp.size_bytes, &esp_img).unwrap();
    judge("fsck.fat", &[OsStr::new("-n"), esp_img.as_os_str()]).unwrap();

    // fstab names the partitions by PARTUUID (read back with debugfs).
    let fstab = judge(
        "debugfs",
        &[
            OsStr::new("-R"),
            OsStr::new("cat /etc/fstab"),
            root_img.as_os_str(),
        ],
    )
    .unwrap();
    assert!(
        fstab.contains(&format!("PARTUUID={}", root.partuuid.as_deref().unwrap())),
        "{fstab}"
    );

    // The result boots under OVMF and runs the rootfs's init.
    let seen = boot_uefi(&disk, marker, Duration::from_secs(180)).unwrap();
    assert!(seen.contains(marker));
}

#[tokio::test(flavor = "multi_thread")]
async fn unpartitioned_from_rootfs_puts_ext4_on_the_whole_volume() {
    let tarball = busybox_rootfs_tar_gz("unused", false);
    let fixture = HttpFixture::start(vec![("/rootfs.tar.gz".into(), tarball.into())]).unwrap();
    // The connection drops twice mid-stream: the agent resumes with Range
    // requests instead of failing or starting over.
    fixture.cut_after(300_000, 2);
    let mut server = BuildServer {
        cmdline: format!(
            "NO_METADATA=1 build_method=unpartitioned-from-rootfs rootfs_url={}",
            guest_url("/rootfs.tar.gz")
        ),
        tags: None,
        volume_size: 128 << 20,
        artifacts: Some(fixture.addr()),
        ..Default::default()
    }
    .start()
    .unwrap();
    let line = server.wait_done(BUILD_TIMEOUT).await.unwrap();
    assert!(line.is_success(), "{line:?}\n{}", server.console());
    let ranges: Vec<_> = fixture
        .requests()
        .into_iter()
        .filter_map(|r| r.range)
        .collect();
    assert_eq!(ranges.len(), 2, "two resumes: {ranges:?}");
    assert!(ranges[0].starts_with("bytes=300000-"), "{ranges:?}");
    server.vm.kill();
    let disk = server.disk.clone();
    judge("e2fsck", &[OsStr::new("-fn"), disk.as_os_str()]).unwrap();
    let hostname = judge(
        "debugfs",
        &[
            OsStr::new("-R"),
            OsStr::new("cat /etc/hostname"),
            disk.as_os_str(),
        ],
    )
    .unwrap();
    assert!(hostname.contains("imgforge-test"), "{hostname}");
    let busybox = judge(
        "debugfs",
        &[
            OsStr::new("-R"),
            OsStr::new("stat /bin/busybox"),
            disk.as_os_str(),
        ],
    )
    .unwrap();
    assert!(busybox.contains("Mode:  0755"), "{busybox}");
    // No partition table: sgdisk finds none.
    let out = std::process::Command::new("sgdisk")
        .arg("-p")
        .arg(&disk)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("efisystem"), "{text}");
}
