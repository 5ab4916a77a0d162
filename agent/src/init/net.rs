//! The network in the initramfs: loopback up, then DHCPv4 on the boot NIC ([`super::nic`]
//! picks the order: the NIC the boot named, else each in slot order), each NIC given a bounded
//! wait for link; DISCOVER → OFFER → REQUEST → ACK, messages by `dhcproto`, and the lease
//! applied with rtnetlink (address, default route). The lease is not renewed here: the real
//! root's own network stack takes over after switch-root.
//!
//! The client uses a UDP socket bound to the interface with the broadcast flag set, so replies
//! come back as broadcasts, which reach a socket on an interface without an address.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable as _, Encodable as _};
use futures_util::TryStreamExt as _;
use ironroot_contract::run_state::{NetworkRecord, NicAttempt};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use super::nic::{self, Nic, Wanted};

/// How long a NIC gets to report link after it is set up.
const LINK_WAIT: Duration = Duration::from_secs(10);

/// How long the boot waits for the NIC it named once another has appeared.
const WANTED_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no Ethernet interface appeared within {0:?} (no NIC driver bound: see the hardware lines above)")]
    NoInterface(Duration),
    #[error("no NIC got a DHCP lease: {0}")]
    NoLease(String),
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("DHCP socket on {iface}: {source}")]
    Dhcp { iface: String, source: std::io::Error },
    #[error("no DHCP {wanted} on {iface} within {waited:?}")]
    NoAnswer { iface: String, wanted: &'static str, waited: Duration },
    #[error("DHCP server refused the request on {iface} (NAK)")]
    Nak { iface: String },
}

/// What DHCP gave us.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Lease {
    pub interface: String,
    pub mac: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub lease_s: Option<u32>,
}

/// Brings the network up on the first NIC (in [`nic::order`]) with link that gets a lease;
/// returns the lease and the record of the choice.
pub async fn up(wait: Duration, wanted: Option<&Wanted>) -> Result<(Lease, NetworkRecord), NetError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    tokio::spawn(connection);
    if let Some(index) = link_index(&handle, "lo").await? {
        handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await?;
    }
    let nics = ethernet(&handle, wait, wanted).await?;
    let (ordered, reason) = nic::order(&nics, wanted);
    // Every link up at once: their carriers come up while the first is tried.
    for n in &ordered {
        handle.link().set(LinkUnspec::new_with_index(n.index).up().build()).execute().await?;
    }
    let mut attempts: Vec<NicAttempt> = Vec::new();
    for (i, n) in ordered.iter().enumerate() {
        let carrier = carrier(&n.name, LINK_WAIT).await;
        let attempt = |outcome: String| NicAttempt {
            interface: n.name.clone(),
            mac: n.mac.clone(),
            driver: n.driver.clone(),
            carrier,
            outcome,
        };
        if !carrier {
            tracing::warn!(interface = %n.name, mac = %n.mac, waited = ?LINK_WAIT, "no link; trying the next NIC");
            attempts.push(attempt(format!("no link within {LINK_WAIT:?}")));
            continue;
        }
        let lease = match dhcp(&n.name, &mac_bytes(&n.mac)).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(interface = %n.name, mac = %n.mac, error = %e, "no lease; trying the next NIC");
                attempts.push(attempt(e.to_string()));
                continue;
            }
        };
        handle.address().add(n.index, lease.address.into(), lease.prefix).execute().await?;
        if let Some(router) = lease.router {
            let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(router).output_interface(n.index).build();
            handle.route().add(route).execute().await?;
        }
        attempts.push(attempt("lease".to_owned()));
        attempts.extend(ordered[i + 1..].iter().map(nic::not_tried));
        let reason = if i == 0 { reason } else { format!("{reason}; the NICs before it did not get a lease") };
        let lease = Lease { mac: n.mac.clone(), ..lease };
        let record = NetworkRecord {
            interface: n.name.clone(),
            mac: n.mac.clone(),
            driver: n.driver.clone(),
            address: lease.address,
            prefix: lease.prefix,
            router: lease.router,
            reason,
            candidates: attempts,
        };
        return Ok((lease, record));
    }
    let tried: Vec<String> = attempts.iter().map(|a| format!("{} ({}): {}", a.interface, a.mac, a.outcome)).collect();
    Err(NetError::NoLease(tried.join("; ")))
}

fn mac_bytes(mac: &str) -> Vec<u8> {
    mac.split(':').filter_map(|b| u8::from_str_radix(b, 16).ok()).collect()
}

