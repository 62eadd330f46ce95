//! What this host can run: hardware-assisted KVM, PVM, or nothing.

use std::fmt;
use std::path::Path;

#[cfg(target_arch = "x86_64")]
use platform_x86_64::CpuTemplate;

/// The kind of KVM this host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// KVM on hardware virtualization (Intel VMX or AMD SVM).
    HardwareKvm,
    /// KVM provided by `kvm_pvm`, a nested, emulating hypervisor.
    Pvm,
    /// `/dev/kvm` is missing or unusable.
    NoKvm,
}

impl fmt::Display for HostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostKind::HardwareKvm => "hardware KVM (VMX/SVM)",
            HostKind::Pvm => "PVM (kvm_pvm: nested, emulated)",
            HostKind::NoKvm => "no usable KVM",
        })
    }
}

/// Kernel command-line parameters a PVM host needs (see
/// `guest-image/README.md`): the guest-kernel accommodations, `…=off` for
/// mitigations whose instructions PVM cannot emulate, and the CPU feature
/// switches. The last are needed on top of the `pvm-compat` CPUID template
/// because PVM does not honour every CPUID bit a VMM clears (measured: a
/// guest still sees `xsave` and `popcnt` after KVM_SET_CPUID2 hid them, while
/// `cx16` does disappear).
pub const PVM_CMDLINE: &str = "skip_int3_selftest pvm_syscall_fixup pvm_no_fwait \
     mds=off mmio_stale_data=off tsx_async_abort=off reg_file_data_sampling=off \
     noxsave nopcid noinvpcid nofsgsbase clearcpuid=cx16,smap,rdtscp,rdpid,popcnt";

/// The base kernel command line for skiff's micro-VMs: serial console,
/// `reboot=k` so a reboot resets through the i8042 (a clean VM exit),
/// `panic=-1` so a panic does too, and no i8042 port probing (there is no
/// keyboard or mouse behind it, and probing waits on timeouts).
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// What the host offers and what skiff picks for it.
#[derive(Clone, Debug)]
pub struct HostReport {
    /// The kind of KVM.
    pub kind: HostKind,
    /// Why we think so.
    pub evidence: String,
    /// The CPU template to use.
    #[cfg(target_arch = "x86_64")]
    pub template: CpuTemplate,
    /// Extra kernel parameters to use.
    pub extra_cmdline: &'static str,
}

impl HostReport {
    /// The kernel command line to boot with on this host.
    pub fn cmdline(&self) -> String {
        if self.extra_cmdline.is_empty() {
            BASE_CMDLINE.to_owned()
        } else {
            format!("{BASE_CMDLINE} {}", self.extra_cmdline)
        }
    }
}

/// Inspects `/dev/kvm`, `/sys/module` and `/proc/cpuinfo`.
pub fn detect() -> HostReport {
    detect_in(Path::new("/"))
}

/// [`detect`] against another root directory (for tests).
pub fn detect_in(root: &Path) -> HostReport {
    let kvm = root.join("dev/kvm");
    let pvm = root.join("sys/module/kvm_pvm");
    let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let (kind, evidence) = if !kvm.exists() {
        (HostKind::NoKvm, format!("{} does not exist", kvm.display()))
    } else if pvm.exists() {
        (HostKind::Pvm, format!("{} is loaded", pvm.display()))
    } else if hw {
        (
            HostKind::HardwareKvm,
            "cpu flags include vmx/svm".to_owned(),
        )
    } else {
        (
            HostKind::NoKvm,
            "/dev/kvm exists but neither vmx/svm nor kvm_pvm is present".to_owned(),
        )
    };
    HostReport {
        kind,
        evidence,
        #[cfg(target_arch = "x86_64")]
        template: if kind == HostKind::Pvm {
            CpuTemplate::PvmCompat
        } else {
            CpuTemplate::Default
        },
        extra_cmdline: if kind == HostKind::Pvm {
            PVM_CMDLINE
        } else {
            ""
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(kvm: bool, pvm: bool, flags: &str) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        if kvm {
            std::fs::create_dir_all(d.path().join("dev")).unwrap();
            std::fs::write(d.path().join("dev/kvm"), "").unwrap();
        }
        if pvm {
            std::fs::create_dir_all(d.path().join("sys/module/kvm_pvm")).unwrap();
        }
        std::fs::create_dir_all(d.path().join("proc")).unwrap();
        std::fs::write(
            d.path().join("proc/cpuinfo"),
            format!("flags\t\t: {flags}\n"),
        )
        .unwrap();
        d
    }

    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p =
                    std::env::temp_dir().join(format!("skiff-check-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn classifies_hosts() {
        let r = detect_in(fake_root(true, true, "fpu sse").path());
        assert_eq!(r.kind, HostKind::Pvm);
        assert!(r.extra_cmdline.contains("pvm_syscall_fixup"));
        assert!(r.cmdline().starts_with(BASE_CMDLINE));
        assert!(r.cmdline().ends_with(PVM_CMDLINE));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(r.template, CpuTemplate::PvmCompat);

        let r = detect_in(fake_root(true, false, "fpu vmx sse").path());
        assert_eq!(r.kind, HostKind::HardwareKvm);
        assert_eq!(r.extra_cmdline, "");
        assert_eq!(r.cmdline(), BASE_CMDLINE);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(r.template, CpuTemplate::Default);

        let r = detect_in(fake_root(false, false, "vmx").path());
        assert_eq!(r.kind, HostKind::NoKvm);
        let r = detect_in(fake_root(true, false, "fpu").path());
        assert_eq!(r.kind, HostKind::NoKvm);
    }
}
