//! Duties of PID 1 in the image-creation initrd.
//!
//! PID 1 mounts the API filesystems, loads the kernel modules, then forks:
//! the child (the *worker*) runs the agent on a tokio runtime, and PID 1
//! stays a plain loop that reaps every process. Splitting it this way means
//! PID 1 never calls `waitpid(-1)` under tokio's feet (which would steal the
//! exit status of the commands the worker runs), and the kernel never panics
//! because init died: whatever kills the worker, a panic that escaped, an
//! abort or the OOM killer, PID 1 notices and serves a failure line itself.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use tracing::{error, info, warn};

use crate::params::{parse_port, Cmdline};
use crate::signal::PORT_FILE;
use contract::params::{INITRD_DONE_PORT, SIGNAL_BUILD_DONE_PORT};
use contract::{DoneLine, Stage};

/// Where the initrd builder puts the modules and their load order.
const MODULES_DIR: &str = "/lib/modules";

pub fn main() -> ! {
    // The log level comes from the kernel command line, so /proc goes first
    // (quietly; mount_api_filesystems reports it with the others).
    let _ = std::fs::create_dir_all("/proc");
    let _ = mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV,
        None::<&str>,
    );
    let cmdline = Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    crate::log::init(cmdline.flag("INITRD_VERBOSE") || cmdline.flag("INITRD_DEBUG"));
    info!(
        "initrd-agent {} starting as PID 1",
        env!("CARGO_PKG_VERSION")
    );
    mount_api_filesystems();
    load_modules(Path::new(MODULES_DIR));

    // SAFETY: no other thread exists yet (the tokio runtime is created in
    // the child), so the child may run arbitrary code after fork.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let code = crate::agent::run_initrd(cmdline);
            std::process::exit(code);
        }
        Ok(ForkResult::Parent { child }) => supervise(child, &cmdline),
        Err(e) => {
            error!("fork failed ({e}); running the agent in PID 1 itself");
            crate::agent::run_initrd(cmdline);
            idle_forever()
        }
    }
}

fn mount_api_filesystems() {
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 5] = [
        (
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV,
            None,
        ),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        match mount(Some(src), target, Some(fstype), flags, data) {
            Ok(()) => info!("mounted {fstype} on {target}"),
            Err(Errno::EBUSY) => info!("{target} is already mounted"),
            Err(e) => error!("cannot mount {fstype} on {target}: {e}"),
        }
    }
}

/// Loads the modules listed in `load-order` (dependencies first, as the
/// initrd builder resolved them). A module that fails is logged and skipped:
/// the step that needs it (a disk, the network) then fails with its own,
/// clearer message.
pub fn load_modules(dir: &Path) {
    let order_file = dir.join("load-order");
    let order = match std::fs::read_to_string(&order_file) {
        Ok(o) => o,
        Err(e) => {
            warn!(
                "no module list at {} ({e}); loading no modules",
                order_file.display()
            );
            return;
        }
    };
    let started = Instant::now();
    let mut loaded = 0;
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match load_module(&dir.join(name)) {
            Ok(true) => loaded += 1,
            Ok(false) => info!("module {name} is already loaded"),
            Err(e) => error!("cannot load module {name}: {e:#}"),
        }
    }
    info!(
        "loaded {loaded} kernel modules in {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
}

fn load_module(path: &Path) -> Result<bool> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let params = CString::default();
    match finit_module(&file, &params, ModuleInitFlags::empty()) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(e) => Err(e).context("finit_module (an unknown symbol means a dependency is missing)"),
    }
}

/// PID 1's loop: reap every child; when the worker dies, report it.
fn supervise(worker: Pid, cmdline: &Cmdline) -> ! {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == worker => {
                worker_died(cmdline, format!("exited with status {code}"));
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == worker => {
                worker_died(cmdline, format!("was killed by {sig}"));
            }
            Ok(_) => {}
            Err(Errno::ECHILD) => std::thread::sleep(std::time::Duration::from_secs(1)),
            Err(Errno::EINTR) => {}
            Err(e) => {
                error!("waitpid: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// The worker is gone: it never exits on its own, so this is a crash. Serve
/// a failure line from a thread while PID 1 keeps reaping.
fn worker_died(cmdline: &Cmdline, how: String) {
    error!("the agent worker {how}; reporting the build as failed");
    let port = std::fs::read_to_string(PORT_FILE)
        .ok()
        .and_then(|p| parse_port(&p).ok())
        .or_else(|| {
            cmdline
                .get(SIGNAL_BUILD_DONE_PORT)
                .and_then(|p| parse_port(p).ok())
        })
        .unwrap_or(INITRD_DONE_PORT);
    let line = DoneLine::failure(
        Stage::Agent,
        format!("initrd-agent crashed: the worker process {how}; the console log has the details"),
    );
    std::thread::spawn(move || serve_blocking(port, &line));
}

fn serve_blocking(port: u16, line: &DoneLine) {
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            error!("cannot listen on the done port {port}: {e}");
            return;
        }
    };
    info!(
        "serving the done signal on port {port}: {}",
        line.to_line().trim_end()
    );
    for mut stream in listener.incoming().flatten() {
        let _ = stream.write_all(line.to_line().as_bytes());
    }
}

fn idle_forever() -> ! {
    loop {
        let _ = waitpid(None, None);
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
