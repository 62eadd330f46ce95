//! Tiny hand-assembled guests on the real VM runner: the run loop, port and
//! MMIO exits, UART output, the boot timer, and the ways a VM ends.
//!
//! These need `/dev/kvm`; without it each test says so and returns.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use shim::vmm::{self, BootProtocol, BootSource, CpuTemplate, ExitReason, SerialOutput, VmConfig};

mod common;
use common::kvm_available;

fn config(
    image: Vec<u8>,
    load_addr: u64,
    protocol: BootProtocol,
) -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let template = shim::check::detect().template;
    (
        VmConfig {
            vcpus: 1,
            mem_mib: 32,
            boot: BootSource::Raw {
                image,
                load_addr,
                protocol,
            },
            disks: vec![],
            vsock: None,
            cpu_template: template,
            serial: SerialOutput::Buffer(out.clone()),
            epoch: Instant::now(),
            seccomp: true,
        },
        out,
    )
}

fn serial(out: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&out.lock().unwrap()).into_owned()
}

/// Counts this process's threads and open fds.
fn threads_and_fds() -> (usize, usize) {
    let threads = std::fs::read_dir("/proc/self/task").unwrap().count();
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    (threads, fds)
}

#[test]
fn real_mode_uart_output_then_i8042_reset() {
    if !kvm_available() {
        return;
    }
    #[rustfmt::skip]
    let code = vec![
        0xba, 0xf8, 0x03,       // mov dx, 0x3f8
        0xb0, b'H', 0xee,       // mov al, 'H'; out dx, al
        0xb0, b'i', 0xee,       // mov al, 'i'; out dx, al
        0xb0, b'\n', 0xee,      // mov al, '\n'; out dx, al
        0xe4, 0x64,             // in al, 0x64 (i8042 status)
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al (reset)
        0xf4,                   // hlt (never reached)
    ];
    let (cfg, out) = config(code, 0x1000, BootProtocol::RealMode);
    let report = vmm::run(cfg).expect("VM runs");
    assert_eq!(report.exit, ExitReason::Reset, "serial: {}", serial(&out));
    assert_eq!(serial(&out), "Hi\n");
    assert!(report.first_entry.is_some());
    assert!(report.boot_timer.is_none());
}

#[test]
fn protected_mode_mmio_boot_timer_and_shutdown() {
    if !kvm_available() {
        return;
    }
    #[rustfmt::skip]
    let code = vec![
        0xc6, 0x05, 0x00, 0x00, 0x00, 0xd0, 123, // mov byte [0xd0000000], 123
        0xa1, 0x00, 0x00, 0x00, 0xd0,             // mov eax, [0xd0000000] (reads 0)
        0xba, 0xf8, 0x03, 0x00, 0x00,             // mov edx, 0x3f8
        0x04, b'0', 0xee,                          // add al, '0'; out dx, al
        0xb0, b'\n', 0xee,                         // mov al, '\n'; out dx, al
        0x0f, 0x0b,                                // ud2: no IDT, so a triple fault
    ];
    let (cfg, out) = config(code, 0x10_0000, BootProtocol::Pvh);
    let report = vmm::run(cfg).expect("VM runs");
    assert_eq!(
        report.exit,
        ExitReason::Shutdown,
        "serial: {}",
        serial(&out)
    );
    assert_eq!(serial(&out), "0\n");
    let t = report.boot_timer.expect("boot timer recorded");
    assert!(t >= report.first_entry.unwrap());
}

#[test]
fn long_mode_uart_then_triple_fault() {
    if !kvm_available() {
        return;
    }
    #[rustfmt::skip]
    let code = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'L', 0xee,       // mov al, 'L'; out dx, al
        0xb0, b'\n', 0xee,      // mov al, '\n'; out dx, al
        0x0f, 0x0b,             // ud2
    ];
    let (cfg, out) = config(code, 0x10_0000, BootProtocol::Linux64);
    let report = vmm::run(cfg).expect("VM runs");
    assert_eq!(
        report.exit,
        ExitReason::Shutdown,
        "serial: {}",
        serial(&out)
    );
    assert_eq!(serial(&out), "L\n");
}

/// The `Seccomp:` line of each VMM thread (`vcpuN`, `vmm-<device>`) of this
/// process, by thread name.
fn vmm_thread_seccomp_modes() -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        // A thread may end while we look.
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue;
        };
        let name = comm.trim().to_owned();
        if !(name.starts_with("vcpu") || name.starts_with("vmm-")) {
            continue;
        }
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_owned();
        modes.push((name, mode));
    }
    modes
}

/// Every VMM thread runs under its filter (mode 2). Other tests' VMs run
/// in parallel threads and may be between spawning a thread and its
/// filter, so a straggler gets a moment.
fn every_vmm_thread_is_filtered() {
    let mut modes = vmm_thread_seccomp_modes();
    for _ in 0..100 {
        if modes.iter().all(|(_, mode)| mode == "2") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        modes = vmm_thread_seccomp_modes();
    }
    assert!(modes.iter().any(|(n, _)| n == "vcpu0"), "{modes:?}");
    assert!(modes.iter().any(|(n, _)| n == "vmm-blk0"), "{modes:?}");
    assert!(modes.iter().all(|(_, mode)| mode == "2"), "{modes:?}");
    // The test's own thread is not filtered.
    let ours = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert!(ours.contains("Seccomp:\t0\n"), "{ours}");
}

