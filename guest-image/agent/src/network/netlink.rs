//! A small synchronous rtnetlink client: list links, change one, add an
//! address or a route. Its socket belongs to the network namespace of the
//! thread that opened it ([`Rtnl::open`]), so a test can drive it inside a
//! throwaway namespace.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::address::{AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::route::{RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

use super::config::{IpPrefix, MacAddress, Route};

/// `NLMSGERR_ATTR_MSG`: the extended ack's text.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// The size of a netlink message header.
const NLMSG_HDRLEN: usize = 16;

/// What a netlink request failed with.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    /// Sending, receiving or decoding failed.
    #[error("netlink I/O failed")]
    Io(#[from] io::Error),
    /// The kernel refused the request.
    #[error(
        "{}{}",
        io::Error::from_raw_os_error(*errno),
        message.as_ref().map(|m| format!(" (kernel: {m})")).unwrap_or_default()
    )]
    Kernel {
        /// The (positive) errno.
        errno: i32,
        /// The kernel's extended-ack text, if it sent one.
        message: Option<String>,
    },
}

impl RtnlError {
    /// True if the kernel answered `EEXIST` (the address or route is there).
    pub fn is_exists(&self) -> bool {
        matches!(self, Self::Kernel { errno, .. } if *errno == libc::EEXIST)
    }
}

/// A link as a dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The interface index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// `IFF_LOOPBACK`.
    pub loopback: bool,
    /// An Ethernet link (`ARPHRD_ETHER`): virtio-net, veth, dummy; not a
    /// tunnel (`sit0`, `tunl0`, ...).
    pub ethernet: bool,
    /// `IFF_UP`.
    pub up: bool,
    /// Its hardware address.
    pub mac: Vec<u8>,
    /// Its MTU.
    pub mtu: u32,
}

impl Link {
    fn from_message(msg: LinkMessage) -> Self {
        let mut link = Self {
            index: msg.header.index,
            name: String::new(),
            loopback: msg.header.flags.contains(LinkFlags::Loopback),
            ethernet: msg.header.link_layer_type == LinkLayerType::Ether,
            up: msg.header.flags.contains(LinkFlags::Up),
            mac: Vec::new(),
            mtu: 0,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Address(mac) => link.mac = mac,
                LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                _ => {}
            }
        }
        link
    }
}

