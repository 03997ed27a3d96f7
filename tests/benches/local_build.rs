//! Local build time: imgforge against virt-make-fs on the same Debian rootfs.
//!
//! Both tools turn the same plain Debian bookworm rootfs tar (the e2e tests'
//! `debian_bookworm_tar()`) into a GPT disk with an ext4 root, in the same
//! run, timed by wall clock from the tar to a raw disk file:
//! - imgforge: `imgforge --json build --provider local --method from-rootfs
//!   --size 4G --accel tcg`, then `imgforge image export --format raw`;
//! - virt-make-fs (Debian package guestfs-tools): `--partition=gpt
//!   --type=ext4 --size=+512M`.
//!
//! Both run their worker VM under QEMU TCG: KVM guests hang on these
//! machines, and the same accelerator on both sides keeps the ratio honest.
//! libguestfs gets `LIBGUESTFS_BACKEND=direct` (plain QEMU, no libvirt
//! daemon) and `LIBGUESTFS_BACKEND_SETTINGS=force_tcg`; its appliance has no
//! network (libguestfs's default, which virt-make-fs keeps).
//!
//! The runs alternate which tool goes first, so page-cache effects on the tar
//! cancel out over an even number of runs. Each output is judged with
//! `e2fsck -fn` on its root partition; a timing of a broken image would mean
//! nothing, so a dirty filesystem fails the bench.
//!
//! Env: `BENCH_RUNS` (default 1: each run takes minutes under TCG).

use std::ffi::OsString;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tests::{debian_bookworm_tar, imgforge_bin, judge, target_dir};

const IMGFORGE_SIZE: &str = "4G";
/// Free space virt-make-fs adds on top of the tar's contents.
const VMF_EXTRA: &str = "+512M";
/// A step that takes longer has hung (a TCG build here takes minutes).
const STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const NOTE: &str = "virt-make-fs output has no bootloader; imgforge's includes the ESP and GRUB";

fn main() -> ExitCode {
    // `cargo bench` passes --bench; nothing to parse.
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("local_build: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let runs = bench_runs()?;
    // Both checks come first: each is instant, a timed run is minutes.
    check_virt_make_fs()?;
    let imgforge = imgforge_bin();
    check_imgforge_build(&imgforge)?;
    let tar = debian_bookworm_tar();
    warm_kernel_cache()?;
    // In the target directory: the outputs are GiB-sized sparse files.
    let work = tempfile::tempdir_in(target_dir()).context("make a work directory")?;
    let rows = (1..=runs)
        .map(|run| one_run(run, runs, &imgforge, &tar, work.path()))
        .collect::<Result<Vec<_>>>()?;
    report(&tar, &rows);
    Ok(())
}

/// Both tools once, in the order that alternates with `run`.
fn one_run(run: usize, runs: usize, imgforge: &Path, tar: &Path, work: &Path) -> Result<Row> {
    let dir = work.join(format!("run{run}"));
    std::fs::create_dir_all(&dir)?;
    let imgforge_first = run % 2 == 1;
    let ours = |dir: &Path| {
        eprintln!("run {run}/{runs}: imgforge build + export ...");
        imgforge_to_raw(imgforge, tar, dir, run)
    };
    let theirs = |dir: &Path| {
        eprintln!("run {run}/{runs}: virt-make-fs ...");
        virt_make_fs(tar, dir)
    };
    let (imgforge, vmf) = if imgforge_first {
        let a = ours(&dir)?;
        (a, theirs(&dir)?)
    } else {
        let b = theirs(&dir)?;
        (ours(&dir)?, b)
    };
    // Both outputs were judged and removed; the logs go too.
    std::fs::remove_dir_all(&dir).ok();
    Ok(Row {
        run,
        imgforge_first,
        imgforge,
        vmf,
    })
}

fn bench_runs() -> Result<usize> {
    let Some(v) = std::env::var_os("BENCH_RUNS") else {
        return Ok(1);
    };
    let n: usize = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("BENCH_RUNS={v:?} is not a number"))?;
    ensure!(n >= 1, "BENCH_RUNS must be at least 1");
    Ok(n)
}

