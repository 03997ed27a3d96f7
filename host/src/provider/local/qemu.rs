//! Starting QEMU for build servers: the command line and the process.
//!
//! The network is always user-mode with `restrict=on`, so a guest reaches
//! nothing but the forwards set up here. The guest network is the
//! link-local 169.254.0.0/16, because QEMU only forwards a guest address
//! (the metadata server's 169.254.42.42) that lies inside the slirp network.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

use super::guestfwd;
use crate::tools::RunTool;

/// The metadata server's address inside the guest (Scaleway's).
pub const METADATA_GUEST_IP: Ipv4Addr = contract::params::METADATA_IPV4;

/// The host's side of user networking: the guest's gateway.
pub const USER_NET_HOST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);

/// Which accelerator QEMU uses. KVM guests hang on nested-virtualisation
/// machines like the development ones, so callers choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

/// A host port forwarded to a guest port.
#[derive(Clone, Copy, Debug)]
pub struct PortForward {
    pub host: SocketAddr,
    pub guest_port: u16,
}

/// A guest-visible address relayed to a host address (one process per
/// connection, see [`guestfwd`]).
#[derive(Clone, Debug)]
pub struct GuestForward {
    pub guest_ip: Ipv4Addr,
    pub guest_port: u16,
    pub target: SocketAddr,
}

/// A guest-visible address answered by a command run once per connection
/// (the connection on its stdin/stdout, see [`guestfwd`]).
#[derive(Clone, Debug)]
pub struct GuestCommand {
    pub guest_ip: Ipv4Addr,
    pub guest_port: u16,
    pub exe: PathBuf,
    pub args: Vec<String>,
}

/// User-mode networking with `restrict=on`: the guest reaches only the
/// forwards listed here.
#[derive(Clone, Debug, Default)]
pub struct UserNet {
    pub host_forwards: Vec<PortForward>,
    pub guest_forwards: Vec<GuestForward>,
    pub guest_commands: Vec<GuestCommand>,
    /// The executable that runs `guestfwd-bridge` (imgforge itself).
    pub bridge_exe: PathBuf,
}

impl UserNet {
    /// The `-netdev` value.
    fn netdev(&self) -> String {
        let mut opts = vec![
            "user".to_string(),
            "id=n0".into(),
            "restrict=on".into(),
            "net=169.254.0.0/16".into(),
            format!("host={USER_NET_HOST_IP}"),
            "dhcpstart=169.254.0.15".into(),
        ];
        for f in &self.host_forwards {
            opts.push(format!(
                "hostfwd=tcp:{}:{}-:{}",
                f.host.ip(),
                f.host.port(),
                f.guest_port
            ));
        }
        for g in &self.guest_forwards {
            opts.push(guestfwd::guestfwd_rule(
                g.guest_ip,
                g.guest_port,
                &self.bridge_exe,
                g.target,
            ));
        }
        for c in &self.guest_commands {
            opts.push(guestfwd::guestfwd_command_rule(
                c.guest_ip,
                c.guest_port,
                &c.exe,
                &c.args,
            ));
        }
        opts.join(",")
    }

    fn add_to(&self, cmd: &mut Command) {
        cmd.args([
            "-netdev",
            &self.netdev(),
            "-device",
            "virtio-net-pci,netdev=n0",
        ]);
    }
}

/// Everything needed to start one build server booted from a bootscript.
#[derive(Clone, Debug)]
pub struct BootscriptVm {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    /// Volumes, attached as virtio-blk in order (`/dev/vda`, `/dev/vdb`...).
    pub disks: Vec<PathBuf>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    pub net: UserNet,
    pub serial_log: PathBuf,
}

impl BootscriptVm {
    pub fn command(&self) -> Command {
        let mut cmd = machine_command(self.memory_mib, self.cpus, self.accel, &self.serial_log);
        cmd.arg("-kernel").arg(&self.kernel);
        cmd.arg("-initrd").arg(&self.initrd);
        cmd.args(["-append", &self.append]);
        for (i, disk) in self.disks.iter().enumerate() {
            add_virtio_disk(&mut cmd, i, disk);
        }
        self.net.add_to(&mut cmd);
        cmd
    }

    /// Starts QEMU. QEMU's own messages go to `<serial_log>.qemu`.
    pub fn spawn(&self) -> Result<Vm> {
        spawn_logged(self.command(), &self.serial_log)
    }
}

