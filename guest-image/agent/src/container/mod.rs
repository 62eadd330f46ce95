//! The container engine: turns a request into an OCI bundle and drives
//! youki's `libcontainer` to create, start, exec into, pause, resume, signal
//! and delete containers; keeps each process's stdio and exit status.
//!
//! Namespaces, pivot_root, mounts, /dev, capabilities, seccomp, rlimits and
//! cgroups are libcontainer's; this module owns the bundle layout, the stdio
//! plumbing, and the bookkeeping between pids and requests. One job per
//! file:
//!
//! - `engine`: [`Engine`] creates, execs into and removes containers.
//! - `handle`: the [`Container`] and [`Process`] handles it hands out.
//! - `error`: [`ContainerError`] (with [`IdError`]) and its ttrpc-facing
//!   [`ErrorKind`].
//! - `validate`: checks of ids and of the OCI process.
//! - `medium`: waiting for a hot-attached disk's medium (and its serial).
//! - `rootfs`: mounting a block-device rootfs (ext4) and releasing it.
//! - `pty`: receiving a terminal's pty master from the console socket.
//! - `cgroup_stats`: cgroup v2 statistics read leniently.

mod cgroup_stats;
mod engine;
mod error;
mod handle;
mod medium;
mod pty;
mod rootfs;
mod validate;

pub use engine::{CreateRequest, Engine, EngineConfig, StdioRequest};
pub use error::{ContainerError, ErrorKind, IdError};
pub use handle::{Container, Process};
