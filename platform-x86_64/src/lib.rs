//! KVM VM and vCPU setup for x86_64 hosts.
//!
//! Guest memory layout (low memory, the 32-bit MMIO gap, the e820 map) over
//! `vm-memory`, kernel loading via `linux-loader` (bzImage, ELF `vmlinux`
//! with the PVH entry), boot CPU state, CPUID templates, MSRs, the LAPIC, the
//! in-kernel irqchip/PIT and MP tables. It exposes the same public names as
//! `platform-aarch64`, so callers never need `cfg`.
//!
//! It must never depend on the shim, the agent, or anything async: it is
//! synchronous setup code that the VM runner drives.
#![cfg(target_arch = "x86_64")]

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use boot::{load_kernel, BootError, BootInfo, BootProtocol, KernelSpec};
pub use cpuid::{CpuTemplate, CpuidError};
pub use memory::{create_guest_memory, GuestRam, MemoryLayoutError};
pub use snapshot::{SnapshotError, VcpuState, VmState};
pub use vcpu::{configure_vcpu, VcpuError};
pub use vm::{create_vm, KvmVm, VmError};
