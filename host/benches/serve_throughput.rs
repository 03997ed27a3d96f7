//! Download throughput of the artifact server on loopback.
//!
//! Serves a 1 GiB file and downloads it with `curl -s -o /dev/null URL`,
//! against the baseline measured in the same run: `curl -s -o /dev/null
//! file:///path` (curl reading the same file from the page cache, no HTTP).
//! Then one stream against a 4-way parallel download (four `curl -r`
//! quarters at once), aggregate throughput. 3 runs each, medians.
//!
//! Run with `cargo bench -p host --bench serve_throughput`. Needs curl and
//! 1 GiB free under the temporary directory.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use host::serve::ArtifactServer;

const SIZE: u64 = 1 << 30;
const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn mb_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// Starts curl on `url` (optionally a byte range); it prints the bytes it
/// received, which [`finish`] checks.
fn curl(url: &str, range: Option<(u64, u64)>) -> std::process::Child {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-f", "-o", "/dev/null", "-w", "%{size_download}"]);
    if let Some((a, b)) = range {
        cmd.args(["-r", &format!("{a}-{b}")]);
    }
    cmd.arg(url)
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl is installed")
}

fn finish(child: std::process::Child, expect: u64) {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "curl failed: {:?}", out.status);
    let got: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(
        got, expect,
        "curl downloaded {got} bytes, expected {expect}"
    );
}

/// Wall time of one whole download, seconds.
fn timed_single(url: &str) -> f64 {
    let t = Instant::now();
    finish(curl(url, None), SIZE);
    t.elapsed().as_secs_f64()
}

/// Wall time of four concurrent quarter downloads, seconds.
fn timed_parallel(url: &str, ways: u64) -> f64 {
    let part = SIZE / ways;
    let t = Instant::now();
    let children: Vec<_> = (0..ways)
        .map(|i| {
            let a = i * part;
            let b = if i == ways - 1 {
                SIZE - 1
            } else {
                a + part - 1
            };
            (curl(url, Some((a, b))), b - a + 1)
        })
        .collect();
    for (child, len) in children {
        finish(child, len);
    }
    t.elapsed().as_secs_f64()
}

fn write_file(path: &Path) {
    use std::io::Write;
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..(SIZE >> 20) {
        block[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
}

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`:
    // a 1 GiB benchmark is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("serve_throughput: skipped (run it with `cargo bench`)");
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rootfs-1GiB.bin");
    write_file(&path);
    let file_url = format!("file://{}", path.display());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = rt
        .block_on(ArtifactServer::start("127.0.0.1:0".parse().unwrap(), None))
        .unwrap();
    let t = Instant::now();
    let served = rt.block_on(server.add_file(&path)).unwrap();
    let hash_s = t.elapsed().as_secs_f64();

    // Warm-up (page cache, connection paths), not measured.
    finish(curl(&file_url, None), SIZE);
    finish(curl(&served.url, None), SIZE);

    let (mut base, mut ours, mut par) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        base.push(mb_s(SIZE, timed_single(&file_url)));
        ours.push(mb_s(SIZE, timed_single(&served.url)));
        par.push(mb_s(SIZE, timed_parallel(&served.url, 4)));
    }
    let stats = server.stats();
    let expected = (2 * RUNS as u64 + 1) * SIZE;
    assert_eq!(stats.bytes_served, expected, "bytes served");
    rt.block_on(server.shutdown());

    let (base_m, ours_m, par_m) = (
        median(base.clone()),
        median(ours.clone()),
        median(par.clone()),
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "serve_throughput: 1 GiB file on loopback, {RUNS} runs each, medians (MB/s = 10^6 bytes/s)"
    );
    println!(
        "  sha256 on add           {:>8.0} MB/s  ({hash_s:.2} s)",
        mb_s(SIZE, hash_s)
    );
    println!(
        "  curl file:// (baseline) {base_m:>8.0} MB/s  [{}]",
        fmt(&base)
    );
    println!(
        "  curl http:// (ours)     {ours_m:>8.0} MB/s  [{}]",
        fmt(&ours)
    );
    println!("  ours / baseline         {:>8.2}", ours_m / base_m);
    println!(
        "  ours, 4 parallel ranges {par_m:>8.0} MB/s aggregate  [{}]",
        fmt(&par)
    );
    println!("  single / 4-way          {:>8.2}", ours_m / par_m);
    println!(
        "  total time              {:>8.1} s",
        started.elapsed().as_secs_f64()
    );
}
