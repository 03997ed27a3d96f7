//! `debian:SUITE`: a bootable Debian root filesystem made with mmdebstrap.
//!
//! minbase plus what a server image needs to boot on its own: the cloud
//! kernel, GRUB for EFI, systemd as init, udev and e2fsprogs (more with
//! `--include`). GRUB's kernel command line gets a serial console on ttyS0
//! (`/etc/default/grub.d/50-imgforge-serial.cfg`), and `/etc/hostname` a
//! fixed name instead of the build host's, which mmdebstrap would copy.
//!
//! Two profiles ([`Profile`]): `cloud` (the default) adds what a server needs
//! to be usable, [`CLOUD_PACKAGES`] with the customize hook `debian_cloud.sh`
//! (DHCP on any NIC, cloud-init, SSH by key only, per-server identity);
//! `minimal` is the system above and nothing more.
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

/// What a `debian:` rootfs is made for.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Profile {
    /// A cloud server: network, SSH, cloud-init, guest agent, growing root.
    #[default]
    Cloud,
    /// Boots to a login prompt on the console; nothing else.
    Minimal,
}

/// Options of the `debian:` source.
#[derive(Debug, Clone)]
pub struct DebianOptions {
    pub profile: Profile,
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
            profile: Profile::default(),
            include: Vec::new(),
            mirror: None,
            hostname: "debian".into(),
        }
    }
}

/// What the cloud profile installs on top of the minimal system, and why: the list Scaleway
/// gives for a custom image (DHCP, cloud-init, the QEMU guest agent, UEFI) and what a user
/// expects of a cloud server.
pub const CLOUD_PACKAGES: &[(&str, &str)] = &[
    ("openssh-server", "logins over SSH, by key only; host keys made at first boot"),
    ("cloud-init", "SSH keys, hostname and user data from the metadata service (Scaleway datasource; NoCloud elsewhere)"),
    ("isc-dhcp-client", "the DHCP lease cloud-init takes in its local stage to reach the metadata service"),
    ("iproute2", "ip, which cloud-init runs to configure that lease"),
    ("systemd-resolved", "DNS from the DHCP lease (systemd-networkd brings the NIC up)"),
    ("libpam-systemd", "logind sessions for SSH logins"),
    ("qemu-guest-agent", "the hypervisor's agent (Scaleway reconfigures networking through it)"),
    ("cloud-guest-utils", "growpart: the root partition and filesystem grow to the volume at first boot"),
    ("sudo", "administration as the default user"),
    ("ca-certificates", "HTTPS from the server"),
];

/// The customize hook of the cloud profile.
pub const CLOUD_HOOK: &str = include_str!("debian_cloud.sh");

/// The packages every `debian:` rootfs of `profile` gets for `arch` (a Debian architecture
/// name).
pub fn default_packages(arch: &str, profile: Profile) -> Result<Vec<String>> {
    let (kernel, grub) = match arch {
        "amd64" => ("linux-image-cloud-amd64", "grub-efi-amd64"),
        "arm64" => ("linux-image-cloud-arm64", "grub-efi-arm64"),
        other => bail!("debian: no default kernel and GRUB packages for the architecture '{other}' (amd64 and arm64 have them)"),
    };
    let mut packages: Vec<String> = [kernel, grub, "systemd-sysv", "udev", "e2fsprogs"]
        .into_iter()
        .map(String::from)
        .collect();
    if profile == Profile::Cloud {
        packages.extend(CLOUD_PACKAGES.iter().map(|(p, _)| p.to_string()));
    }
    Ok(packages)
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
    let mut packages = default_packages(arch, opts.profile)?;
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
        "mkdir -p \"$1/etc/default/grub.d\" && printf '%s' '{GRUB_SERIAL_CFG}' > \"$1/etc/default/grub.d/50-imgforge-serial.cfg\""
    );
    let hostname_hook = format!("echo '{}' > \"$1/etc/hostname\"", opts.hostname);
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg(format!("--mode={mode}"))
        .arg("--variant=minbase")
        .arg(format!("--architectures={arch}"))
        .arg(format!("--include={}", packages.join(",")))
        .arg(format!("--customize-hook={grub_hook}"))
        .arg(format!("--customize-hook={hostname_hook}"));
    if opts.profile == Profile::Cloud {
        cmd.arg(format!("--customize-hook={CLOUD_HOOK}"));
    }
    cmd.arg(suite).arg("-");
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
            profile: Profile::Minimal,
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
        assert!(!args.iter().any(|a| a.contains("cloud.cfg.d")), "{args:?}");
        assert_eq!(&args[args.len() - 2..], ["bookworm", "-"]);
        assert!(command("--help", "amd64", &opts).is_err());
        assert!(command("bookworm", "mips", &opts).is_err());
        let bad = DebianOptions {
            include: vec!["x;rm".into()],
            ..DebianOptions::default()
        };
        assert!(command("bookworm", "amd64", &bad).is_err());
    }

    #[test]
    fn the_cloud_profile_is_the_default_and_adds_its_packages_and_hook() {
        let cmd = command("bookworm", "arm64", &DebianOptions::default()).unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let include = args.iter().find(|a| a.starts_with("--include=")).unwrap();
        assert!(include.starts_with("--include=linux-image-cloud-arm64,grub-efi-arm64,"));
        for (package, why) in CLOUD_PACKAGES {
            assert!(
                include.split([',', '=']).any(|p| p == *package),
                "{package}"
            );
            assert!(!why.is_empty());
        }
        let hook = args
            .iter()
            .find(|a| a.contains("90-imgforge.cfg"))
            .expect("the cloud hook");
        assert!(hook.starts_with("--customize-hook=# The cloud profile"));
        assert_eq!(&args[args.len() - 2..], ["bookworm", "-"]);
    }

    #[test]
    fn the_cloud_hook_is_valid_shell() {
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", CLOUD_HOOK])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
