//! The network in the initramfs: loopback up, then DHCPv4 on the first Ethernet interface
//! (DISCOVER → OFFER → REQUEST → ACK, messages by `dhcproto`), and the lease applied with
//! rtnetlink (address, default route). The lease is not renewed here: the real root's own
//! network stack takes over after switch-root.
//!
//! The client uses a UDP socket bound to the interface with the broadcast flag set, so replies
//! come back as broadcasts, which reach a socket on an interface without an address.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable as _, Encodable as _};
use futures_util::TryStreamExt as _;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no Ethernet interface appeared within {0:?} (is virtio_net loaded?)")]
    NoInterface(Duration),
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

/// Brings the network up and returns the lease.
pub async fn up(wait: Duration) -> Result<Lease, NetError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    tokio::spawn(connection);
    if let Some(index) = link_index(&handle, "lo").await? {
        handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await?;
    }
    let (index, iface, mac) = first_ethernet(&handle, wait).await?;
    handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await?;
    let lease = dhcp(&iface, &mac).await?;
    handle.address().add(index, lease.address.into(), lease.prefix).execute().await?;
    if let Some(router) = lease.router {
        let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(router).output_interface(index).build();
        handle.route().add(route).execute().await?;
    }
    Ok(Lease { mac: mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"), ..lease })
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

/// The first non-loopback Ethernet link, waiting for the driver to create it.
async fn first_ethernet(handle: &rtnetlink::Handle, wait: Duration) -> Result<(u32, String, Vec<u8>), NetError> {
    let start = Instant::now();
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
                found.push((m.header.index, name, mac));
            }
        }
        found.sort();
        if let Some(first) = found.into_iter().next() {
            return Ok(first);
        }
        if start.elapsed() > wait {
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
