//! A local server's QEMU process: started detached (`-daemonize`), found
//! again by its pid file and name, and controlled over QMP.
//!
//! The process outlives the `imgforge` command that started it, like a cloud
//! server outlives the API call. Stopping goes through QMP (`quit`, after
//! `system_powerdown` for guests that shut down on ACPI) so QEMU closes its
//! qcow2 files cleanly; a kill is only the last resort.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{debug, warn};

use crate::tools::RunTool;

/// The runtime files of one server, in its directory.
pub struct MachineFiles {
    dir: PathBuf,
}

impl MachineFiles {
    pub fn new(dir: &Path) -> Self {
        MachineFiles {
            dir: dir.to_path_buf(),
        }
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// The QEMU guest agent's channel of a server booted from a volume.
    pub fn guest_agent_socket(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }
}

/// The `-name` of a server's QEMU: how its process is recognised (a pid
/// alone may have been reused).
pub fn process_name(server_id: &str) -> String {
    format!("imgforge-{server_id}")
}

/// Starts `cmd` (a complete QEMU command line) detached. Returns the pid
/// once QEMU has initialised; an error carries QEMU's own message.
pub fn launch(mut cmd: Command, files: &MachineFiles, name: &str) -> Result<u32> {
    let _ = std::fs::remove_file(files.pid_file());
    let _ = std::fs::remove_file(files.qmp_socket());
    cmd.arg("-name").arg(name);
    cmd.arg("-daemonize");
    cmd.arg("-pidfile").arg(files.pid_file());
    cmd.arg("-qmp").arg(format!(
        "unix:{},server=on,wait=off",
        files.qmp_socket().to_string_lossy().replace(',', ",,")
    ));
    let log = File::create(files.qemu_log())
        .with_context(|| format!("create {}", files.qemu_log().display()))?;
    debug!("starting {:?}", cmd);
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .running("qemu-system-x86_64")?;
    if !status.success() {
        let message = std::fs::read_to_string(files.qemu_log()).unwrap_or_default();
        bail!("QEMU failed to start ({status}): {}", message.trim());
    }
    let pid = std::fs::read_to_string(files.pid_file())
        .with_context(|| format!("read {}", files.pid_file().display()))?;
    pid.trim()
        .parse()
        .with_context(|| format!("pid file says {pid:?}"))
}

/// Whether `pid` is still the QEMU named `name`.
pub fn is_alive(pid: u32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // A zombie has an empty command line: it is gone for our purposes.
    cmdline.split(|b| *b == 0).any(|arg| arg == name.as_bytes())
}

/// Stops the QEMU `pid`. With `powerdown`, the guest first gets an ACPI
/// power-button press and up to that long to power off by itself.
pub fn stop(files: &MachineFiles, pid: u32, name: &str, powerdown: Option<Duration>) -> Result<()> {
    if let Some(grace) = powerdown {
        match qmp(files, |q| {
            q.execute(&qapi::qmp::system_powerdown {}).map(drop)
        }) {
            Ok(()) => {
                if wait_gone(pid, name, grace) {
                    return Ok(());
                }
                debug!("the guest did not power off within {grace:?}; quitting QEMU");
            }
            Err(e) => debug!("system_powerdown: {e:#}"),
        }
    }
    // QEMU may close the socket before answering `quit`: the answer does
    // not matter, the process going away does.
    if let Err(e) = qmp(files, |q| q.execute(&qapi::qmp::quit {}).map(drop)) {
        debug!("quit: {e:#}");
    }
    if wait_gone(pid, name, Duration::from_secs(15)) {
        return Ok(());
    }
    warn!("QEMU {pid} did not quit over QMP; killing it");
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    if wait_gone(pid, name, Duration::from_secs(5)) {
        Ok(())
    } else {
        bail!("QEMU {pid} is still running after SIGKILL")
    }
}

type QmpStream<'a> = qapi::Qmp<qapi::Stream<std::io::BufReader<&'a UnixStream>, &'a UnixStream>>;

/// Connects to the server's QMP socket, negotiates, runs `f`.
fn qmp(
    files: &MachineFiles,
    f: impl FnOnce(&mut QmpStream<'_>) -> Result<(), qapi::ExecuteError>,
) -> Result<()> {
    let socket = files.qmp_socket();
    let stream = UnixStream::connect(&socket)
        .with_context(|| format!("connect to QMP at {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut qmp = qapi::Qmp::from_stream(&stream);
    qmp.handshake().context("QMP handshake")?;
    f(&mut qmp).context("QMP command")
}

/// Waits until `pid` is no longer the QEMU `name`.
fn wait_gone(pid: u32, name: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_alive(pid, name) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
