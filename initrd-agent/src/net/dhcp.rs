//! A DHCPv4 client for one interface: DISCOVER, OFFER, REQUEST, ACK.
//!
//! The interface has no address yet, so the socket is bound to the device
//! (SO_BINDTODEVICE) and talks by broadcast; slirp and cloud DHCP servers
//! answer by broadcast when asked to (the BOOTP broadcast flag), so no raw
//! socket is needed. The lease is used once: a build lasts far less than any
//! lease, so there is no renewal.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use nix::sys::socket::{self, setsockopt, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
use tracing::debug;

/// What the server handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub server: Ipv4Addr,
}

/// Runs the exchange on `iface`, retrying with growing timeouts until
/// `budget` is spent.
pub fn acquire(iface: &str, mac: [u8; 6], budget: Duration) -> Result<Lease> {
    let sock = bound_socket(iface)?;
    let deadline = Instant::now() + budget;
    let mut wait = Duration::from_millis(500);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match exchange(
            &sock,
            mac,
            wait.min(deadline.saturating_duration_since(Instant::now())),
        ) {
            Ok(lease) => return Ok(lease),
            Err(e) if Instant::now() + Duration::from_millis(50) < deadline => {
                debug!("DHCP attempt {attempt} on {iface}: {e:#}");
                wait = (wait * 2).min(Duration::from_secs(4));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("no DHCP lease on {iface} after {attempt} attempts in {budget:?}")
                })
            }
        }
    }
}

fn bound_socket(iface: &str) -> Result<UdpSocket> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("open a UDP socket for DHCP")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    setsockopt(&fd, sockopt::Broadcast, &true).context("SO_BROADCAST")?;
    setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(iface))
        .with_context(|| format!("SO_BINDTODEVICE {iface}"))?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)),
    )
    .context("bind UDP port 68")?;
    Ok(UdpSocket::from(fd))
}

fn exchange(sock: &UdpSocket, mac: [u8; 6], wait: Duration) -> Result<Lease> {
    let xid: u32 = rand_xid(mac);
    let discover = request_message(xid, mac, MessageType::Discover, None);
    send(sock, &discover)?;
    let offer = receive(sock, xid, MessageType::Offer, wait)?;
    let server = match offer.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => *ip,
        _ => offer.siaddr(),
    };
    let request = request_message(
        xid,
        mac,
        MessageType::Request,
        Some((offer.yiaddr(), server)),
    );
    send(sock, &request)?;
    let ack = receive(sock, xid, MessageType::Ack, wait)?;
    lease_from(&ack, server)
}

fn request_message(
    xid: u32,
    mac: [u8; 6],
    kind: MessageType,
    chosen: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Message {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(xid, z, z, z, z, &mac);
    msg.set_opcode(Opcode::BootRequest);
    msg.set_flags(Flags::default().set_broadcast());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
    ]));
    if let Some((ip, server)) = chosen {
        opts.insert(DhcpOption::RequestedIpAddress(ip));
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    msg
}

fn send(sock: &UdpSocket, msg: &Message) -> Result<()> {
    let mut buf = Vec::with_capacity(300);
    msg.encode(&mut Encoder::new(&mut buf))
        .context("encode DHCP message")?;
    sock.send_to(&buf, (Ipv4Addr::BROADCAST, 67))
        .context("send DHCP message")?;
    Ok(())
}

fn receive(sock: &UdpSocket, xid: u32, want: MessageType, wait: Duration) -> Result<Message> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no DHCP {want:?} within {wait:?}");
        }
        sock.set_read_timeout(Some(left))?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("no DHCP {want:?} within {wait:?}")
            }
            Err(e) => return Err(e).context("receive DHCP reply"),
        };
        let Ok(msg) = Message::decode(&mut Decoder::new(&buf[..n])) else {
            continue;
        };
        if msg.xid() != xid || msg.opcode() != Opcode::BootReply {
            continue;
        }
        match msg.opts().msg_type() {
            Some(t) if t == want => return Ok(msg),
            Some(MessageType::Nak) => bail!("the DHCP server refused the request (NAK)"),
            _ => continue,
        }
    }
}

fn lease_from(ack: &Message, server: Ipv4Addr) -> Result<Lease> {
    let address = ack.yiaddr();
    if address.is_unspecified() {
        bail!("the DHCP ACK carries no address");
    }
    let prefix = match ack.opts().get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => super::iface::mask_to_prefix(*m),
        _ => 24,
    };
    let router = match ack.opts().get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let dns = match ack.opts().get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(d)) => d.clone(),
        _ => Vec::new(),
    };
    Ok(Lease {
        address,
        prefix,
        router,
        dns,
        server,
    })
}

/// A transaction id that differs per interface and per attempt without
/// asking the kernel's entropy pool (which may block this early in boot).
fn rand_xid(mac: [u8; 6]) -> u32 {
    let t = crate::log::uptime().as_nanos() as u32;
    t ^ u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_is_read_from_an_ack() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let z = Ipv4Addr::UNSPECIFIED;
        let mut ack = Message::new_with_id(7, z, Ipv4Addr::new(169, 254, 0, 15), z, z, &mac);
        ack.set_opcode(Opcode::BootReply);
        ack.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Ack));
        ack.opts_mut()
            .insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 0, 0)));
        ack.opts_mut()
            .insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
                169, 254, 2, 3,
            )]));
        // Round trip through the wire format, as the client sees it.
        let mut buf = Vec::new();
        ack.encode(&mut Encoder::new(&mut buf)).unwrap();
        let decoded = Message::decode(&mut Decoder::new(&buf)).unwrap();
        let lease = lease_from(&decoded, Ipv4Addr::new(169, 254, 0, 2)).unwrap();
        assert_eq!(lease.address, Ipv4Addr::new(169, 254, 0, 15));
        assert_eq!(lease.prefix, 16);
        assert_eq!(lease.router, None, "restrict=on slirp sends no router");
        assert_eq!(lease.dns, vec![Ipv4Addr::new(169, 254, 2, 3)]);
    }

    #[test]
    fn requests_carry_the_broadcast_flag_and_the_chosen_address() {
        let mac = [2, 0, 0, 0, 0, 1];
        let ip = Ipv4Addr::new(10, 0, 2, 15);
        let server = Ipv4Addr::new(10, 0, 2, 2);
        let msg = request_message(9, mac, MessageType::Request, Some((ip, server)));
        assert!(msg.flags().broadcast());
        assert_eq!(msg.chaddr(), &mac);
        assert_eq!(
            msg.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(ip))
        );
    }
}
