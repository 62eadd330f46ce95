//! skiff's guest agent: the container engine that serves the agent
//! protocol (`skiff-agent-proto`, ttrpc) and runs OCI containers with youki's
//! `libcontainer`.
//!
//! It runs as PID 1 inside the micro-VM (listening on vsock) and on the host
//! as the `linux` sandbox handler (listening on a unix socket). Layers, each a
//! real boundary: [`server`] (listening) → [`service`] (ttrpc requests, error
//! → status mapping) → [`container`] (the engine: bundles, processes; one job
//! per file, see its doc) → [`spawner`] (the single-threaded helper process
//! that calls libcontainer to fork) and [`reaper`] / [`stdio`] / [`oom`]
//! (threads that watch processes). [`init`] is what PID 1 in the micro-VM
//! does besides serving (mounts, `lo`, reset); [`mounts`] holds the mount
//! helpers it shares with the engine; [`refresh`] is what a guest restored
//! from a VM snapshot changes so it shares nothing with its template
//! (entropy, clock, machine id: guest init only); [`network`] configures
//! the guest's side of the pod network (its NIC, routes, `/etc/hosts`,
//! `/etc/resolv.conf`: guest init only); [`shared_fs`] mounts the VM's
//! virtio-fs share (container rootfs and volumes: guest init only).
//!
//! It must never depend on the VMM crates (`vmm-core`, `platform-*`) or the
//! shim: the agent is what runs *inside* the VM. What it shares with the
//! shim (messages, the vsock port, disk serials, status names) lives in
//! `skiff-agent-proto`, so the shim never links the engine.

pub mod container;
pub mod files;
pub mod init;
pub mod mounts;
pub mod network;
pub mod oom;
pub mod reaper;
pub mod refresh;
pub mod server;
pub mod service;
pub mod shared_fs;
pub mod spawner;
pub mod stdio;
