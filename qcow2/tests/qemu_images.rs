//! Images written by qemu-img read back byte for byte like `qemu-img convert -O raw`.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};

use common::*;
use qcow2::{Compression, Extent};

/// A raw source with data, text, zeros and holes, converted with `options`.
fn convert(dir: &Path, name: &str, options: &[&str]) -> PathBuf {
    let source = dir.join("source.raw");
    if !source.exists() {
        write_source(&source, SOURCE_SIZE, 42);
    }
    let image = dir.join(format!("{name}.qcow2"));
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(options);
    args.extend_from_slice(&[path_str(&source), path_str(&image)]);
    qemu_img(&args);
    image
}

fn count(layout: &qcow2::Layout, kind: fn(&Extent) -> bool) -> usize {
    layout.extents().iter().filter(|e| kind(e)).count()
}

fn is_data(extent: &Extent) -> bool {
    matches!(extent, Extent::Data { .. })
}

fn is_compressed(extent: &Extent) -> bool {
    matches!(extent, Extent::Compressed { .. })
}

fn is_zero(extent: &Extent) -> bool {
    matches!(extent, Extent::Zero { .. })
}

#[test]
fn plain() {
    let dir = tempfile::tempdir().unwrap();
    let layout = assert_same_as_qemu(&convert(dir.path(), "plain", &[]));
    assert_eq!(layout.header().version, 3);
    assert_eq!(layout.cluster_size(), 65536);
    assert!(count(&layout, is_data) > 0 && count(&layout, is_zero) > 0);
    assert_eq!(count(&layout, is_compressed), 0);
}

#[test]
fn zlib_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let layout = assert_same_as_qemu(&convert(dir.path(), "zlib", &["-c"]));
    assert_eq!(layout.header().compression, Compression::Zlib);
    assert!(count(&layout, is_compressed) > 10);
}

#[test]
fn zstd_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let layout = assert_same_as_qemu(&convert(
        dir.path(),
        "zstd",
        &["-c", "-o", "compression_type=zstd"],
    ));
    assert_eq!(layout.header().compression, Compression::Zstd);
    assert!(count(&layout, is_compressed) > 10);
}

#[test]
fn clusters_of_2_mib() {
    let dir = tempfile::tempdir().unwrap();
    let layout = assert_same_as_qemu(&convert(
        dir.path(),
        "big-clusters",
        &["-o", "cluster_size=2M"],
    ));
    assert_eq!(layout.cluster_size(), 2 << 20);
    let compressed = assert_same_as_qemu(&convert(
        dir.path(),
        "big-clusters-zlib",
        &["-c", "-o", "cluster_size=2M"],
    ));
    assert!(count(&compressed, is_compressed) > 0);
    let zstd = assert_same_as_qemu(&convert(
        dir.path(),
        "big-clusters-zstd",
        &["-c", "-o", "cluster_size=2M,compression_type=zstd"],
    ));
    assert!(count(&zstd, is_compressed) > 0);
}

#[test]
fn clusters_of_512_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let layout = assert_same_as_qemu(&convert(
        dir.path(),
        "small-clusters",
        &["-o", "cluster_size=512"],
    ));
    assert_eq!(layout.cluster_size(), 512);
    let compressed = assert_same_as_qemu(&convert(
        dir.path(),
        "small-clusters-zlib",
        &["-c", "-o", "cluster_size=512"],
    ));
    assert!(count(&compressed, is_compressed) > 100);
    let zstd = assert_same_as_qemu(&convert(
        dir.path(),
        "small-clusters-zstd",
        &["-c", "-o", "cluster_size=512,compression_type=zstd"],
    ));
    assert!(count(&zstd, is_compressed) > 100);
}

#[test]
fn version_2() {
    let dir = tempfile::tempdir().unwrap();
    let layout = assert_same_as_qemu(&convert(dir.path(), "v2", &["-o", "compat=0.10"]));
    assert_eq!(layout.header().version, 2);
    assert_eq!(layout.header().header_length, 72);
    let compressed = assert_same_as_qemu(&convert(
        dir.path(),
        "v2-zlib",
        &["-c", "-o", "compat=0.10"],
    ));
    assert_eq!(compressed.header().version, 2);
    assert!(count(&compressed, is_compressed) > 10);
}

