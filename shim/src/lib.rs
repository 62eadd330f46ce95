//! skiff's std glue.
//!
//! - [`vmm`]: the VM runner — builds a KVM micro-VM from a [`vmm::VmConfig`],
//!   runs its vCPU threads, dispatches exits to `vmm-core` devices, and
//!   reports how the VM ended.
//! - [`check`]: what this host can run (VMX KVM, PVM, or no KVM).
//! - [`task`]: the containerd shim v2 TaskService
//!   (`containerd-shim-skiff-v2`).
//! - [`sandbox`]: what runs the agent: the `linux` (host process) and `vm`
//!   (micro-VM) handlers, used by [`task`] and [`run`].
//! - [`config`]: `/etc/skiff/config.toml` and its overrides.
//! - [`agent_client`]: the typed client of the skiff agent.
//! - [`fixups`]: what the host gives a guest restored from a snapshot
//!   (fresh entropy, a new machine id) for `AgentClient::refresh_guest`.
//! - [`podnet`]: the host side of pod networking: the pod's network
//!   namespace joined to a tap by tc redirects.
//! - [`run`]: `skiff run`, one container in a fresh sandbox without
//!   containerd.
//!
//! This crate turns `vmm-core`'s
//! allocation-free state machines into running devices; it must never be a
//! dependency of `vmm-core` or of the platform crates.

pub mod agent_client;
pub mod check;
pub mod config;
pub mod fixups;
pub mod image;
pub mod podnet;
pub mod procfs;
pub mod run;
pub mod sandbox;
pub mod sync;
pub mod task;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod vmm;
