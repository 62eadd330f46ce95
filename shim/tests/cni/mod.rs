//! Pod networks wired the way CNI wires them, entirely inside network
//! namespaces the test makes.
//!
//! A [`CniNet`] is a throwaway "host" network namespace holding a bridge;
//! [`CniNet::add_pod`] makes a pod network namespace and runs Debian's
//! `containernetworking-plugins` (`bridge` with `host-local` IPAM, then
//! `loopback`) with `CNI_COMMAND=ADD` on it, the `bridge` plugin itself
//! running in the host namespace, so the bridge and the veths' host ends
//! land there and never in the machine's own namespace. No route leads out
//! of it: traffic stays between the namespaces the test made.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where Debian's package puts the plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";
/// The pods' subnet (inside the test's host namespace only).
pub const SUBNET: &str = "10.99.0.0/24";
/// The bridge's address: the pods' gateway.
pub const GATEWAY: &str = "10.99.0.1";

/// Why the network tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        if !Path::new(CNI_PATH).join(plugin).exists() {
            return Some(format!(
                "{CNI_PATH}/{plugin} missing (apt-get install containernetworking-plugins)"
            ));
        }
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("ip (iproute2) missing".into());
    }
    None
}

fn unique(what: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "skt{}-{}{}",
        std::process::id(),
        what,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A named network namespace (`/var/run/netns/<name>`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new, empty one.
    pub fn new(what: &str) -> Result<Netns, String> {
        let name = unique(what);
        ip(&["netns", "add", &name])?;
        Ok(Netns { name })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path, as a spec's `linux.namespaces` names it.
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs `cmd` in it; its output, or why it failed.
    pub fn exec(&self, cmd: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .map_err(|e| format!("{cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{cmd:?} in {}: {}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A bridge network in a host namespace of its own.
pub struct CniNet {
    host: Netns,
    ipam: tempfile::TempDir,
    bridge: String,
}

/// A pod on a [`CniNet`]: its network namespace, wired, and its address.
pub struct Pod<'n> {
    net: &'n CniNet,
    id: String,
    /// The pod's network namespace.
    pub netns: Netns,
    /// The address the IPAM gave it.
    pub ip: String,
}

impl CniNet {
    /// A new network with no pods.
    pub fn new() -> Result<CniNet, String> {
        let host = Netns::new("host")?;
        host.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(CniNet {
            bridge: format!("skbr{}", std::process::id() % 100_000),
            host,
            ipam: tempfile::tempdir().map_err(|e| e.to_string())?,
        })
    }

    fn conf(&self, plugin: &str) -> String {
        match plugin {
            "bridge" => serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "skiff-test",
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": self.ipam.path(),
                },
            }),
            _ => serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "skiff-test-lo",
                "type": "loopback",
            }),
        }
        .to_string()
    }

    /// Runs `plugin` with `command` for pod `id` in `netns`, from the
    /// host namespace; the plugin's result.
    fn plugin(
        &self,
        plugin: &str,
        command: &str,
        id: &str,
        netns: &Path,
    ) -> Result<String, String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.host.name()])
            .arg(Path::new(CNI_PATH).join(plugin))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env(
                "CNI_IFNAME",
                if plugin == "loopback" { "lo" } else { "eth0" },
            )
            .env("CNI_PATH", CNI_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{plugin}: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.conf(plugin).as_bytes())
                .map_err(|e| format!("{plugin}: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("{plugin}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "CNI {plugin} {command} for {id}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A new pod namespace, wired to the bridge (`bridge` + `host-local`,
    /// then `loopback`, as containerd's CRI plugin runs them).
    pub fn add_pod(&self) -> Result<Pod<'_>, String> {
        let netns = Netns::new("pod")?;
        let id = netns.name().to_owned();
        let result = self.plugin("bridge", "ADD", &id, &netns.path())?;
        let result: serde_json::Value =
            serde_json::from_str(&result).map_err(|e| format!("CNI result {result:?}: {e}"))?;
        let address = result["ips"][0]["address"]
            .as_str()
            .ok_or_else(|| format!("no address in the CNI result {result}"))?;
        let ip = address.split('/').next().unwrap_or_default().to_owned();
        let pod = Pod {
            net: self,
            id,
            netns,
            ip,
        };
        self.plugin("loopback", "ADD", &pod.id, &pod.netns.path())?;
        Ok(pod)
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        if let Err(e) = self
            .net
            .plugin("bridge", "DEL", &self.id, &self.netns.path())
        {
            eprintln!("{e}");
        }
    }
}