/// The machine every VM here gets: q35, no default devices, no display,
/// exit instead of rebooting, the serial console written to `serial_log`.
pub(crate) fn machine_command(
    memory_mib: u32,
    cpus: u32,
    accel: Accel,
    serial_log: &Path,
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "q35", "-nodefaults", "-no-reboot", "-display", "none"]);
    cmd.args(["-m", &memory_mib.to_string(), "-smp", &cpus.to_string()]);
    match accel {
        // `-cpu max` gives the guest RDRAND: without it early getrandom()
        // blocks for about a second under TCG.
        Accel::Tcg => cmd.args(["-accel", "tcg", "-cpu", "max"]),
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
    };
    cmd.arg("-chardev").arg(format!(
        "file,id=serial0,path={}",
        qemu_escape(&serial_log.to_string_lossy())
    ));
    cmd.args(["-serial", "chardev:serial0"]);
    cmd
}

/// Starts `cmd` with QEMU's own messages in `<serial_log>.qemu`.
pub(crate) fn spawn_logged(mut cmd: Command, serial_log: &Path) -> Result<Vm> {
    let stderr_path = serial_log.with_extension("qemu");
    let stderr =
        File::create(&stderr_path).with_context(|| format!("create {}", stderr_path.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .running("qemu-system-x86_64")?;
    Ok(Vm {
        child: Some(child),
        serial_log: serial_log.to_path_buf(),
        stderr_log: stderr_path,
    })
}

/// Volume `i` as a virtio-blk disk (`/dev/vda`, `/dev/vdb`...).
fn add_virtio_disk(cmd: &mut Command, i: usize, disk: &Path) {
    cmd.arg("-drive").arg(format!(
        "file={},if=none,id=d{i},format={},cache=unsafe",
        qemu_escape(&disk.to_string_lossy()),
        disk_format(disk)
    ));
    cmd.args([
        "-device",
        &format!("virtio-blk-pci,drive=d{i},serial=vol{i}"),
    ]);
}

/// `qcow2` for `*.qcow2`, else `raw`.
fn disk_format(disk: &Path) -> &'static str {
    if disk.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    }
}

/// QEMU's option syntax doubles commas inside a value.
pub(crate) fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// A running QEMU process; killed when dropped.
pub struct Vm {
    child: Option<Child>,
    serial_log: PathBuf,
    stderr_log: PathBuf,
}

impl Vm {
    pub fn serial_log(&self) -> &Path {
        &self.serial_log
    }

    /// The QEMU process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The console output so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial_log).unwrap_or_default()).into_owned()
    }

    /// Fails once QEMU has exited, with its status and last messages.
    pub fn check_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("the VM was stopped")
        };
        if let Some(status) = child.try_wait()? {
            let qemu = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
            bail!(
                "QEMU exited ({status}): {}\nconsole tail:\n{}",
                qemu.trim(),
                tail(&self.console(), 15)
            );
        }
        Ok(())
    }

    /// Kills QEMU and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A free TCP port on loopback (bound and released; QEMU binds it next).
pub fn free_loopback_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("find a free port")?;
    Ok(l.local_addr()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_restricts_the_network_and_escapes_commas() {
        let vm = BootscriptVm {
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/initrd.img".into(),
            append: "console=ttyS0 build_method=x".into(),
            disks: vec!["/tmp/a,b.raw".into()],
            memory_mib: 512,
            cpus: 1,
            accel: Accel::Tcg,
            net: UserNet {
                host_forwards: vec![PortForward {
                    host: "127.0.0.1:4022".parse().unwrap(),
                    guest_port: 22,
                }],
                guest_forwards: vec![GuestForward {
                    guest_ip: METADATA_GUEST_IP,
                    guest_port: 80,
                    target: "127.0.0.1:5000".parse().unwrap(),
                }],
                guest_commands: vec![],
                bridge_exe: "/usr/bin/imgforge".into(),
            },
            serial_log: "/tmp/console.log".into(),
        };
        let args: Vec<String> = vm
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let netdev = &args[args.iter().position(|a| a == "-netdev").unwrap() + 1];
        assert!(netdev.contains("restrict=on"), "{netdev}");
        assert!(
            netdev.contains("hostfwd=tcp:127.0.0.1:4022-:22"),
            "{netdev}"
        );
        assert!(
            netdev.contains("guestfwd=tcp:169.254.42.42:80-cmd:"),
            "{netdev}"
        );
        assert!(
            args.iter().any(|a| a.starts_with("file=/tmp/a,,b.raw,")),
            "{args:?}"
        );
        assert!(args.windows(2).any(|w| w[0] == "-accel" && w[1] == "tcg"));
    }
}

