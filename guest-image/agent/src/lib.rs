//! skiff's guest agent: the agent protocol (ttrpc, `proto/agent.proto`) and
//! the container engine that runs OCI containers with youki's `libcontainer`.
//!
//! It runs as PID 1 inside the micro-VM (listening on vsock) and on the host
//! as the `linux` sandbox handler (listening on a unix socket). Layers, each a
//! real boundary: [`server`] (listening) → [`service`] (ttrpc requests, error
//! → status mapping) → [`container`] (bundles, processes) → [`spawner`] (the
//! single-threaded helper process that calls libcontainer to fork) and
//! [`reaper`] / [`stdio`] / [`oom`] (threads that watch processes). [`init`]
//! is what PID 1 in the micro-VM does besides serving (mounts, `lo`, reset);
//! [`mounts`] holds the mount helpers it shares with the engine.
//!
//! It must never depend on the VMM crates (`vmm-core`, `platform-*`) or the
//! shim: the agent is what runs *inside* the VM.

pub mod container;
pub mod init;
pub mod mounts;
pub mod oom;
/// The agent protocol (the `skiff-agent-proto` crate), under its old path.
pub use skiff_agent_proto as proto;
pub mod reaper;
pub mod server;
pub mod service;
pub mod spawner;
pub mod stdio;
