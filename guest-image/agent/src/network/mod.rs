//! `ConfigureNetwork`: the guest side of the pod network. The VM has one
//! virtio-net NIC, the other end of which the host plugs into the pod's
//! network (its CNI interface); the guest's link takes that interface's
//! name, MAC, MTU and addresses, the pod's routes, and `/etc/hosts` and
//! `/etc/resolv.conf`.
//!
//! [`NetworkConfig::try_from_request`] checks the whole request first
//! (parse, [`config`]), so a bad one changes nothing; then
//! [`NetworkConfig::apply`] makes the changes (execute) through rtnetlink
//! ([`netlink`]): `lo` up; the NIC, the only Ethernet link besides `lo`,
//! renamed, given its MAC (both while down, and only if they differ: a
//! second identical request does not flap the link) and its MTU, and
//! brought up; its addresses (IPv6 ones without duplicate address
//! detection, usable at once); the routes, those on the link before those
//! through a gateway; then the files, each replaced atomically. It works in
//! the network namespace of the calling thread and writes the files under
//! a root directory, so tests run it in a throwaway namespace. Applying
//! the same request again succeeds (an address or route that exists is
//! left as is).
//!
//! Changing the network of the system the agent runs on is for the guest
//! init only: the agent also runs on the host as the `linux` sandbox
//! handler, where renaming "the" Ethernet link would be a disaster.
//! [`configure_network`] refuses ([`NetworkError::NotGuestInit`]) unless
//! told it runs as the guest init, before it looks at the request.

pub mod config;
pub mod netlink;

use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use skiff_agent_proto::agent as pb;

pub use self::config::{
    Interface, InterfaceName, IpPrefix, MacAddress, NetworkConfig, Route, MAX_ADDRESSES, MAX_ROUTES,
};
use self::netlink::{Link, Rtnl, RtnlError};
use crate::container::ErrorKind;

/// Where the guest's hosts file lives, relative to the root.
pub const HOSTS_PATH: &str = "etc/hosts";
/// Where the guest's resolver configuration lives, relative to the root.
pub const RESOLV_CONF_PATH: &str = "etc/resolv.conf";