/// OVMF firmware files (Debian's `ovmf` package).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";

/// A machine booting a disk image under UEFI (OVMF), the way a cloud server
/// boots the image. The disk is attached as NVMe, whose driver Debian's
/// cloud kernel has built in (so images without an initramfs boot too).
#[derive(Clone, Debug)]
pub struct UefiVm {
    pub disk: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    /// A private copy of OVMF_VARS is made here.
    pub vars: PathBuf,
    pub serial_log: PathBuf,
    /// Open the disk read-only (snapshot=on): the image is not modified.
    pub snapshot: bool,
    /// Further volumes, as virtio-blk.
    pub extra_disks: Vec<PathBuf>,
    /// No network at all when `None`.
    pub net: Option<UserNet>,
    /// What makes the machine a Scaleway instance to the software inside.
    pub instance: Option<InstanceIdentity>,
}

/// What a server started from an image gets so that its software sees a Scaleway instance:
/// SMBIOS system-manufacturer `Scaleway` and a product name (cloud-init's ds-identify and
/// datasource detect Scaleway by it), and the QEMU guest agent's channel
/// (`org.qemu.guest_agent.0`, on a Unix socket on this side).
#[derive(Clone, Debug)]
pub struct InstanceIdentity {
    /// SMBIOS product name, like Scaleway's `SCW-<commercial type>`.
    pub product: String,
    pub guest_agent_socket: PathBuf,
}

impl InstanceIdentity {
    fn add_to(&self, cmd: &mut Command) {
        cmd.arg("-smbios").arg(format!(
            "type=1,manufacturer=Scaleway,product={}",
            qemu_escape(&self.product)
        ));
        cmd.args(["-device", "virtio-serial-pci,id=vser0"]);
        cmd.arg("-chardev").arg(format!(
            "socket,id=qga0,path={},server=on,wait=off",
            qemu_escape(&self.guest_agent_socket.to_string_lossy())
        ));
        cmd.args([
            "-device",
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
    }
}

impl UefiVm {
    pub fn command(&self) -> Command {
        let mut cmd = machine_command(self.memory_mib, self.cpus, self.accel, &self.serial_log);
        cmd.arg("-drive").arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            qemu_escape(OVMF_CODE)
        ));
        cmd.arg("-drive").arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            qemu_escape(&self.vars.to_string_lossy())
        ));
        cmd.arg("-drive").arg(format!(
            "file={},if=none,id=nvme0,format={}{}",
            qemu_escape(&self.disk.to_string_lossy()),
            disk_format(&self.disk),
            if self.snapshot { ",snapshot=on" } else { "" }
        ));
        cmd.args(["-device", "nvme,drive=nvme0,serial=imgforge0"]);
        for (i, disk) in self.extra_disks.iter().enumerate() {
            add_virtio_disk(&mut cmd, i + 1, disk);
        }
        match &self.net {
            Some(net) => net.add_to(&mut cmd),
            None => {
                cmd.args(["-net", "none"]);
            }
        }
        if let Some(instance) = &self.instance {
            instance.add_to(&mut cmd);
        }
        cmd
    }

    /// Gives the machine its own copy of the UEFI variable store.
    pub fn prepare_vars(&self) -> Result<()> {
        let template = crate::tools::require_path(OVMF_VARS)?;
        crate::tools::require_path(OVMF_CODE)?;
        std::fs::copy(template, &self.vars)
            .with_context(|| format!("copy {OVMF_VARS} to {}", self.vars.display()))?;
        Ok(())
    }

    pub fn spawn(&self) -> Result<Vm> {
        self.prepare_vars()?;
        spawn_logged(self.command(), &self.serial_log)
    }
}

impl Vm {
    /// Waits until a console line matches `pattern`. Ends early with an
    /// error when QEMU exits first (a guest that powered off without
    /// printing it, a firmware that found nothing to boot).
    pub fn wait_for_console(
        &mut self,
        pattern: &regex::Regex,
        timeout: std::time::Duration,
    ) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let console = self.console();
            if let Some(line) = console.lines().find(|l| pattern.is_match(l)) {
                return Ok(line.to_string());
            }
            if let Err(e) = self.check_running() {
                // The line may have been written just before the exit.
                let console = self.console();
                if let Some(line) = console.lines().find(|l| pattern.is_match(l)) {
                    return Ok(line.to_string());
                }
                return Err(e.context(format!("the VM stopped before printing /{pattern}/")));
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "no console line matching /{pattern}/ within {timeout:?}; console tail:\n{}",
                    tail(&console, 20)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
}
