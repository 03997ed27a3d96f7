//! `imgforge boot`: boot a disk image under UEFI (OVMF) and wait for a line
//! on its serial console, the way the original `test_image.sh` checked a
//! fresh image. The disk is opened with `snapshot=on`: booting never
//! modifies the image.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::provider::local::accel::AccelChoice;
use crate::provider::local::qemu::UefiVm;

#[derive(clap::Args, Debug, Clone)]
pub struct BootArgs {
    /// A disk image file (raw or qcow2), or a local provider image (id or
    /// name).
    pub target: String,
    /// Wait for a console line matching this regular expression.
    #[arg(long, default_value = "login:")]
    pub expect: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// QEMU accelerator; `auto` uses KVM only when a probe guest runs
    /// properly under it.
    #[arg(long, value_enum, env = "IMGFORGE_ACCEL", default_value = "auto")]
    pub accel: AccelChoice,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Keep the console log here (default: a temporary file).
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// The server test instead: a throwaway server from the (local provider)
    /// image with a fresh SSH key, logged in over SSH, `cloud-init status
    /// --wait`, then --command; the server is removed whatever happens.
    #[arg(long)]
    pub ssh: bool,
    /// --ssh: what to run in the server once cloud-init is done.
    #[arg(long, default_value = "uname -a", requires = "ssh")]
    pub command: String,
    /// --ssh: the server's root volume size (default: the image's).
    #[arg(long, value_parser = crate::size::parse_size, requires = "ssh")]
    pub root_size: Option<u64>,
}

/// The QEMU process to kill if imgforge is interrupted.
static RUNNING_QEMU: AtomicU32 = AtomicU32::new(0);

pub fn run_boot(args: BootArgs, json: bool) -> Result<()> {
    if args.ssh {
        return run_server_test(&args, json);
    }
    let accel = crate::provider::local::accel::resolve(args.accel)?;
    let disk = resolve_target(&args.target, args.accel)?;
    let pattern =
        regex::Regex::new(&args.expect).with_context(|| format!("--expect '{}'", args.expect))?;
    let dir = tempfile::tempdir().context("create a temporary directory")?;
    let serial_log = args
        .console_log
        .clone()
        .unwrap_or_else(|| dir.path().join("console.log"));
    let vm = UefiVm {
        instance: None,
        disk: disk.clone(),
        memory_mib: args.memory,
        cpus: 2,
        accel,
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
        disk.display(),
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
            args.target,
            line.trim_end()
        );
    }
    Ok(())
}

/// `imgforge boot IMAGE --ssh`.
fn run_server_test(args: &BootArgs, json: bool) -> Result<()> {
    let home = crate::provider::local::store::Store::default_home()?;
    let provider = crate::provider::local::LocalProvider::open(&home, args.accel)?;
    let report = crate::server_test::run(
        std::sync::Arc::new(provider),
        &args.target,
        &crate::server_test::ServerTestOptions {
            root_size: args.root_size,
            memory_mib: Some(args.memory),
            command: args.command.clone(),
            timeout: Duration::from_secs(args.timeout),
        },
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "server test of {}: SSH login after {:.1} s, cloud-init done after {:.1} s",
            report.image, report.ssh_ready_s, report.cloud_init_done_s
        );
        println!("{}", report.cloud_init_status);
        println!("$ {}", report.command);
        print!("{}", report.output);
    }
    Ok(())
}

/// A file is booted as is; anything else names a local provider image,
/// whose snapshot file is booted (read-only, like any disk here).
fn resolve_target(target: &str, accel: AccelChoice) -> Result<PathBuf> {
    let path = Path::new(target);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        bail!("{target} is not a disk image file");
    }
    let home = crate::provider::local::store::Store::default_home()?;
    let local = crate::provider::local::LocalProvider::open(&home, accel)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let image = rt
        .block_on(crate::provider::find_image(&local, target))
        .with_context(|| format!("{target} is not a disk image file nor a local image"))?;
    local.snapshot_file(&image.root_volume)
}
