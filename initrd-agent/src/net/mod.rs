//! Network bring-up for the build server: loopback, then every other
//! interface by DHCP, unless the kernel command line carries an `ip=`
//! static configuration (the kernel's own `ip=` support is not built into
//! Debian's cloud kernel, so the agent implements the useful subset).

mod dhcp;
pub mod iface;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

/// How to configure the network, from `ip=`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpConfig {
    /// `ip=off` / `ip=none`: loopback only.
    Off,
    /// No `ip=`, or `ip=dhcp|on|any`: DHCP on every interface (or on the
    /// named one).
    Dhcp { device: Option<String> },
    /// `ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>`
    Static {
        address: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
        device: Option<String>,
        dns: Vec<Ipv4Addr>,
    },
}

impl IpConfig {
    pub fn parse(value: Option<&str>) -> Result<Self> {
        let Some(v) = value else {
            return Ok(IpConfig::Dhcp { device: None });
        };
        match v {
            "off" | "none" => return Ok(IpConfig::Off),
            "" | "dhcp" | "on" | "any" | "both" => return Ok(IpConfig::Dhcp { device: None }),
            _ => {}
        }
        let f: Vec<&str> = v.split(':').collect();
        let field = |i: usize| f.get(i).copied().filter(|s| !s.is_empty());
        let ip = |i: usize, what: &str| -> Result<Option<Ipv4Addr>> {
            field(i)
                .map(|s| {
                    s.parse()
                        .with_context(|| format!("ip=: {what} '{s}' is not an IPv4 address"))
                })
                .transpose()
        };
        let device = field(5).map(str::to_string);
        let Some(address) = ip(0, "client address")? else {
            return match field(6) {
                None | Some("dhcp" | "on" | "any" | "both") => Ok(IpConfig::Dhcp { device }),
                Some("off" | "none") => Ok(IpConfig::Off),
                Some(other) => bail!("ip=: autoconf '{other}' is not supported (use dhcp or off)"),
            };
        };
        let prefix = match ip(3, "netmask")? {
            Some(mask) => iface::mask_to_prefix(mask),
            None => 24,
        };
        let dns = [ip(7, "dns0")?, ip(8, "dns1")?]
            .into_iter()
            .flatten()
            .collect();
        Ok(IpConfig::Static {
            address,
            prefix,
            gateway: ip(2, "gateway")?,
            device,
            dns,
        })
    }
}

/// One configured interface, for the log and the done line.
#[derive(Clone, Debug)]
pub struct Configured {
    pub device: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// Brings the network up. Returns the configured interfaces; an interface
/// that gets no lease is logged, and an empty result is an error only for
/// the caller that needs the network.
pub fn configure(config: &IpConfig) -> Result<Vec<Configured>> {
    if let Err(e) = iface::set_up("lo").and_then(|_| iface::set_ipv4("lo", Ipv4Addr::LOCALHOST, 8))
    {
        warn!("loopback: {e:#}");
    }
    let candidates: Vec<String> = iface::list().into_iter().filter(|n| n != "lo").collect();
    let pick = |device: &Option<String>| -> Result<Vec<String>> {
        match device {
            Some(d) if candidates.contains(d) => Ok(vec![d.clone()]),
            Some(d) => bail!("ip= names interface {d}, but only {candidates:?} exist"),
            None => Ok(candidates.clone()),
        }
    };
    let mut done = Vec::new();
    match config {
        IpConfig::Off => info!("ip=off: leaving the network down"),
        IpConfig::Static {
            address,
            prefix,
            gateway,
            device,
            dns,
        } => {
            let dev = pick(device)?
                .into_iter()
                .next()
                .context("no network interface found")?;
            iface::set_up(&dev)?;
            iface::set_ipv4(&dev, *address, *prefix)?;
            if let Some(gw) = gateway {
                iface::add_default_route(&dev, *gw)?;
            }
            write_resolv_conf(dns);
            info!("{dev}: static {address}/{prefix} gateway {gateway:?}");
            done.push(Configured {
                device: dev,
                address: *address,
                prefix: *prefix,
                gateway: *gateway,
            });
        }
        IpConfig::Dhcp { device } => {
            let mut dns = Vec::new();
            for dev in pick(device)? {
                match dhcp_one(&dev) {
                    Ok((c, mut d)) => {
                        dns.append(&mut d);
                        done.push(c);
                    }
                    Err(e) => warn!("{dev}: {e:#}"),
                }
            }
            write_resolv_conf(&dns);
        }
    }
    Ok(done)
}

fn dhcp_one(dev: &str) -> Result<(Configured, Vec<Ipv4Addr>)> {
    iface::set_up(dev)?;
    let mac = iface::mac_address(dev)?;
    let lease = dhcp::acquire(dev, mac, Duration::from_secs(10))?;
    iface::set_ipv4(dev, lease.address, lease.prefix)?;
    if let Some(gw) = lease.router {
        iface::add_default_route(dev, gw)?;
    }
    info!(
        "{dev}: DHCP lease {}/{} from {} router {:?} dns {:?}",
        lease.address, lease.prefix, lease.server, lease.router, lease.dns
    );
    let c = Configured {
        device: dev.to_string(),
        address: lease.address,
        prefix: lease.prefix,
        gateway: lease.router,
    };
    Ok((c, lease.dns))
}

/// musl's resolver (used by the HTTP client for host names) reads this.
fn write_resolv_conf(dns: &[Ipv4Addr]) {
    if dns.is_empty() {
        return;
    }
    let text: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    let _ = std::fs::create_dir_all("/etc");
    if let Err(e) = std::fs::write("/etc/resolv.conf", text) {
        warn!("cannot write /etc/resolv.conf: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_forms() {
        assert_eq!(
            IpConfig::parse(None).unwrap(),
            IpConfig::Dhcp { device: None }
        );
        assert_eq!(
            IpConfig::parse(Some("dhcp")).unwrap(),
            IpConfig::Dhcp { device: None }
        );
        assert_eq!(IpConfig::parse(Some("off")).unwrap(), IpConfig::Off);
        assert_eq!(
            IpConfig::parse(Some(":::::eth1:dhcp")).unwrap(),
            IpConfig::Dhcp {
                device: Some("eth1".into())
            }
        );
        assert_eq!(
            IpConfig::parse(Some("10.0.2.15::10.0.2.2:255.255.255.0::eth0:off:10.0.2.3")).unwrap(),
            IpConfig::Static {
                address: Ipv4Addr::new(10, 0, 2, 15),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
                device: Some("eth0".into()),
                dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
            }
        );
        assert_eq!(
            IpConfig::parse(Some("169.254.0.20:::255.255.0.0")).unwrap(),
            IpConfig::Static {
                address: Ipv4Addr::new(169, 254, 0, 20),
                prefix: 16,
                gateway: None,
                device: None,
                dns: vec![],
            }
        );
        let err = IpConfig::parse(Some("10.0.2.300")).unwrap_err().to_string();
        assert!(err.contains("10.0.2.300"), "{err}");
    }
}
