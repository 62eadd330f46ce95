//! skiff's std glue.
//!
//! This crate will hold the VM runner (vCPU threads, ioeventfd/irqfd, device
//! backends), the containerd shim v2 TaskService (`containerd-shim-skiff-v2`),
//! the agent client and the `skiff` CLI. It turns `vmm-core`'s allocation-free
//! state machines into running devices; it must never be a dependency of
//! `vmm-core` or of the platform crates.
