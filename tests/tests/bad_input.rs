//! Bad input to the rootfs build methods: every case ends in a failure line
//! (`status` 1) with a message naming the problem, well before any timeout,
//! and never in a success.

use std::time::{Duration, Instant};

use test_support::http_fixture::HttpFixture;
use tests::{busybox_rootfs_tar_gz, guest_url, BuildServer};

/// Boots a build server for `method` on `url` and expects a failure whose
/// message contains every one of `needles`.
async fn expect_failure(
    fixture: &HttpFixture,
    extra: &str,
    volume_size: u64,
    needles: &[&str],
) -> String {
    let started = Instant::now();
    let mut server = BuildServer {
        cmdline: format!("NO_METADATA=1 {extra}"),
        tags: None,
        volume_size,
        artifacts: Some(fixture.addr()),
        ..Default::default()
    }
    .start()
    .unwrap();
    let line = server.wait_done(Duration::from_secs(180)).await.unwrap();
    assert_eq!(
        line.status,
        "1",
        "must fail: {line:?}\n{}",
        server.console()
    );
    for n in needles {
        assert!(line.message.contains(n), "'{n}' not in: {}", line.message);
    }
    // "Within seconds": boot (~3 s under TCG) plus the failing step, far
    // from the build timeout. Generous for a loaded CI machine.
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
    line.message
}

fn rootfs_cmdline(path: &str) -> String {
    format!(
        "build_method=unpartitioned-from-rootfs rootfs_url={}",
        guest_url(path)
    )
}

fn tar_with(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(if *kind == tar::EntryType::Regular {
            5
        } else {
            0
        });
        // Write the name bytes directly: tar's set_path refuses `..`.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        h.set_cksum();
        let data: &[u8] = if *kind == tar::EntryType::Regular {
            b"evil\n"
        } else {
            b""
        };
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_rootfs_url_target_fails_with_the_status() {
    let fixture = HttpFixture::start(vec![]).unwrap();
    expect_failure(
        &fixture,
        &rootfs_cmdline("/missing.tar.gz"),
        64 << 20,
        &["404", "missing.tar.gz"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_cut_more_often_than_the_retries_fails() {
    let tarball = busybox_rootfs_tar_gz("x", false);
    let fixture = HttpFixture::start(vec![("/r.tar.gz".into(), tarball.into())]).unwrap();
    fixture.cut_after(100_000, 1000);
    expect_failure(
        &fixture,
        &rootfs_cmdline("/r.tar.gz"),
        64 << 20,
        &["dropped", "gave up"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_tar_fails() {
    let tarball = busybox_rootfs_tar_gz("x", false);
    let mut plain = Vec::new();
    std::io::copy(&mut flate2::read::GzDecoder::new(&tarball[..]), &mut plain).unwrap();
    plain.truncate(plain.len() / 2);
    let fixture = HttpFixture::start(vec![("/r.tar".into(), plain.into())]).unwrap();
    expect_failure(
        &fixture,
        &rootfs_cmdline("/r.tar"),
        64 << 20,
        &["truncated"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_gzip_and_zstd_streams_fail() {
    let mut gz = busybox_rootfs_tar_gz("x", false);
    let mid = gz.len() / 2;
    for b in &mut gz[mid..mid + 64] {
        *b ^= 0x5a;
    }
    // A zstd frame header followed by garbage.
    let mut zst = vec![0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x58];
    zst.extend((0..4096u32).map(|i| (i * 7919 % 251) as u8));
    let fixture = HttpFixture::start(vec![
        ("/r.tar.gz".into(), gz.into()),
        ("/r.tar.zst".into(), zst.into()),
    ])
    .unwrap();
    // Flipped bytes inside deflate data mostly decode to garbage rather than
    // fail the inflater: the tar layer notices first, or gzip's CRC at the end.
    expect_failure(
        &fixture,
        &rootfs_cmdline("/r.tar.gz"),
        64 << 20,
        &["corrupt"],
    )
    .await;
    expect_failure(&fixture, &rootfs_cmdline("/r.tar.zst"), 64 << 20, &["zstd"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sha256_mismatch_fails() {
    let tarball = busybox_rootfs_tar_gz("x", false);
    let fixture = HttpFixture::start(vec![("/r.tar.gz".into(), tarball.into())]).unwrap();
    let wrong = "0".repeat(64);
    let cmd = format!("{} rootfs_sha256={wrong}", rootfs_cmdline("/r.tar.gz"));
    expect_failure(&fixture, &cmd, 64 << 20, &["sha256 mismatch", &wrong]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rootfs_larger_than_the_volume_fails() {
    // 96 MiB of zeros compress to almost nothing over the wire but do not
    // fit on a 48 MiB volume.
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_size(96 << 20);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    b.append_data(
        &mut h,
        "big",
        std::io::Read::take(std::io::repeat(0), 96 << 20),
    )
    .unwrap();
    let gz = b.into_inner().unwrap().finish().unwrap();
    let fixture = HttpFixture::start(vec![("/big.tar.gz".into(), gz.into())]).unwrap();
    expect_failure(
        &fixture,
        &rootfs_cmdline("/big.tar.gz"),
        48 << 20,
        &["volume is full", "larger"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_that_does_not_exist_fails() {
    let fixture = HttpFixture::start(vec![]).unwrap();
    let cmd = format!("{} volume=/dev/vdz", rootfs_cmdline("/never-fetched.tar"));
    let msg = expect_failure(
        &fixture,
        &cmd,
        64 << 20,
        &["/dev/vdz", "does not exist", "/dev/vda"],
    )
    .await;
    assert!(
        fixture.request_count() == 0,
        "nothing fetched before the volume is checked: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_tar_entries_are_refused() {
    use tar::EntryType::{Link, Regular, Symlink};
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("dotdot", tar_with(&[("../etc/x", Regular, "")]), "../etc/x"),
        ("absolute", tar_with(&[("/abs", Regular, "")]), "/abs"),
        (
            "symlink",
            tar_with(&[("evil", Symlink, "/etc"), ("evil/passwd", Regular, "")]),
            "evil/passwd",
        ),
        ("hardlink", tar_with(&[("h", Link, "/etc/passwd")]), "h"),
    ];
    let files = cases
        .iter()
        .map(|(n, t, _)| (format!("/{n}.tar"), t.clone().into()))
        .collect();
    let fixture = HttpFixture::start(files).unwrap();
    for (name, _, entry) in &cases {
        let msg = expect_failure(
            &fixture,
            &rootfs_cmdline(&format!("/{name}.tar")),
            64 << 20,
            &["outside"],
        )
        .await;
        assert!(msg.contains(entry), "{name}: {msg}");
    }
}
