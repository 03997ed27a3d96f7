//! `imgforge boot`: boot a disk image under UEFI (OVMF) and wait for a line
//! on its serial console, the way the original `test_image.sh` checked a
//! fresh image. The disk is opened with `snapshot=on`: booting never
//! modifies the image.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::qemu::{Accel, UefiVm};

#[derive(clap::Args, Debug, Clone)]
pub struct BootArgs {
    /// A disk image file (raw or qcow2).
    pub target: PathBuf,
    /// Wait for a console line matching this regular expression.
    #[arg(long, default_value = "login:")]
    pub expect: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// QEMU accelerator; KVM guests hang on nested-virtualisation hosts.
    #[arg(long, value_enum, default_value = "tcg")]
    pub accel: AccelArg,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Keep the console log here (default: a temporary file).
    #[arg(long)]
    pub console_log: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum AccelArg {
    Tcg,
    Kvm,
}

/// The QEMU process to kill if imgforge is interrupted.
static RUNNING_QEMU: AtomicU32 = AtomicU32::new(0);

pub fn run_boot(args: BootArgs, json: bool) -> Result<()> {
    if !args.target.is_file() {
        bail!(
            "{} is not a disk image file (image names are resolved by the local provider, \
             which is not part of this release yet; export the image to a file)",
            args.target.display()
        );
    }
    let pattern =
        regex::Regex::new(&args.expect).with_context(|| format!("--expect '{}'", args.expect))?;
    let dir = tempfile::tempdir().context("create a temporary directory")?;
    let serial_log = args
        .console_log
        .clone()
        .unwrap_or_else(|| dir.path().join("console.log"));
    let vm = UefiVm {
        disk: args.target.clone(),
        memory_mib: args.memory,
        cpus: 2,
        accel: match args.accel {
            AccelArg::Tcg => Accel::Tcg,
            AccelArg::Kvm => Accel::Kvm,
        },
        vars: dir.path().join("OVMF_VARS.fd"),
        serial_log,
        snapshot: true,
        extra_disks: vec![],
        net: None,
    };
    // No VM is left behind when interrupted.
    crate::interrupt::on_interrupt(|| {
        let pid = RUNNING_QEMU.load(Ordering::SeqCst);
        if pid != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        eprintln!("imgforge: interrupted");
    });
    let started = Instant::now();
    let mut running = vm.spawn()?;
    RUNNING_QEMU.store(running.pid(), Ordering::SeqCst);
    tracing::info!(
        "booting {} under OVMF; waiting for /{}/",
        args.target.display(),
        args.expect
    );
    let result = running.wait_for_console(&pattern, Duration::from_secs(args.timeout));
    running.kill();
    RUNNING_QEMU.store(0, Ordering::SeqCst);
    let line = result?;
    let seconds = started.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({ "matched": line.trim_end(), "seconds": (seconds * 10.0).round() / 10.0 })
        );
    } else {
        println!(
            "{} booted: {:?} after {seconds:.1} s",
            args.target.display(),
            line.trim_end()
        );
    }
    Ok(())
}
