//! The rtnetlink and tc requests of pod networking, over a synchronous
//! `NETLINK_ROUTE` socket.
//!
//! An [`Rtnl`] speaks to the network namespace its socket was opened in:
//! open it on the thread [`super::run_in_netns`] runs. Each request waits
//! for the kernel's acknowledgement (or the end of its dump) before the
//! next one is sent.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    DecodeError, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

use super::PodRoute;

/// Why a netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// A `NETLINK_ROUTE` socket could not be opened.
    #[error("cannot open a netlink socket")]
    Socket(#[source] io::Error),
    /// Sending or receiving on the socket failed.
    #[error("the netlink socket failed")]
    Io(#[source] io::Error),
    /// An answer of the kernel could not be decoded.
    #[error("a malformed netlink answer")]
    Decode(#[source] DecodeError),
    /// The kernel refused a request.
    #[error("cannot {what}")]
    Refused {
        /// What was asked, as a verb phrase ("add the ingress qdisc of eth0").
        what: String,
        /// The kernel's errno.
        #[source]
        source: io::Error,
    },
    /// A dump was interrupted by changes every time it was tried.
    #[error("cannot {what}: the dump kept being interrupted")]
    Interrupted {
        /// What was asked.
        what: String,
    },
}

impl NetlinkError {
    /// The errno the kernel refused a request with, if it did.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Refused { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// The ingress qdisc's handle, `ffff:`. (Its parent is `TcHandle::INGRESS`,
/// `ffff:fff1`, which netlink-packet-route names as if it were the handle.)
pub(super) const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

/// The kind of the ingress qdisc (`TcQdiscIngress::KIND` is private).
const INGRESS_KIND: &str = "ingress";

/// The priority of the redirect filter.
const FILTER_PRIORITY: u16 = 1;

/// How often an interrupted dump is tried again.
const DUMP_ATTEMPTS: usize = 5;

/// What a link dump tells about one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Link {
    pub(super) index: u32,
    pub(super) name: String,
    /// The hardware address when it is 6 bytes long.
    pub(super) mac: Option<[u8; 6]>,
    pub(super) mtu: u32,
    pub(super) loopback: bool,
    pub(super) up: bool,
    pub(super) ethernet: bool,
}

impl Link {
    fn from_message(msg: LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            loopback: msg.header.flags.contains(LinkFlags::Loopback),
            up: msg.header.flags.contains(LinkFlags::Up),
            ethernet: msg.header.link_layer_type == LinkLayerType::Ether,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Address(mac) => link.mac = <[u8; 6]>::try_from(mac.as_slice()).ok(),
                LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                _ => {}
            }
        }
        link
    }
}