/// An rtnetlink socket in the calling thread's network namespace.
pub struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl std::fmt::Debug for Rtnl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtnl")
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl Rtnl {
    /// Opens a `NETLINK_ROUTE` socket, in the network namespace of the
    /// calling thread.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Best effort (Linux 4.12+): the kernel's reason in refusals, and
        // acks that do not echo the whole request.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, RtnlError> {
        let mut links = Vec::new();
        self.exchange(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
            |msg| {
                if let RouteNetlinkMessage::NewLink(link) = msg {
                    links.push(Link::from_message(link));
                }
            },
        )?;
        Ok(links)
    }

    /// Brings link `index` up or takes it down (`ip link set ... up|down`).
    pub fn set_up(&mut self, index: u32, up: bool) -> Result<(), RtnlError> {
        let mut msg = link_message(index);
        msg.header.flags = if up {
            LinkFlags::Up
        } else {
            LinkFlags::empty()
        };
        msg.header.change_mask = LinkFlags::Up;
        self.set_link(msg)
    }

    /// Renames link `index` (it must be down).
    pub fn set_name(&mut self, index: u32, name: &str) -> Result<(), RtnlError> {
        let mut msg = link_message(index);
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        self.set_link(msg)
    }

    /// Sets link `index`'s MAC (most drivers want it down).
    pub fn set_mac(&mut self, index: u32, mac: MacAddress) -> Result<(), RtnlError> {
        let mut msg = link_message(index);
        msg.attributes
            .push(LinkAttribute::Address(mac.octets().to_vec()));
        self.set_link(msg)
    }

    /// Sets link `index`'s MTU.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), RtnlError> {
        let mut msg = link_message(index);
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.set_link(msg)
    }

    fn set_link(&mut self, msg: LinkMessage) -> Result<(), RtnlError> {
        self.exchange(RouteNetlinkMessage::SetLink(msg), NLM_F_ACK, |_| {})
    }

    /// Adds `prefix` to link `index` (`ip addr add`), scope global; an
    /// IPv4 address gets its subnet's broadcast address (below /31), an
    /// IPv6 one skips duplicate address detection (`IFA_F_NODAD`) so it is
    /// usable at once. `EEXIST` if the link already has it.
    pub fn add_address(&mut self, index: u32, prefix: IpPrefix) -> Result<(), RtnlError> {
        let mut msg = AddressMessage::default();
        msg.header.prefix_len = prefix.prefix_len();
        msg.header.index = index;
        msg.header.scope = AddressScope::Universe;
        let addr = prefix.addr();
        match addr {
            IpAddr::V4(v4) => {
                msg.header.family = AddressFamily::Inet;
                msg.attributes.push(AddressAttribute::Local(addr));
                msg.attributes.push(AddressAttribute::Address(addr));
                if prefix.prefix_len() < 31 {
                    let host_mask = u32::MAX >> prefix.prefix_len();
                    let broadcast = (v4.to_bits() | host_mask).into();
                    msg.attributes.push(AddressAttribute::Broadcast(broadcast));
                }
            }
            IpAddr::V6(_) => {
                msg.header.family = AddressFamily::Inet6;
                msg.header.flags = AddressHeaderFlags::Nodad;
                msg.attributes.push(AddressAttribute::Address(addr));
                msg.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
        }
        self.exchange(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            |_| {},
        )
    }

    /// Adds `route` out of link `index` to the main table (`ip route add`,
    /// protocol static): scope link without a gateway, universe with one.
    /// `EEXIST` if the table has that route already.
    pub fn add_route(&mut self, index: u32, route: &Route) -> Result<(), RtnlError> {
        let dest = route.destination;
        let mut msg = RouteMessage::default();
        msg.header = RouteHeader {
            address_family: if dest.addr().is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            },
            destination_prefix_length: dest.prefix_len(),
            table: RouteHeader::RT_TABLE_MAIN,
            protocol: RouteProtocol::Static,
            scope: if route.is_on_link() {
                RouteScope::Link
            } else {
                RouteScope::Universe
            },
            kind: RouteType::Unicast,
            ..RouteHeader::default()
        };
        if dest.prefix_len() > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(dest.addr())));
        }
        if let Some(gateway) = route.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
        }
        if let Some(source) = route.source {
            msg.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::from(source)));
        }
        msg.attributes.push(RouteAttribute::Oif(index));
        self.exchange(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            |_| {},
        )
    }

    /// Sends `message` with `flags` (plus `NLM_F_REQUEST`) and reads the
    /// answer: each message of a dump goes to `each` until `NLMSG_DONE`;
    /// an acked request ends at its ack. Messages of other sequence numbers
    /// are skipped.
    fn exchange(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> Result<(), RtnlError> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut packet =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = sequence;
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        let sent = self.socket.send(&buf, 0)?;
        if sent != buf.len() {
            return Err(
                invalid_data(format!("sent {sent} of a {}-byte request", buf.len())).into(),
            );
        }
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < datagram.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[offset..])
                    .map_err(|err| invalid_data(format!("cannot decode an answer: {err}")))?;
                // deserialize checked that the length fits and is >= 16.
                offset += align4(msg.header.length as usize);
                if msg.header.sequence_number != sequence {
                    continue;
                }
                let outer_flags = msg.header.flags;
                match msg.payload {
                    NetlinkPayload::InnerMessage(inner) => each(inner),
                    NetlinkPayload::Done(done) if done.code < 0 => {
                        return Err(RtnlError::Kernel {
                            errno: -done.code,
                            message: None,
                        })
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(err) => match err.code {
                        None => return Ok(()),
                        Some(code) => {
                            return Err(RtnlError::Kernel {
                                errno: code.get().saturating_abs(),
                                message: ext_ack_message(outer_flags, &err.header),
                            })
                        }
                    },
                    _ => {}
                }
            }
        }
    }
}

fn link_message(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn invalid_data(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, text)
}

