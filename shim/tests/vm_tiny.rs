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
            rng: false,
            net: None,
            fs: None,
            seccomp: true,
        },
        out,
    )
}

fn serial(out: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&out.lock().unwrap()).into_owned()
}

/// Held by the fd-leak check and by the tests whose VMs live for seconds
/// (their fds would count as the check's leak).
static LONG_VMS: Mutex<()> = Mutex::new(());

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
    let _alone = LONG_VMS.lock().unwrap_or_else(|e| e.into_inner());
    let before = threads_and_fds();
    // `jmp $`, and an empty disk slot, so that a device thread
    // (`vmm-blk0`) runs too.
    let (mut cfg, _out) = config(vec![0xeb, 0xfe], 0x1000, BootProtocol::RealMode);
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
    for _ in 0..250 {
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

/// A 64-bit guest that writes `A\n` … `Z\n` to the UART, `cycles` TSC
/// cycles apart (time, not a count of instructions: under PVM a loop runs
/// trapped and slow, on hardware fast), then resets through the i8042.
fn alphabet(cycles: u32) -> Vec<u8> {
    let c = cycles.to_le_bytes();
    #[rustfmt::skip]
    let code = vec![
        0xb3, b'A',                               //  0: mov bl, 'A'
        0x66, 0xba, 0xf8, 0x03,                   //  2: next: mov dx, 0x3f8 (rdtsc takes edx)
        0x88, 0xd8,                               //  6: mov al, bl
        0xee,                                     //  8: out dx, al
        0xb0, b'\n', 0xee,                        //  9: mov al, '\n'; out dx, al
        0x0f, 0x31,                               // 12: rdtsc
        0x48, 0xc1, 0xe2, 0x20,                   // 14: shl rdx, 32
        0x48, 0x09, 0xd0,                         // 18: or rax, rdx
        0x48, 0x8d, 0xb0, c[0], c[1], c[2], c[3], // 21: lea rsi, [rax + cycles]
        0x0f, 0x31,                               // 28: spin: rdtsc
        0x48, 0xc1, 0xe2, 0x20,                   // 30: shl rdx, 32
        0x48, 0x09, 0xd0,                         // 34: or rax, rdx
        0x48, 0x39, 0xf0,                         // 37: cmp rax, rsi
        0x72, 0xf2,                               // 40: jb spin
        0xfe, 0xc3,                               // 42: inc bl
        0x80, 0xfb, b'Z' + 1,                     // 44: cmp bl, 'Z' + 1
        0x75, 0xd1,                               // 47: jne next
        0xb0, 0xfe, 0xe6, 0x64,                   // 49: mov al, 0xfe; out 0x64, al
        0xeb, 0xfe,                               // 53: jmp $
    ];
    code
}

/// The letters a run of [`alphabet`] wrote, one per non-empty line.
fn letters(out: &Arc<Mutex<Vec<u8>>>) -> String {
    serial(out).lines().filter(|l| !l.is_empty()).collect()
}

/// A VM snapshotted mid-run (vCPU registers, irqchip, PIT, clock, UART
/// and i8042 state, guest memory) carries on to its end, and two VMs
/// restored from the snapshot (memory mapped copy on write from its file)
/// carry on from where it was: the same letters, to the same reset. A
/// snapshot that does not fit the config (memory, devices), or is corrupt,
/// is a typed error.
#[test]
fn a_snapshot_restores_into_vms_that_carry_on() {
    if !kvm_available() {
        return;
    }
    // About 40-70 ms a letter at 2-3 GHz: the whole run takes 1-2 s.
    const CYCLES: u32 = 0x0800_0000;
    let _alone = LONG_VMS.lock().unwrap_or_else(|e| e.into_inner());
    let (cfg, out) = config(alphabet(CYCLES), 0x10_0000, BootProtocol::Linux64);
    let vm = vmm::Vm::start(cfg).expect("VM starts");
    let t = Instant::now();
    while !letters(&out).starts_with('A') {
        assert!(t.elapsed().as_secs() < 60, "no A: {}", serial(&out));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let t = Instant::now();
    vm.snapshot(&snap).expect("snapshot");
    eprintln!("snapshot taken in {:?}", t.elapsed());
    let report = vm.wait();
    assert_eq!(report.exit, ExitReason::Reset, "serial: {}", serial(&out));
    let all: String = ('A'..='Z').collect();
    assert_eq!(letters(&out), all, "the snapshot's pause lost nothing");
    let memory = std::fs::metadata(snap.join(vmm::snapshot::MEMORY_FILE)).unwrap();
    assert_eq!(memory.len(), 32 << 20);
    // Sparse: the pages the guest never wrote are holes.
    use std::os::unix::fs::MetadataExt;
    assert!(
        memory.blocks() * 512 < (8 << 20),
        "{} blocks",
        memory.blocks()
    );

    let mut restored = Vec::new();
    for _ in 0..2 {
        let (cfg, out) = config(vec![0xf4], 0x1000, BootProtocol::RealMode);
        let t = Instant::now();
        let vm = vmm::Vm::restore(cfg, &snap)
            .and_then(|vm| vm.start())
            .expect("restore");
        eprintln!("restored in {:?}", t.elapsed());
        assert_eq!(
            vm.wait().exit,
            ExitReason::Reset,
            "serial: {}",
            serial(&out)
        );
        let got = letters(&out);
        assert!(
            !got.is_empty() && all.ends_with(&got) && !got.starts_with('A'),
            "a restored VM carries on from the snapshot: {got:?}"
        );
        restored.push(got);
    }
    assert_eq!(restored[0], restored[1], "both restores carry on alike");

    // Errors: another memory size, a corrupt state file, other devices.
    let (mut cfg, _) = config(vec![0xf4], 0x1000, BootProtocol::RealMode);
    cfg.mem_mib = 64;
    let e = vmm::Vm::restore(cfg, &snap).err().expect("a mismatch");
    assert!(format!("{e:?}").contains("Mismatch"), "{e:?}");
    let (mut cfg, _) = config(vec![0xf4], 0x1000, BootProtocol::RealMode);
    cfg.disks = vec![vmm::DiskConfig::empty()];
    let e = vmm::Vm::restore(cfg, &snap)
        .err()
        .expect("another device set");
    assert!(format!("{e:?}").contains("device state sections"), "{e:?}");
    let state = snap.join(vmm::snapshot::STATE_FILE);
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x01;
    std::fs::write(&state, &bytes).unwrap();
    let (cfg, _) = config(vec![0xf4], 0x1000, BootProtocol::RealMode);
    let e = vmm::Vm::restore(cfg, &snap).err().expect("corrupt");
    assert!(format!("{e:?}").contains("Corrupt"), "{e:?}");
    // A VM with virtio devices (an empty disk slot, an rng) snapshots and
    // restores into one with the same devices.
    let (mut cfg, _) = config(vec![0xeb, 0xfe], 0x1000, BootProtocol::RealMode);
    cfg.disks = vec![vmm::DiskConfig::empty()];
    cfg.rng = true;
    let vm = vmm::Vm::start(cfg).unwrap();
    let virtio = dir.path().join("virtio");
    vm.snapshot(&virtio)
        .expect("a VM with virtio devices snapshots");
    vm.stop();
    assert_eq!(vm.wait().exit, ExitReason::Stopped);
    let (mut cfg, _) = config(vec![0xf4], 0x1000, BootProtocol::RealMode);
    cfg.disks = vec![vmm::DiskConfig::empty()];
    cfg.rng = true;
    let vm = vmm::Vm::restore(cfg, &virtio)
        .and_then(|vm| vm.start())
        .expect("restores with the same devices");
    vm.stop();
    assert_eq!(vm.wait().exit, ExitReason::Stopped);
}