// ---------------------------------------------------------------------------
// Preconditions.

fn check_virt_make_fs() -> Result<()> {
    const INSTALL: &str = "install it with `apt-get install -y guestfs-tools` (scripts/bench.sh \
        does); supermin builds the libguestfs appliance from the host's kernel, so keep \
        Recommends on or add linux-image-amd64";
    match Command::new("virt-make-fs").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => bail!(
            "`virt-make-fs --version` failed ({}); {INSTALL}",
            out.status
        ),
        Err(e) => bail!("virt-make-fs is not installed ({e}); {INSTALL}"),
    }
    // Without a host kernel libguestfs fails only after a long appliance
    // build attempt, with an obscure supermin error: say it up front.
    let has_kernel = std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false);
    ensure!(
        has_kernel || std::env::var_os("SUPERMIN_KERNEL").is_some(),
        "no /boot/vmlinuz-* for the libguestfs appliance: apt-get install -y linux-image-amd64"
    );
    Ok(())
}

/// `imgforge build` is being written separately; until it lands, clap
/// rejects the subcommand and there is nothing to compare.
fn check_imgforge_build(imgforge: &Path) -> Result<()> {
    let out = Command::new(imgforge)
        .args(["build", "--help"])
        .output()
        .with_context(|| format!("run {}", imgforge.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("unrecognized subcommand") {
        bail!(
            "`imgforge build` is not available in {} (clap: unrecognized subcommand 'build'): \
             this imgforge predates the build command; rebuild it (`cargo build --release -p \
             host`) from a tree that has it",
            imgforge.display()
        );
    }
    bail!("`imgforge build --help` failed ({}):\n{stderr}", out.status)
}

/// Downloads the build kernel into imgforge's cache now, so a first run does
/// not time a download from Debian's archive. (virt-make-fs's one-time cost,
/// supermin assembling its appliance from host files, is local work of a few
/// seconds and stays in.)
fn warm_kernel_cache() -> Result<()> {
    let bootscript = host::bootscript::load("image-creation-x86_64")?;
    let package = bootscript
        .kernel
        .debian_package
        .as_deref()
        .context("the image-creation bootscript names no kernel package")?;
    host::kernel::Kernel::from_debian_package(package, &host::kernel::cache_dir().join("kernels"))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The two contestants.

/// One tool's result in one run.
struct Outcome {
    /// Wall clock from the tar to a raw disk file.
    seconds: f64,
    /// How `seconds` splits, for the table.
    detail: String,
    disk: DiskFacts,
}

struct Row {
    run: usize,
    imgforge_first: bool,
    imgforge: Outcome,
    vmf: Outcome,
}

fn imgforge_to_raw(imgforge: &Path, tar: &Path, dir: &Path, run: usize) -> Result<Outcome> {
    // A fresh home per run: no image or volume left from an earlier one.
    let home = dir.join("imgforge-home");
    std::fs::create_dir_all(&home)?;
    let name = format!("bench-local-build-{run}");
    let mut rootfs = OsString::from("tar:");
    rootfs.push(tar);
    let mut build = Command::new(imgforge);
    build
        .env("IMGFORGE_HOME", &home)
        .args(["--json", "build", "--provider", "local"])
        .args(["--method", "from-rootfs", "--rootfs"])
        .arg(&rootfs)
        .args(["--name", &name, "--size", IMGFORGE_SIZE, "--accel", "tcg"]);
    let (build_s, stdout) = timed(&mut build, dir, "imgforge-build")?;
    let reported_s = build_result(&stdout)?;

    let disk = dir.join("imgforge.raw");
    let mut export = Command::new(imgforge);
    export
        .env("IMGFORGE_HOME", &home)
        .args(["image", "export", &name, "-o"])
        .arg(&disk)
        .args(["--format", "raw"]);
    let (export_s, _) = timed(&mut export, dir, "imgforge-export")?;

    let facts = disk_facts(&disk).context("judge imgforge's image")?;
    std::fs::remove_file(&disk).ok();
    Ok(Outcome {
        seconds: build_s + export_s,
        detail: format!(
            "build {build_s:.1} s (imgforge says {reported_s:.1} s) + export {export_s:.1} s"
        ),
        disk: facts,
    })
}

/// The `seconds` of `imgforge --json build`'s one JSON object, which must
/// also name the image it made.
fn build_result(stdout: &str) -> Result<f64> {
    let v: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("imgforge build --json printed no JSON object:\n{stdout}"))?;
    ensure!(
        v["image_id"].as_str().is_some_and(|s| !s.is_empty()),
        "imgforge build --json has no image_id: {v}"
    );
    v["seconds"]
        .as_f64()
        .with_context(|| format!("imgforge build --json has no numeric seconds: {v}"))
}

fn virt_make_fs(tar: &Path, dir: &Path) -> Result<Outcome> {
    let disk = dir.join("virt-make-fs.raw");
    let mut cmd = Command::new("virt-make-fs");
    cmd
        // Plain QEMU rather than libvirt, and TCG like imgforge's --accel tcg
        // (KVM guests hang here). Set, not inherited: the comparison needs it.
        .env("LIBGUESTFS_BACKEND", "direct")
        .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
        .args(["--partition=gpt", "--type=ext4"])
        .arg(format!("--size={VMF_EXTRA}"))
        .arg(tar)
        .arg(&disk);
    let (seconds, _) = timed(&mut cmd, dir, "virt-make-fs")?;
    let facts = disk_facts(&disk).context("judge virt-make-fs's image")?;
    std::fs::remove_file(&disk).ok();
    Ok(Outcome {
        seconds,
        detail: String::new(),
        disk: facts,
    })
}

// ---------------------------------------------------------------------------
// Running a step.

/// Runs `cmd` to completion and returns its wall-clock seconds and stdout.
/// Output goes to files in `dir` rather than pipes: a chatty tool must not
/// block on a full pipe while it is being timed.
fn timed(cmd: &mut Command, dir: &Path, what: &str) -> Result<(f64, String)> {
    let out_path = dir.join(format!("{what}.stdout"));
    let err_path = dir.join(format!("{what}.stderr"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("start {what}"))?;
    let status = wait_bounded(&mut child, what)?;
    let seconds = started.elapsed().as_secs_f64();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        bail!(
            "{what} failed ({status}); its stderr ends with:\n{}",
            host::provider::local::qemu::tail(&stderr, 30)
        );
    }
    Ok((seconds, stdout))
}

/// Waits for `child`, stopping it after [`STEP_TIMEOUT`]. SIGTERM first:
/// imgforge stops its QEMU on it, and libguestfs's recovery process kills
/// the appliance once virt-make-fs is gone; SIGKILL if that is not enough.
fn wait_bounded(child: &mut Child, what: &str) -> Result<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() > STEP_TIMEOUT {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).ok();
            std::thread::sleep(Duration::from_secs(10));
            child.kill().ok();
            child.wait().ok();
            bail!("{what} did not finish within {STEP_TIMEOUT:?}; stopped it");
        }
        // Polling adds at most this much to a step of minutes.
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Judging an output.

struct DiskFacts {
    virtual_size: u64,
    /// What the file occupies on the host (`qemu-img info` actual size).
    actual_size: u64,
    partitions: usize,
    has_esp: bool,
    root_size: u64,
}

fn disk_facts(disk: &Path) -> Result<DiskFacts> {
    let info = json_of(
        "qemu-img",
        &["info".as_ref(), "--output=json".as_ref(), disk.as_os_str()],
    )?;
    let table = json_of("sfdisk", &["--json".as_ref(), disk.as_os_str()])?;
    let partitions = partitions(&table)?;
    let root = root_partition(&partitions).context("no root partition")?;
    // e2fsprogs opens `FILE?offset=N` at that byte offset: no loop device,
    // no copy of the partition.
    let spec = format!("{}?offset={}", disk.display(), root.start);
    judge("e2fsck", &["-fn".as_ref(), spec.as_ref()])
        .context("e2fsck -fn on the root partition")?;
    Ok(DiskFacts {
        virtual_size: u64_field(&info, "virtual-size")?,
        actual_size: u64_field(&info, "actual-size")?,
        partitions: partitions.len(),
        has_esp: partitions.iter().any(|p| p.type_guid == ESP_TYPE),
        root_size: root.size,
    })
}

struct Partition {
    type_guid: String,
    /// Bytes.
    start: u64,
    size: u64,
}

/// The partitions of `sfdisk --json` output, in bytes.
fn partitions(table: &Value) -> Result<Vec<Partition>> {
    let t = &table["partitiontable"];
    let sector = t["sectorsize"].as_u64().unwrap_or(512);
    t["partitions"]
        .as_array()
        .context("sfdisk --json lists no partitions")?
        .iter()
        .map(|p| {
            Ok(Partition {
                type_guid: p["type"].as_str().unwrap_or_default().to_uppercase(),
                start: u64_field(p, "start")? * sector,
                size: u64_field(p, "size")? * sector,
            })
        })
        .collect()
}

/// The root filesystem: the largest partition that is not the ESP. Neither
/// tool's partition numbering or type GUID is taken for granted.
fn root_partition(partitions: &[Partition]) -> Option<&Partition> {
    partitions
        .iter()
        .filter(|p| p.type_guid != ESP_TYPE)
        .max_by_key(|p| p.size)
}

/// `program`'s stdout as JSON (stdout alone: a warning on stderr, such as
/// sfdisk's about a backup GPT, must not spoil the parse).
fn json_of(program: &str, args: &[&std::ffi::OsStr]) -> Result<Value> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    ensure!(
        out.status.success(),
        "{program} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{program} printed no JSON:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn u64_field(v: &Value, key: &str) -> Result<u64> {
    v[key]
        .as_u64()
        .with_context(|| format!("no numeric {key:?} in {v}"))
}

// ---------------------------------------------------------------------------
// The report.

fn report(tar: &Path, rows: &[Row]) {
    let tar_len = std::fs::metadata(tar).map(|m| m.len()).unwrap_or(0);
    println!("local build: imgforge vs virt-make-fs, same Debian bookworm rootfs tar, same run");
    println!("  tar: {} ({})", tar.display(), size(tar_len));
    println!(
        "  imgforge: build --provider local --method from-rootfs --size {IMGFORGE_SIZE} --accel tcg, \
         then image export --format raw"
    );
    println!(
        "  virt-make-fs: --partition=gpt --type=ext4 --size={VMF_EXTRA}, \
         LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg (appliance without network)"
    );
    println!("  seconds: wall clock from the tar to a raw disk file");
    println!(
        "  {:>3}  {:<12}  {:>10}  {:>14}  {:>6}",
        "run", "first", "imgforge s", "virt-make-fs s", "ratio"
    );
    let mut ratios = Vec::new();
    for r in rows {
        let ratio = r.imgforge.seconds / r.vmf.seconds;
        ratios.push(ratio);
        println!(
            "  {:>3}  {:<12}  {:>10.1}  {:>14.1}  {:>6.2}   imgforge: {}",
            r.run,
            if r.imgforge_first {
                "imgforge"
            } else {
                "virt-make-fs"
            },
            r.imgforge.seconds,
            r.vmf.seconds,
            ratio,
            r.imgforge.detail,
        );
    }
    println!(
        "  ratio imgforge / virt-make-fs (median of {} run(s)): {:.2}",
        rows.len(),
        median(ratios)
    );
    let last = rows.last().expect("at least one run");
    println!(
        "  outputs (run {}):  {:>10}  {:>11}  {:>10}  {:<24}  root e2fsck -fn",
        last.run, "virtual", "actual", "root", "partitions"
    );
    for (name, o) in [("imgforge", &last.imgforge), ("virt-make-fs", &last.vmf)] {
        println!(
            "    {name:<14}  {:>10}  {:>11}  {:>10}  {:<24}  clean",
            size(o.disk.virtual_size),
            size(o.disk.actual_size),
            size(o.disk.root_size),
            format!(
                "{} ({})",
                o.disk.partitions,
                if o.disk.has_esp {
                    "ESP + root"
                } else {
                    "root only"
                }
            ),
        );
    }
    println!("  note: {NOTE}");
}

fn size(bytes: u64) -> String {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