/// A `NETLINK_ROUTE` socket in the namespace it was opened in.
pub(super) struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// Opens a socket in the calling thread's network namespace.
    pub(super) fn new() -> Result<Rtnl, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        Ok(Rtnl {
            socket,
            seq: 0,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// Sends `msg` with `flags` and gathers the answers to it up to the
    /// acknowledgement (or the end of a dump). Returns the answers and
    /// whether the kernel flagged the dump as interrupted.
    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &dyn Fn() -> String,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool), NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = self.seq;
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0).map_err(NetlinkError::Io)?;

        let mut answers = Vec::new();
        let mut interrupted = false;
        loop {
            self.buf.clear();
            let len = self
                .socket
                .recv(&mut self.buf, 0)
                .map_err(NetlinkError::Io)?;
            let datagram = &self.buf[..len.min(self.buf.len())];
            let mut offset = 0;
            while offset < datagram.len() {
                let answer: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&datagram[offset..])
                        .map_err(NetlinkError::Decode)?;
                let length = answer.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += (length + 3) & !3;
                if answer.header.sequence_number != self.seq {
                    continue;
                }
                interrupted |= answer.header.flags & NLM_F_DUMP_INTR != 0;
                match answer.payload {
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    NetlinkPayload::Done(_) => return Ok((answers, interrupted)),
                    NetlinkPayload::Error(err) => {
                        return match err.code {
                            None => Ok((answers, interrupted)),
                            Some(_) => Err(NetlinkError::Refused {
                                what: what(),
                                source: err.to_io(),
                            }),
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// A request the kernel acknowledges.
    fn ack(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &dyn Fn() -> String,
    ) -> Result<(), NetlinkError> {
        self.exchange(msg, NLM_F_ACK | flags, what).map(drop)
    }

    /// A dump, tried again while the kernel flags it as interrupted.
    fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
        what: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        for _ in 0..DUMP_ATTEMPTS {
            let (answers, interrupted) = self.exchange(msg.clone(), NLM_F_DUMP, what)?;
            if !interrupted {
                return Ok(answers);
            }
        }
        Err(NetlinkError::Interrupted { what: what() })
    }

    /// Every link of the namespace.
    pub(super) fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let answers = self.dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            &|| "list the links".into(),
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewLink(msg) => Some(Link::from_message(msg)),
                _ => None,
            })
            .collect())
    }

    /// The link named `name`, if there is one.
    pub(super) fn link(&mut self, name: &str) -> Result<Option<Link>, NetlinkError> {
        Ok(self.links()?.into_iter().find(|link| link.name == name))
    }

    /// The addresses of link `index` with their prefix lengths, IPv6
    /// link-local ones (fe80::/10) left out.
    pub(super) fn addresses(&mut self, index: u32) -> Result<Vec<(IpAddr, u8)>, NetlinkError> {
        let answers = self.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            &|| "list the addresses".into(),
        )?;
        let mut addresses = Vec::new();
        for answer in answers {
            let RouteNetlinkMessage::NewAddress(msg) = answer else {
                continue;
            };
            if msg.header.index != index {
                continue;
            }
            // IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on
            // a point-to-point link, and the only one for IPv6.
            let mut local = None;
            let mut address = None;
            for attr in msg.attributes {
                match attr {
                    AddressAttribute::Local(ip) => local = Some(ip),
                    AddressAttribute::Address(ip) => address = Some(ip),
                    _ => {}
                }
            }
            if let Some(ip) = local.or(address) {
                if !is_ipv6_link_local(&ip) {
                    addresses.push((ip, msg.header.prefix_len));
                }
            }
        }
        Ok(addresses)
    }

    /// The unicast routes of the main table that go out of link `index`;
    /// see [`super::PodNetwork::routes`] for what is kept.
    pub(super) fn routes(&mut self, index: u32) -> Result<Vec<PodRoute>, NetlinkError> {
        let answers = self.dump(
            RouteNetlinkMessage::GetRoute(RouteMessage::default()),
            &|| "list the routes".into(),
        )?;
        let mut routes = Vec::new();
        for answer in answers {
            let RouteNetlinkMessage::NewRoute(msg) = answer else {
                continue;
            };
            if let Some(route) = pod_route(msg, index) {
                routes.push(route);
            }
        }
        Ok(routes)
    }

    /// Sets link `index`'s MTU and brings it up.
    pub(super) fn set_mtu_and_up(&mut self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.ack(RouteNetlinkMessage::SetLink(msg), 0, &|| {
            format!("set the MTU of link {index} to {mtu} and bring it up")
        })
    }

    /// Deletes link `index`.
    pub(super) fn delete_link(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.ack(RouteNetlinkMessage::DelLink(msg), 0, &|| {
            format!("delete link {index}")
        })
    }

    /// Adds an ingress qdisc (`ffff:`) to link `index`; fails if the link
    /// has one already.
    pub(super) fn add_ingress_qdisc(&mut self, index: u32) -> Result<(), NetlinkError> {
        let msg = ingress_qdisc(index);
        self.ack(
            RouteNetlinkMessage::NewQueueDiscipline(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("add an ingress qdisc to link {index}"),
        )
    }

    /// Deletes the ingress qdisc of link `index`, with its filters.
    pub(super) fn delete_ingress_qdisc(&mut self, index: u32) -> Result<(), NetlinkError> {
        let msg = ingress_qdisc(index);
        self.ack(RouteNetlinkMessage::DelQueueDiscipline(msg), 0, &|| {
            format!("delete the ingress qdisc of link {index}")
        })
    }

    /// The links with an ingress qdisc.
    pub(super) fn ingress_qdiscs(&mut self) -> Result<Vec<u32>, NetlinkError> {
        let answers = self.dump(
            RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
            &|| "list the qdiscs".into(),
        )?;
        let mut links = Vec::new();
        for answer in answers {
            let RouteNetlinkMessage::NewQueueDiscipline(msg) = answer else {
                continue;
            };
            let ingress = msg.header.parent == TcHandle::INGRESS
                && msg
                    .attributes
                    .iter()
                    .any(|attr| matches!(attr, TcAttribute::Kind(kind) if kind == INGRESS_KIND));
            if ingress {
                if let Ok(index) = u32::try_from(msg.header.index) {
                    links.push(index);
                }
            }
        }
        Ok(links)
    }

    /// Adds to the ingress qdisc of link `from` a filter that matches every
    /// frame (u32, one key with mask 0) and redirects it to the egress of
    /// link `to` (mirred egress redirect), as
    /// `tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0
    /// action mirred egress redirect dev TO`.
    pub(super) fn add_redirect(&mut self, from: u32, to: u32) -> Result<(), NetlinkError> {
        let mut mirror = TcMirror::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.attributes = vec![
            TcActionAttribute::Kind(TcActionMirror::KIND.into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirror,
            ))]),
        ];
        let mut selector = TcU32Selector::default();
        selector.flags = TcU32SelectorFlags::Terminal;
        selector.nkeys = 1;
        selector.keys = vec![TcU32Key::default()];

        let mut msg = TcMessage::with_index(link_index(from));
        msg.header.parent = INGRESS_HANDLE;
        msg.header.info = filter_info(FILTER_PRIORITY);
        msg.attributes = vec![
            TcAttribute::Kind(TcFilterU32::KIND.into()),
            TcAttribute::Options(vec![
                TcOption::U32(TcFilterU32Option::Selector(selector)),
                TcOption::U32(TcFilterU32Option::Action(vec![action])),
            ]),
        ];
        self.ack(
            RouteNetlinkMessage::NewTrafficFilter(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("add a redirect filter from link {from} to link {to}"),
        )
    }

    /// The links the ingress filters of link `index` redirect or mirror to
    /// (0 for a target that was deleted since).
    pub(super) fn redirect_targets(&mut self, index: u32) -> Result<Vec<u32>, NetlinkError> {
        let mut msg = TcMessage::with_index(link_index(index));
        msg.header.parent = INGRESS_HANDLE;
        let answers = self.dump(RouteNetlinkMessage::GetTrafficFilter(msg), &|| {
            format!("list the ingress filters of link {index}")
        })?;
        let mut targets = Vec::new();
        for answer in answers {
            let RouteNetlinkMessage::NewTrafficFilter(msg) = answer else {
                continue;
            };
            for attr in &msg.attributes {
                let TcAttribute::Options(options) = attr else {
                    continue;
                };
                for option in options {
                    if let TcOption::U32(TcFilterU32Option::Action(actions)) = option {
                        targets.extend(actions.iter().filter_map(mirred_target));
                    }
                }
            }
        }
        Ok(targets)
    }
}