/// The text of an error's extended ack (`NLMSGERR_ATTR_MSG`): the TLVs
/// after the echoed request (only its header if `NLM_F_CAPPED`).
fn ext_ack_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < NLMSG_HDRLEN {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        u32::from_ne_bytes(payload[..4].try_into().ok()?) as usize
    };
    let mut tlvs = payload.get(align4(echoed)..)?;
    while tlvs.len() >= 4 {
        let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
        let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]);
        let value = tlvs.get(4..len)?;
        if kind == NLMSGERR_ATTR_MSG {
            let text = value.split(|&b| b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        tlvs = tlvs.get(align4(len).max(4)..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_ack_text_is_found_after_the_echoed_header() {
        // A capped error payload: the request's header, then one TLV.
        let mut payload = vec![0u8; NLMSG_HDRLEN];
        payload[..4].copy_from_slice(&20u32.to_ne_bytes());
        let text = b"Nexthop has invalid gateway\0";
        payload.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        payload.resize(align4(payload.len()), 0);
        assert_eq!(
            ext_ack_message(NLM_F_ACK_TLVS | NLM_F_CAPPED, &payload).as_deref(),
            Some("Nexthop has invalid gateway")
        );
        assert_eq!(ext_ack_message(NLM_F_CAPPED, &payload), None);
        // Not capped: the whole 20-byte request is echoed first.
        let mut uncapped = payload[..NLMSG_HDRLEN].to_vec();
        uncapped.extend_from_slice(&[0; 4]);
        uncapped.extend_from_slice(&payload[NLMSG_HDRLEN..]);
        assert_eq!(
            ext_ack_message(NLM_F_ACK_TLVS, &uncapped).as_deref(),
            Some("Nexthop has invalid gateway")
        );
        // Truncated TLVs are ignored, not read past.
        assert_eq!(
            ext_ack_message(NLM_F_ACK_TLVS | NLM_F_CAPPED, &payload[..NLMSG_HDRLEN + 6]),
            None
        );
    }

    #[test]
    fn kernel_errors_read_like_errno_and_say_the_kernel_s_reason() {
        let err = RtnlError::Kernel {
            errno: libc::ENETUNREACH,
            message: Some("Nexthop has invalid gateway".into()),
        };
        let text = err.to_string();
        assert!(text.contains("unreachable"), "{text}");
        assert!(
            text.ends_with("(kernel: Nexthop has invalid gateway)"),
            "{text}"
        );
        assert!(!err.is_exists());
        assert!(RtnlError::Kernel {
            errno: libc::EEXIST,
            message: None
        }
        .is_exists());
    }

    #[test]
    fn the_kernel_s_refusals_keep_errno_and_reason() {
        // As root, in a throwaway namespace: only its lo is touched.
        super::super::tests::in_throwaway_netns(|| {
            let mut rtnl = Rtnl::open().unwrap();
            let links = rtnl.links().unwrap();
            let [lo] = links.as_slice() else {
                panic!("a new namespace has only lo: {links:?}");
            };
            assert!(lo.loopback && !lo.ethernet && !lo.up, "{lo:?}");
            assert_eq!(lo.name, "lo");

            let err = rtnl.set_mtu(lo.index, u32::MAX).unwrap_err();
            match &err {
                RtnlError::Kernel { errno, message } => {
                    assert_eq!(*errno, libc::EINVAL);
                    // Extended acks are on (Linux 4.12+); the text is the
                    // kernel's and may change, so only its gist is checked.
                    let message = message.as_deref().unwrap_or_default();
                    assert!(message.contains("mtu"), "{message:?}");
                }
                other => panic!("{other:?}"),
            }

            rtnl.set_up(lo.index, true).unwrap();
            let prefix = IpPrefix::parse_cidr("10.1.2.3/32").unwrap();
            rtnl.add_address(lo.index, prefix).unwrap();
            let again = rtnl.add_address(lo.index, prefix).unwrap_err();
            assert!(again.is_exists(), "{again:?}");
            let lo = rtnl.links().unwrap().remove(0);
            assert!(lo.up, "{lo:?}");
        });
    }
}
