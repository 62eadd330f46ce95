//! The checked form of a `ConfigureNetworkRequest` (parse): every field is
//! validated before anything in the guest changes, so a bad request is
//! refused whole ([`NetworkError::is_invalid_request`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use skiff_agent_proto::agent as pb;
use skiff_agent_proto::{NET_FILE_MAX_LEN, NET_IFNAME_MAX_LEN, NET_IPV6_MIN_MTU, NET_MTU};

use super::{NetworkError, RouteProblem};

/// The most addresses one interface may be given.
pub const MAX_ADDRESSES: usize = 64;
/// The most routes one request may add.
pub const MAX_ROUTES: usize = 256;
/// The loopback link's name, which the NIC may not take.
const LOOPBACK_NAME: &str = "lo";

/// An IP address with a prefix length that fits its family
/// (`10.88.0.5/24`, `fd00::5/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPrefix {
    addr: IpAddr,
    prefix_len: u8,
}

impl IpPrefix {
    /// `addr/prefix_len`, or `None` if the length exceeds the family's
    /// (32 or 128).
    pub fn try_new(addr: IpAddr, prefix_len: u32) -> Option<Self> {
        let prefix_len = u8::try_from(prefix_len).ok()?;
        (u32::from(prefix_len) <= max_prefix_len(addr)).then_some(Self { addr, prefix_len })
    }

    /// Parses CIDR text, `a.b.c.d/n` or `x::y/n` (the prefix is required).
    pub fn parse_cidr(text: &str) -> Option<Self> {
        let (addr, len) = text.split_once('/')?;
        if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Self::try_new(addr.parse().ok()?, len.parse().ok()?)
    }

    /// `0.0.0.0/0` or `::/0`: the default route of `addr`'s family.
    pub fn any_of_family(addr: IpAddr) -> Self {
        let addr = match addr {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        Self {
            addr,
            prefix_len: 0,
        }
    }

    /// The address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The address with every bit past the prefix cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V4((a.to_bits() & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V6((a.to_bits() & mask).into())
            }
        }
    }

    /// True if `ip` is of the same family and inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4()
            && Self {
                addr: ip,
                prefix_len: self.prefix_len,
            }
            .network()
                == self.network()
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

fn max_prefix_len(addr: IpAddr) -> u32 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn family_name(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Unicast, and not the unspecified, loopback or broadcast address: what a
/// link may carry or a route may go through.
fn is_usable_unicast(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            !(a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback())
        }
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast() || a.is_loopback()),
    }
}

/// `fe80::/10`: a next hop the kernel takes on any link without a route.
fn is_ipv6_link_local(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
}

/// An Ethernet MAC address that a link may take: unicast, not all zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddress([u8; 6]);

impl MacAddress {
    /// Checks `bytes`: 6 of them, the multicast bit clear, not all zeros.
    pub fn try_new(bytes: &[u8]) -> Result<Self, NetworkError> {
        let refuse = |reason| NetworkError::Mac {
            mac: hex_colons(bytes),
            reason,
        };
        let mac: [u8; 6] = bytes
            .try_into()
            .map_err(|_| refuse("a MAC address is 6 bytes"))?;
        if mac[0] & 1 != 0 {
            return Err(refuse("it is a multicast address"));
        }
        if mac == [0; 6] {
            return Err(refuse("it is all zeros"));
        }
        Ok(Self(mac))
    }

    /// The 6 bytes.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_colons(&self.0))
    }
}

