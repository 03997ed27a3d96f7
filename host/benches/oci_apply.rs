//! OCI layer application: `imgforge rootfs oci:LAYOUT -o rootfs.tar` against
//! `umoci unpack` of the same layout, in the same run.
//!
//! The layout: 3 gzip layers, about 320 MB uncompressed (168 MB stored) and
//! 5,700 entries (text-like and binary-like content, 0.5 KiB to 4 MiB), with
//! whiteouts of files and directories, an opaque directory and overwritten
//! files. Each
//! tool runs 3 times; medians are printed, as seconds and as MB/s of
//! uncompressed layer data applied. `ratio` is our speed over umoci's
//! (above 1.0: faster).
//!
//! `cargo bench -p host --bench oci_apply` (umoci runs as root: `apt-get
//! install umoci`). Set `OCI_APPLY_MB` to change the size.

#[path = "../tests/rootfs_common/mod.rs"]
#[allow(unused_imports)]
mod rootfs_common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use host::rootfs::{build, Options, Source};
use rootfs_common::*;
use serde_json::json;

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "the", "kernel", "module", "config", "systemd", "service", "network", "return", "static",
    "const", "error", "value", "string", "buffer", "device", "driver", "package", "library",
    "function", "struct", "#include", "0x7f", "int", "char", "void", "if", "else", "for", "while",
    "{", "}", ";", "\n", "\t",
];

/// File content: text-like (compresses ~4x) or binary-like (~1.5x).
fn content(rng: &mut Rng, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 16);
    if rng.below(2) == 0 {
        while out.len() < size {
            out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
            out.push(b' ');
        }
    } else {
        while out.len() < size {
            let v = rng.next();
            // Half random bytes, half small values: like machine code.
            out.extend_from_slice(&v.to_le_bytes()[..4]);
            out.extend_from_slice(&[0, (v >> 40) as u8 & 7, 0, 0]);
        }
    }
    out.truncate(size);
    out
}

fn size(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..=69 => 512 + rng.below(8 << 10) as usize,
        70..=93 => (8 << 10) + rng.below(120 << 10) as usize,
        94..=98 => (128 << 10) + rng.below(384 << 10) as usize,
        _ => (1 << 20) + rng.below(3 << 20) as usize,
    }
}

