//! `imgforge image push` upload throughput and peak memory.
//!
//! Against one real S3 server on loopback (moto, as in the tests) and the
//! Scaleway fake:
//! - throughput: the push's own upload figures (from its JSON report)
//!   against a plain `curl -T` PUT of a QCOW2 of the same disk to the same
//!   server, in the same run; ratios imgforge / curl (1.0 = as fast as one
//!   unsigned PUT), for sending the parts, and for the whole upload, which
//!   adds the server assembling the parts (moto copies them, seconds per
//!   GiB; Scaleway's completion is not measured here);
//! - memory: imgforge's peak RSS (VmHWM, sampled) during pushes of a
//!   1 GiB and a 3 GiB disk of incompressible data (`--no-compress`, so the
//!   object is as large as the disk); big / small near 1.0 means the memory
//!   does not grow with the image (parts are streamed from the file).
//!
//! Env: `BENCH_RUNS` (default 2) pushes per size; medians are reported.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use test_support::s3_server::{S3Server, UNSIGNED_AUTHORIZATION};
use tests::fake_scaleway::FakeScaleway;
use tests::LocalHome;

const BUCKET: &str = "imgforge-bench";
const POLL: Duration = Duration::from_millis(50);
/// Peak memory that counts as bounded: read buffers of the parts in flight
/// plus the runtime, far below any part size.
const RSS_TARGET_KIB: u64 = 128 << 10;

fn main() -> ExitCode {
    match tokio::runtime::Runtime::new().unwrap().block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("push: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .map(|v| v.parse())
        .transpose()
        .context("BENCH_RUNS")?
        .unwrap_or(2);
    let s3 = S3Server::start().await?;
    let fake = FakeScaleway::builder()
        .delay(Duration::from_millis(20))
        .object_storage(&s3.endpoint())
        .start()
        .await;
    let home = LocalHome::new();
    let work = tempfile::tempdir()?;
    println!("push: imgforge image push vs curl -T, against moto on loopback");
    let mut rss = Vec::new();
    for (label, gib) in [("1 GiB", 1u64), ("3 GiB", 3)] {
        let image = local_image(&home, work.path(), &format!("bench-{gib}g"), gib << 30)?;
        let qcow2 = work.path().join(format!("bench-{gib}g.qcow2"));
        export_qcow2(&home, &image, &qcow2)?;
        let size = std::fs::metadata(&qcow2)?.len();
        let mut ours = Vec::new();
        let mut ours_parts = Vec::new();
        let mut theirs = Vec::new();
        let mut peaks = Vec::new();
        for run in 0..runs {
            // Alternate who goes first: moto's state and the page cache.
            let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            for who in order {
                if who == 0 {
                    let (mbps, parts_mbps, peak) = push(
                        &home,
                        work.path(),
                        &fake,
                        &s3,
                        &image,
                        &format!("{label}-{run}"),
                    )?;
                    ours.push(mbps);
                    ours_parts.push(parts_mbps);
                    peaks.push(peak);
                } else {
                    theirs.push(curl_put(&s3, &qcow2, size, &format!("curl/{gib}g-{run}"))?);
                }
            }
        }
        let (ours, parts, theirs, peak) = (
            median(&mut ours),
            median(&mut ours_parts),
            median(&mut theirs),
            peaks_median(&mut peaks),
        );
        println!(
            "  {label} disk ({:.0} MiB object): curl -T {theirs:7.1} MB/s; imgforge parts {parts:7.1} MB/s \
             (ratio {:.2}), whole upload {ours:7.1} MB/s (ratio {:.2}); imgforge peak RSS {:.1} MiB \
             (target <= {} MiB: {})",
            size as f64 / f64::from(1 << 20),
            parts / theirs,
            ours / theirs,
            peak as f64 / 1024.0,
            RSS_TARGET_KIB >> 10,
            if peak <= RSS_TARGET_KIB { "met" } else { "NOT met" }
        );
        rss.push(peak);
        std::fs::remove_file(&qcow2)?;
    }
    println!(
        "  peak RSS 3 GiB / 1 GiB: {:.2} (1.00 = independent of the image size)",
        rss[1] as f64 / rss[0] as f64
    );
    Ok(())
}

/// A local image of `size` bytes of pseudo-random data (a snapshot file
/// written directly, as the tests do).
fn local_image(home: &LocalHome, work: &Path, name: &str, size: u64) -> Result<String> {
    let server = home.json([
        "server",
        "create",
        "--name",
        name,
        "--volume",
        &size.to_string(),
    ]);
    let server_id = server["id"].as_str().context("server id")?.to_string();
    let snapshot = home.json(["snapshot", "create", &server_id, "--name", name]);
    let snapshot_id = snapshot["id"].as_str().context("snapshot id")?;
    let raw = work.join(format!("{name}.raw"));
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&raw)?);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ size;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..size >> 20 {
            for word in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            out.write_all(&chunk)?;
        }
    }
    let file = home.path().join(format!("snapshots/{snapshot_id}.qcow2"));
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&file),
    )?;
    std::fs::remove_file(&raw)?;
    let image = home.json(["image", "create", "--name", name, "--snapshot", snapshot_id]);
    run_ok(
        home.command(["server", "rm", &server_id])
            .stdout(Stdio::null()),
    )?;
    Ok(image["id"].as_str().context("image id")?.to_string())
}