/// 1.5 GiB with 64 KiB clusters: each L1 entry maps 512 MiB, and the middle
/// one is unallocated. Too large for a Vec, checked against the
/// reference file on the fly.
#[test]
fn sparse_with_large_holes() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 3 << 29;
    let source = dir.path().join("sparse.raw");
    let file = File::create(&source).unwrap();
    file.set_len(size).unwrap();
    let mut rng = Rng::new(7);
    for offset in [0, (1 << 30) + 12345, size - 70_000] {
        let mut data = vec![0u8; 70_000];
        rng.fill(&mut data);
        std::os::unix::fs::FileExt::write_all_at(&file, &data, offset).unwrap();
    }
    drop(file);
    let image = dir.path().join("sparse.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path_str(&source),
        path_str(&image),
    ]);

    let layout = layout_of(&image);
    assert_eq!(layout.virtual_size(), size);
    assert!(
        layout.data_bytes() < 1 << 20,
        "only the written clusters hold data"
    );
    assert!(
        layout
            .zero_extents()
            .iter()
            .any(|e| e.guest_len() > 512 << 20),
        "an unallocated L1 entry makes one zero range of 512 MiB or more"
    );
    let mut sink = CheckingSink {
        expected: File::open(&source).unwrap(),
        size,
        calls: Vec::new(),
    };
    copy_file(
        &layout,
        &image,
        layout.first_data_offset().unwrap(),
        &mut sink,
    )
    .unwrap();
    sink.assert_covered_once();

    // A volume smaller than the virtual size is refused before any table is read.
    let err = qcow2::Layout::read(&mut File::open(&image).unwrap(), file_len(&image), size - 1)
        .unwrap_err();
    assert!(
        matches!(err, qcow2::Error::TooLarge { virtual_size, volume_size } if virtual_size == size && volume_size == size - 1),
        "{err}"
    );
}

/// `preallocation=metadata`: every cluster is allocated, the file is sparse.
#[test]
fn preallocated_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("prealloc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        path_str(&image),
        "8M",
    ]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 100k",
            "-c",
            "write -P 0x33 7M 4k",
            path_str(&image),
        ],
    );
    let layout = assert_same_as_qemu(&image);
    assert_eq!(layout.data_bytes(), 8 << 20, "all clusters are allocated");
}

/// Zero clusters made by qemu-io: with the zero flag and a preserved
/// allocation (`write -z`), and unmapped (`write -z -u`).
#[test]
fn zero_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let image = convert(dir.path(), "zeroed", &[]);
    let before = layout_of(&image);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -z 0 256k",
            "-c",
            "write -z -u 1M 192k",
            path_str(&image),
        ],
    );
    let after = assert_same_as_qemu(&image);
    assert!(after.zero_bytes() >= before.zero_bytes() + 256 * 1024);
    assert!(after.extents().iter().any(|e| matches!(
        e,
        Extent::Zero {
            guest_offset: 0,
            ..
        }
    )));
    let v2 = convert(dir.path(), "zeroed-v2", &["-o", "compat=0.10"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -z 0 256k", path_str(&v2)],
    );
    assert_same_as_qemu(&v2);
}

/// A disk without any data: every byte is a zero range, nothing is read.
#[test]
fn empty_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("empty.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&image), "5M"]);
    let layout = assert_same_as_qemu(&image);
    assert_eq!(layout.first_data_offset(), None);
    assert_eq!(
        layout.extents(),
        &[Extent::Zero {
            guest_offset: 0,
            len: 5 << 20
        }]
    );
}

/// Internal snapshots do not disturb the active L1 table.
#[test]
fn with_internal_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let image = convert(dir.path(), "snap", &[]);
    qemu_img(&["snapshot", "-c", "before", path_str(&image)]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x77 64k 128k",
            path_str(&image),
        ],
    );
    let layout = assert_same_as_qemu(&image);
    assert_eq!(layout.header().nb_snapshots, 1);
}

/// Counts the metadata reads, as an HTTP `Range` client would issue them.
struct CountingReads {
    file: File,
    calls: usize,
    bytes: u64,
}

impl qcow2::ReadAt for CountingReads {
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.calls += 1;
        self.bytes += buf.len() as u64;
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }
}

/// Header, L1 and L2 tables take a handful of reads, even with 512-byte
/// clusters whose L2 tables qemu-img scatters between the data.
#[test]
fn few_metadata_reads() {
    let dir = tempfile::tempdir().unwrap();
    for (name, options, max_calls) in [
        ("default", &[][..], 3),
        ("small", &["-o", "cluster_size=512"][..], 6),
    ] {
        let image = convert(dir.path(), name, options);
        let mut reads = CountingReads {
            file: File::open(&image).unwrap(),
            calls: 0,
            bytes: 0,
        };
        let layout = qcow2::Layout::read(&mut reads, file_len(&image), u64::MAX).unwrap();
        let l2_tables = layout
            .virtual_size()
            .div_ceil(layout.cluster_size() * layout.cluster_size() / 8);
        assert!(
            reads.calls <= max_calls,
            "{name}: {} reads ({} bytes) for {l2_tables} L2 tables",
            reads.calls,
            reads.bytes
        );
    }
}
