//! from-qcow2 benchmark: the agent run natively (no VM) against
//! `qemu-img convert -O raw`, on the same 4 GiB disk image in three flavours.
//!
//! The image: a 4 GiB raw disk holding about 1 GiB of data in several
//! regions (incompressible random bytes, text-like data, machine-code-like
//! data, small blocks scattered like filesystem metadata, an allocated run
//! of zeros) with holes in between, converted by `qemu-img convert -O qcow2`
//! plain, with `-c` (zlib) and with `-c -o compression_type=zstd`. The files
//! live in `target/bench-qcow2/<version>/` and are reused by later runs.
//!
//! For each variant, `BENCH_RUNS` times (default 3), in alternating order:
//! - the agent: `initrd-agent run --method from-qcow2` onto a fresh sparse
//!   4 GiB file, fetching the image from an in-process artifact server on
//!   loopback (tables by `Range`, then one GET for the data);
//! - the baseline: `qemu-img convert -O raw`, reading the qcow2 file directly.
//!
//! Page cache is dropped before every timed run, so both start cold. Each
//! time is the wall clock from spawn to exit plus an fsync of the output
//! (both tools flush on their own; the fsync makes sure neither is credited
//! with data still in the page cache). Once per variant the two outputs are
//! compared byte for byte; a mismatch fails the bench. Printed: median
//! seconds, MiB/s of virtual size and of file size, the throughput ratio
//! agent / qemu-img (target >= 1.0) and the agent's peak RSS (target <= 64 MiB).
//!
//! `cargo bench -p tests --bench from_qcow2` (as root, for drop_caches; build
//! the agent first with `--profile agent --target x86_64-unknown-linux-musl`).

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use contract::DoneLine;
use host::serve::ArtifactServer;
use tests::{agent_bin, target_dir};

const MIB: u64 = 1 << 20;
const VIRTUAL_SIZE: u64 = 4 << 30;
/// Bumped whenever the image's content or the conversions change: a new
/// directory is made and older ones are removed.
const IMAGE_VERSION: &str = "v1";
const DEFAULT_RUNS: usize = 3;
const RATIO_TARGET: f64 = 1.0;
const RSS_TARGET_KIB: u64 = 64 << 10;
/// How often a running tool's VmHWM is sampled (for qemu-img, which does not
/// report its own; the agent logs its own as well).
const POLL: Duration = Duration::from_millis(2);

// ---------------------------------------------------------------------------
// The test image.

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

#[derive(Clone, Copy)]
enum Fill {
    /// Incompressible: packages, media, encrypted or compressed files.
    Random,
    /// Text-like: logs, configs, sources (zlib gets ~3-4x).
    Text,
    /// Machine-code-like: half random bytes, half small values (~1.5x).
    Code,
    /// Zeros actually written (an allocated but empty region).
    Zeros,
}

struct Region {
    offset: u64,
    len: u64,
    fill: Fill,
}

/// About 1 GiB of data in a 4 GiB disk: large regions of each kind, holes
/// between them, and 4-64 KiB blocks scattered over the upper half (so that
/// many clusters are partly filled, as with filesystem metadata).
fn regions() -> Vec<Region> {
    let region = |offset_mib: u64, len_mib: u64, fill| Region {
        offset: offset_mib * MIB,
        len: len_mib * MIB,
        fill,
    };
    let mut out = vec![
        region(1, 64, Fill::Code),
        region(96, 32, Fill::Zeros),
        region(128, 320, Fill::Random),
        region(512, 384, Fill::Text),
        region(1280, 128, Fill::Code),
        region(3584, 64, Fill::Random),
    ];
    let mut rng = Rng(0x51f1_5eed_0bad_cafe);
    let (lo, hi) = (2048 * MIB, 3584 * MIB);
    for i in 0..2048u64 {
        let len = (4 << 10) * (1 + rng.below(16));
        // 4 KiB aligned, like filesystem blocks.
        let offset = lo + rng.below((hi - lo - len) >> 12) * 4096;
        let fill = [Fill::Text, Fill::Code, Fill::Random][(i % 3) as usize];
        out.push(Region { offset, len, fill });
    }
    out
}

