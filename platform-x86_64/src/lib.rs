//! KVM VM and vCPU setup for x86_64 hosts.
//!
//! This crate will hold guest memory layout (low memory, the 32-bit MMIO gap,
//! the e820 map) over `vm-memory`, kernel loading via `linux-loader` (bzImage,
//! ELF `vmlinux` with the PVH entry), boot CPU state, CPUID templates, MSRs,
//! the in-kernel irqchip/PIT and MP tables. It exposes the same public names as
//! `platform-aarch64`, so callers never need `cfg`.
//!
//! It must never depend on the shim, the agent, or anything async: it is
//! synchronous setup code that the VM runner drives.
#![cfg(target_arch = "x86_64")]
