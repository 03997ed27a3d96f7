//! from-qcow2 end to end: a bootable test disk (itself built by the agent
//! with from-rootfs) converted by `qemu-img` into raw, compressed raw and
//! qcow2 variants, each written by the agent onto a larger volume that is
//! filled with garbage first. The volume must equal `qemu-img convert -O
//! raw` of the same file outside the GPT structures the growth step
//! rewrites; the growth is judged by sgdisk and e2fsck, and the result boots
//! under OVMF.

use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use test_support::http_fixture::HttpFixture;
use tests::{boot_uefi, busybox_rootfs_tar_gz, guest_url, judge, slice_to_file, BuildServer};
use tokio::sync::OnceCell;

const TIMEOUT: Duration = Duration::from_secs(300);
const MARKER: &str = "IMGFORGE-E2E-FROM-QCOW2-OK";
/// The test disk's size, and the volume it is written onto.
const DISK_BYTES: u64 = 128 << 20;
const VOLUME_BYTES: u64 = 256 << 20;
/// The primary GPT (MBR, header, 128 entries) and the backup at the end.
const GPT_HEAD: u64 = 34 * 512;
const GPT_TAIL: u64 = 33 * 512;

/// A bootable raw disk: busybox and the Debian kernel written by
/// from-rootfs (GPT, 40 MiB ESP, ext4 root, GRUB), built once per run.
async fn bootable_disk() -> &'static Path {
    static DISK: OnceCell<(tempfile::TempDir, PathBuf)> = OnceCell::const_new();
    let (_, path) = DISK
        .get_or_init(|| async {
            let tarball = busybox_rootfs_tar_gz(MARKER, true);
            let fixture =
                HttpFixture::start(vec![("/rootfs.tar.gz".into(), tarball.into())]).unwrap();
            let mut server = BuildServer {
                tags: Some(vec![
                    "build_method=from-rootfs".into(),
                    "efi_size=40M".into(),
                    format!("rootfs_url={}", guest_url("/rootfs.tar.gz")),
                ]),
                volume_size: DISK_BYTES,
                artifacts: Some(fixture.addr()),
                ..Default::default()
            }
            .start()
            .unwrap();
            let line = server.wait_done(TIMEOUT).await.unwrap();
            assert!(line.is_success(), "{line:?}");
            server.vm.kill();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bootable.raw");
            std::fs::copy(&server.disk, &path).unwrap();
            (dir, path)
        })
        .await;
    path
}

