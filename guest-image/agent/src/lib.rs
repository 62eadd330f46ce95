//! skiff's guest agent.
//!
//! This crate will hold the agent protocol (ttrpc, our own `.proto`) and the
//! container engine that runs OCI containers: namespaces, rootfs and mounts,
//! cgroups, process setup and stdio. It runs as PID 1 inside the micro-VM
//! (listening on vsock) and on the host as the `linux` sandbox handler
//! (listening on a unix socket). It must never depend on the VMM crates.
