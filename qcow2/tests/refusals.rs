//! Images the reader must refuse, each with an error that says why.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};

use common::*;
use qcow2::{Error, Extent, Layout};

fn small_image(dir: &Path, options: &[&str]) -> PathBuf {
    let source = dir.join("source.raw");
    write_source(&source, 1 << 20, 3);
    let image = dir.join("image.qcow2");
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(options);
    args.extend_from_slice(&[path_str(&source), path_str(&image)]);
    qemu_img(&args);
    image
}

fn read_layout(bytes: &[u8]) -> qcow2::Result<Layout> {
    Layout::read(&mut bytes.to_vec(), bytes.len() as u64, u64::MAX)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn set_be_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// File offset of the first L2 table and of its first data entry.
fn first_l2_data_entry(bytes: &[u8]) -> usize {
    let l1 = be_u64(bytes, 40) as usize;
    let l2 = (be_u64(bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    (0..8192)
        .map(|i| l2 + 8 * i)
        .find(|&at| be_u64(bytes, at) & 0x00ff_ffff_ffff_fe00 != 0)
        .expect("a data cluster")
}

#[test]
fn backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        path_str(&base),
        "-F",
        "qcow2",
        path_str(&top),
    ]);
    let err = Layout::read(&mut File::open(&top).unwrap(), file_len(&top), u64::MAX).unwrap_err();
    match &err {
        Error::BackingFile { name } => assert_eq!(name, path_str(&base)),
        other => panic!("expected BackingFile, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("base.qcow2") && message.contains("qemu-img convert"),
        "{message}"
    );
    // The header alone still reads, for inspection.
    let header = qcow2::Header::read(&mut File::open(&top).unwrap(), file_len(&top)).unwrap();
    assert_eq!(header.backing_file.as_deref(), Some(path_str(&base)));
}

#[test]
fn luks_encryption() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=123456",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        path_str(&image),
        "4M",
    ]);
    let err =
        Layout::read(&mut File::open(&image).unwrap(), file_len(&image), u64::MAX).unwrap_err();
    assert!(matches!(err, Error::Encrypted { method: 2 }), "{err:?}");
    assert!(err.to_string().contains("LUKS"), "{err}");
}

#[test]
fn aes_encryption_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(small_image(dir.path(), &[])).unwrap();
    bytes[32..36].copy_from_slice(&1u32.to_be_bytes());
    let err = read_layout(&bytes).unwrap_err();
    assert!(matches!(err, Error::Encrypted { method: 1 }), "{err:?}");
}

#[test]
fn external_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("meta.qcow2");
    let data = dir.path().join("data.raw");
    let option = format!("data_file={}", path_str(&data));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &option,
        path_str(&image),
        "4M",
    ]);
    let err =
        Layout::read(&mut File::open(&image).unwrap(), file_len(&image), u64::MAX).unwrap_err();
    assert!(matches!(err, Error::ExternalDataFile), "{err:?}");
}

#[test]
fn extended_l2_entries() {
    let dir = tempfile::tempdir().unwrap();
    let image = small_image(dir.path(), &["-o", "extended_l2=on"]);
    let err =
        Layout::read(&mut File::open(&image).unwrap(), file_len(&image), u64::MAX).unwrap_err();
    assert!(matches!(err, Error::ExtendedL2), "{err:?}");
}

#[test]
fn unknown_incompatible_features() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(small_image(dir.path(), &[])).unwrap();
    let features = be_u64(&bytes, 72) | (1 << 5) | (1 << 9);
    set_be_u64(&mut bytes, 72, features);
    let err = read_layout(&bytes).unwrap_err();
    assert!(
        matches!(err, Error::UnknownIncompatibleFeatures { bits } if bits == (1 << 5) | (1 << 9))
    );
    assert!(err.to_string().contains("bits 5 and 9"), "{err}");
}

#[test]
fn marked_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(small_image(dir.path(), &[])).unwrap();
    let features = be_u64(&bytes, 72) | 2;
    set_be_u64(&mut bytes, 72, features);
    let err = read_layout(&bytes).unwrap_err();
    assert!(matches!(err, Error::MarkedCorrupt), "{err:?}");
    assert!(err.to_string().contains("qemu-img check -r all"), "{err}");
}

