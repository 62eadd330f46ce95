//! The host side of pod networking: the pod's network namespace (made by
//! CNI) is joined to the guest's NIC by a tap and two tc redirects, as
//! Kata's "tcfilter" model and firecracker-containerd's tc-redirect-tap do.
//!
//! [`PodNetwork::setup`] finds the pod interface in the namespace (CNI's
//! veth, `eth0`), reads what the guest needs to take it over (name, MAC,
//! MTU, addresses, routes: [`PodInterface`], [`PodRoute`]), creates a
//! [`Tap`] in the same namespace with the same MTU, and adds an ingress
//! qdisc to both links, each with a filter that redirects every frame to
//! the other link's egress. Frames from the pod's network come out of the
//! tap's fd; frames written to it leave by the veth. Nothing moves out of
//! the namespace and the veth keeps its addresses (the guest takes the
//! same ones, and the veth's MAC; the namespace's own stack then sees no
//! traffic). [`teardown`] undoes it, also after a shim that was killed.
//!
//! The filter is u32 with one key of mask 0 (`tc ... u32 match u8 0 0`),
//! which matches every frame, as Kata's, rather than matchall: cls_u32 is
//! in more kernels (the one skiff's tests run on has cls_u32 and
//! act_mirred but no cls_matchall).
//!
//! Everything runs on a helper thread inside the namespace
//! ([`run_in_netns`]); the caller's thread never changes namespace.
//!
//! This module knows nothing of the VMM, the sandbox or containerd; the
//! only outside type it names is the agent protocol's, in the
//! [`PodNetwork::to_proto`] conversions.

mod netlink;
mod netns;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use skiff_agent_proto::agent;

pub use crate::vmm::tap::{
    Tap, TapError, MAX_NAME_LEN, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO,
    VNET_HDR_LEN,
};
pub use netlink::NetlinkError;
pub use netns::{run_in_netns, NetnsError};

use netlink::{Link, Rtnl};

/// Why pod networking could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    /// The namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The namespace has no pod interface.
    #[error("the pod's network namespace has no interface (a link that is up, Ethernet, and not loopback or the tap)")]
    NoPodInterface,
    /// The namespace has several interfaces that could be the pod's.
    #[error("the pod's network namespace has several interfaces ({}); one is supported", names.join(", "))]
    SeveralPodInterfaces {
        /// Their names.
        names: Vec<String>,
    },
    /// A link named as the tap already exists in the namespace.
    #[error("the pod's network namespace already has a link named {name}")]
    TapNameTaken {
        /// The tap's name.
        name: String,
    },
    /// The tap disappeared between its creation and its configuration.
    #[error("the tap {name} vanished from the pod's network namespace")]
    TapVanished {
        /// The tap's name.
        name: String,
    },
    /// The tap could not be created.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// The pod interface, as the guest's NIC must look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInterface {
    /// Its name (`eth0`).
    pub name: String,
    /// Its MAC.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Its IPv4 and IPv6 addresses with their prefix lengths, IPv6
    /// link-local ones (fe80::/10) left out.
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A route of the pod's main table out of the pod interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRoute {
    /// The destination and its prefix length; `None` for a default route
    /// (of the gateway's family).
    pub destination: Option<(IpAddr, u8)>,
    /// The next hop; `None` for a route on the link (a connected subnet).
    pub gateway: Option<IpAddr>,
    /// The preferred source address, if the route has one.
    pub source: Option<IpAddr>,
}

/// The pod's network as set up by [`PodNetwork::setup`]: what the guest
/// must configure, and what [`PodNetwork::teardown`] removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetwork {
    netns: PathBuf,
    tap_name: String,
    interface: PodInterface,
    routes: Vec<PodRoute>,
}

