//! A VM's share of the pod's network (the "tcfilter" model of Kata and
//! firecracker-containerd's tc-redirect-tap).
//!
//! In the pod's network namespace (CNI's, from the spec) the handler makes
//! a tap and redirects everything the pod's interface receives to the tap
//! and back ([`PodNetwork::setup`]); the VM's virtio-net NIC is the tap's
//! other end and takes the interface's MAC and MTU, and the agent gives the
//! guest its addresses and routes ([`configure_guest`]). Nothing moves
//! out of the namespace. The namespace's path is recorded in the state
//! directory, so that [`cleanup`] after a killed shim removes the tap and
//! the filters too.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::VmSandboxError;
use crate::agent_client::AgentClient;
use crate::podnet::{self, PodNetwork};
use crate::sandbox::error::SandboxError;
use crate::vmm::NetConfig;

/// The tap's name in the pod's namespace (one VM per pod).
pub const TAP_NAME: &str = "tap0_skiff";
/// The state-dir file recording the pod's namespace.
const RECORD: &str = "pod-netns";

/// Wires the pod's namespace `netns` for a VM whose state is in
/// `state_dir`: the pod network and the NIC for the VM's config. On an
/// error nothing is left in the namespace.
pub fn wire(netns: &Path, state_dir: &Path) -> Result<(PodNetwork, NetConfig), VmSandboxError> {
    let err = |source| VmSandboxError::PodNetwork {
        netns: netns.to_owned(),
        source,
    };
    let (pod, tap) = PodNetwork::setup(netns, TAP_NAME).map_err(err)?;
    let record = state_dir.join(RECORD);
    if let Err(e) = std::fs::write(&record, netns.as_os_str().as_encoded_bytes()) {
        // Without the record a killed shim's tap outlives it: a warning,
        // not a failed pod.
        log::warn!("cannot record the pod network in {}: {e}", record.display());
    }
    let iface = pod.interface();
    let nic = NetConfig {
        tap: Arc::new(OwnedFd::from(tap)),
        mac: iface.mac,
        mtu: u16::try_from(iface.mtu).unwrap_or(u16::MAX),
    };
    log::debug!(
        "pod network {}: MAC {}",
        netns.display(),
        mac_text(&iface.mac)
    );
    Ok((pod, nic))
}

/// Gives the guest the pod interface's name, MAC, MTU, addresses and
/// routes.
pub fn configure_guest(agent: &AgentClient, pod: &PodNetwork) -> Result<(), SandboxError> {
    agent
        .configure_network(&pod.to_proto())
        .map_err(SandboxError::Agent)
}

/// Removes what [`wire`] made in the namespace; a failure is logged.
pub fn unwire(pod: &PodNetwork) {
    match pod.teardown() {
        Ok(()) => log::debug!(
            "pod network {}: tap and filters removed",
            pod.netns().display()
        ),
        Err(e) => log::warn!(
            "pod network {}: cannot remove the tap and filters: {}",
            pod.netns().display(),
            crate::vmm::error_chain(&e)
        ),
    }
}

/// After a shim died: removes the tap and filters of the namespace recorded
/// in `state_dir`, if any.
pub fn cleanup(state_dir: &Path) {
    let Ok(netns) = std::fs::read(state_dir.join(RECORD)) else {
        return;
    };
    let netns = PathBuf::from(String::from_utf8_lossy(&netns).into_owned());
    if let Err(e) = podnet::teardown(&netns, TAP_NAME) {
        log::warn!(
            "pod network {}: cannot remove the tap and filters: {}",
            netns.display(),
            crate::vmm::error_chain(&e)
        );
    }
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
