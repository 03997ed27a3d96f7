//! How long a server from a cloud image takes to be usable, and what the cloud profile costs.
//!
//! Builds `debian:bookworm` twice on the local provider (TCG), with `--profile cloud` and
//! `--profile minimal`, then runs the server test (`imgforge boot IMAGE --ssh`) of the cloud image
//! `BENCH_RUNS` times (default 3): server start to the first SSH login, and to `cloud-init status
//! --wait` returning. Prints medians, and the two images' sizes (bytes the agent wrote, and the
//! snapshot's qcow2 file) with their ratio. The baseline of the same run is the minimal image's
//! size; boot times have no local baseline (a minimal image has no SSH), so they are absolute
//! and only comparable between runs on the same machine. Runs the release imgforge: `cargo build
//! --release -p host` first (scripts/bench.sh does).

use std::time::Instant;

use tests::{bootscript_dir, LocalHome};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Builds `debian:bookworm` with `profile` as image `name`; returns (bytes written by the agent,
/// snapshot file bytes, build seconds).
fn build(home: &LocalHome, name: &str, profile: &str) -> (u64, u64, f64) {
    let started = Instant::now();
    let report = home.json([
        "build",
        "--rootfs",
        "debian:bookworm",
        "--profile",
        profile,
        "--name",
        name,
        "--size",
        "2G",
        "--bootscript-dir",
        bootscript_dir().to_str().unwrap(),
    ]);
    let seconds = started.elapsed().as_secs_f64();
    let written = report["done"]["bytes"].as_u64().unwrap();
    let snapshot = report["snapshot_id"].as_str().unwrap();
    let file = home.path().join(format!("snapshots/{snapshot}.qcow2"));
    (written, std::fs::metadata(file).unwrap().len(), seconds)
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let home = LocalHome::new();
    let (cloud_bytes, cloud_file, cloud_build) = build(&home, "cloud", "cloud");
    let (minimal_bytes, minimal_file, minimal_build) = build(&home, "minimal", "minimal");
    println!(
        "image size: cloud {} MiB written ({} MiB qcow2), minimal {} MiB written ({} MiB qcow2); \
         ratio cloud/minimal {:.2} written, {:.2} qcow2",
        cloud_bytes >> 20,
        cloud_file >> 20,
        minimal_bytes >> 20,
        minimal_file >> 20,
        cloud_bytes as f64 / minimal_bytes as f64,
        cloud_file as f64 / minimal_file as f64
    );
    println!(
        "build time (mmdebstrap + build server): cloud {cloud_build:.0} s, minimal {minimal_build:.0} s, ratio {:.2}",
        cloud_build / minimal_build
    );
    let mut ssh = Vec::new();
    let mut cloud_init = Vec::new();
    for run in 1..=runs {
        let report = home.json(["boot", "cloud", "--ssh", "--timeout", "900"]);
        let s = report["ssh_ready_s"].as_f64().unwrap();
        let c = report["cloud_init_done_s"].as_f64().unwrap();
        println!("run {run}: SSH login after {s:.1} s, cloud-init done after {c:.1} s");
        ssh.push(s);
        cloud_init.push(c);
    }
    println!(
        "server start -> SSH login: median {:.1} s; -> cloud-init done: median {:.1} s ({runs} runs, TCG)",
        median(ssh),
        median(cloud_init)
    );
    home.assert_no_servers_left();
}