impl PodNetwork {
    /// Joins the pod interface of the network namespace at `netns` to a new
    /// tap named `tap_name` (at most [`MAX_NAME_LEN`] bytes) in the same
    /// namespace, and returns what the guest needs with the tap.
    ///
    /// The pod interface is the one link that is up, Ethernet, and neither
    /// loopback nor a link named `tap_name` (the kernel's fallback tunnel
    /// devices, `tunl0`, `sit0`, `gretap0`..., are down or not Ethernet).
    /// The tap gets its MTU and is brought up; each link gets an ingress
    /// qdisc whose filter redirects every frame to the other.
    ///
    /// On an error, what was done is undone: no tap, no qdisc added.
    pub fn setup(netns: &Path, tap_name: &str) -> Result<(PodNetwork, Tap), PodNetError> {
        crate::vmm::tap::check_name(tap_name)?;
        let (interface, routes, tap) = run_in_netns(netns, || setup_here(tap_name))??;
        log::info!(
            "pod network {}: {} (MTU {}, {} addresses, {} routes) redirected to {tap_name}",
            netns.display(),
            interface.name,
            interface.mtu,
            interface.addresses.len(),
            routes.len(),
        );
        let network = PodNetwork {
            netns: netns.to_owned(),
            tap_name: tap_name.to_owned(),
            interface,
            routes,
        };
        Ok((network, tap))
    }

    /// The path of the pod's network namespace.
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    /// The pod interface.
    pub fn interface(&self) -> &PodInterface {
        &self.interface
    }

    /// The routes of the namespace's main table that go out of the pod
    /// interface, in the kernel's order: unicast routes with the interface
    /// as their only output (multipath routes are left out), including the
    /// connected subnets the kernel adds with each address and routes
    /// whose gateway is link-local, but not the IPv6 link-local subnet
    /// (fe80::/64). The local table's routes (the addresses themselves,
    /// broadcast, multicast) are not read: the guest's kernel makes its
    /// own.
    pub fn routes(&self) -> &[PodRoute] {
        &self.routes
    }

    /// Removes the tap and the pod interface's ingress qdisc (with its
    /// filter); see [`teardown`].
    pub fn teardown(&self) -> Result<(), PodNetError> {
        teardown(&self.netns, &self.tap_name)
    }

    /// The agent's `ConfigureNetwork` request for this network, with
    /// `hosts` and `resolv_conf` empty (left as they are): the interface
    /// under its name, then its routes.
    pub fn to_proto(&self) -> agent::ConfigureNetworkRequest {
        agent::ConfigureNetworkRequest {
            interfaces: vec![self.interface.to_proto()],
            routes: self
                .routes
                .iter()
                .map(|route| route.to_proto(&self.interface.name))
                .collect(),
            ..Default::default()
        }
    }
}