/// Whether `iface` reports link within `wait` (`/sys/class/net/IFACE/carrier`).
async fn carrier(iface: &str, wait: Duration) -> bool {
    let path = format!("/sys/class/net/{iface}/carrier");
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == "1") {
            return true;
        }
        if start.elapsed() > wait {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Every non-loopback Ethernet link, waiting for a driver to create one (and a little longer
/// for the one the boot named).
async fn ethernet(handle: &rtnetlink::Handle, wait: Duration, wanted: Option<&Wanted>) -> Result<Vec<Nic>, NetError> {
    let start = Instant::now();
    let mut first_seen: Option<Instant> = None;
    loop {
        let mut links = handle.link().get().execute();
        let mut found = Vec::new();
        while let Some(m) = links.try_next().await? {
            if m.header.link_layer_type != LinkLayerType::Ether || m.header.flags.contains(LinkFlags::Loopback) {
                continue;
            }
            let mut name = None;
            let mut mac = None;
            for attr in &m.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::Address(a) if a.len() == 6 => mac = Some(a.clone()),
                    _ => {}
                }
            }
            if let (Some(name), Some(mac)) = (name, mac) {
                let device = std::fs::canonicalize(format!("/sys/class/net/{name}/device")).ok();
                let driver = std::fs::read_link(format!("/sys/class/net/{name}/device/driver"))
                    .ok()
                    .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
                found.push(Nic {
                    index: m.header.index,
                    mac: mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
                    driver,
                    slot: device.map_or_else(|| name.clone(), |d| d.display().to_string()),
                    name,
                });
            }
        }
        if !found.is_empty() {
            let seen = *first_seen.get_or_insert_with(Instant::now);
            let have_wanted = wanted.is_none_or(|w| found.iter().any(|n| n.mac == w.mac));
            if have_wanted || seen.elapsed() > WANTED_WAIT || start.elapsed() > wait {
                return Ok(found);
            }
        } else if start.elapsed() > wait {
            return Err(NetError::NoInterface(wait));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Retransmissions: 4 tries per message, 1 s, 2 s, 4 s, 8 s apart.
const TRIES: [u64; 4] = [1, 2, 4, 8];

async fn dhcp(iface: &str, mac: &[u8]) -> Result<Lease, NetError> {
    let io = |source| NetError::Dhcp { iface: iface.to_owned(), source };
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP)).map_err(io)?;
    socket.set_reuse_address(true).map_err(io)?;
    socket.set_broadcast(true).map_err(io)?;
    socket.bind_device(Some(iface.as_bytes())).map_err(io)?;
    socket.set_nonblocking(true).map_err(io)?;
    socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68).into()).map_err(io)?;
    let socket = tokio::net::UdpSocket::from_std(socket.into()).map_err(io)?;

    let xid: u32 = rand::random();
    let discover = request(xid, mac, MessageType::Discover, None);
    let offer = exchange(&socket, iface, &discover, xid, "OFFER", |m| m == MessageType::Offer).await?;
    let server = match offer.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => offer.siaddr(),
    };
    let req = request(xid, mac, MessageType::Request, Some((offer.yiaddr(), server)));
    let ack = exchange(&socket, iface, &req, xid, "ACK", |m| matches!(m, MessageType::Ack | MessageType::Nak)).await?;
    if ack.opts().msg_type() == Some(MessageType::Nak) {
        return Err(NetError::Nak { iface: iface.to_owned() });
    }
    let prefix = match ack.opts().get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => u32::from(*m).count_ones() as u8,
        _ => 24,
    };
    let router = match ack.opts().get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let lease_s = match ack.opts().get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(t)) => Some(*t),
        _ => None,
    };
    Ok(Lease {
        interface: iface.to_owned(),
        mac: String::new(),
        address: ack.yiaddr(),
        prefix,
        router,
        server,
        lease_s,
    })
}

fn request(xid: u32, mac: &[u8], kind: MessageType, chosen: Option<(Ipv4Addr, Ipv4Addr)>) -> Message {
    let zero = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(xid, zero, zero, zero, zero, mac);
    msg.set_flags(Flags::default().set_broadcast());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::AddressLeaseTime,
    ]));
    if let Some((address, server)) = chosen {
        opts.insert(DhcpOption::RequestedIpAddress(address));
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    msg
}

/// Sends `msg` until a reply with our xid and an accepted type arrives.
async fn exchange(
    socket: &tokio::net::UdpSocket,
    iface: &str,
    msg: &Message,
    xid: u32,
    wanted: &'static str,
    accept: impl Fn(MessageType) -> bool,
) -> Result<Message, NetError> {
    let io = |source| NetError::Dhcp { iface: iface.to_owned(), source };
    let bytes = msg.to_vec().map_err(|e| io(std::io::Error::other(e.to_string())))?;
    let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let mut buf = vec![0u8; 1500];
    let start = Instant::now();
    for wait in TRIES {
        socket.send_to(&bytes, broadcast).await.map_err(io)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
        while let Ok(got) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            let (n, _) = got.map_err(io)?;
            // Anything that does not decode, is not a reply, or is someone else's is ignored.
            let Ok(reply) = Message::from_bytes(&buf[..n]) else { continue };
            if reply.opcode() == Opcode::BootReply && reply.xid() == xid && reply.opts().msg_type().is_some_and(&accept)
            {
                return Ok(reply);
            }
        }
    }
    Err(NetError::NoAnswer { iface: iface.to_owned(), wanted, waited: start.elapsed() })
}