const WORDS: &[&str] = &[
    "the", "kernel", "module", "config", "systemd", "service", "network", "return", "static",
    "const", "error", "value", "string", "buffer", "device", "driver", "package", "library",
    "function", "struct", "#include", "0x7f", "int", "char", "void", "if", "else", "for", "while",
    "{", "}", ";", "\n", "\t",
];

fn fill(rng: &mut Rng, kind: Fill, buf: &mut [u8]) {
    match kind {
        Fill::Random => {
            for chunk in buf.chunks_mut(8) {
                let v = rng.next().to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
        }
        Fill::Code => {
            for chunk in buf.chunks_mut(8) {
                let v = rng.next();
                let b = v.to_le_bytes();
                let word = [b[0], b[1], b[2], b[3], 0, (v >> 40) as u8 & 7, 0, 0];
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
        }
        Fill::Text => {
            let mut at = 0;
            while at < buf.len() {
                let word = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
                for &c in word.iter().chain(b" ") {
                    if at == buf.len() {
                        break;
                    }
                    buf[at] = c;
                    at += 1;
                }
            }
        }
        Fill::Zeros => buf.fill(0),
    }
}

/// The sparse raw disk; returns the bytes of data written.
fn write_raw(path: &Path) -> u64 {
    let file = File::create(path).unwrap();
    file.set_len(VIRTUAL_SIZE).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0u8; (8 * MIB) as usize];
    let mut written = 0;
    for r in regions() {
        let mut done = 0;
        while done < r.len {
            let n = (r.len - done).min(buf.len() as u64) as usize;
            fill(&mut rng, r.fill, &mut buf[..n]);
            file.write_all_at(&buf[..n], r.offset + done).unwrap();
            done += n as u64;
        }
        written += r.len;
    }
    file.sync_all().unwrap();
    written
}

struct Variant {
    name: &'static str,
    /// `qemu-img convert` options that make it from the raw disk.
    convert: &'static [&'static str],
    path: PathBuf,
}

fn variants(dir: &Path) -> Vec<Variant> {
    let v = |name, convert| Variant {
        name,
        convert,
        path: dir.join(format!("{name}.qcow2")),
    };
    vec![
        v("plain", &[]),
        v("zlib", &["-c"]),
        v("zstd", &["-c", "-o", "compression_type=zstd"]),
    ]
}