fn hex_colons(bytes: &[u8]) -> String {
    let hex: Vec<_> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

/// A link name the kernel takes as is (`dev_valid_name`, and no `%`,
/// which would make it a pattern), other than `lo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceName(String);

impl InterfaceName {
    /// Checks `name`.
    pub fn try_new(name: &str) -> Result<Self, NetworkError> {
        let refuse = |reason| NetworkError::InterfaceName {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(refuse("it is empty"));
        }
        if name.len() > NET_IFNAME_MAX_LEN {
            return Err(refuse("it is longer than 15 bytes"));
        }
        if name == "." || name == ".." {
            return Err(refuse("\".\" and \"..\" are reserved"));
        }
        if name
            .chars()
            .any(|c| matches!(c, '/' | ':' | '%') || c.is_whitespace() || c.is_control())
        {
            return Err(refuse(
                "it contains '/', ':', '%', white space or a control character",
            ));
        }
        if name == LOOPBACK_NAME {
            return Err(refuse("it is the loopback link's"));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The guest's NIC as the request describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// The name the link takes.
    pub name: InterfaceName,
    /// The MAC it takes.
    pub mac: MacAddress,
    /// Its MTU, in [`NET_MTU`].
    pub mtu: u32,
    /// Its addresses, in request order.
    pub addresses: Vec<IpPrefix>,
}

impl Interface {
    fn try_from_request(iface: &pb::NetInterface) -> Result<Self, NetworkError> {
        let name = InterfaceName::try_new(&iface.name)?;
        let mac = MacAddress::try_new(&iface.mac)?;
        if !NET_MTU.contains(&iface.mtu) {
            return Err(NetworkError::Mtu(iface.mtu));
        }
        if iface.addresses.len() > MAX_ADDRESSES {
            return Err(NetworkError::TooManyAddresses(iface.addresses.len()));
        }
        let addresses = iface
            .addresses
            .iter()
            .map(|a| {
                let refuse = |reason| NetworkError::Address {
                    address: a.address.clone(),
                    prefix_len: a.prefix_len,
                    reason,
                };
                let addr: IpAddr = a
                    .address
                    .parse()
                    .map_err(|_| refuse("it is not an IPv4 or IPv6 address"))?;
                let prefix = IpPrefix::try_new(addr, a.prefix_len).ok_or(refuse(
                    "the prefix is longer than the family's (32 for IPv4, 128 for IPv6)",
                ))?;
                if !is_usable_unicast(addr) {
                    return Err(refuse(
                        "it is not a unicast address (unspecified, loopback, multicast or broadcast)",
                    ));
                }
                if addr.is_ipv6() && iface.mtu < NET_IPV6_MIN_MTU {
                    return Err(NetworkError::Ipv6Mtu(iface.mtu));
                }
                Ok(prefix)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name,
            mac,
            mtu: iface.mtu,
            addresses,
        })
    }

    /// True if `ip` is one of the interface's addresses.
    fn has_address(&self, ip: IpAddr) -> bool {
        self.addresses.iter().any(|a| a.addr() == ip)
    }
}

/// A route to add, on the request's one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The destination network (host bits clear); `/0` is the default
    /// route of its family.
    pub destination: IpPrefix,
    /// The next hop, of the destination's family; `None` for a route on
    /// the link (scope link).
    pub gateway: Option<IpAddr>,
    /// The interface the route goes out of.
    pub device: InterfaceName,
    /// The preferred source address: one of the interface's.
    pub source: Option<IpAddr>,
}

impl Route {
    /// True for a route on the link (no gateway).
    pub fn is_on_link(&self) -> bool {
        self.gateway.is_none()
    }

    fn try_from_request(route: &pb::Route, iface: &Interface) -> Result<Self, RouteProblem> {
        let parse_addr = |text: &str, bad: fn(String) -> RouteProblem| {
            (!text.is_empty())
                .then(|| text.parse::<IpAddr>().map_err(|_| bad(text.to_owned())))
                .transpose()
        };
        let gateway = parse_addr(&route.gateway, RouteProblem::Gateway)?;
        let source = parse_addr(&route.source, RouteProblem::Source)?;
        let destination = match (route.destination.as_str(), gateway) {
            ("", None) => return Err(RouteProblem::NoDestinationOrGateway),
            ("", Some(gateway)) => IpPrefix::any_of_family(gateway),
            (text, _) => {
                let prefix = IpPrefix::parse_cidr(text)
                    .ok_or_else(|| RouteProblem::Destination(text.to_owned()))?;
                if prefix.network() != prefix.addr() {
                    return Err(RouteProblem::HostBits {
                        destination: prefix,
                        network: prefix.network(),
                    });
                }
                prefix
            }
        };
        let family = destination.addr();
        for (what, addr) in [("gateway", gateway), ("source", source)] {
            if let Some(addr) = addr.filter(|a| a.is_ipv4() != family.is_ipv4()) {
                return Err(RouteProblem::FamilyMismatch {
                    what,
                    addr,
                    family: family_name(family),
                });
            }
        }
        let device = match route.device.as_str() {
            "" => iface.name.clone(),
            name if name == iface.name.as_str() => iface.name.clone(),
            other => return Err(RouteProblem::UnknownDevice(other.to_owned())),
        };
        if let Some(gateway) = gateway {
            if !is_usable_unicast(gateway) {
                return Err(RouteProblem::GatewayNotUnicast(gateway));
            }
            if iface.has_address(gateway) {
                return Err(RouteProblem::GatewayIsLocal(gateway));
            }
        }
        if let Some(source) = source.filter(|&s| !iface.has_address(s)) {
            return Err(RouteProblem::SourceNotLocal(source));
        }
        Ok(Self {
            destination,
            gateway,
            device,
            source,
        })
    }
}

impl fmt::Display for Route {
    /// As `ip route` shows it: `default via 10.88.0.1 dev eth0`,
    /// `10.99.0.0/16 dev eth0 scope link src 10.88.0.5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.destination.prefix_len() == 0 {
            write!(f, "default")?;
            if self.destination.addr().is_ipv6() && self.gateway.is_none() {
                write!(f, " (IPv6)")?;
            }
        } else {
            write!(f, "{}", self.destination)?;
        }
        match self.gateway {
            Some(gateway) => write!(f, " via {gateway} dev {}", self.device)?,
            None => write!(f, " dev {} scope link", self.device)?,
        }
        if let Some(source) = self.source {
            write!(f, " src {source}")?;
        }
        Ok(())
    }
}