impl PodInterface {
    /// The agent protocol's `NetInterface`.
    pub fn to_proto(&self) -> agent::NetInterface {
        agent::NetInterface {
            name: self.name.clone(),
            mac: self.mac.to_vec(),
            mtu: self.mtu,
            addresses: self
                .addresses
                .iter()
                .map(|(address, prefix_len)| agent::IpAddress {
                    address: address.to_string(),
                    prefix_len: u32::from(*prefix_len),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

impl PodRoute {
    /// The agent protocol's `Route` out of `device`.
    pub fn to_proto(&self, device: &str) -> agent::Route {
        let text = |ip: Option<IpAddr>| ip.map(|ip| ip.to_string()).unwrap_or_default();
        agent::Route {
            destination: self
                .destination
                .map(|(ip, prefix)| format!("{ip}/{prefix}"))
                .unwrap_or_default(),
            gateway: text(self.gateway),
            device: device.to_owned(),
            source: text(self.source),
            ..Default::default()
        }
    }
}

/// What [`setup_here`] did so far, to undo on an error.
#[derive(Default)]
struct Done {
    tap: Option<u32>,
    pod_qdisc: Option<u32>,
}

impl Done {
    fn undo(&self, rtnl: &mut Rtnl) {
        if let Some(index) = self.pod_qdisc {
            if let Err(e) = rtnl.delete_ingress_qdisc(index) {
                log::warn!("undoing pod network setup: {e}");
            }
        }
        if let Some(index) = self.tap {
            if let Err(e) = rtnl.delete_link(index) {
                log::warn!("undoing pod network setup: {e}");
            }
        }
    }
}

/// [`PodNetwork::setup`] inside the namespace.
fn setup_here(tap_name: &str) -> Result<(PodInterface, Vec<PodRoute>, Tap), PodNetError> {
    let mut rtnl = Rtnl::new()?;
    let links = rtnl.links()?;
    if links.iter().any(|link| link.name == tap_name) {
        return Err(PodNetError::TapNameTaken {
            name: tap_name.into(),
        });
    }
    let pod = pod_interface(&links, tap_name)?;
    let addresses = rtnl.addresses(pod.index)?;
    let routes = rtnl.routes(pod.index)?;
    let interface = PodInterface {
        name: pod.name.clone(),
        mac: pod.mac.unwrap_or_default(),
        mtu: pod.mtu,
        addresses,
    };

    let tap = Tap::create(tap_name)?;
    let mut done = Done::default();
    let joined = join(&mut rtnl, &mut done, pod, tap_name);
    if let Err(e) = joined {
        done.undo(&mut rtnl);
        return Err(e);
    }
    Ok((interface, routes, tap))
}

/// The one link that can be the pod interface.
fn pod_interface<'a>(links: &'a [Link], tap_name: &str) -> Result<&'a Link, PodNetError> {
    let candidates: Vec<&Link> = links
        .iter()
        .filter(|link| {
            !link.loopback
                && link.up
                && link.ethernet
                && link.mac.is_some()
                && link.name != tap_name
        })
        .collect();
    match candidates.as_slice() {
        [] => Err(PodNetError::NoPodInterface),
        [one] => Ok(one),
        several => Err(PodNetError::SeveralPodInterfaces {
            names: several.iter().map(|link| link.name.clone()).collect(),
        }),
    }
}

/// Configures the new tap and the redirects between it and `pod`,
/// recording each step in `done`.
fn join(rtnl: &mut Rtnl, done: &mut Done, pod: &Link, tap_name: &str) -> Result<(), PodNetError> {
    let tap = rtnl
        .link(tap_name)?
        .ok_or_else(|| PodNetError::TapVanished {
            name: tap_name.into(),
        })?;
    done.tap = Some(tap.index);
    rtnl.set_mtu_and_up(tap.index, pod.mtu)?;
    rtnl.add_ingress_qdisc(pod.index)?;
    done.pod_qdisc = Some(pod.index);
    rtnl.add_ingress_qdisc(tap.index)?;
    rtnl.add_redirect(pod.index, tap.index)?;
    rtnl.add_redirect(tap.index, pod.index)?;
    Ok(())
}

/// Removes what [`PodNetwork::setup`] added to the network namespace at
/// `netns` for the tap `tap_name`: the tap, if it is still there, and the
/// ingress qdisc (with its filters) of every link whose ingress filters
/// redirect to the tap or to a link that is gone (the tap of a killed
/// shim disappears with its last fd). For `containerd delete` after a
/// killed shim as much as for a clean stop: idempotent, and a namespace
/// that is gone (no file, or no longer a namespace) is nothing to do.
pub fn teardown(netns: &Path, tap_name: &str) -> Result<(), PodNetError> {
    match run_in_netns(netns, || teardown_here(tap_name)) {
        Ok(result) => Ok(result?),
        Err(NetnsError::NotFound { .. } | NetnsError::NotANetns { .. }) => {
            log::debug!(
                "pod network teardown: {} is gone, nothing to do",
                netns.display()
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// [`teardown`] inside the namespace.
fn teardown_here(tap_name: &str) -> Result<(), PodNetError> {
    let mut rtnl = Rtnl::new()?;
    let links = rtnl.links()?;
    let tap = links.iter().find(|link| link.name == tap_name);
    let is_ours = |target: u32| {
        tap.is_some_and(|tap| tap.index == target) || !links.iter().any(|link| link.index == target)
    };
    for index in rtnl.ingress_qdiscs()? {
        if tap.is_some_and(|tap| tap.index == index) {
            continue; // Goes with the tap.
        }
        if !rtnl.redirect_targets(index)?.into_iter().any(is_ours) {
            continue;
        }
        match rtnl.delete_ingress_qdisc(index) {
            Ok(()) => {
                log::debug!("pod network teardown: removed the ingress qdisc of link {index}")
            }
            Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(tap) = tap {
        match rtnl.delete_link(tap.index) {
            Ok(()) => log::debug!("pod network teardown: removed {tap_name}"),
            Err(e) if e.errno() == Some(libc::ENODEV) => {}
            Err(e) => return Err(e.into()),
        }
    } else {
        log::debug!("pod network teardown: no {tap_name}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::podnet::testing::{skip_reason, TestNetns, TestPod};

    const TAP: &str = "tap0_skiff";

    /// What a namespace holds: its links, and for each link with an
    /// ingress qdisc, where its ingress filters redirect to.
    struct State {
        links: Vec<Link>,
        redirects: Vec<(u32, Vec<u32>)>,
    }

    impl State {
        fn of(netns: &Path) -> State {
            run_in_netns(netns, || {
                let mut rtnl = Rtnl::new().unwrap();
                let links = rtnl.links().unwrap();
                let redirects = rtnl
                    .ingress_qdiscs()
                    .unwrap()
                    .into_iter()
                    .map(|index| (index, rtnl.redirect_targets(index).unwrap()))
                    .collect();
                State { links, redirects }
            })
            .unwrap()
        }

        fn link(&self, name: &str) -> Option<&Link> {
            self.links.iter().find(|link| link.name == name)
        }

        fn redirects_of(&self, name: &str) -> Option<&[u32]> {
            let index = self.link(name)?.index;
            self.redirects
                .iter()
                .find(|(link, _)| *link == index)
                .map(|(_, targets)| targets.as_slice())
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn setup_reads_the_pod_interface_and_redirects_it_to_the_tap() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        let test = TestPod::new().unwrap();
        let (network, tap) = PodNetwork::setup(test.pod.path(), TAP).unwrap();
        assert_eq!(network.netns(), test.pod.path());
        assert_eq!(network.tap_name(), TAP);
        assert_eq!(tap.name(), TAP);

        let interface = network.interface();
        assert_eq!(interface.name, TestPod::IFNAME);
        assert_eq!(interface.mac, TestPod::MAC);
        assert_eq!(interface.mtu, TestPod::MTU);
        let mut addresses = interface.addresses.clone();
        addresses.sort();
        assert_eq!(
            addresses,
            [(ip("10.200.0.2"), 24), (ip("fd00:200::2"), 64)],
            "no fe80:: address"
        );

        let routes = network.routes();
        let expected = [
            PodRoute {
                destination: Some((ip("10.200.0.0"), 24)),
                gateway: None,
                source: Some(ip("10.200.0.2")),
            },
            PodRoute {
                destination: None,
                gateway: Some(ip("10.200.0.1")),
                source: None,
            },
            PodRoute {
                destination: Some((ip("fd00:200::"), 64)),
                gateway: None,
                source: None,
            },
            PodRoute {
                destination: None,
                gateway: Some(ip("fd00:200::1")),
                source: None,
            },
        ];
        for route in &expected {
            assert!(routes.contains(route), "{route:?} not in {routes:?}");
        }
        assert_eq!(routes.len(), expected.len(), "{routes:?}");

        let state = State::of(test.pod.path());
        let eth0 = state.link("eth0").unwrap();
        let tap_link = state.link(TAP).unwrap();
        assert_eq!(tap_link.mtu, TestPod::MTU);
        assert!(tap_link.up);
        assert_eq!(state.redirects_of("eth0"), Some(&[tap_link.index][..]));
        assert_eq!(state.redirects_of(TAP), Some(&[eth0.index][..]));
        // The veth keeps its addresses.
        let shown = test
            .pod
            .ip(&["-br", "addr", "show", "dev", "eth0"])
            .unwrap();
        assert!(shown.contains("10.200.0.2/24"), "{shown}");

        let proto = network.to_proto();
        assert_eq!(proto.interfaces.len(), 1);
        assert_eq!(proto.interfaces[0].name, "eth0");
        assert_eq!(proto.interfaces[0].mac, TestPod::MAC);
        assert_eq!(proto.interfaces[0].mtu, TestPod::MTU);
        assert_eq!(proto.routes.len(), 4);
        let default = proto
            .routes
            .iter()
            .find(|route| route.gateway == "10.200.0.1")
            .unwrap();
        assert_eq!(default.destination, "");
        assert_eq!(default.device, "eth0");
        assert!(proto
            .routes
            .iter()
            .any(|route| route.destination == "10.200.0.0/24" && route.source == "10.200.0.2"));

        network.teardown().unwrap();
        let state = State::of(test.pod.path());
        assert!(state.link(TAP).is_none());
        assert!(state.redirects.is_empty());
        assert!(state.link("eth0").is_some());
        network.teardown().unwrap();
        drop(tap);
        network.teardown().unwrap();
    }

    #[test]
    fn teardown_after_a_killed_shim_removes_the_dangling_redirect() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        let test = TestPod::new().unwrap();
        let (network, tap) = PodNetwork::setup(test.pod.path(), TAP).unwrap();
        // The shim and its VMM die: the last tap fd closes, the tap goes
        // (soon: a thread of another test forking a child holds a copy of
        // the fd until the child execs).
        drop(tap);
        drop(network);
        let deadline = Instant::now() + Duration::from_secs(5);
        let state = loop {
            let state = State::of(test.pod.path());
            if state.link(TAP).is_none() || Instant::now() > deadline {
                break state;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(state.link(TAP).is_none());
        let dangling = state.redirects_of("eth0").unwrap();
        assert!(dangling
            .iter()
            .all(|&target| state.links.iter().all(|link| link.index != target)));

        teardown(test.pod.path(), TAP).unwrap();
        assert!(State::of(test.pod.path()).redirects.is_empty());
        teardown(test.pod.path(), TAP).unwrap();
    }

    #[test]
    fn teardown_leaves_other_ingress_qdiscs_alone() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        let test = TestPod::new().unwrap();
        test.pod
            .tc(&["qdisc", "add", "dev", "eth0", "ingress"])
            .unwrap();
        teardown(test.pod.path(), TAP).unwrap();
        assert_eq!(
            State::of(test.pod.path()).redirects_of("eth0"),
            Some(&[][..])
        );
    }

    #[test]
    fn a_missing_netns_is_a_typed_error_and_nothing_to_tear_down() {
        let path = Path::new("/var/run/netns/skiff-no-such-netns");
        let err = PodNetwork::setup(path, TAP).unwrap_err();
        assert!(
            matches!(&err, PodNetError::Netns(NetnsError::NotFound { path: p }) if p == path),
            "{err:?}"
        );
        teardown(path, TAP).unwrap();
    }

    #[test]
    fn a_bad_tap_name_is_refused_before_anything() {
        let err = PodNetwork::setup(Path::new("/nonexistent"), "tap-name-too-long").unwrap_err();
        assert!(
            matches!(err, PodNetError::Tap(TapError::InvalidName { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn a_netns_with_only_loopback_has_no_pod_interface() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        let ns = TestNetns::new().unwrap();
        ns.ip(&["link", "set", "lo", "up"]).unwrap();
        let err = PodNetwork::setup(ns.path(), TAP).unwrap_err();
        assert!(matches!(err, PodNetError::NoPodInterface), "{err:?}");
        assert!(State::of(ns.path()).link(TAP).is_none());
    }

    #[test]
    fn two_interfaces_are_refused_and_nothing_is_left_behind() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        let test = TestPod::new().unwrap();
        test.pod
            .ip(&[
                "link",
                "add",
                "eth1",
                "type",
                "veth",
                "peer",
                "name",
                "peer1",
                "netns",
                test.peer.name(),
            ])
            .unwrap();
        test.pod.ip(&["link", "set", "eth1", "up"]).unwrap();
        let err = PodNetwork::setup(test.pod.path(), TAP).unwrap_err();
        match &err {
            PodNetError::SeveralPodInterfaces { names } => {
                let mut names = names.clone();
                names.sort();
                assert_eq!(names, ["eth0", "eth1"]);
            }
            _ => panic!("{err:?}"),
        }
        assert!(err.to_string().contains("eth0"), "{err}");
        let state = State::of(test.pod.path());
        assert!(state.link(TAP).is_none());
        assert!(state.redirects.is_empty());
    }

    #[test]
    fn a_failure_halfway_is_undone() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        // Someone else's ingress qdisc on eth0: the tap is made, then
        // adding our qdisc fails.
        let test = TestPod::new().unwrap();
        test.pod
            .tc(&["qdisc", "add", "dev", "eth0", "ingress"])
            .unwrap();
        let err = PodNetwork::setup(test.pod.path(), TAP).unwrap_err();
        match &err {
            PodNetError::Netlink(e) => assert_eq!(e.errno(), Some(libc::EEXIST), "{e}"),
            _ => panic!("{err:?}"),
        }
        let state = State::of(test.pod.path());
        assert!(state.link(TAP).is_none());
        // Theirs is still there; the tap's went with it.
        assert_eq!(state.redirects_of("eth0"), Some(&[][..]));
        assert_eq!(state.redirects.len(), 1);
    }

    #[test]
    fn a_taken_tap_name_is_refused() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        let test = TestPod::new().unwrap();
        test.pod
            .ip(&["tuntap", "add", "mode", "tap", "name", TAP])
            .unwrap();
        let err = PodNetwork::setup(test.pod.path(), TAP).unwrap_err();
        assert!(matches!(err, PodNetError::TapNameTaken { .. }), "{err:?}");
        assert!(State::of(test.pod.path()).redirects.is_empty());
    }

    const ETH_HDR: usize = 14;

    /// Reads frames from `tap` until one (without its vnet header) passes
    /// `wanted`, for at most 5 s.
    fn frame_where(tap: &Tap, wanted: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            match tap.read(&mut buf).unwrap() {
                Some(n) if n > VNET_HDR_LEN => {
                    let frame = &buf[VNET_HDR_LEN..n];
                    if wanted(frame) {
                        return Some(frame.to_vec());
                    }
                }
                Some(_) => {}
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        None
    }

    /// An ARP frame (Ethernet, IPv4) with operation `op`, sender and
    /// target protocol addresses `spa`, `tpa`.
    fn is_arp(frame: &[u8], op: u16, spa: [u8; 4], tpa: [u8; 4]) -> bool {
        frame.len() >= ETH_HDR + 28
            && frame[12..14] == [0x08, 0x06]
            && frame[ETH_HDR + 6..ETH_HDR + 8] == op.to_be_bytes()
            && frame[ETH_HDR + 14..ETH_HDR + 18] == spa
            && frame[ETH_HDR + 24..ETH_HDR + 28] == tpa
    }

    #[test]
    fn frames_cross_between_the_tap_and_the_pod_network() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        let test = TestPod::new().unwrap();
        let (network, tap) = PodNetwork::setup(test.pod.path(), TAP).unwrap();

        // The "host" sends to the pod's address: its ARP request comes out
        // of the tap, not into the pod namespace's stack.
        run_in_netns(test.peer.path(), || {
            let socket = UdpSocket::bind("10.200.0.1:0").unwrap();
            socket.send_to(b"to the guest", "10.200.0.2:9").unwrap();
        })
        .unwrap();
        let request = frame_where(&tap, |f| is_arp(f, 1, TestPod::PEER_IPV4, TestPod::IPV4))
            .expect("the peer's ARP request comes out of the tap");
        assert_eq!(request[0..6], [0xff; 6]);
        let peer_mac: [u8; 6] = request[6..12].try_into().unwrap();

        // The guest asks who has the gateway: the request leaves by the
        // veth, the peer answers, the answer comes out of the tap.
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&TestPod::MAC);
        frame.extend_from_slice(&[0x08, 0x06]);
        frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        frame.extend_from_slice(&TestPod::MAC);
        frame.extend_from_slice(&TestPod::IPV4);
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&TestPod::PEER_IPV4);
        frame.resize(VNET_HDR_LEN + 60, 0);
        assert_eq!(tap.write(&frame).unwrap(), Some(frame.len()));
        // Learning the guest's MAC from the request, the peer sends its
        // queued datagram, then its reply.
        let is_reply = |f: &[u8]| is_arp(f, 2, TestPod::PEER_IPV4, TestPod::IPV4);
        let is_datagram =
            |f: &[u8]| f.len() > ETH_HDR + 20 && f[12..14] == [0x08, 0x00] && f[ETH_HDR + 9] == 17;
        let mut reply = None;
        let mut datagram = None;
        while reply.is_none() || datagram.is_none() {
            let Some(f) = frame_where(&tap, |f| is_reply(f) || is_datagram(f)) else {
                break;
            };
            if is_reply(&f) {
                reply = Some(f);
            } else {
                datagram = Some(f);
            }
        }
        let reply = reply.expect("the peer's ARP reply comes out of the tap");
        assert_eq!(reply[0..6], TestPod::MAC);
        assert_eq!(reply[6..12], peer_mac);
        let datagram = datagram.expect("the peer's datagram comes out of the tap");
        assert_eq!(datagram[0..6], TestPod::MAC);
        assert_eq!(datagram[ETH_HDR + 16..ETH_HDR + 20], TestPod::IPV4);
        assert!(datagram.ends_with(b"to the guest"));

        network.teardown().unwrap();
    }
}
