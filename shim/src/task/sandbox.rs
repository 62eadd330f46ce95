//! Sandbox handlers: what runs the agent that runs the containers.
//!
//! A [`SandboxHandler`] starts one [`Sandbox`] per shim (per pod) and gives
//! the TaskService an [`AgentClient`]; everything after that is agent
//! requests. Two implementations fit this trait: [`linux`] (the agent as a
//! sandboxed host process, here) and [`vm`] (the agent as PID 1 of a skiff
//! micro-VM in this process, reached over vsock). The calls are direct and
//! synchronous; timeouts are [`Duration`]s.
//!
//! [`linux`]: crate::task::linux
//! [`vm`]: crate::task::vm

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent_client::{AgentCallError, AgentClient};
use crate::task::config::{Config, HandlerKind};
use crate::task::linux::LinuxHandler;
use crate::task::vm::VmHandler;

/// Errors starting, reaching or stopping a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The agent binary is nowhere to be found.
    #[error("the skiff-agent binary was not found (looked at {looked}); install it next to containerd-shim-skiff-v2 or set agent_path in the skiff config")]
    AgentNotFound {
        /// The places searched.
        looked: String,
    },
    /// Spawning the agent failed.
    #[error("cannot start the agent {path}")]
    Spawn {
        /// The agent binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent exited or never answered.
    #[error("the agent did not come up within {timeout:?}: {detail}")]
    NotReady {
        /// The bound waited.
        timeout: Duration,
        /// What happened (exit status, last log lines).
        detail: String,
    },
    /// The agent's first requests failed.
    #[error("the agent failed to set up the sandbox")]
    Agent(#[source] AgentCallError),
    /// The `vm` handler failed (artifacts, rootfs image, VM start).
    #[error(transparent)]
    Vm(crate::task::vm::VmSandboxError),
    /// Host I/O for the sandbox's state failed.
    #[error("{context}")]
    Io {
        /// What the handler was doing.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl SandboxError {
    /// Wraps an I/O error with what the handler was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

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
    /// The shim's configuration.
    pub config: &'a Config,
    /// How long to wait for the agent's first Health answer.
    pub ready_timeout: Duration,
}

/// Starts sandboxes of one kind.
pub trait SandboxHandler: Send + Sync + std::fmt::Debug {
    /// Starts a sandbox and waits (bounded) until its agent answers.
    fn start(&self, req: &SandboxRequest<'_>) -> Result<Box<dyn Sandbox>, SandboxError>;

    /// Refuses, before anything starts, a container spec (OCI runtime
    /// spec JSON) whose mounts this kind of sandbox cannot provide.
    fn check_mounts(&self, _spec: &serde_json::Value) -> Result<(), SandboxError> {
        Ok(())
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

    /// Makes the bind mounts of `spec` (an OCI runtime spec) reachable in
    /// the sandbox, rewriting their entries in place; returns the host
    /// paths shared for them, for [`Sandbox::unshare_path`] when the
    /// container goes. On error nothing stays shared. The default (a
    /// sandbox that sees the host's paths) changes nothing.
    fn share_mounts(&self, _spec: &mut serde_json::Value) -> Result<Vec<PathBuf>, SandboxError> {
        Ok(Vec::new())
    }

    /// Stops the sandbox: removes its containers, stops the agent (waiting
    /// at most `timeout` for it to go), removes the state directory.
    fn stop(&self, timeout: Duration) -> Result<(), SandboxError>;
}

/// The handler `kind` names.
pub fn handler_for(kind: HandlerKind) -> Box<dyn SandboxHandler> {
    match kind {
        HandlerKind::Linux => Box::new(LinuxHandler),
        HandlerKind::Vm => Box::new(VmHandler),
    }
}