/// A checked `ConfigureNetworkRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The NIC.
    pub interface: Interface,
    /// The routes, those on the link first (each group in request order).
    pub routes: Vec<Route>,
    /// `/etc/hosts`' new contents, if any.
    pub hosts: Option<String>,
    /// `/etc/resolv.conf`'s new contents, if any.
    pub resolv_conf: Option<String>,
}

impl NetworkConfig {
    /// Checks the whole request: exactly one interface (a valid link name,
    /// a unicast 6-byte MAC, an MTU in [`NET_MTU`], addresses with prefixes
    /// that fit), routes that parse, whose gateway and source match the
    /// destination's family, whose device is the interface and whose
    /// gateway is on one of its subnets, and files of at most
    /// [`NET_FILE_MAX_LEN`] bytes.
    pub fn try_from_request(req: &pb::ConfigureNetworkRequest) -> Result<Self, NetworkError> {
        let [iface] = req.interfaces.as_slice() else {
            return Err(NetworkError::InterfaceCount(req.interfaces.len()));
        };
        let interface = Interface::try_from_request(iface)?;
        if req.routes.len() > MAX_ROUTES {
            return Err(NetworkError::TooManyRoutes(req.routes.len()));
        }
        let mut routes = req
            .routes
            .iter()
            .enumerate()
            .map(|(index, route)| {
                Route::try_from_request(route, &interface)
                    .map_err(|problem| refused_route(index, route, problem))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The kernel takes a gateway only if a route on the link (one of
        // the addresses' prefixes, or an on-link route) reaches it.
        for (index, route) in routes.iter().enumerate() {
            let Some(gateway) = route.gateway else {
                continue;
            };
            let on_link = is_ipv6_link_local(gateway)
                || interface.addresses.iter().any(|a| a.contains(gateway))
                || routes
                    .iter()
                    .any(|r| r.is_on_link() && r.destination.contains(gateway));
            if !on_link {
                return Err(refused_route(
                    index,
                    &req.routes[index],
                    RouteProblem::GatewayUnreachable {
                        gateway,
                        device: route.device.clone(),
                    },
                ));
            }
        }
        if interface.mtu < NET_IPV6_MIN_MTU && routes.iter().any(|r| r.destination.addr().is_ipv6())
        {
            return Err(NetworkError::Ipv6Mtu(interface.mtu));
        }
        // Stable: each group keeps the request's order.
        routes.sort_by_key(|r| !r.is_on_link());
        let file = |name: &'static str, text: &str| {
            if text.len() > NET_FILE_MAX_LEN {
                return Err(NetworkError::FileTooLarge {
                    file: name,
                    len: text.len(),
                });
            }
            Ok((!text.is_empty()).then(|| text.to_owned()))
        };
        Ok(Self {
            hosts: file("hosts", &req.hosts)?,
            resolv_conf: file("resolv_conf", &req.resolv_conf)?,
            interface,
            routes,
        })
    }
}

fn refused_route(index: usize, route: &pb::Route, problem: RouteProblem) -> NetworkError {
    NetworkError::Route {
        index,
        destination: route.destination.clone(),
        gateway: route.gateway.clone(),
        device: route.device.clone(),
        problem: Box::new(problem),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x58, 0x00, 0x05];

    fn address(address: &str, prefix_len: u32) -> pb::IpAddress {
        pb::IpAddress {
            address: address.into(),
            prefix_len,
            ..Default::default()
        }
    }

    fn route(destination: &str, gateway: &str) -> pb::Route {
        pb::Route {
            destination: destination.into(),
            gateway: gateway.into(),
            ..Default::default()
        }
    }

    /// A good request: eth0, a /24 and a /64, an on-link route, two
    /// gateway routes (one through the on-link route), both files.
    fn good() -> pb::ConfigureNetworkRequest {
        pb::ConfigureNetworkRequest {
            interfaces: vec![pb::NetInterface {
                name: "eth0".into(),
                mac: MAC.to_vec(),
                mtu: 1400,
                addresses: vec![address("10.88.0.5", 24), address("fd00:88::5", 64)],
                ..Default::default()
            }],
            routes: vec![
                route("", "10.88.0.1"),
                route("10.200.0.0/16", "10.99.0.1"),
                route("10.99.0.0/16", ""),
                route("", "fd00:88::1"),
            ],
            hosts: "127.0.0.1 localhost\n".into(),
            resolv_conf: "nameserver 10.88.0.1\n".into(),
            ..Default::default()
        }
    }

    fn refused(req: &pb::ConfigureNetworkRequest) -> NetworkError {
        let err = NetworkConfig::try_from_request(req).unwrap_err();
        assert!(err.is_invalid_request(), "{err:?}");
        err
    }

    fn route_problem(req: &pb::ConfigureNetworkRequest) -> (usize, RouteProblem) {
        match refused(req) {
            NetworkError::Route { index, problem, .. } => (index, *problem),
            other => panic!("not a route refusal: {other:?}"),
        }
    }

    #[test]
    fn a_good_request_is_checked_and_its_routes_ordered() {
        let config = NetworkConfig::try_from_request(&good()).unwrap();
        assert_eq!(config.interface.name.as_str(), "eth0");
        assert_eq!(config.interface.mac.octets(), MAC);
        assert_eq!(config.interface.mac.to_string(), "02:42:0a:58:00:05");
        assert_eq!(config.interface.mtu, 1400);
        let addresses: Vec<_> = config
            .interface
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addresses, ["10.88.0.5/24", "fd00:88::5/64"]);
        // On-link first, then the gateway routes in request order.
        let routes: Vec<_> = config.routes.iter().map(ToString::to_string).collect();
        assert_eq!(
            routes,
            [
                "10.99.0.0/16 dev eth0 scope link",
                "default via 10.88.0.1 dev eth0",
                "10.200.0.0/16 via 10.99.0.1 dev eth0",
                "default via fd00:88::1 dev eth0",
            ]
        );
        let default6 = &config.routes[3];
        assert_eq!(
            default6.destination,
            IpPrefix::try_new(Ipv6Addr::UNSPECIFIED.into(), 0).unwrap()
        );
        assert_eq!(config.hosts.as_deref(), Some("127.0.0.1 localhost\n"));
        assert_eq!(
            config.resolv_conf.as_deref(),
            Some("nameserver 10.88.0.1\n")
        );
    }

    #[test]
    fn empty_files_and_no_routes_are_fine() {
        let mut req = good();
        req.routes.clear();
        req.hosts.clear();
        req.resolv_conf.clear();
        req.interfaces[0].addresses.clear();
        let config = NetworkConfig::try_from_request(&req).unwrap();
        assert!(config.routes.is_empty());
        assert_eq!((config.hosts, config.resolv_conf), (None, None));
    }

    #[test]
    fn exactly_one_interface() {
        let mut req = good();
        req.interfaces.clear();
        assert!(matches!(refused(&req), NetworkError::InterfaceCount(0)));
        let mut req = good();
        req.interfaces.push(req.interfaces[0].clone());
        let err = refused(&req);
        assert!(matches!(err, NetworkError::InterfaceCount(2)), "{err:?}");
        assert!(err.to_string().contains("exactly one"), "{err}");
    }

    #[test]
    fn interface_names() {
        for ok in ["eth0", "e", "a23456789012345", "net-0_pod.1", "é"] {
            InterfaceName::try_new(ok).unwrap();
        }
        for bad in [
            "",
            "a234567890123456", // 16 bytes
            "éééééééé",         // 16 bytes in 8 chars
            ".",
            "..",
            "eth/0",
            "eth:0",
            "eth%d",
            "eth 0",
            "eth\t0",
            "eth\u{7f}",
            "lo",
        ] {
            let mut req = good();
            req.interfaces[0].name = bad.into();
            let err = refused(&req);
            assert!(
                matches!(&err, NetworkError::InterfaceName { name, .. } if name == bad),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn macs() {
        for (bad, reason) in [
            (vec![], "6 bytes"),
            (vec![2, 0, 0, 0, 0], "6 bytes"),
            (vec![2, 0, 0, 0, 0, 1, 0], "6 bytes"),
            (vec![1, 0, 0x5e, 0, 0, 1], "multicast"),
            (vec![0xff; 6], "multicast"),
            (vec![0; 6], "all zeros"),
        ] {
            let mut req = good();
            req.interfaces[0].mac = bad.clone();
            let err = refused(&req);
            assert!(
                matches!(&err, NetworkError::Mac { reason: r, .. } if r.contains(reason)),
                "{bad:?}: {err:?}"
            );
        }
        let err = MacAddress::try_new(&[1, 2, 3, 4, 5, 6]).unwrap_err();
        assert!(err.to_string().contains("01:02:03:04:05:06"), "{err}");
        // A locally administered unicast MAC (bit 1 set) is fine.
        MacAddress::try_new(&[0xfe, 0, 0, 0, 0, 1]).unwrap();
    }

    #[test]
    fn mtus() {
        for ok in [68, 1280, 1500, 9000, 65535] {
            let mut req = good();
            req.interfaces[0].mtu = ok;
            req.interfaces[0].addresses.truncate(1); // IPv4 only
            req.routes.truncate(3);
            NetworkConfig::try_from_request(&req).unwrap();
        }
        for bad in [0, 67, 65536, u32::MAX] {
            let mut req = good();
            req.interfaces[0].mtu = bad;
            let err = refused(&req);
            assert!(matches!(err, NetworkError::Mtu(m) if m == bad), "{err:?}");
        }
        // IPv6 needs 1280, for addresses and for routes.
        let mut req = good();
        req.interfaces[0].mtu = 1279;
        let err = refused(&req);
        assert!(matches!(err, NetworkError::Ipv6Mtu(1279)), "{err:?}");
        let mut req = good();
        req.interfaces[0].mtu = 1279;
        req.interfaces[0].addresses.truncate(1);
        req.routes = vec![route("", "fe80::1")];
        let err = refused(&req);
        assert!(matches!(err, NetworkError::Ipv6Mtu(1279)), "{err:?}");
    }

    #[test]
    fn addresses() {
        for (text, len) in [("10.0.0.1", 32), ("10.0.0.1", 0), ("fd00::1", 128)] {
            let mut req = good();
            req.interfaces[0].addresses = vec![address(text, len)];
            req.routes.clear();
            NetworkConfig::try_from_request(&req).unwrap();
        }
        for (text, len, reason) in [
            ("", 24, "not an IPv4 or IPv6"),
            ("10.0.0", 24, "not an IPv4 or IPv6"),
            ("10.0.0.1/24", 24, "not an IPv4 or IPv6"),
            ("fd00::1%eth0", 64, "not an IPv4 or IPv6"),
            ("10.0.0.1", 33, "prefix is longer"),
            ("10.0.0.1", 256 + 24, "prefix is longer"),
            ("fd00::1", 129, "prefix is longer"),
            ("0.0.0.0", 8, "not a unicast"),
            ("127.0.0.1", 8, "not a unicast"),
            ("224.0.0.1", 4, "not a unicast"),
            ("255.255.255.255", 32, "not a unicast"),
            ("::", 64, "not a unicast"),
            ("::1", 128, "not a unicast"),
            ("ff02::1", 64, "not a unicast"),
        ] {
            let mut req = good();
            req.interfaces[0].addresses = vec![address(text, len)];
            req.routes.clear();
            let err = refused(&req);
            assert!(
                matches!(&err, NetworkError::Address { address, reason: r, .. }
                    if address == text && r.contains(reason)),
                "{text}/{len}: {err:?}"
            );
        }
        let mut req = good();
        req.interfaces[0].addresses = vec![address("10.0.0.1", 24); MAX_ADDRESSES + 1];
        assert!(matches!(
            refused(&req),
            NetworkError::TooManyAddresses(n) if n == MAX_ADDRESSES + 1
        ));
    }

    #[test]
    fn route_parsing() {
        for (dest, gw, expect) in [
            ("10.0.0.0", "", "Destination"),
            ("10.0.0.0/", "", "Destination"),
            ("10.0.0.0/+8", "", "Destination"),
            ("10.0.0.0/33", "", "Destination"),
            ("fd00::/129", "", "Destination"),
            ("10.0.0.0/8/8", "", "Destination"),
            ("default", "10.88.0.1", "Destination"),
            ("10.1.0.0/8", "", "HostBits"),
            ("fd00::1/64", "", "HostBits"),
            ("", "", "NoDestinationOrGateway"),
            ("", "10.88.0", "Gateway"),
            ("", "224.0.0.1", "GatewayNotUnicast"),
            ("", "10.88.0.5", "GatewayIsLocal"),
            ("10.9.0.0/16", "fd00:88::1", "FamilyMismatch"),
            ("fd01::/64", "10.88.0.1", "FamilyMismatch"),
            ("", "10.1.2.3", "GatewayUnreachable"),
            ("", "fd01::1", "GatewayUnreachable"),
        ] {
            let mut req = good();
            req.routes.push(route(dest, gw));
            let (index, problem) = route_problem(&req);
            let text = format!("{problem:?}");
            assert!(text.starts_with(expect), "{dest:?} via {gw:?}: {text}");
            assert_eq!(index, 4, "{text}");
        }
        // A link-local IPv6 next hop needs no route to it.
        let mut req = good();
        req.routes.push(route("", "fe80::1"));
        NetworkConfig::try_from_request(&req).unwrap();
    }

    #[test]
    fn route_devices_and_sources() {
        let mut req = good();
        req.routes[0].device = "eth0".into();
        req.routes[2].source = "10.88.0.5".into();
        let config = NetworkConfig::try_from_request(&req).unwrap();
        assert_eq!(
            config.routes[0].to_string(),
            "10.99.0.0/16 dev eth0 scope link src 10.88.0.5"
        );
        assert_eq!(
            config.routes[0].source,
            Some(Ipv4Addr::new(10, 88, 0, 5).into())
        );

        for (device, source, expect) in [
            ("eth1", "", "UnknownDevice"),
            ("lo", "", "UnknownDevice"),
            ("", "10.88.0", "Source"),
            ("", "10.88.0.6", "SourceNotLocal"),
            ("", "fd00:88::5", "FamilyMismatch"),
        ] {
            let mut req = good();
            req.routes[1].device = device.into();
            req.routes[1].source = source.into();
            let (index, problem) = route_problem(&req);
            assert_eq!(index, 1);
            let text = format!("{problem:?}");
            assert!(text.starts_with(expect), "{device:?} {source:?}: {text}");
        }
        let mut req = good();
        req.routes = vec![route("10.0.0.0/8", ""); MAX_ROUTES + 1];
        assert!(matches!(
            refused(&req),
            NetworkError::TooManyRoutes(n) if n == MAX_ROUTES + 1
        ));
    }

    #[test]
    fn route_refusals_name_the_route() {
        let mut req = good();
        req.routes[1].gateway = "10.99.0.1x".into();
        let err = refused(&req);
        let text = skiff_agent_proto::error_chain(&err);
        assert!(text.contains("route 1"), "{text}");
        assert!(text.contains("10.200.0.0/16"), "{text}");
        assert!(
            text.contains("\"10.99.0.1x\" is not an IP address"),
            "{text}"
        );
    }

    #[test]
    fn file_sizes() {
        let mut req = good();
        req.hosts = "#".repeat(NET_FILE_MAX_LEN);
        req.resolv_conf = "#".repeat(NET_FILE_MAX_LEN);
        NetworkConfig::try_from_request(&req).unwrap();
        for field in ["hosts", "resolv_conf"] {
            let mut req = good();
            let big = "#".repeat(NET_FILE_MAX_LEN + 1);
            if field == "hosts" {
                req.hosts = big;
            } else {
                req.resolv_conf = big;
            }
            let err = refused(&req);
            assert!(
                matches!(err, NetworkError::FileTooLarge { file, len }
                    if file == field && len == NET_FILE_MAX_LEN + 1),
                "{err:?}"
            );
        }
    }

    #[test]
    fn prefixes() {
        let p = IpPrefix::parse_cidr("10.88.7.5/20").unwrap();
        assert_eq!(p.network(), IpAddr::from([10, 88, 0, 0]));
        assert!(p.contains([10, 88, 15, 255].into()));
        assert!(!p.contains([10, 88, 16, 0].into()));
        assert!(!p.contains("::a58:705".parse().unwrap()));
        let all = IpPrefix::parse_cidr("0.0.0.0/0").unwrap();
        assert!(all.contains([1, 2, 3, 4].into()));
        assert!(!all.contains(Ipv6Addr::LOCALHOST.into()));
        let host = IpPrefix::parse_cidr("fd00::5/128").unwrap();
        assert!(host.contains("fd00::5".parse().unwrap()));
        assert!(!host.contains("fd00::6".parse().unwrap()));
        assert_eq!(
            IpPrefix::parse_cidr("fd00:1:2:3:4::/62").unwrap().network(),
            "fd00:1:2::".parse::<IpAddr>().unwrap()
        );
    }
}
