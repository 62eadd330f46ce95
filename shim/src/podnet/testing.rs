//! Throwaway network namespaces for tests: [`TestNetns`] (a named
//! namespace, `ip netns add`, deleted on drop) and [`TestPod`] (a pod
//! namespace whose `eth0` is one end of a veth pair, as CNI leaves it, the
//! other end in a peer namespace standing in for the host). Traffic in
//! them never reaches the host's own interfaces.
//!
//! Only built for tests and with the `test-utils` feature; needs root,
//! `ip` and `tc` (iproute2).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

const IP: &str = "ip";
const TC: &str = "tc";

/// Why tests that make namespaces and taps cannot run here, if they can't.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("network namespaces and taps need root".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    for tool in [IP, TC] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("no `{tool}` (iproute2)"));
        }
    }
    None
}

/// A named network namespace (`/var/run/netns/<name>`), deleted on drop.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
    path: PathBuf,
}

impl TestNetns {
    /// Makes a new namespace with a name no other test uses; it holds only
    /// `lo`, down.
    pub fn new() -> io::Result<TestNetns> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "skiff-t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new(IP).args(["netns", "add", &name]))?;
        Ok(TestNetns {
            path: Path::new("/var/run/netns").join(&name),
            name,
        })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `ip -n <name> <args>` and returns its standard output.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        run(Command::new(IP).args(["-n", &self.name]).args(args))
    }

    /// Runs `tc -n <name> <args>` and returns its standard output.
    pub fn tc(&self, args: &[&str]) -> io::Result<String> {
        run(Command::new(TC).args(["-n", &self.name]).args(args))
    }

    /// Whether the namespace has a link named `name`.
    pub fn link_exists(&self, name: &str) -> bool {
        self.ip(&["link", "show", "dev", name]).is_ok()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new(IP).args(["netns", "delete", &self.name])) {
            eprintln!("cannot delete the test namespace {}: {e}", self.name);
        }
    }
}

fn run(command: &mut Command) -> io::Result<String> {
    let out = command.output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A pod's network as a CNI plugin leaves it: in [`TestPod::pod`], `eth0`
/// ([`TestPod::MAC`], MTU [`TestPod::MTU`], 10.200.0.2/24 and
/// fd00:200::2/64, default routes via 10.200.0.1 and fd00:200::1), the
/// other end of its veth pair (`peer0`, 10.200.0.1/24, fd00:200::1/64) in
/// [`TestPod::peer`].
#[derive(Debug)]
pub struct TestPod {
    /// The pod's namespace.
    pub pod: TestNetns,
    /// The namespace holding the other end of the veth (the "host").
    pub peer: TestNetns,
}

impl TestPod {
    /// The pod interface's name.
    pub const IFNAME: &'static str = "eth0";
    /// The pod interface's MAC.
    pub const MAC: [u8; 6] = [0x02, 0x5c, 0x1f, 0x00, 0x00, 0x02];
    /// The pod interface's MTU.
    pub const MTU: u32 = 1400;
    /// The pod interface's IPv4 address.
    pub const IPV4: [u8; 4] = [10, 200, 0, 2];
    /// The peer's IPv4 address, the pod's IPv4 gateway.
    pub const PEER_IPV4: [u8; 4] = [10, 200, 0, 1];

    /// Makes both namespaces and the veth pair.
    pub fn new() -> io::Result<TestPod> {
        let pod = TestNetns::new()?;
        let peer = TestNetns::new()?;
        let mac = Self::MAC.map(|b| format!("{b:02x}")).join(":");
        let mtu = Self::MTU.to_string();
        pod.ip(&[
            "link",
            "add",
            "eth0",
            "address",
            &mac,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
            "mtu",
            &mtu,
            "netns",
            peer.name(),
        ])?;
        peer.ip(&["addr", "add", "10.200.0.1/24", "dev", "peer0"])?;
        peer.ip(&["addr", "add", "fd00:200::1/64", "dev", "peer0", "nodad"])?;
        peer.ip(&["link", "set", "peer0", "up"])?;
        pod.ip(&["addr", "add", "10.200.0.2/24", "dev", "eth0"])?;
        pod.ip(&["addr", "add", "fd00:200::2/64", "dev", "eth0", "nodad"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["link", "set", "lo", "up"])?;
        pod.ip(&["route", "add", "default", "via", "10.200.0.1"])?;
        pod.ip(&["-6", "route", "add", "default", "via", "fd00:200::1"])?;
        Ok(TestPod { pod, peer })
    }
}