/// Errors of `ConfigureNetwork`.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The agent is not the micro-VM's init (e.g. the host's `linux`
    /// sandbox handler), so it must not touch the network it runs in.
    #[error(
        "ConfigureNetwork is for the guest init only: this agent is not the micro-VM's PID 1 \
         and will not change its host's links, addresses, routes or /etc files"
    )]
    NotGuestInit,
    /// The request does not have exactly one interface.
    #[error("the request must have exactly one interface, got {0}")]
    InterfaceCount(usize),
    /// The interface name is not one the kernel takes.
    #[error("interface name {name:?} is refused: {reason}")]
    InterfaceName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The MAC is not a unicast 6-byte address.
    #[error("MAC {mac} is refused: {reason}")]
    Mac {
        /// The bytes, in hex.
        mac: String,
        /// Why.
        reason: &'static str,
    },
    /// The MTU is out of range.
    #[error(
        "MTU {0} is out of range {min}..={max}",
        min = skiff_agent_proto::NET_MTU.start(),
        max = skiff_agent_proto::NET_MTU.end()
    )]
    Mtu(u32),
    /// The interface has IPv6 addresses or routes and an MTU below IPv6's
    /// minimum (the kernel turns IPv6 off on such a link).
    #[error(
        "MTU {0} is too small for IPv6 addresses and routes (at least {min})",
        min = skiff_agent_proto::NET_IPV6_MIN_MTU
    )]
    Ipv6Mtu(u32),
    /// An interface address is malformed or not unicast.
    #[error("address {address}/{prefix_len} is refused: {reason}")]
    Address {
        /// The address text.
        address: String,
        /// The prefix length.
        prefix_len: u32,
        /// Why.
        reason: &'static str,
    },
    /// Too many addresses.
    #[error("the interface has {0} addresses, more than {MAX_ADDRESSES}")]
    TooManyAddresses(usize),
    /// Too many routes.
    #[error("the request has {0} routes, more than {MAX_ROUTES}")]
    TooManyRoutes(usize),
    /// A route is malformed or cannot be added as asked.
    #[error(
        "route {index} (destination {destination:?}, gateway {gateway:?}, device {device:?}) \
         is refused"
    )]
    Route {
        /// Its position in the request.
        index: usize,
        /// Its destination as the request has it.
        destination: String,
        /// Its gateway as the request has it.
        gateway: String,
        /// Its device as the request has it.
        device: String,
        /// What is wrong with it.
        #[source]
        problem: Box<RouteProblem>,
    },
    /// `hosts` or `resolv_conf` is too large.
    #[error(
        "{file} is {len} bytes, more than {max}",
        max = skiff_agent_proto::NET_FILE_MAX_LEN
    )]
    FileTooLarge {
        /// The field.
        file: &'static str,
        /// Its size.
        len: usize,
    },
    /// The rtnetlink socket could not be opened.
    #[error("cannot open an rtnetlink socket")]
    OpenNetlink(#[source] std::io::Error),
    /// The links could not be listed.
    #[error("cannot list the links")]
    ListLinks(#[source] RtnlError),
    /// There is no loopback link.
    #[error("the guest has no loopback link")]
    NoLoopback,
    /// There is no Ethernet link besides `lo`: the VM has no NIC.
    #[error("the guest has no Ethernet link to configure (was the VM started without a NIC?); links: {0:?}")]
    NoNic(Vec<String>),
    /// There are several Ethernet links and nothing says which is the pod's.
    #[error("the guest has several Ethernet links, {0:?}, and cannot tell which is the pod's")]
    SeveralNics(Vec<String>),
    /// A link change failed.
    #[error("link {link}: cannot {change}")]
    SetLink {
        /// The link's name before the change.
        link: String,
        /// What was asked.
        change: LinkChange,
        /// The kernel's answer.
        #[source]
        source: RtnlError,
    },
    /// An address could not be added.
    #[error("cannot add address {address} to {link}")]
    AddAddress {
        /// The address.
        address: IpPrefix,
        /// The link.
        link: String,
        /// The kernel's answer.
        #[source]
        source: RtnlError,
    },
    /// A route could not be added.
    #[error("cannot add route {route}")]
    AddRoute {
        /// The route.
        route: Box<Route>,
        /// The kernel's answer.
        #[source]
        source: RtnlError,
    },
    /// A file could not be written or put in place.
    #[error("cannot write {path:?}")]
    WriteFile {
        /// The file being written (the temporary one or the target).
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What is wrong with one route of a request.
#[derive(Debug, thiserror::Error)]
pub enum RouteProblem {
    /// The destination is not CIDR text.
    #[error("destination {0:?} is not an address with a prefix length (CIDR)")]
    Destination(String),
    /// The destination has bits set past its prefix.
    #[error("destination {destination} has bits set past its prefix (the network is {network})")]
    HostBits {
        /// As given.
        destination: IpPrefix,
        /// With the host bits cleared.
        network: IpAddr,
    },
    /// Neither a destination nor a gateway: no family to take a default
    /// route of.
    #[error("a route needs a destination or a gateway (an empty destination is the default route of the gateway's family)")]
    NoDestinationOrGateway,
    /// The gateway does not parse.
    #[error("gateway {0:?} is not an IP address")]
    Gateway(String),
    /// The gateway is not a unicast address.
    #[error("gateway {0} is not a unicast address")]
    GatewayNotUnicast(IpAddr),
    /// The gateway is one of the interface's own addresses.
    #[error("gateway {0} is an address of the interface itself")]
    GatewayIsLocal(IpAddr),
    /// No address prefix or on-link route of the device reaches the
    /// gateway.
    #[error(
        "gateway {gateway} is not on {device}'s link: no address's prefix or on-link route \
         covers it"
    )]
    GatewayUnreachable {
        /// The gateway.
        gateway: IpAddr,
        /// The route's device.
        device: InterfaceName,
    },
    /// The source does not parse.
    #[error("source {0:?} is not an IP address")]
    Source(String),
    /// The source is not one of the interface's addresses.
    #[error("source {0} is not one of the interface's addresses")]
    SourceNotLocal(IpAddr),
    /// The gateway or source is of the other family.
    #[error("the {what} {addr} is not {family} like the destination")]
    FamilyMismatch {
        /// "gateway" or "source".
        what: &'static str,
        /// The address.
        addr: IpAddr,
        /// The destination's family.
        family: &'static str,
    },
    /// The device is not an interface of the request.
    #[error("device {0:?} is not an interface of the request")]
    UnknownDevice(String),
}

/// A change to a link, as [`NetworkError::SetLink`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    /// Bring it up.
    Up,
    /// Take it down.
    Down,
    /// Rename it.
    Name(InterfaceName),
    /// Set its MAC.
    Mac(MacAddress),
    /// Set its MTU.
    Mtu(u32),
}

