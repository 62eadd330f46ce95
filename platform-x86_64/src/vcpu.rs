//! Boot state of a vCPU: CPUID, MSRs, LAPIC, FPU, registers, and the GDT
//! and identity page tables the entry protocols need.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{BootInfo, BootProtocol};
use crate::cpuid::{filter_cpuid, CpuTemplate};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What we tried.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than we set.
    #[error("KVM set only {set} of {wanted} boot MSRs")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many we asked for.
        wanted: usize,
    },
    /// Writing the GDT or page tables into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    GuestMemory {
        /// What was written.
        what: &'static str,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { what, source }
}

/// Configures vCPU `cpu_id` of `cpu_count`. The boot vCPU (0) gets the entry
/// state for `boot`; the others wait for the guest's INIT/SIPI.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    supported_cpuid: &CpuId,
    template: CpuTemplate,
    boot: &BootInfo,
    cpu_id: u8,
    cpu_count: u8,
) -> Result<(), VcpuError> {
    let mut cpuid = supported_cpuid.clone();
    filter_cpuid(&mut cpuid, template, cpu_id, cpu_count);
    vcpu.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
    if boot.protocol != BootProtocol::RealMode {
        set_msrs(vcpu)?;
    }
    set_lapic(vcpu)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set the FPU state"))?;
    if cpu_id == 0 {
        set_boot_state(vcpu, mem, boot)?;
    }
    Ok(())
}

fn set_msrs(vcpu: &VcpuFd) -> Result<(), VcpuError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("set the boot MSRs"))?;
    if set != entries.len() {
        return Err(VcpuError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

fn set_lapic(vcpu: &VcpuFd) -> Result<(), VcpuError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("read the LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = u32::from_le_bytes(bytes);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("set the LAPIC"))
}

/// A GDT entry from flags (access byte in bits 0-7, G/DB/L/AVL in 12-15),
/// base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The `kvm_segment` a GDT entry describes, for selector `index * 8`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        s: ((entry >> 44) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        present: ((entry >> 47) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        db: ((entry >> 54) & 1) as u8,
        g,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    addr: u64,
    v: T,
    what: &'static str,
) -> Result<(), VcpuError> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|_| VcpuError::GuestMemory { what })
}

fn set_boot_state(vcpu: &VcpuFd, mem: &GuestMemoryMmap, boot: &BootInfo) -> Result<(), VcpuError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("read special registers"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: boot.entry,
        ..Default::default()
    };
    match boot.protocol {
        BootProtocol::RealMode => {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
        }
        BootProtocol::Linux64 | BootProtocol::Pvh => {
            let long = boot.protocol == BootProtocol::Linux64;
            let code = if long { 0xa09b } else { 0xc09b };
            let gdt = [
                0,
                gdt_entry(code, 0, 0xfffff),
                gdt_entry(0xc093, 0, 0xfffff),
                gdt_entry(0x808b, 0, 0xfffff),
            ];
            for (i, e) in gdt.iter().enumerate() {
                write(mem, BOOT_GDT_START + 8 * i as u64, *e, "the boot GDT")?;
            }
            write(mem, BOOT_IDT_START, 0u64, "the boot IDT")?;
            sregs.gdt.base = BOOT_GDT_START;
            sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
            sregs.idt.base = BOOT_IDT_START;
            sregs.idt.limit = 7;
            let data = segment_from_gdt(gdt[2], 2);
            sregs.cs = segment_from_gdt(gdt[1], 1);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = segment_from_gdt(gdt[3], 3);
            if long {
                write_identity_page_tables(mem)?;
                sregs.cr3 = PML4_START;
                sregs.cr4 |= X86_CR4_PAE;
                sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
                sregs.efer |= EFER_LME | EFER_LMA;
                regs.rsp = BOOT_STACK_POINTER;
                regs.rbp = BOOT_STACK_POINTER;
                regs.rsi = ZERO_PAGE_START;
            } else {
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
                regs.rbx = PVH_INFO_START;
            }
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(kvm("set special registers"))?;
    vcpu.set_regs(&regs).map_err(kvm("set registers"))
}

/// Identity-maps the first 1 GiB with 2 MiB pages.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), VcpuError> {
    let what = "the boot page tables";
    write(mem, PML4_START, PDPTE_START | 0x03, what)?;
    write(mem, PDPTE_START, PDE_START | 0x03, what)?;
    for i in 0..512u64 {
        write(mem, PDE_START + i * 8, (i << 21) | 0x83, what)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let code64 = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(code64, 0x00af_9b00_0000_ffff);
        let s = segment_from_gdt(code64, 1);
        assert_eq!(
            (s.selector, s.type_, s.l, s.db, s.g, s.present),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        let data = segment_from_gdt(gdt_entry(0xc093, 0x1234_5678, 0xfffff), 2);
        assert_eq!(
            (data.base, data.type_, data.db, data.s),
            (0x1234_5678, 3, 1, 1)
        );
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }
}