/// A dirty image is read (the flag is about refcounts), and says so.
#[test]
fn dirty_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let image = small_image(dir.path(), &[]);
    let clean = layout_of(&image);
    let mut bytes = std::fs::read(&image).unwrap();
    let features = be_u64(&bytes, 72) | 1;
    set_be_u64(&mut bytes, 72, features);
    let dirty = read_layout(&bytes).unwrap();
    assert!(dirty.header().is_dirty() && !clean.header().is_dirty());
    assert_eq!(dirty.extents(), clean.extents());
}

#[test]
fn not_qcow2() {
    let err = read_layout(&[0u8; 4096]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotQcow2 {
                found: [0, 0, 0, 0]
            }
        ),
        "{err:?}"
    );
    let err = read_layout(b"QF").unwrap_err();
    assert!(matches!(err, Error::TruncatedHeader { .. }), "{err:?}");
}

#[test]
fn cluster_bits_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(small_image(dir.path(), &[])).unwrap();
    for bits in [0u32, 8, 22, 63, u32::MAX] {
        bytes[20..24].copy_from_slice(&bits.to_be_bytes());
        let err = read_layout(&bytes).unwrap_err();
        assert!(
            matches!(err, Error::InvalidClusterBits(b) if b == bits),
            "{err:?}"
        );
    }
}

#[test]
fn too_large_for_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let image = small_image(dir.path(), &[]);
    let err =
        Layout::read(&mut File::open(&image).unwrap(), file_len(&image), 1 << 19).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                virtual_size: 1048576,
                volume_size: 524288
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("larger than the volume"), "{err}");
    // Exactly the volume size is fine.
    Layout::read(&mut File::open(&image).unwrap(), file_len(&image), 1 << 20).unwrap();
}

/// A virtual size whose L1 table would be huge is refused before anything
/// is allocated, whatever the volume size.
#[test]
fn absurd_virtual_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(small_image(dir.path(), &[])).unwrap();
    set_be_u64(&mut bytes, 24, u64::MAX);
    let err = read_layout(&bytes).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    // Large but within QEMU's L1 limit: the L1 table in the file is too small.
    set_be_u64(&mut bytes, 24, 1 << 40);
    let err = read_layout(&bytes).unwrap_err();
    assert!(err.to_string().contains("L1 table has 1 entries"), "{err}");
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = small_image(dir.path(), &[]);
    let bytes = std::fs::read(&image).unwrap();
    let layout = layout_of(&image);
    // Cut inside the last data cluster: the metadata points past the end.
    let cut = &bytes[..bytes.len() - 1000];
    let err = read_layout(cut).unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutsideFile {
                what: "data cluster",
                ..
            }
        ),
        "{err:?}"
    );
    // Cut inside the header.
    let err = read_layout(&bytes[..80]).unwrap_err();
    assert!(
        matches!(err, Error::TruncatedHeader { needed: 104, .. }),
        "{err:?}"
    );
    // The metadata is whole but the data stream stops early (a download cut short).
    let start = layout.first_data_offset().unwrap();
    let stream = &bytes[start as usize..bytes.len() - 1000];
    let mut sink = VecSink::new(layout.virtual_size());
    let err = qcow2::copy_data(&layout, stream, start, &mut sink).unwrap_err();
    assert!(matches!(err, Error::DataStreamEnded { .. }), "{err:?}");
    // And a stream that starts after the first data cluster is refused
    // before anything is written.
    let mut untouched = VecSink::new(layout.virtual_size());
    let err = qcow2::copy_data(
        &layout,
        &bytes[start as usize + 1..],
        start + 1,
        &mut untouched,
    )
    .unwrap_err();
    assert!(matches!(err, Error::StreamStartsTooLate { .. }), "{err:?}");
    assert!(untouched.calls.is_empty());
}