impl std::fmt::Display for LinkChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Up => write!(f, "bring it up"),
            Self::Down => write!(f, "take it down"),
            Self::Name(name) => write!(f, "rename it to {name}"),
            Self::Mac(mac) => write!(f, "set its MAC to {mac}"),
            Self::Mtu(mtu) => write!(f, "set its MTU to {mtu}"),
        }
    }
}

impl NetworkError {
    /// True for the errors of a malformed request (as opposed to a refusal
    /// or a failure to apply a good one).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Self::InterfaceCount(_)
                | Self::InterfaceName { .. }
                | Self::Mac { .. }
                | Self::Mtu(_)
                | Self::Ipv6Mtu(_)
                | Self::Address { .. }
                | Self::TooManyAddresses(_)
                | Self::TooManyRoutes(_)
                | Self::Route { .. }
                | Self::FileTooLarge { .. }
        )
    }

    /// The ttrpc-facing class: a malformed request, a refusal (not the
    /// guest init; a guest without exactly one NIC), or a failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            _ if self.is_invalid_request() => ErrorKind::InvalidArgument,
            Self::NotGuestInit | Self::NoNic(_) | Self::SeveralNics(_) => {
                ErrorKind::FailedPrecondition
            }
            _ => ErrorKind::Internal,
        }
    }
}

/// Serves one `ConfigureNetwork`: refuses unless `guest_init` (the agent
/// is the micro-VM's PID 1) before looking at the request, then checks it
/// and applies it to the guest's network and its files under `/`.
pub fn configure_network(
    guest_init: bool,
    req: &pb::ConfigureNetworkRequest,
) -> Result<(), NetworkError> {
    if !guest_init {
        return Err(NetworkError::NotGuestInit);
    }
    NetworkConfig::try_from_request(req)?.apply(Path::new("/"))
}

