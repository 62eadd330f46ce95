//! The host side of virtio-fs: [`Passthrough`], `vmm-core`'s
//! [`FileSystem`](vmm_core::devices::fs::FileSystem) over a shared host
//! directory.
//!
//! The device (in `vmm-core`) parses and checks every FUSE request; this
//! module only touches the host's file system, always relative to file
//! descriptors it opened itself, so that nothing a guest names can resolve
//! outside the shared directory. See [`passthrough`] for the design and
//! [`SYSCALLS`] for the system calls it makes.

pub mod passthrough;

pub use passthrough::{CacheMode, Passthrough, PassthroughError, SYSCALLS};
