//! Interface configuration with the classic socket ioctls: enough to bring a
//! link up, give it an IPv4 address and add a default route, with no
//! netlink library and no `ip` binary in the initrd.

use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// The kernel's `struct rtentry` (linux/route.h). libc only has it for some
/// targets, and the agent also builds for the host in tests.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_tos: libc::c_uchar,
    rt_class: libc::c_uchar,
    rt_pad4: [libc::c_short; 3],
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn control_socket() -> Result<OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("cannot open a control socket")
}

fn ifreq(name: &str) -> Result<libc::ifreq> {
    if name.len() >= libc::IFNAMSIZ {
        bail!("interface name '{name}' is too long");
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads
    // the family field to interpret the rest.
    unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Issues `request` with a pointer to `arg`. Callers pass the struct type
/// the request expects (`ifreq` for SIOC*IF*, `RtEntry` for SIOCADDRT).
fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T, what: &str) -> Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed struct of the type the
    // request reads or writes.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            request as _,
            arg as *mut T as *mut libc::c_void,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| what.to_string());
    }
    Ok(())
}

/// Sets IFF_UP on the interface.
pub fn set_up(name: &str) -> Result<()> {
    let fd = control_socket()?;
    let mut req = ifreq(name)?;
    ioctl(
        &fd,
        libc::SIOCGIFFLAGS as _,
        &mut req,
        &format!("read the flags of {name}"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(
        &fd,
        libc::SIOCSIFFLAGS as _,
        &mut req,
        &format!("bring {name} up"),
    )
}

/// Assigns `ip/prefix` to the interface; the kernel adds the subnet route.
pub fn set_ipv4(name: &str, ip: Ipv4Addr, prefix: u8) -> Result<()> {
    let fd = control_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(ip);
    ioctl(
        &fd,
        libc::SIOCSIFADDR as _,
        &mut req,
        &format!("set address {ip} on {name}"),
    )?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(prefix_to_mask(prefix));
    ioctl(
        &fd,
        libc::SIOCSIFNETMASK as _,
        &mut req,
        &format!("set netmask /{prefix} on {name}"),
    )
}

/// Adds `default via gateway dev name`.
pub fn add_default_route(name: &str, gateway: Ipv4Addr) -> Result<()> {
    let fd = control_socket()?;
    let mut dev: Vec<libc::c_char> = name.bytes().map(|b| b as libc::c_char).collect();
    dev.push(0);
    // SAFETY: RtEntry is plain old data; all-zero is valid.
    let mut rt: RtEntry = unsafe { mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
    rt.rt_dev = dev.as_mut_ptr();
    match ioctl(
        &fd,
        libc::SIOCADDRT as _,
        &mut rt,
        &format!("add default route via {gateway}"),
    ) {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .and_then(|e| e.raw_os_error())
                == Some(libc::EEXIST) =>
        {
            Ok(())
        }
        other => other,
    }
}

pub fn prefix_to_mask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix.min(32) as u32)
    };
    Ipv4Addr::from(bits)
}

pub fn mask_to_prefix(mask: Ipv4Addr) -> u8 {
    u32::from(mask).leading_ones() as u8
}

/// Interface names in /sys/class/net, loopback last.
pub fn list() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The interface's MAC address from sysfs.
pub fn mac_address(name: &str) -> Result<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address"))
        .with_context(|| format!("read the MAC address of {name}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    if parts.len() != 6 {
        bail!("{name} has no Ethernet address ('{}')", text.trim());
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)
            .with_context(|| format!("bad MAC address '{}'", text.trim()))?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(prefix_to_mask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(prefix_to_mask(16), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(prefix_to_mask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(prefix_to_mask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 240, 0)), 20);
    }

    #[test]
    fn rtentry_has_the_kernel_layout() {
        // struct rtentry is 120 bytes on x86_64 Linux.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(mem::size_of::<RtEntry>(), 120);
    }
}
