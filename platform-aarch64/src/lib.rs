//! KVM VM and vCPU setup for aarch64 hosts.
//!
//! This crate will hold guest memory layout over `vm-memory`, `Image` loading
//! via `linux-loader`, the device tree (`vm-fdt`), the GIC and vCPU
//! initialisation. It exposes the same public names as `platform-x86_64`, so
//! callers never need `cfg`.
//!
//! It must never depend on the shim, the agent, or anything async.
#![cfg(target_arch = "aarch64")]
