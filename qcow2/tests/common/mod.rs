//! Test support: images made by qemu-img, sinks that check what they get.

#![allow(dead_code)]

use std::fs::File;
use std::io::{self, BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2::{copy_data, CopyStats, Layout, Sink};

/// Runs a qemu tool (qemu-img, qemu-io) and fails the test with its output.
pub fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (install qemu-utils): {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn qemu_img(args: &[&str]) {
    run("qemu-img", args);
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// xorshift64*: reproducible pseudo-random bytes without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Size of the standard raw source: not a multiple of 64 KiB or 2 MiB, so the
/// last cluster is cut short.
pub const SOURCE_SIZE: u64 = 6 * 1024 * 1024 + 3 * 512;

/// Writes a raw disk of `size` bytes in 48 KiB blocks (not aligned to any
/// cluster size): random data, compressible text, explicit zeros, holes,
/// and blocks half data half zeros.
pub fn write_source(path: &Path, size: u64, seed: u64) {
    const BLOCK: u64 = 48 * 1024;
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    let mut block = vec![0u8; BLOCK as usize];
    let mut offset = 0;
    let mut index = 0u64;
    while offset < size {
        let len = BLOCK.min(size - offset) as usize;
        let block = &mut block[..len];
        let written = match index % 8 {
            0 | 5 => {
                rng.fill(block);
                true
            }
            1 | 6 => {
                let text = format!(
                    "block {index} at {offset}: the quick brown fox jumps over the lazy dog. "
                );
                for (byte, text_byte) in block.iter_mut().zip(text.bytes().cycle()) {
                    *byte = text_byte;
                }
                true
            }
            2 => {
                block.fill(0);
                true
            }
            4 => {
                block.fill(0);
                rng.fill(&mut block[..len / 2]);
                true
            }
            _ => false, // a hole
        };
        if written {
            file.write_all_at(block, offset).unwrap();
        }
        offset += len as u64;
        index += 1;
    }
}

/// A guest disk in memory, pre-filled with 0xAA so that zero ranges must be
/// zeroed; records every call to check that each byte is covered once.
pub struct VecSink {
    pub disk: Vec<u8>,
    pub calls: Vec<(u64, u64)>,
}

impl VecSink {
    pub fn new(size: u64) -> VecSink {
        VecSink {
            disk: vec![0xAA; size as usize],
            calls: Vec::new(),
        }
    }

    fn range(&mut self, offset: u64, len: u64) -> io::Result<&mut [u8]> {
        self.calls.push((offset, len));
        let size = self.disk.len();
        usize::try_from(offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(start, len)| self.disk.get_mut(start..start.checked_add(len)?))
            .ok_or_else(|| {
                io::Error::other(format!(
                    "{len} bytes at {offset} are past the disk ({size} bytes)"
                ))
            })
    }

    /// Every byte of the disk was written or zeroed exactly once.
    pub fn assert_covered_once(&self) {
        let mut calls = self.calls.clone();
        calls.sort_unstable();
        let mut expected = 0;
        for (offset, len) in calls {
            assert_eq!(
                offset, expected,
                "guest bytes {expected}..{offset} covered zero or several times"
            );
            assert!(len > 0, "empty call at {offset}");
            expected = offset + len;
        }
        assert_eq!(
            expected,
            self.disk.len() as u64,
            "the end of the disk is not covered"
        );
    }
}

impl Sink for VecSink {
    fn write_at(&mut self, guest_offset: u64, data: &[u8]) -> io::Result<()> {
        self.range(guest_offset, data.len() as u64)?
            .copy_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, guest_offset: u64, len: u64) -> io::Result<()> {
        self.range(guest_offset, len)?.fill(0);
        Ok(())
    }
}

/// Compares what it gets with an expected raw disk on the fly (for virtual
/// sizes too large for memory); zero ranges are checked by reading them.
pub struct CheckingSink {
    pub expected: File,
    pub size: u64,
    pub calls: Vec<(u64, u64)>,
}

impl CheckingSink {
    fn expect(&self, offset: u64, actual: &[u8]) {
        let mut expected = vec![0u8; actual.len()];
        self.expected.read_exact_at(&mut expected, offset).unwrap();
        if let Some(at) = expected.iter().zip(actual).position(|(a, b)| a != b) {
            panic!("guest byte {} differs from qemu-img's", offset + at as u64);
        }
    }

    pub fn assert_covered_once(&self) {
        let mut calls = self.calls.clone();
        calls.sort_unstable();
        let mut expected = 0;
        for (offset, len) in calls {
            assert_eq!(
                offset, expected,
                "guest bytes {expected}..{offset} covered zero or several times"
            );
            expected = offset + len;
        }
        assert_eq!(expected, self.size);
    }
}

impl Sink for CheckingSink {
    fn write_at(&mut self, guest_offset: u64, data: &[u8]) -> io::Result<()> {
        self.calls.push((guest_offset, data.len() as u64));
        self.expect(guest_offset, data);
        Ok(())
    }

    fn zero(&mut self, guest_offset: u64, len: u64) -> io::Result<()> {
        self.calls.push((guest_offset, len));
        let zeros = vec![0u8; 1 << 20];
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < len {
            let piece = (len - done).min(zeros.len() as u64) as usize;
            self.expected
                .read_exact_at(&mut buf[..piece], guest_offset + done)
                .unwrap();
            // Slice equality is a memcmp: fast even in debug builds.
            if buf[..piece] != zeros[..piece] {
                self.expect(guest_offset + done, &zeros[..piece]);
            }
            done += piece as u64;
        }
        Ok(())
    }
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Reads the layout of `path` with a generous volume.
pub fn layout_of(path: &Path) -> Layout {
    let mut file = File::open(path).unwrap();
    Layout::read(&mut file, file_len(path), u64::MAX)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs `copy_data` over `path` as a stream that starts at `stream_offset`.
pub fn copy_file(
    layout: &Layout,
    path: &Path,
    stream_offset: u64,
    sink: &mut dyn Sink,
) -> qcow2::Result<CopyStats> {
    let mut file = File::open(path).unwrap();
    file.seek(SeekFrom::Start(stream_offset)).unwrap();
    copy_data(layout, BufReader::new(file), stream_offset, sink)
}

/// `qemu-img convert -O raw`, the reference.
pub fn reference_raw(image: &Path) -> PathBuf {
    let raw = image.with_extension("reference.raw");
    qemu_img(&["convert", "-O", "raw", path_str(image), path_str(&raw)]);
    raw
}

/// Reads the layout, copies the data into a [`VecSink`] (stream from the
/// first data cluster, and again from offset 0) and compares with qemu-img.
pub fn assert_same_as_qemu(image: &Path) -> Layout {
    let layout = layout_of(image);
    let expected = std::fs::read(reference_raw(image)).unwrap();
    assert_eq!(layout.virtual_size(), expected.len() as u64, "virtual size");

    for stream_offset in [layout.first_data_offset().unwrap_or(0), 0] {
        let mut sink = VecSink::new(layout.virtual_size());
        let stats = copy_file(&layout, image, stream_offset, &mut sink)
            .unwrap_or_else(|e| panic!("{}: {e}", image.display()));
        sink.assert_covered_once();
        assert_eq!(
            stats.bytes_written + stats.bytes_zeroed,
            layout.virtual_size()
        );
        assert_eq!(stats.bytes_written, layout.data_bytes());
        assert_eq!(
            stats.bytes_read,
            layout
                .data_end_offset()
                .map_or(0, |end| end - stream_offset),
            "the stream is read exactly up to the end of the data"
        );
        if let Some(at) = sink.disk.iter().zip(&expected).position(|(a, b)| a != b) {
            panic!(
                "{}: guest byte {at} is {:#x}, qemu-img says {:#x} (layout: {:#?})",
                image.display(),
                sink.disk[at],
                expected[at],
                layout.extents()
            );
        }
    }

    // The in-memory ReadAt finds the same layout.
    let bytes = std::fs::read(image).unwrap();
    let from_bytes = Layout::read(&mut bytes.clone(), bytes.len() as u64, u64::MAX).unwrap();
    assert_eq!(from_bytes.extents(), layout.extents());
    layout
}
