//! `debian:SUITE`: a bootable Debian root filesystem made with mmdebstrap.
//!
//! minbase plus what a server image needs to boot on its own: the cloud
//! kernel, GRUB for EFI, systemd as init, udev and e2fsprogs (more with
//! `--include`). GRUB's kernel command line gets a serial console on ttyS0
//! (`/etc/default/grub.d/50-imgforge-serial.cfg`), and `/etc/hostname` a
//! fixed name instead of the build host's, which mmdebstrap would copy.
//!
//! mmdebstrap writes the tarball to its standard output, which is
//! normalised and compressed like any other source (nothing is staged
//! besides the usual content spool). It runs in root mode as root and in
//! unshare mode otherwise, whose prerequisites `unshare.rs` checks first.

use std::process::Command;

use anyhow::{bail, Context, Result};

use super::engine::run_stream;
use super::output::Output;
use super::tree::LayerSpec;
use super::unshare;
use crate::tools::RunTool;

/// Options of the `debian:` source.
#[derive(Debug, Clone)]
pub struct DebianOptions {
    /// More packages, besides the defaults.
    pub include: Vec<String>,
    /// A Debian mirror URL (default: apt's, deb.debian.org).
    pub mirror: Option<String>,
    /// Written to `/etc/hostname`.
    pub hostname: String,
}

impl Default for DebianOptions {
    fn default() -> Self {
        DebianOptions {
            include: Vec::new(),
            mirror: None,
            hostname: "debian".into(),
        }
    }
}

/// The packages every `debian:` rootfs gets for `arch` (a Debian
/// architecture name).
pub fn default_packages(arch: &str) -> Result<Vec<String>> {
    let (kernel, grub) = match arch {
        "amd64" => ("linux-image-cloud-amd64", "grub-efi-amd64"),
        "arm64" => ("linux-image-cloud-arm64", "grub-efi-arm64"),
        other => bail!("debian: no default kernel and GRUB packages for the architecture '{other}' (amd64 and arm64 have them)"),
    };
    Ok([kernel, grub, "systemd-sysv", "udev", "e2fsprogs"]
        .into_iter()
        .map(String::from)
        .collect())
}

/// The GRUB settings written by the customize hook.
pub const GRUB_SERIAL_CFG: &str = "GRUB_CMDLINE_LINUX=\"console=tty0 console=ttyS0,115200\"\nGRUB_TIMEOUT=1\nGRUB_TERMINAL=\"console serial\"\n";

fn valid_name(s: &str, extra: &[u8]) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// The mmdebstrap command for `suite`, writing a tarball to stdout.
pub fn command(suite: &str, arch: &str, opts: &DebianOptions) -> Result<Command> {
    if !valid_name(suite, b"-.") {
        bail!("debian:{suite}: not a Debian suite name (bookworm, trixie, stable, ...)");
    }
    if !valid_name(&opts.hostname, b"-.") || opts.hostname.len() > 63 {
        bail!("'{}' is not a valid hostname", opts.hostname);
    }
    let mut packages = default_packages(arch)?;
    for p in &opts.include {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        if !valid_name(p, b"-.+:=~") {
            bail!("'{p}' is not a Debian package name");
        }
        if !packages.iter().any(|q| q == p) {
            packages.push(p.to_string());
        }
    }
    // Root mode needs root; unshare mode needs user namespaces (see unshare.rs).
    let mode = if root_mode() { "root" } else { "unshare" };
    let grub_hook = format!(
        "mkdir -p \"$1/etc/default/grub.d\" && printf '%s' '{}' > \"$1/etc/default/grub.d/50-imgforge-serial.cfg\"",
        GRUB_SERIAL_CFG
    );
    let hostname_hook = format!("echo '{}' > \"$1/etc/hostname\"", opts.hostname);
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg(format!("--mode={mode}"))
        .arg("--variant=minbase")
        .arg(format!("--architectures={arch}"))
        .arg(format!("--include={}", packages.join(",")))
        .arg(format!("--customize-hook={grub_hook}"))
        .arg(format!("--customize-hook={hostname_hook}"))
        .arg(suite)
        .arg("-");
    if let Some(m) = &opts.mirror {
        cmd.arg(m);
    }
    Ok(cmd)
}

/// Whether mmdebstrap runs in root mode (as root) or unshare mode (anyone else).
fn root_mode() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Builds the rootfs of `suite` into `out`.
pub(crate) fn build(suite: &str, arch: &str, opts: &DebianOptions, out: &mut Output) -> Result<()> {
    let cmd = command(suite, arch, opts)?;
    Command::new("mmdebstrap")
        .arg("--version")
        .output()
        .running("mmdebstrap")
        .with_context(|| format!("debian:{suite} needs mmdebstrap"))?;
    if !root_mode() {
        let problems = unshare::problems(&unshare::Facts::gather());
        if !problems.is_empty() {
            bail!(
                "debian:{suite} as a non-root user runs mmdebstrap in unshare mode, which this machine is not ready for (or run imgforge as root):\n  - {}",
                problems.join("\n  - ")
            );
        }
    }
    tracing::info!("debian:{suite}: running mmdebstrap (downloads about 130 MB)");
    run_stream(
        cmd,
        "mmdebstrap",
        &LayerSpec::rootfs(format!("debian:{suite}")),
        out,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_has_the_defaults_and_refuses_odd_names() {
        let opts = DebianOptions {
            include: vec!["openssh-server".into(), "udev".into()],
            ..DebianOptions::default()
        };
        let cmd = command("bookworm", "amd64", &opts).unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(
            &"--include=linux-image-cloud-amd64,grub-efi-amd64,systemd-sysv,udev,e2fsprogs,openssh-server".to_string()
        ));
        assert!(args.iter().any(|a| a.contains("console=ttyS0,115200")));
        assert_eq!(&args[args.len() - 2..], ["bookworm", "-"]);
        assert!(command("--help", "amd64", &opts).is_err());
        assert!(command("bookworm", "mips", &opts).is_err());
        let bad = DebianOptions {
            include: vec!["x;rm".into()],
            ..DebianOptions::default()
        };
        assert!(command("bookworm", "amd64", &bad).is_err());
    }
}
