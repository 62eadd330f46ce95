//! The sandbox traits: what a handler starts, and what the TaskService
//! and `skiff run` ask of a running sandbox.

use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::Mount;

use super::error::SandboxError;
use super::mounts::BindMount;
use super::size::PodSize;
use crate::agent_client::AgentClient;
use crate::config::Config;

/// What a sandbox is started with.
#[derive(Debug, Clone)]
pub struct SandboxRequest<'a> {
    /// The sandbox id (the pod's, or the first container's).
    pub id: &'a str,
    /// A directory private to this sandbox (sockets, agent state); removed
    /// by [`Sandbox::stop`] and [`SandboxHandler::cleanup`].
    pub state_dir: &'a Path,
    /// The hostname containers without their own get.
    pub hostname: &'a str,
    /// The first container's root filesystem on the host (mounted). The
    /// `vm` handler builds the guest's disk from it before boot.
    pub rootfs: &'a Path,
    /// The first container's `linux.cgroupsPath`, if its spec has one
    /// (under CRI, the pod sandbox's: the `vm` handler puts its VMM's
    /// cgroup in the pod's).
    pub cgroups_path: Option<&'a str>,
    /// The pod's network namespace on the host (the first container's
    /// `linux.namespaces` network `path`: CNI's, under CRI). The `vm`
    /// handler wires the VM's NIC to it; `None` leaves the VM loopback
    /// only. The `linux` handler's containers join it through their spec.
    pub netns: Option<&'a Path>,
    /// What the pod asks of the sandbox's size (the first container's
    /// CRI sandbox annotations); the `vm` handler sizes its VM from it.
    pub size: PodSize,
    /// The shim's configuration.
    pub config: &'a Config,
    /// How long to wait for the agent's first Health answer.
    pub ready_timeout: Duration,
}

/// Starts sandboxes of one kind.
pub trait SandboxHandler: Send + Sync + std::fmt::Debug {
    /// Starts a sandbox and waits (bounded) until its agent answers.
    fn start(&self, req: &SandboxRequest<'_>) -> Result<Box<dyn Sandbox>, SandboxError>;

    /// The bind mounts among a container spec's `mounts` that this kind of
    /// sandbox must share for the container, validated: a mount it cannot
    /// provide is refused here, before anything starts. The default (a
    /// sandbox that sees the host's paths) shares none.
    fn volumes(&self, _mounts: &[Mount]) -> Result<Vec<BindMount>, SandboxError> {
        Ok(Vec::new())
    }

    /// Cleans up after a sandbox whose shim died: stops what still runs
    /// from `state_dir` (containers included) and removes the directory.
    fn cleanup(&self, state_dir: &Path, config: &Config) -> Result<(), SandboxError>;
}

/// A running sandbox.
pub trait Sandbox: Send + Sync + std::fmt::Debug {
    /// The sandbox's agent.
    fn agent(&self) -> &AgentClient;

    /// The path under which the agent sees the host directory `host`
    /// (a container's rootfs), sharing it into the sandbox if needed.
    fn share_path(&self, host: &Path) -> Result<String, SandboxError>;

    /// Ends one sharing of `host` (its container is gone); shares are
    /// counted. A path that is not shared is no error.
    fn unshare_path(&self, _host: &Path) -> Result<(), SandboxError> {
        Ok(())
    }

    /// Makes `volumes` (what [`SandboxHandler::volumes`] gave for `mounts`)
    /// reachable in the sandbox, rewriting their entries of `mounts` in
    /// place; returns the host paths shared for them, for
    /// [`Sandbox::unshare_path`] when the container goes. On error nothing
    /// stays shared. The default (a sandbox that sees the host's paths)
    /// changes nothing.
    fn share_volumes(
        &self,
        _mounts: &mut [Mount],
        _volumes: &[BindMount],
    ) -> Result<Vec<PathBuf>, SandboxError> {
        Ok(Vec::new())
    }

    /// If the sandbox has ended on its own (the VM stopped, the agent
    /// process died), stops what it left running and says how it ended;
    /// `None` while it runs and after [`Sandbox::stop`]. Callers poll it:
    /// it is cheap until the end, and says so at least once.
    fn ended(&self) -> Option<String>;

    /// Stops the sandbox: removes its containers, stops the agent (waiting
    /// at most `timeout` for it to go), removes the state directory. A
    /// zero `timeout` asks the agent nothing (a sandbox that ended on its
    /// own may have a silent agent, and each request to it would wait out
    /// its own deadline) and stops it at once.
    fn stop(&self, timeout: Duration) -> Result<(), SandboxError>;

    /// Whether the sandbox's own network is the pod's: a container whose
    /// spec joins the pod's network namespace by path then stays in the
    /// sandbox's network instead (a VM's guest network, wired to that
    /// namespace), so the pod's containers share it. The default (a
    /// sandbox on the host) joins the path itself.
    fn pod_network_in_sandbox(&self) -> bool {
        false
    }
}