/// The link a mirred action sends to.
fn mirred_target(action: &TcAction) -> Option<u32> {
    action.attributes.iter().find_map(|attr| match attr {
        TcActionAttribute::Options(options) => options.iter().find_map(|option| match option {
            TcActionOption::Mirror(TcActionMirrorOption::Parms(parms)) => Some(parms.ifindex),
            _ => None,
        }),
        _ => None,
    })
}

/// tc headers carry the link index as a signed int; kernel indexes are
/// positive ints.
fn link_index(index: u32) -> i32 {
    i32::try_from(index).unwrap_or(i32::MAX)
}

/// `tcm_info` of a filter: its priority, and the protocol it matches
/// (`ETH_P_ALL`) in network byte order.
fn filter_info(priority: u16) -> u32 {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    (u32::from(priority) << 16) | u32::from(protocol)
}

fn ingress_qdisc(index: u32) -> TcMessage {
    let mut msg = TcMessage::with_index(link_index(index));
    msg.header.handle = INGRESS_HANDLE;
    msg.header.parent = TcHandle::INGRESS;
    msg.attributes.push(TcAttribute::Kind(INGRESS_KIND.into()));
    msg
}

fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

fn route_ip(address: RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(v6)),
        _ => None,
    }
}

/// `msg` as a route of the pod interface `index`, if it is one to keep:
/// unicast, main table, out of `index` (no multipath), not to an IPv6
/// link-local destination.
fn pod_route(msg: RouteMessage, index: u32) -> Option<PodRoute> {
    if msg.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let mut oif = None;
    let mut destination = None;
    let mut gateway = None;
    let mut source = None;
    for attr in msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = t,
            RouteAttribute::Oif(i) => oif = Some(i),
            RouteAttribute::Destination(a) => destination = route_ip(a),
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            RouteAttribute::PrefSource(a) => source = route_ip(a),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || oif != Some(index) {
        return None;
    }
    let prefix = msg.header.destination_prefix_length;
    let destination = match destination {
        Some(ip) if is_ipv6_link_local(&ip) => return None,
        Some(ip) if prefix > 0 => Some((ip, prefix)),
        _ => None,
    };
    Some(PodRoute {
        destination,
        gateway,
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_route::route::RouteProtocol;
    use netlink_packet_route::AddressFamily;

    use super::*;

    fn route(family: AddressFamily, prefix: u8, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.header.destination_prefix_length = prefix;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.kind = RouteType::Unicast;
        msg.header.protocol = RouteProtocol::Kernel;
        msg.attributes = attrs;
        msg
    }

    #[test]
    fn routes_are_kept_or_left_out() {
        let v4 = |a, b, c, d| RouteAddress::Inet(Ipv4Addr::new(a, b, c, d));
        let subnet = route(
            AddressFamily::Inet,
            24,
            vec![
                RouteAttribute::Destination(v4(10, 0, 0, 0)),
                RouteAttribute::PrefSource(v4(10, 0, 0, 2)),
                RouteAttribute::Oif(7),
            ],
        );
        assert_eq!(
            pod_route(subnet.clone(), 7),
            Some(PodRoute {
                destination: Some(("10.0.0.0".parse().unwrap(), 24)),
                gateway: None,
                source: Some("10.0.0.2".parse().unwrap()),
            })
        );
        // Another link's.
        assert_eq!(pod_route(subnet.clone(), 8), None);
        // Another table's (a table id above 255 is only in the attribute).
        let mut other_table = subnet.clone();
        other_table.attributes.push(RouteAttribute::Table(1000));
        assert_eq!(pod_route(other_table, 7), None);
        // Not unicast.
        let mut local = subnet;
        local.header.kind = RouteType::Local;
        assert_eq!(pod_route(local, 7), None);

        let default = route(
            AddressFamily::Inet6,
            0,
            vec![
                RouteAttribute::Gateway(RouteAddress::Inet6(Ipv6Addr::new(
                    0xfe80, 0, 0, 0, 0, 0, 0, 1,
                ))),
                RouteAttribute::Oif(7),
            ],
        );
        assert_eq!(
            pod_route(default, 7),
            Some(PodRoute {
                destination: None,
                gateway: Some("fe80::1".parse().unwrap()),
                source: None,
            })
        );
        let link_local = route(
            AddressFamily::Inet6,
            64,
            vec![
                RouteAttribute::Destination(RouteAddress::Inet6(Ipv6Addr::new(
                    0xfe80, 0, 0, 0, 0, 0, 0, 0,
                ))),
                RouteAttribute::Oif(7),
            ],
        );
        assert_eq!(pod_route(link_local, 7), None);
    }

    #[test]
    fn link_local_is_fe80_slash_10() {
        assert!(is_ipv6_link_local(&"fe80::1".parse().unwrap()));
        assert!(is_ipv6_link_local(&"febf::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"fec0::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"fd00::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"169.254.0.1".parse().unwrap()));
    }

    #[test]
    fn the_filter_matches_every_protocol() {
        // tc's "pref 1 protocol all": the priority above, ETH_P_ALL in
        // network byte order below.
        let info = filter_info(1);
        assert_eq!(info >> 16, 1);
        assert_eq!(u16::from_be((info & 0xffff) as u16), 3);
    }
}