/// Builds the three layers; returns them (uncompressed) and their total size.
fn make_layers(target_mb: usize) -> (Vec<Vec<u8>>, usize) {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let budget = [
        target_mb * 65 / 100,
        target_mb * 23 / 100,
        target_mb * 12 / 100,
    ];
    let mut layers = Vec::new();
    let mut base_files: Vec<String> = Vec::new();
    for (li, mb) in budget.iter().enumerate() {
        let mut layer = Layer::with_mtime(1_700_000_000 + li as u64);
        if li == 0 {
            layer = layer.dir("./", 0o755, 0, 0);
            for top in [
                "usr/",
                "usr/lib/",
                "usr/share/",
                "usr/bin/",
                "opt/",
                "opt/app/",
            ] {
                layer = layer.dir(top, 0o755, 0, 0);
            }
            for d in 0..60 {
                let top = ["usr/lib", "usr/share", "usr/bin", "opt/app"][d % 4];
                layer = layer.dir(&format!("{top}/d{d:02}/"), 0o755, 0, 0);
            }
        }
        let mut bytes = 0usize;
        let mut n = 0usize;
        // Whiteouts and an opaque directory in the upper layers.
        if li == 1 {
            for f in base_files.iter().step_by(15).take(200) {
                layer = layer.whiteout(f);
            }
            layer = layer
                .dir("usr/share/d07/", 0o755, 0, 0)
                .opaque("usr/share/d07");
        }
        if li == 2 {
            layer = layer.whiteout("usr/lib/d03");
        }
        while bytes < mb << 20 {
            let d = rng.below(60);
            let top = ["usr/lib", "usr/share", "usr/bin", "opt/app"][d as usize % 4];
            let dir = format!("{top}/d{d:02}");
            let path = if li > 0 && rng.below(4) == 0 && !base_files.is_empty() {
                // Overwrite a lower file.
                base_files[rng.below(base_files.len() as u64) as usize].clone()
            } else {
                format!("{dir}/f{li}-{n:05}")
            };
            let s = size(&mut rng);
            let data = content(&mut rng, s);
            layer = layer.file_full(&path, &data, 0o644, 0, 0, &[]);
            if li == 0 {
                base_files.push(path);
            }
            bytes += s;
            n += 1;
        }
        layers.push(layer.finish());
    }
    let total = layers.iter().map(|l| l.len()).sum();
    (layers, total)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too:
    // keep that quick.
    let quick =
        std::env::args().any(|a| a == "--test") || !std::env::args().any(|a| a == "--bench");
    let mb: usize = std::env::var("OCI_APPLY_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 8 } else { 300 });
    let runs = if quick { 1 } else { 3 };

    let work = tempfile::Builder::new()
        .prefix("oci-apply-bench-")
        .tempdir()
        .unwrap();
    let layout = work.path().join("layout");
    let start = Instant::now();
    let (layers, total) = make_layers(mb);
    let files: usize = layers
        .iter()
        .map(|l| tar::Archive::new(&l[..]).entries().unwrap().count())
        .sum();
    let mut desc = put_image(&layout, &layers, LayerCompression::Gzip, "amd64");
    desc["annotations"] = json!({"org.opencontainers.image.ref.name": "latest"});
    write_index(&layout, vec![desc]);
    let stored: u64 = fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    drop(layers);
    let total_mb = total as f64 / 1e6;
    println!(
        "layout: 3 gzip layers, {files} tar entries, {total_mb:.0} MB uncompressed, {:.0} MB stored (made in {:.1?})",
        stored as f64 / 1e6,
        start.elapsed()
    );

    // Ours.
    let src: Source = format!("oci:{}", layout.display()).parse().unwrap();
    let out = work.path().join("rootfs.tar");
    let mut ours = Vec::new();
    for _ in 0..runs {
        let _ = fs::remove_file(&out);
        let t = Instant::now();
        let r = build(&src, &out, &Options::default()).unwrap();
        ours.push(t.elapsed());
        assert!(r.entries > 0);
    }
    let ours = median(ours);
    println!(
        "imgforge oci: -> .tar   {:>7.2} s  {:>7.1} MB/s  (runs: {runs}, median; output {:.0} MB)",
        ours.as_secs_f64(),
        total_mb / ours.as_secs_f64(),
        fs::metadata(&out).unwrap().len() as f64 / 1e6
    );

    if !have_umoci() {
        println!(
            "umoci: SKIPPED (not installed, or not root: apt-get install umoci and run as root)"
        );
        return;
    }
    for (label, raw) in [("umoci unpack", false), ("umoci raw unpack", true)] {
        let mut times = Vec::new();
        for i in 0..runs {
            let dest = work.path().join(format!("bundle-{raw}-{i}"));
            let mut cmd = Command::new("umoci");
            if raw {
                cmd.args(["raw", "unpack"]);
            } else {
                cmd.arg("unpack");
            }
            cmd.arg("--image")
                .arg(format!("{}:latest", layout.display()));
            cmd.arg(if raw {
                dest.join("rootfs")
            } else {
                dest.clone()
            });
            if raw {
                fs::create_dir_all(&dest).unwrap();
            }
            let t = Instant::now();
            let o = cmd.output().unwrap();
            times.push(t.elapsed());
            assert!(
                o.status.success(),
                "{label}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            remove_tree(&dest);
        }
        let theirs = median(times);
        println!(
            "{label:<22}  {:>7.2} s  {:>7.1} MB/s  ratio ours/umoci speed {:.2}",
            theirs.as_secs_f64(),
            total_mb / theirs.as_secs_f64(),
            theirs.as_secs_f64() / ours.as_secs_f64()
        );
    }
}

fn have_umoci() -> bool {
    is_root()
        && Command::new("umoci")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn remove_tree(p: &Path) {
    let _ = fs::remove_dir_all(p);
}
