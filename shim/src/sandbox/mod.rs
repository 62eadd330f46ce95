//! Sandbox handlers: what runs the agent that runs the containers.
//!
//! A [`SandboxHandler`] starts one [`Sandbox`] per shim (per pod) and gives
//! its caller — the containerd TaskService ([`crate::task`]) or `skiff run`
//! ([`crate::run`]) — an [`AgentClient`](crate::agent_client::AgentClient);
//! everything after that is agent requests. Two implementations:
//! [`linux`] (the agent as a sandboxed host process) and [`vm`] (the agent
//! as PID 1 of a skiff micro-VM in this process, reached over vsock). The
//! calls are direct and synchronous; timeouts are `Duration`s.
//!
//! - [`handler`]: the traits and the start request.
//! - [`error`]: [`SandboxError`] and the [`SandboxErrorKind`] callers map.
//! - [`mounts`]: a container spec's bind mounts, parsed once.
//! - [`size`]: what a pod asks of its sandbox's size (CRI's annotations).
//! - [`state_dir`]: the sandbox's private directory and its log files.
//!
//! This module knows nothing of containerd; only [`vm`] depends on the VMM.

pub mod error;
pub mod handler;
pub mod linux;
pub mod mounts;
pub mod size;
pub mod state_dir;
pub mod vm;

pub use error::{SandboxError, SandboxErrorKind};
pub use handler::{Sandbox, SandboxHandler, SandboxRequest};
pub use mounts::BindMount;
pub use size::PodSize;

use crate::config::{Config, HandlerKind};

/// The handler `config` names.
pub fn handler_for(config: &Config) -> Box<dyn SandboxHandler> {
    match config.handler {
        HandlerKind::Linux => Box::new(linux::LinuxHandler),
        HandlerKind::Vm => Box::new(vm::VmHandler::new(config.vm_rootfs)),
    }
}
