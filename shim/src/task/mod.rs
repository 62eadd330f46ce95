//! `containerd-shim-skiff-v2`: the containerd shim v2 Task service.
//!
//! A request travels: ttrpc [`service::TaskService`] (one method per Task
//! RPC, errors mapped to ttrpc codes in [`error`]) → the sandbox's
//! [`crate::agent_client::AgentClient`] → the agent. The only thread
//! boundaries are real ones: the per-process waiter and stdio threads
//! ([`stdio`]), the OOM watcher, and the event forwarder ([`events`]).
//!
//! - [`binary`]: the `start` / `delete` / `serve` command line containerd
//!   drives, socket and bundle files, grouping.
//! - [`rootfs`]: mounting containerd's snapshot at `<bundle>/rootfs`.
//! - [`spec`]: the bundle's OCI spec, read once.
//! - [`logger`]: the shim's log to the bundle's `log` FIFO.
//!
//! This module speaks containerd's protocol and nothing else: what runs
//! the containers is [`crate::sandbox`]'s, and it never depends on the VMM.

/// Stack size of the shim's own threads (waiters, stdio copiers, OOM
/// watcher, event forwarder): each runs one loop of agent calls and small
/// writes, far from std's 2 MiB default.
pub const THREAD_STACK_SIZE: usize = 128 * 1024;

pub mod binary;
pub mod error;
pub mod events;
pub mod logger;
pub mod rootfs;
pub mod service;
pub mod spec;
pub mod stdio;

/// Whether a log record is shown: up to the max level, except that the
/// ttrpc crate's own records (e.g. "The request has returned" for a long
/// poll whose answer came after its deadline) only show at debug and trace.
pub fn log_enabled(metadata: &log::Metadata<'_>) -> bool {
    metadata.level() <= log::max_level()
        && (!metadata.target().starts_with("ttrpc") || log::max_level() >= log::LevelFilter::Debug)
}
