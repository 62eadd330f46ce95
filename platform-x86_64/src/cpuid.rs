//! CPUID: what KVM supports, filtered through a CPU template.
//!
//! Templates hide features the host cannot run for the guest. `pvm-compat` is
//! for hosts whose KVM is PVM (a nested, emulating hypervisor): its
//! instruction emulator lacks `cmpxchg16b`, `xsave`/`xrstor`, `popcnt`,
//! SMAP's `clac`/`stac` and what hides behind `pcid`, `invpcid`, `fsgsbase`,
//! `rdtscp` and `rdpid`, so a guest must never see them.

use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A CPU template.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuTemplate {
    /// Everything KVM supports.
    #[default]
    Default,
    /// Hides what PVM's emulator cannot run.
    PvmCompat,
}

/// Errors of CPUID handling.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The template name is unknown.
    #[error("unknown CPU template {0:?} (known: default, pvm-compat)")]
    UnknownTemplate(String),
}

impl FromStr for CpuTemplate {
    type Err = CpuidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "default" => Ok(CpuTemplate::Default),
            "pvm-compat" => Ok(CpuTemplate::PvmCompat),
            other => Err(CpuidError::UnknownTemplate(other.to_owned())),
        }
    }
}

impl std::fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CpuTemplate::Default => "default",
            CpuTemplate::PvmCompat => "pvm-compat",
        })
    }
}

/// A register of a CPUID leaf.
#[derive(Clone, Copy, Debug)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// `(leaf, subleaf or None for all, register, bit)` hidden by `pvm-compat`.
const PVM_HIDDEN: &[(u32, Option<u32>, Reg, u32)] = &[
    (1, None, Reg::Ecx, 12),           // fma (needs xsave)
    (1, None, Reg::Ecx, 13),           // cx16
    (1, None, Reg::Ecx, 17),           // pcid
    (1, None, Reg::Ecx, 23),           // popcnt
    (1, None, Reg::Ecx, 26),           // xsave
    (1, None, Reg::Ecx, 27),           // osxsave
    (1, None, Reg::Ecx, 28),           // avx (needs xsave)
    (1, None, Reg::Ecx, 29),           // f16c (needs xsave)
    (7, Some(0), Reg::Ebx, 0),         // fsgsbase
    (7, Some(0), Reg::Ebx, 5),         // avx2
    (7, Some(0), Reg::Ebx, 10),        // invpcid
    (7, Some(0), Reg::Ebx, 16),        // avx512f
    (7, Some(0), Reg::Ebx, 20),        // smap
    (7, Some(0), Reg::Ecx, 22),        // rdpid
    (7, Some(0), Reg::Edx, 29),        // arch_capabilities (PVM rejects MSR 0x10a writes)
    (0x8000_0001, None, Reg::Edx, 27), // rdtscp
];

/// Bit 31 of leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 31;
/// Bit 28 of leaf 1 EDX: multiple logical processors.
const LEAF1_EDX_HTT: u32 = 28;

fn reg(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Adjusts KVM's supported CPUID for vCPU `cpu_id` of `cpu_count` under
/// `template`.
pub fn filter_cpuid(cpuid: &mut CpuId, template: CpuTemplate, cpu_id: u8, cpu_count: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC id and logical processor count.
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (u32::from(cpu_id) << 24)
                    | (u32::from(cpu_count) << 16);
                e.ecx |= 1 << LEAF1_ECX_HYPERVISOR;
                if cpu_count > 1 {
                    e.edx |= 1 << LEAF1_EDX_HTT;
                } else {
                    e.edx &= !(1 << LEAF1_EDX_HTT);
                }
            }
            0xb | 0x1f => e.edx = u32::from(cpu_id),
            _ => {}
        }
        if template == CpuTemplate::PvmCompat {
            for &(leaf, sub, r, bit) in PVM_HIDDEN {
                if e.function == leaf && sub.is_none_or(|s| s == e.index) {
                    *reg(e, r) &= !(1 << bit);
                }
            }
            // Without xsave there is no extended state to enumerate.
            if e.function == 0xd {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(1, 0),
            entry(7, 0),
            entry(7, 1),
            entry(0xb, 0),
            entry(0xd, 0),
            entry(0x8000_0001, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn templates_parse_and_print() {
        assert_eq!(
            "default".parse::<CpuTemplate>().unwrap(),
            CpuTemplate::Default
        );
        assert_eq!(
            "pvm-compat".parse::<CpuTemplate>().unwrap(),
            CpuTemplate::PvmCompat
        );
        assert_eq!(CpuTemplate::PvmCompat.to_string(), "pvm-compat");
        let e = "t2".parse::<CpuTemplate>().unwrap_err();
        assert!(e.to_string().contains("t2"));
    }

    #[test]
    fn default_template_sets_topology_only() {
        let mut c = sample();
        filter_cpuid(&mut c, CpuTemplate::Default, 2, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & (1 << 13), 0, "cx16 stays");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(find(&c, 0xb, 0).edx, 2);
        assert_eq!(find(&c, 0xd, 0).eax, !0);
    }

    #[test]
    fn pvm_compat_hides_what_pvm_cannot_emulate() {
        let mut c = sample();
        filter_cpuid(&mut c, CpuTemplate::PvmCompat, 0, 1);
        let l1 = find(&c, 1, 0);
        for bit in [13, 17, 23, 26, 27] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_eq!(l1.edx & (1 << LEAF1_EDX_HTT), 0);
        let l7 = find(&c, 7, 0);
        for bit in [0, 10, 20] {
            assert_eq!(l7.ebx & (1 << bit), 0, "leaf 7 ebx bit {bit}");
        }
        assert_eq!(l7.ecx & (1 << 22), 0, "rdpid");
        assert_eq!(l7.edx & (1 << 29), 0, "arch_capabilities");
        // Subleaf 1 of leaf 7 is not touched.
        assert_eq!(find(&c, 7, 1).ebx, !0);
        assert_eq!(find(&c, 0x8000_0001, 0).edx & (1 << 27), 0, "rdtscp");
        assert_eq!(find(&c, 0xd, 0).eax, 0);
    }
}