fn run_ok(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// The three qcow2 files, made once per [`IMAGE_VERSION`]: a `complete`
/// marker is written last, so an interrupted run starts over.
fn test_images() -> Vec<Variant> {
    let root = target_dir().join("bench-qcow2");
    let dir = root.join(IMAGE_VERSION);
    let variants = variants(&dir);
    let marker = dir.join("complete");
    if marker.is_file() {
        return variants;
    }
    remove_stale_versions(&root);
    fs::create_dir_all(&dir).unwrap();
    let started = Instant::now();
    let raw = dir.join("disk.raw");
    let data = write_raw(&raw);
    for v in &variants {
        let partial = v.path.with_extension("partial");
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .args(v.convert)
                .arg(&raw)
                .arg(&partial),
        );
        fs::rename(&partial, &v.path).unwrap();
    }
    // The raw disk is only the conversions' input: drop it to save 1 GiB.
    fs::remove_file(&raw).unwrap();
    fs::write(&marker, format!("{data}\n")).unwrap();
    eprintln!(
        "made the test images in {} ({:.0} s)",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    variants
}

/// Earlier versions' images (and outputs of interrupted runs), so that the
/// cache does not grow with every version bump.
fn remove_stale_versions(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name() != IMAGE_VERSION {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Data bytes of the image as written (read back from the marker).
fn image_data_bytes() -> u64 {
    let marker = target_dir()
        .join("bench-qcow2")
        .join(IMAGE_VERSION)
        .join("complete");
    fs::read_to_string(marker).unwrap().trim().parse().unwrap()
}

// ---------------------------------------------------------------------------
// Timed runs.

/// Both tools start with nothing cached: the image is read from disk, as it
/// would be on a build host that did not just write it.
fn drop_caches() {
    run_ok(&mut Command::new("sync"));
    fs::write("/proc/sys/vm/drop_caches", "3\n")
        .expect("cannot drop the page cache (the bench must run as root)");
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Waits for `child`, sampling its VmHWM meanwhile (the last sample before
/// exit is within [`POLL`] of the true peak, which only grows).
fn wait_sampling_peak(mut child: Child) -> (ExitStatus, Option<u64>) {
    let mut peak = None;
    loop {
        // Sampled before try_wait: once the child has exited, its memory
        // figures are gone from /proc.
        if let Some(kib) = vm_hwm_kib(child.id()) {
            peak = Some(kib.max(peak.unwrap_or(0)));
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (status, peak);
        }
        std::thread::sleep(POLL);
    }
}

struct Timed {
    seconds: f64,
    sampled_peak_kib: Option<u64>,
}

/// Runs `cmd` with stdout and stderr to files in `logs` (named `tag`), then
/// fsyncs `output`. Panics, showing the log, when the command fails.
fn timed(cmd: &mut Command, tag: &str, logs: &Path, output: &Path) -> Timed {
    let stdout = logs.join(format!("{tag}.stdout"));
    let stderr = logs.join(format!("{tag}.stderr"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap());
    let started = Instant::now();
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let (status, sampled_peak_kib) = wait_sampling_peak(child);
    if !status.success() {
        panic!(
            "{cmd:?} failed: {status}\n{}",
            fs::read_to_string(&stderr).unwrap_or_default()
        );
    }
    File::open(output).unwrap().sync_all().unwrap();
    Timed {
        seconds: started.elapsed().as_secs_f64(),
        sampled_peak_kib,
    }
}

struct AgentRun {
    timed: Timed,
    /// The VmHWM the agent logs at the end of the build.
    logged_peak_kib: u64,
    /// Seconds between the agent's log lines: tables read, data written,
    /// download finished and volume synced, post-build (GPT check, sync).
    phases: [f64; 4],
}

/// The agent onto a fresh sparse file of the virtual size (the size a
/// build server's blank volume would have).
fn run_agent(url: &str, out: &Path, logs: &Path, tag: &str) -> AgentRun {
    let _ = fs::remove_file(out);
    File::create(out).unwrap().set_len(VIRTUAL_SIZE).unwrap();
    drop_caches();
    let timed = timed(
        Command::new(agent_bin())
            .args(["run", "--method", "from-qcow2", "--volume"])
            .arg(out)
            .arg("--param")
            .arg(format!("disk_img_url={url}")),
        tag,
        logs,
        out,
    );
    let log = fs::read_to_string(logs.join(format!("{tag}.stderr"))).unwrap();
    let done = fs::read_to_string(logs.join(format!("{tag}.stdout"))).unwrap();
    let line: DoneLine = serde_json::from_str(done.trim())
        .unwrap_or_else(|e| panic!("the agent's stdout is not a done line ({e}): {done}"));
    assert_eq!(line.status, "0", "the agent reports a failure: {done}");
    AgentRun {
        timed,
        logged_peak_kib: logged_peak_kib(&log),
        phases: phases(&log),
    }
}

fn logged_peak_kib(log: &str) -> u64 {
    log.lines()
        .find_map(|l| {
            let rest = l.split("agent peak memory ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no 'agent peak memory N KiB' in the agent log:\n{log}"))
}

/// The uptime stamp (`[  123.456789]`) of the first log line containing `what`.
fn stamp(log: &str, what: &str) -> f64 {
    log.lines()
        .find(|l| l.contains(what))
        .and_then(|l| l.strip_prefix('[')?.split(']').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stamped '{what}' line in the agent log:\n{log}"))
}

fn phases(log: &str) -> [f64; 4] {
    let first = log
        .lines()
        .find_map(|l| l.strip_prefix('[')?.split(']').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("an empty agent log"));
    let marks = [
        first,
        stamp(log, "writing a qcow2"),
        stamp(log, " bytes read, "),
        stamp(log, "disk image: "),
        stamp(log, "build finished"),
    ];
    std::array::from_fn(|i| marks[i + 1] - marks[i])
}

/// qemu-img as one would use it: reading the local file, writing a new raw
/// file (sparse where the image has no data).
fn run_qemu_img(image: &Path, out: &Path, logs: &Path, tag: &str) -> Timed {
    let _ = fs::remove_file(out);
    drop_caches();
    timed(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(image)
            .arg(out),
        tag,
        logs,
        out,
    )
}

/// The two outputs must hold the same disk: a fast wrong answer is no answer.
fn verify_same(agent_out: &Path, qemu_out: &Path, variant: &str) {
    let status = Command::new("cmp")
        .arg("-n")
        .arg(VIRTUAL_SIZE.to_string())
        .arg(agent_out)
        .arg(qemu_out)
        .status()
        .expect("run cmp");
    assert!(
        status.success(),
        "{variant}: the agent's output differs from qemu-img's ({} vs {})",
        agent_out.display(),
        qemu_out.display()
    );
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

// ---------------------------------------------------------------------------
// Figures.

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mib_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / MIB as f64 / seconds
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn kib_or_unknown(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

struct Results {
    agent: Vec<AgentRun>,
    qemu: Vec<Timed>,
    /// Bytes allocated on disk by the agent's and qemu-img's outputs: what
    /// each had to write (qemu-img leaves the image's holes as holes).
    allocated: (u64, u64),
}

/// Runs both tools `runs` times on one variant, alternating which goes first
/// (so that whatever the first run of a pair pays, both pay it equally).
fn bench_variant(url: &str, v: &Variant, runs: usize, out_dir: &Path) -> Results {
    let agent_out = out_dir.join("agent.raw");
    let qemu_out = out_dir.join("qemu-img.raw");
    let mut r = Results {
        agent: Vec::new(),
        qemu: Vec::new(),
        allocated: (0, 0),
    };
    for i in 0..runs {
        let tag = |tool| format!("{}-{tool}-{}", v.name, i + 1);
        let agent_first = i % 2 == 1;
        if agent_first {
            r.agent
                .push(run_agent(url, &agent_out, out_dir, &tag("agent")));
        }
        r.qemu
            .push(run_qemu_img(&v.path, &qemu_out, out_dir, &tag("qemu-img")));
        if !agent_first {
            r.agent
                .push(run_agent(url, &agent_out, out_dir, &tag("agent")));
        }
        if i == 0 {
            verify_same(&agent_out, &qemu_out, v.name);
            r.allocated = (allocated(&agent_out), allocated(&qemu_out));
        }
        eprintln!(
            "  {} run {}: agent {:.2} s, qemu-img {:.2} s",
            v.name,
            i + 1,
            r.agent[i].timed.seconds,
            r.qemu[i].seconds
        );
    }
    let _ = fs::remove_file(&agent_out);
    let _ = fs::remove_file(&qemu_out);
    r
}

fn print_variant(v: &Variant, r: &Results) {
    let file_size = fs::metadata(&v.path).unwrap().len();
    let agent_s = median(r.agent.iter().map(|a| a.timed.seconds).collect());
    let qemu_s = median(r.qemu.iter().map(|t| t.seconds).collect());
    let ratio = qemu_s / agent_s;
    println!(
        "  {:5}  file {:7.1} MiB  qemu-img {:6.2} s {:7.1} MiB/s virt {:6.1} MiB/s file   \
         agent {:6.2} s {:7.1} MiB/s virt {:6.1} MiB/s file   ratio {ratio:.2} ({})",
        v.name,
        file_size as f64 / MIB as f64,
        qemu_s,
        mib_s(VIRTUAL_SIZE, qemu_s),
        mib_s(file_size, qemu_s),
        agent_s,
        mib_s(VIRTUAL_SIZE, agent_s),
        mib_s(file_size, agent_s),
        met(ratio >= RATIO_TARGET)
    );
    let runs = |f: &dyn Fn(usize) -> f64| {
        (0..r.agent.len())
            .map(|i| format!("{:.2}", f(i)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "         runs (s): qemu-img [{}]  agent [{}]",
        runs(&|i| r.qemu[i].seconds),
        runs(&|i| r.agent[i].timed.seconds)
    );
    let phase = |p: usize| median(r.agent.iter().map(|a| a.phases[p]).collect());
    println!(
        "         agent phases (median s): tables by Range {:.2}, zeros + data pass {:.2}, \
         end of download + sync {:.2}, post-build {:.2}",
        phase(0),
        phase(1),
        phase(2),
        phase(3)
    );
    println!(
        "         output allocated on disk: agent {:.0} MiB, qemu-img {:.0} MiB",
        r.allocated.0 as f64 / MIB as f64,
        r.allocated.1 as f64 / MIB as f64
    );
    let logged = r.agent.iter().map(|a| a.logged_peak_kib).max().unwrap();
    let sampled = r
        .agent
        .iter()
        .filter_map(|a| a.timed.sampled_peak_kib)
        .max();
    let qemu_peak = r.qemu.iter().filter_map(|t| t.sampled_peak_kib).max();
    println!(
        "         agent peak RSS {:.1} MiB logged ({} sampled)  target <= {} MiB: {}   \
         qemu-img peak RSS {} sampled",
        logged as f64 / 1024.0,
        kib_or_unknown(sampled),
        RSS_TARGET_KIB >> 10,
        met(logged <= RSS_TARGET_KIB),
        kib_or_unknown(qemu_peak)
    );
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .map(|s| s.parse().expect("BENCH_RUNS: a number"))
        .unwrap_or(DEFAULT_RUNS);
    assert!(runs >= 1, "BENCH_RUNS must be at least 1");
    let variants = test_images();
    let out_dir = target_dir().join("bench-qcow2").join("out");
    fs::create_dir_all(&out_dir).unwrap();

    // The server runs on its own runtime's threads, so this thread can block
    // on the child processes.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime
        .block_on(ArtifactServer::start("127.0.0.1:0".parse().unwrap(), None))
        .unwrap();
    let mut results = Vec::new();
    for v in &variants {
        let served = runtime.block_on(server.add_file(&v.path)).unwrap();
        results.push(bench_variant(&served.url, v, runs, &out_dir));
    }
    runtime.block_on(server.shutdown());

    println!(
        "imgforge from-qcow2 benchmark: {} GiB virtual disk, {:.0} MiB of data; median of {runs} runs, \
         alternating order, page cache dropped before each",
        VIRTUAL_SIZE >> 30,
        image_data_bytes() as f64 / MIB as f64
    );
    println!(
        "  agent: `initrd-agent run --method from-qcow2` natively onto a sparse {} GiB file, image over \
         HTTP on loopback (in-process artifact server); qemu-img: `convert -O raw` reading the local file",
        VIRTUAL_SIZE >> 30
    );
    println!(
        "  seconds: spawn to exit + fsync of the output; ratio = agent MiB/s / qemu-img MiB/s \
         (target >= {RATIO_TARGET:.1}); outputs compared with cmp once per variant: identical"
    );
    for (v, r) in variants.iter().zip(&results) {
        print_variant(v, r);
    }
    println!("  logs of the last runs: {}", out_dir.display());
}
