//! One real Linux boot on skiff's VMM: our kernel (PVH `vmlinux`), our
//! initramfs and a virtio-blk disk. Slow on a PVM host (~30 s), so it boots
//! once and asserts everything from that one serial log.
//!
//! Needs `SKIFF_TEST_KERNEL` and `SKIFF_TEST_INITRD` (scripts/test builds
//! both from guest-image/ and sets them). Without them the test says so and
//! returns — except under CI, where that is a failure.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shim::check::{self, HostKind};
use shim::vmm::{self, BootSource, DiskConfig, ExitReason, KernelSpec, SerialOutput, VmConfig};

const DISK_SECTORS: u64 = 16384; // 8 MiB

fn artifacts() -> Option<(PathBuf, PathBuf)> {
    let k = std::env::var_os("SKIFF_TEST_KERNEL");
    let i = std::env::var_os("SKIFF_TEST_INITRD");
    match (k, i) {
        (Some(k), Some(i)) => Some((k.into(), i.into())),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set SKIFF_TEST_KERNEL and SKIFF_TEST_INITRD (scripts/test does)"
            );
            eprintln!("skipped: SKIFF_TEST_KERNEL / SKIFF_TEST_INITRD not set (run scripts/test)");
            None
        }
    }
}

#[test]
fn linux_boots_to_init_with_a_virtio_disk() {
    let Some((kernel, initrd)) = artifacts() else {
        return;
    };
    let host = check::detect();
    if host.kind == HostKind::NoKvm {
        eprintln!("skipped: no KVM on this host ({})", host.evidence);
        return;
    }
    eprintln!("booting on {} with template {}", host.kind, host.template);
    let disk = std::env::temp_dir().join(format!("skiff-linux-disk-{}", std::process::id()));
    std::fs::write(&disk, vec![0u8; (DISK_SECTORS * 512) as usize]).unwrap();

    let cmdline = host.cmdline();
    let out = Arc::new(Mutex::new(Vec::new()));
    let before = (
        std::fs::read_dir("/proc/self/task").unwrap().count(),
        std::fs::read_dir("/proc/self/fd").unwrap().count(),
    );
    let report = vmm::run(VmConfig {
        vcpus: 1,
        mem_mib: 128,
        boot: BootSource::Kernel(KernelSpec {
            kernel,
            initrd: Some(initrd),
            cmdline,
        }),
        disks: vec![DiskConfig {
            path: Some(disk.clone()),
            read_only: false,
        }],
        vsock: None,
        cpu_template: host.template,
        serial: SerialOutput::Buffer(out.clone()),
        epoch: Instant::now(),
        rng: false,
        net: None,
        fs: None,
        seccomp: true,
    })
    .expect("the VM runs");
    let _ = std::fs::remove_file(&disk);
    let log = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    eprintln!("--- serial ---\n{log}\n--- end ---\n{report:?}");

    assert!(log.contains("Linux version 6."), "kernel banner");
    assert!(
        log.contains(&format!(
            "virtio_blk virtio0: [vda] {DISK_SECTORS} 512-byte logical blocks"
        )),
        "the disk was probed with our capacity"
    );
    assert!(log.contains("Run /init as init process"), "init started");
    assert!(log.contains("skiff-init: hello from the guest"), "init ran");
    assert!(report.boot_timer.is_some(), "init wrote the boot timer");
    assert!(report.boot_timer > report.first_entry);
    assert_eq!(
        report.exit,
        ExitReason::Reset,
        "clean VM exit through the i8042"
    );
    assert!(!log.contains("Kernel panic"));
    let after = (
        std::fs::read_dir("/proc/self/task").unwrap().count(),
        std::fs::read_dir("/proc/self/fd").unwrap().count(),
    );
    assert!(
        after.0 <= before.0 && after.1 <= before.1,
        "{before:?} -> {after:?}"
    );
}
