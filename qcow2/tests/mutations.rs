//! Mutated qemu-img images never make the reader panic, and whatever it
//! accepts still covers the guest disk exactly once, within its bounds.
//!
//! A deterministic stand-in for the `fuzz/` target that runs on stable in
//! every `cargo test`.

mod common;

use std::io;
use std::path::Path;

use common::*;
use qcow2::{copy_data, Layout, Sink};

/// Virtual size cap: keeps every iteration small.
const VOLUME: u64 = 16 << 20;

/// Counts what it gets; fails on anything out of bounds.
struct Bounds {
    size: u64,
    calls: Vec<(u64, u64)>,
}

impl Bounds {
    fn record(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).expect("offset + len overflows");
        assert!(
            len > 0 && end <= self.size,
            "call {offset}+{len} outside a {}-byte disk",
            self.size
        );
        self.calls.push((offset, len));
        Ok(())
    }
}

impl Sink for Bounds {
    fn write_at(&mut self, guest_offset: u64, data: &[u8]) -> io::Result<()> {
        self.record(guest_offset, data.len() as u64)
    }
    fn zero(&mut self, guest_offset: u64, len: u64) -> io::Result<()> {
        self.record(guest_offset, len)
    }
}

/// How far a mutant got.
#[derive(Debug, Default)]
struct Outcome {
    refused: u64,
    copy_failed: u64,
    copied: u64,
}

/// Parses and copies `bytes`; checks the invariants of what is accepted.
fn exercise(bytes: &[u8], outcome: &mut Outcome) {
    let Ok(layout) = Layout::read(&mut bytes.to_vec(), bytes.len() as u64, VOLUME) else {
        outcome.refused += 1;
        return;
    };
    assert!(layout.virtual_size() <= VOLUME);
    let mut covered: Vec<(u64, u64)> = layout
        .extents()
        .iter()
        .map(|e| (e.guest_offset(), e.guest_len()))
        .collect();
    covered.sort_unstable();
    let mut end = 0;
    for (offset, len) in covered {
        assert_eq!(offset, end, "extents leave a gap or overlap");
        end = offset + len;
    }
    assert_eq!(end, layout.virtual_size());
    if let Some(data_end) = layout.data_end_offset() {
        assert!(data_end <= bytes.len() as u64);
    }

    let mut sink = Bounds {
        size: layout.virtual_size(),
        calls: Vec::new(),
    };
    if copy_data(&layout, bytes, 0, &mut sink).is_ok() {
        let written: u64 = sink.calls.iter().map(|(_, len)| len).sum();
        assert_eq!(written, layout.virtual_size());
        outcome.copied += 1;
    } else {
        outcome.copy_failed += 1;
    }
}

fn seed(dir: &Path, name: &str, cluster_size: &str, options: &[&str]) -> Vec<u8> {
    let source = dir.join("seed.raw");
    if !source.exists() {
        write_source(&source, 300 * 1024, 9);
    }
    let image = dir.join(format!("{name}.qcow2"));
    let cluster = format!("cluster_size={cluster_size}");
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", &cluster];
    args.extend_from_slice(options);
    args.extend_from_slice(&[path_str(&source), path_str(&image)]);
    qemu_img(&args);
    std::fs::read(image).unwrap()
}

/// Values that hit boundaries when written over a field or table entry.
const INTERESTING: [u64; 10] = [
    0,
    1,
    u64::MAX,
    1 << 63,
    1 << 62,
    (1 << 62) | 0x3fff_ffff_ffff_ffff,
    0x00ff_ffff_ffff_fe00,
    0x8000_0000_0001_0000,
    0x8000_0000_0000_0200,
    0x4000_0000_0000_0200,
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = bytes.len() as u64;
        match rng.below(6) {
            // Flip a bit in the header.
            0 => {
                let at = rng.below(len.min(112)) as usize;
                bytes[at] ^= 1 << rng.below(8);
            }
            // Flip a bit anywhere (tables, compressed data).
            1 => {
                let at = rng.below(len) as usize;
                bytes[at] ^= 1 << rng.below(8);
            }
            // Overwrite an aligned u64 (header field or table entry).
            2 | 3 => {
                let at = (rng.below(len / 8) * 8) as usize;
                let value = if rng.below(2) == 0 {
                    INTERESTING[rng.below(INTERESTING.len() as u64) as usize]
                } else {
                    rng.next_u64() & (0xffff_ffff_ffff_ffff >> rng.below(64))
                };
                if let Some(field) = bytes.get_mut(at..at + 8) {
                    field.copy_from_slice(&value.to_be_bytes());
                }
            }
            // Truncate.
            4 => bytes.truncate(rng.below(len) as usize),
            // Overwrite a run with random bytes.
            _ => {
                let at = rng.below(len) as usize;
                let run = (rng.below(64) as usize).min(bytes.len() - at);
                rng.fill(&mut bytes[at..at + run]);
            }
        }
        if bytes.is_empty() {
            break;
        }
    }
    bytes
}

#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = [
        seed(dir.path(), "plain", "4k", &[]),
        seed(dir.path(), "small", "512", &[]),
        seed(dir.path(), "zlib", "512", &["-c"]),
        seed(
            dir.path(),
            "zstd",
            "4k",
            &["-c", "-o", "compression_type=zstd"],
        ),
        seed(dir.path(), "v2", "4k", &["-c", "-o", "compat=0.10"]),
    ];
    let mut outcome = Outcome::default();
    for seed in &seeds {
        exercise(seed, &mut outcome);
    }
    assert_eq!(
        outcome.copied,
        seeds.len() as u64,
        "the seeds themselves copy"
    );
    let iterations = std::env::var("QCOW2_MUTATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(400);
    let mut rng = Rng::new(0x9c0f_2024);
    for seed in &seeds {
        for _ in 0..iterations {
            let mutant = mutate(&mut rng, seed);
            exercise(&mutant, &mut outcome);
        }
    }
    // Mutants that get through the parser are what exercises the copy.
    eprintln!("mutants: {outcome:?}");
    assert!(outcome.copied > iterations, "{outcome:?}");
}
