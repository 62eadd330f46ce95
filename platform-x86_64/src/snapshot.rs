//! Saving and restoring what KVM holds of a VM: each vCPU's registers,
//! special registers, XSAVE area and XCRs, debug registers, MSRs, LAPIC,
//! pending events and MP state; the VM's in-kernel irqchip (both PICs and
//! the IOAPIC), PIT and clock.
//!
//! The states are plain data (kvm-bindings' structs, `serde` on); the
//! caller puts them in its state file. A save happens with the vCPU out of
//! `KVM_RUN` (its own thread, paused); a restore into freshly created VM and
//! vCPUs, before any of them runs.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A KVM ioctl failed: this host's KVM cannot save or restore that
    /// part of the state.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What we tried.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than the state holds.
    #[error("KVM restored only {set} of {saved} MSRs (the first refused: {first_refused:#x})")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many the state holds.
        saved: usize,
        /// The index of the first MSR KVM refused.
        first_refused: u32,
    },
    /// The state holds more CPUID entries or MSRs than KVM takes (a
    /// corrupt or foreign state file).
    #[error("the saved {what} has {len} entries, more than KVM takes")]
    TooMany {
        /// CPUID or MSRs.
        what: &'static str,
        /// How many entries the state has.
        len: usize,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// Everything KVM holds of one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given (restored first: it decides which
    /// MSRs and XSAVE components exist).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The XSAVE area (x87, SSE, AVX, …).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM's index list that this vCPU could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// Running, halted, waiting for SIPI, ….
    pub mp_state: kvm_mp_state,
}

/// What KVM holds of the VM beside its vCPUs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The master PIC.
    pub pic_master: kvm_irqchip,
    /// The slave PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The PIT's channels.
    pub pit: kvm_pit_state2,
    /// The kvmclock.
    pub clock: kvm_clock_data,
}

/// The MSRs KVM saves and restores for a vCPU on this host
/// (`KVM_GET_MSR_INDEX_LIST`).
pub fn msr_index_list(kvm_fd: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    Ok(kvm_fd
        .get_msr_index_list()
        .map_err(kvm("list the MSRs it saves"))?
        .as_slice()
        .to_vec())
}

/// Reads `indices` from `vcpu`, skipping any KVM refuses to read (some of
/// the list exist only with features this vCPU's CPUID lacks).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::TooMany {
            what: "MSR list",
            len: entries.len(),
        })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("read the MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(chunk.len())]);
        // KVM stops at the first MSR it cannot read: skip that one.
        let skip = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[skip.min(rest.len())..];
    }
    Ok(out)
}