fn export_qcow2(home: &LocalHome, image: &str, out: &Path) -> Result<()> {
    run_ok(
        home.command(["image", "export", image, "--format", "qcow2", "-o"])
            .arg(out),
    )
}

/// One `imgforge image push` (the image pushed under a new name each time:
/// the Scaleway side refuses a second image of one name); the upload's
/// MB/s (whole, parts only) and the process's peak RSS in KiB.
fn push(
    home: &LocalHome,
    work: &Path,
    fake: &FakeScaleway,
    s3: &S3Server,
    image: &str,
    run: &str,
) -> Result<(f64, f64, u64)> {
    let name = format!("pushed-{}", run.replace(' ', ""));
    let child = home
        .command([
            "--json",
            "image",
            "push",
            image,
            "--provider",
            "scaleway",
            "--no-compress",
        ])
        .env("HOME", work)
        .env("SCW_API_URL", fake.url())
        .env("SCW_SECRET_KEY", fake.secret())
        .env("SCW_ACCESS_KEY", "SCWXXXXXXXXXXXXXXXXX")
        .env("SCW_DEFAULT_PROJECT_ID", fake.project())
        .env("SCW_DEFAULT_ZONE", fake.zone())
        .env("IMGFORGE_S3_ENDPOINT", s3.endpoint())
        .env("IMGFORGE_SCW_BUCKET", BUCKET)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let (output, peak) = wait_sampling_peak(child, pid)?;
    ensure!(output.0.success(), "imgforge image push failed ({name})");
    let report: Value = serde_json::from_slice(&output.1)?;
    // The next push needs the name free on the Scaleway side.
    delete_scaleway_image(fake, &report)?;
    let bytes = report["upload"]["bytes"].as_f64().context("upload.bytes")?;
    let seconds = report["upload"]["seconds"]
        .as_f64()
        .context("upload.seconds")?;
    let parts = report["upload"]["parts_seconds"]
        .as_f64()
        .context("upload.parts_seconds")?;
    Ok((bytes / seconds / 1e6, bytes / parts / 1e6, peak))
}

/// Deletes the pushed image through the fake's API, as a user would.
fn delete_scaleway_image(fake: &FakeScaleway, report: &Value) -> Result<()> {
    let id = report["image_id"].as_str().context("image_id")?;
    let status = Command::new("curl")
        .args(["-sf", "-X", "DELETE", "-H"])
        .arg(format!("X-Auth-Token: {}", fake.secret()))
        .arg(format!("{}/images/{id}", fake.zone_url()))
        .status()?;
    ensure!(status.success(), "delete image {id}");
    Ok(())
}

/// `curl -T FILE` to the same server: one unsigned PUT; MB/s.
fn curl_put(s3: &S3Server, file: &Path, size: u64, key: &str) -> Result<f64> {
    let url = format!("{}/{BUCKET}/{key}", s3.endpoint());
    let started = Instant::now();
    run_ok(
        Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "-H"])
            .arg(format!("Authorization: {UNSIGNED_AUTHORIZATION}"))
            .arg("-T")
            .arg(file)
            .arg(&url),
    )?;
    let mbps = size as f64 / started.elapsed().as_secs_f64() / 1e6;
    // moto keeps objects in memory: this one is not needed any more.
    run_ok(
        Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "-X", "DELETE", "-H"])
            .arg(format!("Authorization: {UNSIGNED_AUTHORIZATION}"))
            .arg(&url),
    )?;
    Ok(mbps)
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Waits for `child`, sampling its VmHWM (which only grows) meanwhile;
/// its status and stdout, and the last sample.
fn wait_sampling_peak(mut child: Child, pid: u32) -> Result<((ExitStatus, Vec<u8>), u64)> {
    let mut stdout = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = vm_hwm_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(POLL);
    };
    let out = reader
        .join()
        .map_err(|_| anyhow::anyhow!("stdout reader panicked"))?;
    Ok(((status, out), peak))
}

fn run_ok(command: &mut Command) -> Result<()> {
    let output = command.stderr(Stdio::piped()).output()?;
    if !output.status.success() {
        bail!("{command:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn peaks_median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}
