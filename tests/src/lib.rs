//! Helpers for the end-to-end tests: the built artifacts, and a build
//! server (QEMU, TCG) booted from the image-creation bootscript with a blank
//! volume, a metadata server and a done-signal forward.

pub mod fake_scaleway;
pub mod unix_user;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use contract::DoneLine;
use host::done_signal;
use host::provider::local::metadata_server::{MetadataServer, ServerMetadata};
use host::provider::local::qemu::{
    self, Accel, BootscriptVm, GuestForward, PortForward, UserNet, Vm,
};

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The cargo target directory the tests were built in.
pub fn target_dir() -> PathBuf {
    // .../target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

/// The `imgforge` binary of this build (for the guestfwd bridge).
pub fn imgforge_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("imgforge");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build -p host` before the tests",
        p.display()
    );
    p
}

/// The static agent (`cargo build --profile agent --target x86_64-unknown-linux-musl`).
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("IMGFORGE_AGENT") {
        return PathBuf::from(p);
    }
    let p = target_dir().join("x86_64-unknown-linux-musl/agent/initrd-agent");
    assert!(
        p.is_file(),
        "{} is missing: build it with `cargo build --profile agent --target x86_64-unknown-linux-musl -p initrd-agent`",
        p.display()
    );
    p
}

/// The image-creation bootscript's artifacts, built once per test binary.
pub fn bootscript_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    static BUILD: Mutex<()> = Mutex::new(());
    DIR.get_or_init(|| {
        let _guard = BUILD.lock().unwrap();
        let dir = target_dir().join("e2e/bootscript");
        let script = host::bootscript::load("image-creation-x86_64").unwrap();
        host::bootscript::build(
            &script,
            host::bootscript::KernelChoice::FromBootscript,
            &agent_bin(),
            &dir,
        )
        .expect("build the image-creation bootscript");
        dir
    })
}

/// Options for one build server.
pub struct BuildServer {
    /// Appended to the bootscript's arguments.
    pub cmdline: String,
    /// Server tags; `None` starts no metadata server.
    pub tags: Option<Vec<String>>,
    pub volume_size: u64,
    pub done_port_guest: u16,
    /// A host HTTP server the guest reaches at [`ARTIFACTS_GUEST`].
    pub artifacts: Option<SocketAddr>,
    pub memory_mib: u32,
    /// Fill the volume with this byte first (proves that a method writes
    /// or zeroes everything it claims, instead of relying on a blank volume).
    pub volume_fill: Option<u8>,
}

impl Default for BuildServer {
    fn default() -> Self {
        BuildServer {
            cmdline: String::new(),
            tags: Some(vec![]),
            volume_size: 64 << 20,
            done_port_guest: 22,
            artifacts: None,
            memory_mib: 1024,
            volume_fill: None,
        }
    }
}

/// Where the guest reaches the test's artifact server.
pub const ARTIFACTS_GUEST: (std::net::Ipv4Addr, u16) =
    (std::net::Ipv4Addr::new(169, 254, 42, 10), 80);

/// The URL the guest uses for `path` on the artifact server.
pub fn guest_url(path: &str) -> String {
    format!("http://{}:{}{path}", ARTIFACTS_GUEST.0, ARTIFACTS_GUEST.1)
}

/// A running build server and what it talks to.
pub struct Running {
    pub vm: Vm,
    pub metadata: Option<MetadataServer>,
    pub done_addr: SocketAddr,
    /// The build server's volume (a raw file).
    pub disk: PathBuf,
    /// Holds the volume and the console log; removed on drop.
    pub dir: tempfile::TempDir,
}

impl BuildServer {
    pub fn start(self) -> Result<Running> {
        let artifacts = bootscript_dir();
        let info = host::bootscript::read_info(artifacts)?;
        let dir = tempfile::tempdir()?;
        let disk = dir.path().join("volume.raw");
        match self.volume_fill {
            None => std::fs::File::create(&disk)?.set_len(self.volume_size)?,
            Some(byte) => {
                use std::io::Write;
                let mut f = std::io::BufWriter::new(std::fs::File::create(&disk)?);
                let chunk = vec![byte; 1 << 20];
                for _ in 0..self.volume_size.div_ceil(1 << 20) {
                    f.write_all(&chunk)?;
                }
                f.into_inner()?.set_len(self.volume_size)?;
            }
        }
        let metadata = match self.tags {
            Some(tags) => {
                let mut meta =
                    ServerMetadata::new("11111111-2222-3333-4444-555555555555", "e2e-build");
                meta.tags = tags;
                Some(MetadataServer::start(meta)?)
            }
            None => None,
        };
        let done_addr = qemu::free_loopback_port()?;
        let vm = BootscriptVm {
            kernel: artifacts.join(&info.kernel),
            initrd: artifacts.join(&info.initrd),
            append: format!("{} {}", info.bootcmdargs, self.cmdline),
            disks: vec![disk.clone()],
            memory_mib: self.memory_mib,
            cpus: 1,
            accel: Accel::Tcg,
            net: UserNet {
                host_forwards: vec![PortForward {
                    host: done_addr,
                    guest_port: self.done_port_guest,
                }],
                guest_forwards: metadata
                    .iter()
                    .map(|m| GuestForward {
                        guest_ip: qemu::METADATA_GUEST_IP,
                        guest_port: 80,
                        target: m.addr(),
                    })
                    .chain(self.artifacts.map(|a| GuestForward {
                        guest_ip: ARTIFACTS_GUEST.0,
                        guest_port: ARTIFACTS_GUEST.1,
                        target: a,
                    }))
                    .collect(),
                guest_commands: vec![],
                bridge_exe: imgforge_bin(),
            },
            serial_log: dir.path().join("console.log"),
        };
        let vm = vm.spawn()?;
        Ok(Running {
            vm,
            metadata,
            done_addr,
            disk,
            dir,
        })
    }
}

impl Running {
    /// Waits for the done line; on failure the error carries the console.
    pub async fn wait_done(&mut self, timeout: Duration) -> Result<DoneLine> {
        let addr = self.done_addr;
        let vm = &mut self.vm;
        let result = done_signal::wait(addr, timeout, || vm.check_running()).await;
        result.with_context(|| format!("console:\n{}", qemu::tail(&self.vm.console(), 40)))
    }

    pub fn console(&self) -> String {
        self.vm.console()
    }
}

/// Reads `[  uptime]` stamps: the uptime of the first console line that
/// contains `needle`.
pub fn uptime_of(console: &str, needle: &str) -> Option<f64> {
    let line = console.lines().find(|l| l.contains(needle))?;
    let start = line.find('[')? + 1;
    let end = line[start..].find(']')? + start;
    line[start..end].trim().parse().ok()
}

/// A minimal bootable root filesystem as a gzip tarball: static busybox, the
/// Debian kernel of the e2e bootscript at /boot, and an /sbin/init that
/// prints `marker` and powers off. Built in memory with deterministic
/// metadata.
pub fn busybox_rootfs_tar_gz(marker: &str, with_kernel: bool) -> Vec<u8> {
    use flate2::{write::GzEncoder, Compression};
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut add = |path: &str, mode: u32, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
    };
    for d in [
        "bin", "sbin", "boot", "dev", "proc", "sys", "etc", "tmp", "root",
    ] {
        add(d, 0o755, tar::EntryType::Directory, &[], None);
    }
    let busybox =
        std::fs::read("/bin/busybox").expect("/bin/busybox (apt-get install busybox-static)");
    add(
        "bin/busybox",
        0o755,
        tar::EntryType::Regular,
        &busybox,
        None,
    );
    add(
        "bin/sh",
        0o777,
        tar::EntryType::Symlink,
        &[],
        Some("busybox"),
    );
    let init = format!(
        "#!/bin/sh\n/bin/busybox mount -t proc proc /proc\n/bin/busybox echo {marker}\n\
         /bin/busybox echo root=$(/bin/busybox cat /proc/cmdline)\n/bin/busybox poweroff -f\n"
    );
    add(
        "sbin/init",
        0o755,
        tar::EntryType::Regular,
        init.as_bytes(),
        None,
    );
    add(
        "etc/hostname",
        0o644,
        tar::EntryType::Regular,
        b"imgforge-test\n",
        None,
    );
    if with_kernel {
        let vmlinuz = std::fs::read(bootscript_dir().join("vmlinuz")).unwrap();
        add(
            "boot/vmlinuz-6.1.0-test",
            0o644,
            tar::EntryType::Regular,
            &vmlinuz,
            None,
        );
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// Copies `len` bytes at `offset` of `disk` into a new file (for fsck tools
/// that take a filesystem image).
pub fn slice_to_file(disk: &Path, offset: u64, len: u64, out: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(disk)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut o = std::fs::File::create(out)?;
    std::io::copy(&mut f.take(len), &mut o)?;
    Ok(())
}

/// Runs a judge tool; returns its combined output, failing on a non-zero
/// exit.
pub fn judge(program: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success(),
        "{program} failed ({}):\n{text}",
        out.status
    );
    Ok(text)
}

/// Boots `disk` with `imgforge boot` (OVMF, NVMe, no network, disk opened
/// read-only) and returns the console line that matched `pattern`.
pub fn boot_uefi(disk: &Path, pattern: &str, timeout: Duration) -> Result<String> {
    let out = std::process::Command::new(imgforge_bin())
        .env("IMGFORGE_ACCEL", "tcg")
        .args(["--json", "boot"])
        .arg(disk)
        .args([
            "--expect",
            pattern,
            "--timeout",
            &timeout.as_secs().to_string(),
        ])
        .output()
        .context("run imgforge boot")?;
    anyhow::ensure!(
        out.status.success(),
        "imgforge boot failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("imgforge boot --json output")?;
    Ok(v["matched"].as_str().unwrap_or_default().to_string())
}

/// A Debian bookworm server rootfs (kernel, GRUB EFI, systemd, a serial
/// console in GRUB's kernel command line) made by `imgforge rootfs debian:`, as a plain
/// tar. Cached in the target directory: the first build takes a minute and
/// downloads about 130 MB from Debian's archive.
pub fn debian_bookworm_tar() -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap();
    let out = target_dir().join("e2e/debian-bookworm-imgforge.tar");
    if out.is_file() {
        return out;
    }
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    // The same rootfs as `imgforge rootfs debian:bookworm --hostname
    // imgforge-debian` (kernel, GRUB, systemd, serial console).
    let opts = host::rootfs::Options {
        debian: host::rootfs::DebianOptions {
            hostname: "imgforge-debian".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    host::rootfs::build(
        &host::rootfs::Source::Debian("bookworm".into()),
        &out,
        &opts,
    )
    .expect("build the Debian bookworm rootfs");
    out
}

/// A local provider state directory of its own, and `imgforge` commands run
/// against it (TCG, the e2e bootscript's agent).
pub struct LocalHome {
    pub dir: tempfile::TempDir,
}

impl LocalHome {
    pub fn new() -> LocalHome {
        LocalHome {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `imgforge ARGS` with `IMGFORGE_HOME` set to this directory.
    pub fn command<I, S>(&self, args: I) -> std::process::Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = std::process::Command::new(imgforge_bin());
        cmd.args(args)
            .env("IMGFORGE_HOME", self.path())
            .env("IMGFORGE_ACCEL", "tcg")
            .env("IMGFORGE_AGENT", agent_bin());
        cmd
    }

    /// Runs `imgforge --json ARGS`, asserts success, parses stdout.
    pub fn json<I, S>(&self, args: I) -> serde_json::Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(["--json"]);
        cmd.args(args);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{cmd:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The record files of one kind (`servers`, `volumes`, `snapshots`,
    /// `images`) and the data files beside them.
    pub fn files(&self, kind: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path().join(kind))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Asserts that no server or volume is left, and no QEMU process runs
    /// for this directory.
    pub fn assert_no_servers_left(&self) {
        assert_eq!(self.files("servers"), Vec::<String>::new(), "servers left");
        assert_eq!(self.files("volumes"), Vec::<String>::new(), "volumes left");
        let running = qemu_processes_for(self.path());
        assert!(running.is_empty(), "QEMU processes left: {running:?}");
    }
}

impl Default for LocalHome {
    fn default() -> Self {
        Self::new()
    }
}

/// Live (non-zombie) QEMU processes whose command line mentions `dir`.
pub fn qemu_processes_for(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.starts_with("qemu-system") && cmdline.contains(&needle)
        })
        .collect()
}