#[test]
fn corrupted_l1_and_l2_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(small_image(dir.path(), &[])).unwrap();
    let l1 = be_u64(&bytes, 40) as usize;
    let entry = first_l2_data_entry(&bytes);

    let mut misaligned_l2 = bytes.clone();
    set_be_u64(&mut misaligned_l2, l1, be_u64(&bytes, l1) + 512);
    let err = read_layout(&misaligned_l2).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Misaligned {
                what: "L2 table",
                ..
            }
        ),
        "{err:?}"
    );

    let mut l2_outside = bytes.clone();
    set_be_u64(&mut l2_outside, l1, (1 << 63) | (1 << 40));
    let err = read_layout(&l2_outside).unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutsideFile {
                what: "L2 table",
                ..
            }
        ),
        "{err:?}"
    );

    let mut data_outside = bytes.clone();
    set_be_u64(&mut data_outside, entry, (1 << 63) | (1 << 40));
    let err = read_layout(&data_outside).unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutsideFile {
                what: "data cluster",
                ..
            }
        ),
        "{err:?}"
    );

    let mut data_misaligned = bytes.clone();
    set_be_u64(&mut data_misaligned, entry, be_u64(&bytes, entry) + 4096);
    let err = read_layout(&data_misaligned).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Misaligned {
                what: "data cluster",
                ..
            }
        ),
        "{err:?}"
    );

    // Two guest clusters on the same file cluster.
    let mut shared = bytes.clone();
    let next = entry + 8;
    set_be_u64(&mut shared, next, be_u64(&bytes, entry));
    let err = read_layout(&shared).unwrap_err();
    assert!(err.to_string().contains("both use file offset"), "{err}");

    let mut l1_misaligned = bytes.clone();
    set_be_u64(&mut l1_misaligned, 40, l1 as u64 + 8);
    let err = read_layout(&l1_misaligned).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Misaligned {
                what: "L1 table",
                ..
            }
        ),
        "{err:?}"
    );
}

/// A compressed cluster whose bytes are damaged fails the copy, naming the
/// guest offset; one that inflates to less than a cluster too.
#[test]
fn damaged_compressed_cluster() {
    let dir = tempfile::tempdir().unwrap();
    for options in [&["-c"][..], &["-c", "-o", "compression_type=zstd"]] {
        let image = small_image(dir.path(), options);
        let layout = layout_of(&image);
        let Some(Extent::Compressed {
            guest_offset,
            host_offset,
            ..
        }) = layout
            .host_extents()
            .iter()
            .find(|e| matches!(e, Extent::Compressed { .. }))
            .copied()
        else {
            panic!("no compressed cluster")
        };
        let mut bytes = std::fs::read(&image).unwrap();
        bytes[host_offset as usize..host_offset as usize + 16].fill(0);
        let damaged = read_layout(&bytes).unwrap();
        let mut sink = VecSink::new(damaged.virtual_size());
        let err = qcow2::copy_data(&damaged, &bytes[..], 0, &mut sink).unwrap_err();
        assert!(
            matches!(err, Error::BadCompressedCluster { guest_offset: g, .. } if g == guest_offset),
            "{options:?}: {err:?}"
        );
    }
    // A valid deflate stream of half a cluster.
    let mut deflate = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut deflate, &[7u8; 32768]).unwrap();
    let half = deflate.finish().unwrap();
    let image = small_image(dir.path(), &["-c"]);
    let layout = layout_of(&image);
    let host_offset = layout
        .host_extents()
        .iter()
        .find_map(|e| match e {
            Extent::Compressed { host_offset, .. } => Some(*host_offset as usize),
            _ => None,
        })
        .unwrap();
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[host_offset..host_offset + half.len()].copy_from_slice(&half);
    let mut sink = VecSink::new(layout.virtual_size());
    let err = qcow2::copy_data(&layout, &bytes[..], 0, &mut sink).unwrap_err();
    assert!(err.to_string().contains("inflates to 32768 bytes"), "{err}");
}

/// The sink's failure is reported with the guest offset.
#[test]
fn sink_failure() {
    struct Full;
    impl qcow2::Sink for Full {
        fn write_at(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> {
            Err(std::io::Error::other("no space left"))
        }
        fn zero(&mut self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let image = small_image(dir.path(), &[]);
    let layout = layout_of(&image);
    let bytes = std::fs::read(&image).unwrap();
    let err = qcow2::copy_data(&layout, &bytes[..], 0, &mut Full).unwrap_err();
    assert!(matches!(err, Error::Write { .. }), "{err:?}");
    assert!(err.to_string().contains("no space left"), "{err}");
}