impl NetworkConfig {
    /// Configures the network namespace of the calling thread as checked,
    /// and writes the files under `root` (`/` in the guest), stopping at
    /// the first failure. Concurrent calls take turns.
    pub fn apply(&self, root: &Path) -> Result<(), NetworkError> {
        static APPLYING: Mutex<()> = Mutex::new(());
        let _turn = APPLYING.lock().unwrap_or_else(PoisonError::into_inner);

        let mut rtnl = Rtnl::open().map_err(NetworkError::OpenNetlink)?;
        let links = rtnl.links().map_err(NetworkError::ListLinks)?;
        let lo = links
            .iter()
            .find(|l| l.loopback)
            .ok_or(NetworkError::NoLoopback)?;
        if !lo.up {
            change_link(&mut rtnl, lo, LinkChange::Up)?;
        }
        let nic = the_nic(&links)?;
        let iface = &self.interface;
        let renamed = nic.name != iface.name.as_str();
        let new_mac = nic.mac != iface.mac.octets();
        if renamed || new_mac {
            change_link(&mut rtnl, nic, LinkChange::Down)?;
            if new_mac {
                change_link(&mut rtnl, nic, LinkChange::Mac(iface.mac))?;
            }
            if renamed {
                change_link(&mut rtnl, nic, LinkChange::Name(iface.name.clone()))?;
            }
        }
        let nic = Link {
            name: iface.name.to_string(),
            ..nic.clone()
        };
        if nic.mtu != iface.mtu {
            change_link(&mut rtnl, &nic, LinkChange::Mtu(iface.mtu))?;
        }
        change_link(&mut rtnl, &nic, LinkChange::Up)?;

        for &address in &iface.addresses {
            match rtnl.add_address(nic.index, address) {
                Err(err) if !err.is_exists() => {
                    return Err(NetworkError::AddAddress {
                        address,
                        link: nic.name.clone(),
                        source: err,
                    })
                }
                _ => {}
            }
        }
        for route in &self.routes {
            match rtnl.add_route(nic.index, route) {
                Err(err) if !err.is_exists() => {
                    return Err(NetworkError::AddRoute {
                        route: Box::new(route.clone()),
                        source: err,
                    })
                }
                _ => {}
            }
        }
        self.write_files(root)?;
        log::info!(
            "network configured: {} ({}, MTU {}) with {} address(es) and {} route(s){}{}",
            iface.name,
            iface.mac,
            iface.mtu,
            iface.addresses.len(),
            self.routes.len(),
            if self.hosts.is_some() {
                ", /etc/hosts"
            } else {
                ""
            },
            if self.resolv_conf.is_some() {
                ", /etc/resolv.conf"
            } else {
                ""
            },
        );
        Ok(())
    }

    /// Replaces `<root>/etc/hosts` and `<root>/etc/resolv.conf` (mode 0644)
    /// with the request's contents, each only if the request has some;
    /// creates `<root>/etc` if missing.
    pub fn write_files(&self, root: &Path) -> Result<(), NetworkError> {
        for (relative, contents) in [
            (HOSTS_PATH, &self.hosts),
            (RESOLV_CONF_PATH, &self.resolv_conf),
        ] {
            if let Some(contents) = contents {
                replace_file(&root.join(relative), contents.as_bytes())?;
            }
        }
        Ok(())
    }
}

/// The guest's NIC: the one Ethernet link that is not loopback (a tunnel's
/// fallback device such as `sit0` is not Ethernet and does not count).
fn the_nic(links: &[Link]) -> Result<&Link, NetworkError> {
    let nics: Vec<&Link> = links.iter().filter(|l| l.ethernet && !l.loopback).collect();
    match nics[..] {
        [nic] => Ok(nic),
        [] => Err(NetworkError::NoNic(
            links.iter().map(|l| l.name.clone()).collect(),
        )),
        _ => Err(NetworkError::SeveralNics(
            nics.iter().map(|l| l.name.clone()).collect(),
        )),
    }
}

fn change_link(rtnl: &mut Rtnl, link: &Link, change: LinkChange) -> Result<(), NetworkError> {
    let done = match &change {
        LinkChange::Up => rtnl.set_up(link.index, true),
        LinkChange::Down => rtnl.set_up(link.index, false),
        LinkChange::Name(name) => rtnl.set_name(link.index, name.as_str()),
        LinkChange::Mac(mac) => rtnl.set_mac(link.index, *mac),
        LinkChange::Mtu(mtu) => rtnl.set_mtu(link.index, *mtu),
    };
    done.map_err(|source| NetworkError::SetLink {
        link: link.name.clone(),
        change,
        source,
    })
}

/// Replaces the file at `path` with `contents`, mode 0644: written to a
/// temporary file in the same directory (created if missing), synced, then
/// renamed over `path`, so a reader sees the old file or the new one, never
/// a partial one.
fn replace_file(path: &Path, contents: &[u8]) -> Result<(), NetworkError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| NetworkError::WriteFile {
            path: dir.to_owned(),
            source,
        })?;
    crate::files::replace_file(path, contents, 0o644)
        .map_err(|(path, source)| NetworkError::WriteFile { path, source })
}

#[cfg(test)]
mod tests;
