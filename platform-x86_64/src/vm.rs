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

/// A KVM VM and the guest memory registered as its RAM.
///
/// Holding both is what keeps the memory slots sound: the mappings KVM was
/// given stay mapped for as long as the VM can touch them.
#[derive(Debug)]
pub struct KvmVm {
    // Declared before `mem`, so the VM is closed before its memory is
    // unmapped.
    fd: VmFd,
    mem: GuestMemoryMmap,
}

impl KvmVm {
    /// The VM, to create vCPUs and register irqfds and ioeventfds.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// Creates a VM with `mem` as its RAM, an in-kernel irqchip (PIC, IOAPIC,
/// LAPICs) and PIT. The VM keeps `mem` (a clone of a [`GuestMemoryMmap`]
/// shares its mappings, so the caller may keep using its own).
pub fn create_vm(kvm_fd: &Kvm, mem: GuestMemoryMmap) -> Result<KvmVm, VmError> {
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
        // SAFETY: the region is a live mmap held by `mem`, which moves into
        // the returned `KvmVm` next to `vm` and is dropped only after `vm`
        // is closed; if we fail before, `vm` is closed here first. Slots
        // don't overlap because `mem`'s regions don't.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm("register guest memory"))?;
    }
    vm.create_irq_chip().map_err(kvm("create the irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm("create the PIT"))?;
    Ok(KvmVm { fd: vm, mem })
}

/// EFAULT, for a region without a host mapping (cannot happen with mmap
/// regions).
fn libc_efault() -> i32 {
    14
}
