//! Creating the KVM VM: memory slots, the in-kernel irqchip and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::KVM_TSS_ADDRESS;

/// Errors creating a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What we tried.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Creates a VM with `mem` as its RAM, an in-kernel irqchip (PIC, IOAPIC,
/// LAPICs) and PIT.
pub fn create_vm(kvm_fd: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    let vm = kvm_fd.create_vm().map_err(kvm("create a VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm("set the TSS address"))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| VmError::Kvm {
                what: "map guest memory",
                source: kvm_ioctls::Error::new(libc_efault()),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the caller
        // keeps alive for as long as the VM runs (the runner holds both), and
        // slots don't overlap because `mem`'s regions don't.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm("register guest memory"))?;
    }
    vm.create_irq_chip().map_err(kvm("create the irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm("create the PIT"))?;
    Ok(vm)
}

/// EFAULT, for a region without a host mapping (cannot happen with mmap
/// regions).
fn libc_efault() -> i32 {
    14
}