#[test]
fn host_stop_ends_a_spinning_guest_and_leaks_nothing() {
    if !kvm_available() {
        return;
    }
    let before = threads_and_fds();
    let (mut cfg, _out) = config(vec![0xeb, 0xfe], 0x1000, BootProtocol::RealMode); // jmp $
                                                                                    // An empty disk slot, so that a device thread (`vmm-blk0`) runs too.
    cfg.disks = vec![vmm::DiskConfig {
        path: None,
        read_only: true,
    }];
    let vm = vmm::Vm::start(cfg).expect("VM starts");
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!vm.has_exited());
    every_vmm_thread_is_filtered();
    vm.stop();
    let report = vm.wait();
    assert_eq!(report.exit, ExitReason::Stopped);
    // Threads and fds are released once the VM is gone (other tests run in
    // parallel threads, so allow for their churn by retrying briefly).
    let mut after = threads_and_fds();
    for _ in 0..50 {
        if after.1 <= before.1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        after = threads_and_fds();
    }
    assert!(after.1 <= before.1, "fds before {before:?} after {after:?}");
}

#[test]
fn bad_configs_are_clear_errors() {
    if !kvm_available() {
        return;
    }
    let (mut cfg, _) = config(vec![0xf4], 0x1000, BootProtocol::RealMode);
    cfg.vcpus = 0;
    let e = vmm::run(cfg).unwrap_err();
    assert!(e.to_string().contains("vCPUs"), "{e}");

    let (mut cfg, _) = config(vec![0xf4], 0x1000, BootProtocol::RealMode);
    cfg.mem_mib = 1;
    let e = vmm::run(cfg).unwrap_err();
    assert!(e.to_string().contains("too small"), "{e}");

    let (cfg, _) = config(vec![0xf4; 64], (32 << 20) - 16, BootProtocol::RealMode);
    let e = vmm::run(cfg).unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");

    let (mut cfg, _) = config(vec![], 0, BootProtocol::RealMode);
    cfg.boot = BootSource::Kernel(vmm::KernelSpec {
        kernel: "/nonexistent/vmlinux".into(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
    });
    let e = vmm::run(cfg).unwrap_err();
    assert!(format!("{e:#}").contains("/nonexistent/vmlinux"), "{e}");
    let _ = CpuTemplate::Default;
}

#[test]
fn protected_mode_reads_virtio_mmio_registers() {
    if !kvm_available() {
        return;
    }
    let disk = std::env::temp_dir().join(format!("skiff-tiny-disk-{}", std::process::id()));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    #[rustfmt::skip]
    let code = vec![
        0xba, 0xf8, 0x03, 0x00, 0x00,             // mov edx, 0x3f8
        0xa1, 0x00, 0x10, 0x00, 0xd0,             // mov eax, [0xd0001000] (MagicValue)
        0xee, 0xc1, 0xe8, 0x08,                   // out dx, al; shr eax, 8
        0xee, 0xc1, 0xe8, 0x08,                   // out dx, al; shr eax, 8
        0xee, 0xc1, 0xe8, 0x08,                   // out dx, al; shr eax, 8
        0xee,                                     // out dx, al
        0xa1, 0x08, 0x10, 0x00, 0xd0,             // mov eax, [0xd0001008] (DeviceID)
        0x04, b'0', 0xee,                          // add al, '0'; out dx, al
        0xa1, 0x04, 0x10, 0x00, 0xd0,             // mov eax, [0xd0001004] (Version)
        0x04, b'0', 0xee,                          // add al, '0'; out dx, al
        0xb0, b'\n', 0xee,                         // mov al, '\n'; out dx, al
        0xb0, 0xfe, 0xe6, 0x64,                    // reset through the i8042
    ];
    let (mut cfg, out) = config(code, 0x10_0000, BootProtocol::Pvh);
    cfg.disks = vec![vmm::DiskConfig {
        path: Some(disk.clone()),
        read_only: true,
    }];
    let report = vmm::run(cfg).expect("VM runs");
    let _ = std::fs::remove_file(&disk);
    assert_eq!(report.exit, ExitReason::Reset, "serial: {}", serial(&out));
    assert_eq!(serial(&out), "virt22\n");
}

#[test]
fn missing_disk_is_a_clear_error() {
    if !kvm_available() {
        return;
    }
    let (mut cfg, _) = config(vec![0xf4], 0x1000, BootProtocol::RealMode);
    cfg.disks = vec![vmm::DiskConfig {
        path: Some("/nonexistent/disk.img".into()),
        read_only: false,
    }];
    let e = vmm::run(cfg).unwrap_err();
    assert!(format!("{e:#}").contains("/nonexistent/disk.img"), "{e}");
}