/// Saves `vcpu`'s state; `msr_indices` from [`msr_index_list`]. The vCPU
/// must be out of `KVM_RUN`.
pub fn save_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, SnapshotError> {
    // The MP state first: reading it makes KVM settle pending APIC events.
    let mp_state = vcpu.get_mp_state().map_err(kvm("read the MP state"))?;
    Ok(VcpuState {
        cpuid: vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("read the CPUID"))?
            .as_slice()
            .to_vec(),
        regs: vcpu.get_regs().map_err(kvm("read the registers"))?,
        sregs: vcpu
            .get_sregs()
            .map_err(kvm("read the special registers"))?,
        xsave: vcpu.get_xsave().map_err(kvm("read the XSAVE area"))?,
        xcrs: vcpu.get_xcrs().map_err(kvm("read the XCRs"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(kvm("read the debug registers"))?,
        lapic: vcpu.get_lapic().map_err(kvm("read the LAPIC"))?,
        msrs: read_msrs(vcpu, msr_indices)?,
        events: vcpu
            .get_vcpu_events()
            .map_err(kvm("read the pending events"))?,
        mp_state,
    })
}

/// `IA32_TSC`.
const MSR_IA32_TSC: u32 = 0x10;

/// How far `vcpu`'s TSC, once `state` is restored into it, runs ahead of
/// the TSC `state` saved, in nanoseconds; `None` when it is where it was
/// saved (within a millisecond) or cannot be told.
///
/// Where KVM offsets the guest TSC (VMX, SVM), a restored vCPU's TSC is
/// the saved one and this is `None`. Where the guest reads the host's TSC
/// unchanged (PVM), the TSC cannot be restored: it is ahead by the time
/// since the snapshot, and the kvmclock must be moved on by as much, or
/// the guest's clock jumps forward (a stale kvmclock page over the newer
/// TSC) and then back (once KVM updates the page).
pub fn tsc_lag_ns(vcpu: &VcpuFd, state: &VcpuState) -> Option<u64> {
    let saved = state.msrs.iter().find(|m| m.index == MSR_IA32_TSC)?.data;
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .ok()?;
    if vcpu.get_msrs(&mut msrs).ok()? != 1 {
        return None;
    }
    let now = msrs.as_slice()[0].data;
    let khz = u64::from(vcpu.get_tsc_khz().ok()?);
    if khz == 0 || now <= saved {
        return None;
    }
    let ns = u128::from(now - saved) * 1_000_000 / u128::from(khz);
    let ns = u64::try_from(ns).ok()?;
    (ns > 1_000_000).then_some(ns)
}

/// Restores `state` into a new `vcpu` that has not run.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), SnapshotError> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| SnapshotError::TooMany {
        what: "CPUID",
        len: state.cpuid.len(),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("set the CPUID"))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(kvm("set the MP state"))?;
    vcpu.set_regs(&state.regs)
        .map_err(kvm("set the registers"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(kvm("set the special registers"))?;
    vcpu_set_xsave(vcpu, &state.xsave)?;
    vcpu.set_xcrs(&state.xcrs).map_err(kvm("set the XCRs"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(kvm("set the debug registers"))?;
    vcpu.set_lapic(&state.lapic).map_err(kvm("set the LAPIC"))?;
    for chunk in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| SnapshotError::TooMany {
            what: "MSR list",
            len: chunk.len(),
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(kvm("set the MSRs"))?;
        if set != chunk.len() {
            return Err(SnapshotError::Msrs {
                set,
                saved: chunk.len(),
                first_refused: chunk[set].index,
            });
        }
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(kvm("set the pending events"))?;
    Ok(())
}

fn vcpu_set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), SnapshotError> {
    // SAFETY: `xsave` is a whole `kvm_xsave` (4 KiB). KVM_SET_XSAVE reads
    // the guest FPU's uABI size, which exceeds 4 KiB only for dynamically
    // enabled features (AMX) a VMM must request with
    // ARCH_REQ_XCOMP_GUEST_PERM; skiff never does.
    unsafe { vcpu.set_xsave(xsave) }.map_err(kvm("set the XSAVE area"))
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("read the irqchip"))?;
    Ok(chip)
}

/// Saves the VM's irqchip, PIT and clock; every vCPU must be out of
/// `KVM_RUN`.
pub fn save_vm(vm: &VmFd) -> Result<VmState, SnapshotError> {
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("read the PIT"))?,
        clock: vm.get_clock().map_err(kvm("read the clock"))?,
    })
}

/// Restores `state` into a new VM (irqchip and PIT created, no vCPU run
/// yet), its kvmclock moved on by `advance_ns` (see [`tsc_lag_ns`]).
pub fn restore_vm(
    vm: &VmFd,
    state: &VmState,
    advance_ns: Option<u64>,
) -> Result<(), SnapshotError> {
    vm.set_pit2(&state.pit).map_err(kvm("set the PIT"))?;
    let mut clock = state.clock;
    // Only the clock's value is set: KVM_GET_CLOCK's report flags
    // (TSC_STABLE, REALTIME, HOST_TSC) are not inputs.
    clock.flags = 0;
    // Moved on with a TSC that could not be restored (see tsc_lag_ns).
    clock.clock = clock.clock.saturating_add(advance_ns.unwrap_or(0));
    vm.set_clock(&clock).map_err(kvm("set the clock"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(kvm("set the irqchip"))?;
    }
    Ok(())
}