fn run(program: &str, args: &[&OsStr]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img convert -O raw` of `image`: what the volume must hold.
fn reference_raw(image: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("reference.raw");
    run(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            image.as_os_str(),
            out.as_os_str(),
        ],
    );
    out
}

/// Compares `volume` with `reference` over the reference's length, except
/// `[0, skip_head)` and the last `skip_tail` bytes. Reports the first
/// difference.
fn assert_same_bytes(volume: &Path, reference: &Path, skip_head: u64, skip_tail: u64) {
    let len = std::fs::metadata(reference).unwrap().len();
    let mut a = std::fs::File::open(volume).unwrap();
    let mut b = std::fs::File::open(reference).unwrap();
    a.seek(SeekFrom::Start(skip_head)).unwrap();
    b.seek(SeekFrom::Start(skip_head)).unwrap();
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = skip_head;
    let end = len - skip_tail;
    while offset < end {
        let n = ((end - offset) as usize).min(x.len());
        a.read_exact(&mut x[..n]).unwrap();
        b.read_exact(&mut y[..n]).unwrap();
        if x[..n] != y[..n] {
            let i = x[..n]
                .iter()
                .zip(&y[..n])
                .position(|(p, q)| p != q)
                .unwrap();
            panic!(
                "volume and qemu-img's raw differ at byte {} (volume {:#04x}, reference {:#04x})",
                offset + i as u64,
                x[i],
                y[i]
            );
        }
        offset += n as u64;
    }
}

/// Runs from-qcow2 for `file` (served at `/<name>`) onto a garbage-filled
/// volume; returns the server (stopped) and the done line.
async fn write_image(
    file: &Path,
    extra_tags: &[&str],
    volume_size: u64,
) -> (tests::Running, contract::DoneLine) {
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let fixture =
        HttpFixture::start(vec![(format!("/{name}"), file.to_path_buf().into())]).unwrap();
    let mut tags = vec![
        "build_method=from-qcow2".to_string(),
        format!("disk_img_url={}", guest_url(&format!("/{name}"))),
    ];
    tags.extend(extra_tags.iter().map(|t| t.to_string()));
    let mut server = BuildServer {
        tags: Some(tags),
        volume_size,
        artifacts: Some(fixture.addr()),
        volume_fill: Some(0xAA),
        ..Default::default()
    }
    .start()
    .unwrap();
    let line = server.wait_done(TIMEOUT).await.unwrap();
    server.vm.kill();
    (server, line)
}

/// The grown GPT: sgdisk finds no problem and partition 1 (root) ends at
/// the last usable sector of the volume; its ext4 is clean.
fn assert_grown(server: &tests::Running, line: &contract::DoneLine) {
    let out = judge("sgdisk", &[OsStr::new("-v"), server.disk.as_os_str()]).unwrap();
    assert!(out.contains("No problems found"), "{out}");
    let layout = line.layout.clone().unwrap();
    let root = layout.iter().find(|e| e.number == Some(1)).unwrap();
    let end = root.start_bytes + root.size_bytes;
    assert_eq!(end, VOLUME_BYTES - GPT_TAIL, "{root:?}");
    let root_img = server.dir.path().join("root.img");
    slice_to_file(&server.disk, root.start_bytes, root.size_bytes, &root_img).unwrap();
    judge("e2fsck", &[OsStr::new("-fn"), root_img.as_os_str()]).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_and_zstd_raw_images_are_written_grown_and_boot() {
    let disk = bootable_disk().await;
    let dir = tempfile::tempdir().unwrap();
    let zst = dir.path().join("disk.raw.zst");
    run(
        "zstd",
        &[
            OsStr::new("-q"),
            OsStr::new("-3"),
            disk.as_os_str(),
            OsStr::new("-o"),
            zst.as_os_str(),
        ],
    );
    for (image, check_boot) in [(disk.to_path_buf(), false), (zst, true)] {
        let sha = initrd::sha256_hex(&std::fs::read(&image).unwrap());
        let (server, line) = write_image(
            &image,
            &[&format!("disk_img_sha256={sha}"), "grow_fs=1"],
            VOLUME_BYTES,
        )
        .await;
        assert!(line.is_success(), "{}: {line:?}", image.display());
        assert_eq!(line.method, Some(contract::Method::FromQcow2));
        assert_grown(&server, &line);
        if check_boot {
            let seen = boot_uefi(&server.disk, MARKER, Duration::from_secs(240)).unwrap();
            assert!(seen.contains(MARKER));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_raw_images_fail_with_a_clear_message() {
    let disk = bootable_disk().await;
    let dir = tempfile::tempdir().unwrap();
    // A zstd stream cut in the middle and patched: not a valid frame.
    let zst = dir.path().join("corrupt.raw.zst");
    run(
        "zstd",
        &[
            OsStr::new("-q"),
            disk.as_os_str(),
            OsStr::new("-o"),
            zst.as_os_str(),
        ],
    );
    let mut bytes = std::fs::read(&zst).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 64].fill(0x5A);
    std::fs::write(&zst, &bytes).unwrap();
    let (_, line) = write_image(&zst, &[], VOLUME_BYTES).await;
    assert_eq!(line.status, "1", "{line:?}");
    assert!(line.message.to_lowercase().contains("zstd"), "{line:?}");

    // The right bytes with the wrong digest: refused after the last byte.
    let (_, line) = write_image(
        disk,
        &[&format!("disk_img_sha256={}", "0".repeat(64))],
        VOLUME_BYTES,
    )
    .await;
    assert_eq!(line.status, "1", "{line:?}");
    assert!(line.message.contains("sha256"), "{line:?}");

    // A 128 MiB image onto a 64 MiB volume.
    let (_, line) = write_image(disk, &[], 64 << 20).await;
    assert_eq!(line.status, "1", "{line:?}");
    assert!(line.message.contains("larger than the volume"), "{line:?}");
}

/// `qemu-img convert -O qcow2 OPTS disk out`.
fn to_qcow2(disk: &Path, out: &Path, opts: &[&str]) {
    let mut args: Vec<&OsStr> = vec![OsStr::new("convert"), OsStr::new("-O"), OsStr::new("qcow2")];
    args.extend(opts.iter().map(OsStr::new));
    args.push(disk.as_os_str());
    args.push(out.as_os_str());
    run("qemu-img", &args);
}

#[tokio::test(flavor = "multi_thread")]
async fn qcow2_variants_are_written_byte_for_byte_grown_and_boot() {
    let disk = bootable_disk().await;
    let dir = tempfile::tempdir().unwrap();
    let variants: [(&str, &[&str]); 4] = [
        ("plain", &[]),
        ("zlib", &["-c"]),
        ("zstd", &["-c", "-o", "compression_type=zstd"]),
        ("cluster-2m", &["-o", "cluster_size=2M"]),
    ];
    for (name, opts) in variants {
        let image = dir.path().join(format!("{name}.qcow2"));
        to_qcow2(disk, &image, opts);
        let reference = reference_raw(&image, dir.path());
        let (server, line) = write_image(&image, &[], VOLUME_BYTES).await;
        assert!(line.is_success(), "{name}: {line:?}");
        // Outside the GPT structures (primary at the start, the old backup
        // at the image's end) the volume is the image.
        assert_same_bytes(&server.disk, &reference, GPT_HEAD, GPT_TAIL);
        assert_grown(&server, &line);
        if name == "zstd" {
            let seen = boot_uefi(&server.disk, MARKER, Duration::from_secs(240)).unwrap();
            assert!(seen.contains(MARKER), "{name}: {seen}");
        }
    }
}

/// An image with no partition table, 192 MiB of virtual size with two
/// small data islands in large holes: the volume (full of garbage before)
/// reads as the image over its first 192 MiB.
#[tokio::test(flavor = "multi_thread")]
async fn a_sparse_qcow2_without_a_partition_table_zeroes_its_holes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("sparse.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(192 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    let island: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    f.write_all_at(&island, 3 << 20).unwrap();
    f.write_all_at(&island, 150 << 20).unwrap();
    drop(f);
    let image = dir.path().join("sparse.qcow2");
    to_qcow2(&raw, &image, &[]);
    assert!(std::fs::metadata(&image).unwrap().len() < 8 << 20);
    let (server, line) = write_image(&image, &[], VOLUME_BYTES).await;
    assert!(line.is_success(), "{line:?}");
    assert_eq!(line.layout.as_ref().unwrap()[0].size_bytes, 192u64 << 20);
    assert_same_bytes(&server.disk, &raw, 0, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_qcow2_images_fail_with_a_clear_message() {
    let disk = bootable_disk().await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.qcow2");
    to_qcow2(disk, &good, &[]);

    // A backing file.
    let top = dir.path().join("top.qcow2");
    run(
        "qemu-img",
        &[
            OsStr::new("create"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-b"),
            good.as_os_str(),
            OsStr::new("-F"),
            OsStr::new("qcow2"),
            top.as_os_str(),
        ],
    );
    let (_, line) = write_image(&top, &[], VOLUME_BYTES).await;
    assert_eq!(line.status, "1");
    assert!(line.message.contains("backing file"), "{line:?}");

    // Truncated: the data stops half-way.
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.qcow2");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (_, line) = write_image(&truncated, &[], VOLUME_BYTES).await;
    assert_eq!(line.status, "1");
    assert!(line.message.contains("truncated"), "{line:?}");

    // The first L1 entry points far outside the file.
    let mut corrupt = bytes.clone();
    let l1 = u64::from_be_bytes(corrupt[40..48].try_into().unwrap()) as usize;
    let far: u64 = (1 << 63) | (1 << 40);
    corrupt[l1..l1 + 8].copy_from_slice(&far.to_be_bytes());
    let corrupt_path = dir.path().join("corrupt-l1.qcow2");
    std::fs::write(&corrupt_path, &corrupt).unwrap();
    let (_, line) = write_image(&corrupt_path, &[], VOLUME_BYTES).await;
    assert_eq!(line.status, "1");
    assert!(line.message.contains("outside the file"), "{line:?}");

    // Larger than the volume: refused before anything is written.
    let (_, line) = write_image(&good, &[], 64 << 20).await;
    assert_eq!(line.status, "1");
    assert!(line.message.contains("larger than the volume"), "{line:?}");
}
