//! Helpers for the end-to-end tests: the built artifacts, and a build
//! server (QEMU, TCG) booted from the image-creation bootscript with a blank
//! volume, a metadata server and a done-signal forward.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use host::done_signal::{self, DoneLine};
use host::metadata_server::{MetadataServer, ServerMetadata};
use host::qemu::{self, Accel, BootscriptVm, GuestForward, PortForward, Vm};

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
}

impl Default for BuildServer {
    fn default() -> Self {
        BuildServer {
            cmdline: String::new(),
            tags: Some(vec![]),
            volume_size: 64 << 20,
            done_port_guest: 22,
        }
    }
}

/// A running build server and what it talks to.
pub struct Running {
    pub vm: Vm,
    pub metadata: Option<MetadataServer>,
    pub done_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl BuildServer {
    pub fn start(self) -> Result<Running> {
        let artifacts = bootscript_dir();
        let info = host::bootscript::read_info(artifacts)?;
        let dir = tempfile::tempdir()?;
        let disk = dir.path().join("volume.raw");
        std::fs::File::create(&disk)?.set_len(self.volume_size)?;
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
            disks: vec![disk],
            memory_mib: 1024,
            cpus: 1,
            accel: Accel::Tcg,
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
                .collect(),
            bridge_exe: imgforge_bin(),
            serial_log: dir.path().join("console.log"),
        };
        let vm = vm.spawn()?;
        Ok(Running {
            vm,
            metadata,
            done_addr,
            _dir: dir,
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
