//! The jailed VMM process with tiny hand-assembled guests: what the
//! process may reach, how its ends are reported, and the control channel.
//!
//! These need `/dev/kvm` and root (new namespaces, a cgroup); without them
//! each test says so and returns.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shim::vmm::jail::{JailConfig, JailError, JailedVm};
use shim::vmm::{
    BootProtocol, BootSource, DiskConfig, ExitReason, SerialOutput, VmConfig, VsockConfig,
};

mod common;
use common::kvm_available;

fn can_jail() -> bool {
    if !kvm_available() {
        return false;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: a jailed VMM needs root");
        return false;
    }
    true
}

/// Writes "J\n" to the UART, then spins.
fn spinner(root: &Path, disks: Vec<DiskConfig>) -> VmConfig {
    #[rustfmt::skip]
    let code = vec![
        0xba, 0xf8, 0x03,       // mov dx, 0x3f8
        0xb0, b'J', 0xee,       // mov al, 'J'; out dx, al
        0xb0, b'\n', 0xee,      // mov al, '\n'; out dx, al
        0xeb, 0xfe,             // jmp $
    ];
    VmConfig {
        vcpus: 1,
        mem_mib: 32,
        boot: BootSource::Raw {
            image: code,
            load_addr: 0x1000,
            protocol: BootProtocol::RealMode,
        },
        disks,
        // The muxer's socket file is removed at the VM's end, by the
        // control thread under its filter.
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: root.join("vsock.sock"),
        }),
        cpu_template: shim::check::detect().template,
        serial: SerialOutput::File(root.join("serial.log")),
        epoch: Instant::now(),
        rng: false,
        net: None,
        fs: None,
        seccomp: true,
    }
}

fn jail(root: &Path, name: &str) -> JailConfig {
    JailConfig {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_skiff")),
        ..JailConfig::new(root, &format!("{name}-{}", std::process::id()), name)
    }
}

fn status(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim_start_matches(':').trim())
        })
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_jailed_vmm_is_confined_and_reports_its_end() {
    if !can_jail() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let jail = jail(&root, "confined");
    let vm = JailedVm::start(&spinner(&root, vec![]), &jail).expect("the jailed VMM starts");
    let pid = vm.pid();
    wait_for("the guest's output", || {
        std::fs::read_to_string(root.join("serial.log")).is_ok_and(|s| s.contains("J\n"))
    });
    assert_eq!(vm.exit_reason(), None);

    let st = status(pid);
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&st, key), "0000000000000000", "{key}:\n{st}");
    }
    // Every thread of the VMM (the control thread, vmm-vsock, vcpu0; KVM's
    // own workers inherit the control thread's) runs under a seccomp
    // filter.
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
        let st = std::fs::read_to_string(dir.join("status")).unwrap();
        assert_eq!(field(&st, "Seccomp"), "2", "{}:\n{st}", comm.trim());
        names.push(comm.trim().to_owned());
    }
    assert_eq!(field(&st, "Seccomp"), "2", "control thread:\n{st}");
    for name in ["vmm-vsock", "vcpu0"] {
        assert!(names.iter().any(|n| n == name), "{names:?}");
    }
    assert_eq!(field(&st, "NoNewPrivs"), "1", "{st}");
    assert!(
        field(&st, "Uid").split_whitespace().all(|u| u == "65534"),
        "{st}"
    );
    assert!(
        field(&st, "Gid").split_whitespace().all(|g| g == "65534"),
        "{st}"
    );
    // PID 1 of its own PID namespace.
    assert_eq!(
        field(&st, "NSpid").split_whitespace().collect::<Vec<_>>(),
        [pid.to_string().as_str(), "1"],
        "{st}"
    );
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(ours, its, "the VMM shares our {ns} namespace");
    }
    // Its `/` is the jail root: the serial log and the vsock socket,
    // nothing of the host's.
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["serial.log", "vsock.sock"]);
    assert!(!Path::new(&format!("/proc/{pid}/root/run/containerd")).exists());
    // Its own cgroup.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroup.contains(&format!("/skiff/{}", jail.name)),
        "{cgroup}"
    );
    let comm = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(comm.starts_with("skiff-vmm\0"), "{comm:?}");

    vm.stop();
    let report = vm.wait();
    assert_eq!(report.exit, ExitReason::Stopped);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "not reaped");
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    assert!(!cgroups.is_empty());
    for line in cgroups.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap();
        for c in ["memory", "pids"] {
            let dir = Path::new("/sys/fs/cgroup")
                .join(c)
                .join(path.trim_start_matches('/'))
                .join("skiff")
                .join(&jail.name);
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }
}

#[test]
fn a_killed_vmm_is_reported_as_such() {
    if !can_jail() {
        return;
    }
    // SIGKILL: the VMM is its PID namespace's init, so signals it has no
    // handler for are ignored when sent from outside (a seccomp filter's
    // SIGSYS is forced by the kernel, not sent: see the forbidden-call test).
    let (signal, needle) = (nix::sys::signal::Signal::SIGKILL, "killed by SIGKILL");
    {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let vm = JailedVm::start(&spinner(&root, vec![]), &jail(&root, "killed")).unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(vm.pid()), signal).unwrap();
        let mut reason = None;
        wait_for("the death to be noticed", || {
            reason = vm.exit_reason();
            reason.is_some()
        });
        match reason.unwrap() {
            ExitReason::VmmDied(text) => assert!(text.contains(needle), "{text}"),
            other => panic!("{signal}: {other:?}"),
        }
        // Requests after the end are typed errors, and wait reports it too.
        let err = vm.set_disk(0, None).unwrap_err();
        assert!(
            matches!(err, JailError::Ended(ExitReason::VmmDied(_))),
            "{err}"
        );
        assert!(matches!(vm.wait().exit, ExitReason::VmmDied(_)));
    }
}

#[test]
fn disks_cross_the_control_channel_and_bad_input_is_a_clear_error() {
    if !can_jail() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let vm = JailedVm::start(
        &spinner(&root, vec![DiskConfig::empty()]),
        &jail(&root, "disks"),
    )
    .unwrap();
    let image = root.join("image-0.ext4");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    vm.set_disk(0, Some(&DiskConfig::file(&image))).unwrap();
    // The slot is taken: a second medium is refused, by the VMM.
    let err = vm.set_disk(0, Some(&DiskConfig::file(&image))).unwrap_err();
    assert!(matches!(err, JailError::Failed(_)), "{err}");
    vm.set_disk(0, None).unwrap();
    let empty = root.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let err = vm.set_disk(0, Some(&DiskConfig::file(&empty))).unwrap_err();
    assert!(err.to_string().contains("failed"), "{err}");
    let err = vm.set_disk(7, None).unwrap_err();
    assert!(matches!(err, JailError::Failed(_)), "{err}");
    let err = vm
        .set_disk(0, Some(&DiskConfig::file(root.join("missing.img"))))
        .unwrap_err();
    assert!(matches!(err, JailError::Disk { .. }), "{err}");
    // Still running after all that.
    assert_eq!(vm.exit_reason(), None);
    vm.stop();
    assert_eq!(vm.wait().exit, ExitReason::Stopped);

    // A kernel that is not there: the VMM says so, and is gone.
    let mut bad = spinner(&root, vec![]);
    bad.boot = BootSource::Kernel(shim::vmm::KernelSpec {
        kernel: "/nonexistent/vmlinux".into(),
        initrd: None,
        cmdline: String::new(),
    });
    let err = JailedVm::start(&bad, &jail(&root, "bad")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    // A binary that is not there.
    let missing = JailConfig {
        exe: "/nonexistent/skiff".into(),
        ..jail(&root, "missing")
    };
    let err = JailedVm::start(&spinner(&root, vec![]), &missing).unwrap_err();
    assert!(err.to_string().contains("127"), "{err}");
}

/// Writes the test panic port (test builds only), then spins.
fn panicker(root: &Path) -> VmConfig {
    writes_port(root, shim::vmm::TEST_PANIC_PORT)
}

/// Writes `port`, then spins.
fn writes_port(root: &Path, port: u16) -> VmConfig {
    let [lo, hi] = port.to_le_bytes();
    VmConfig {
        boot: BootSource::Raw {
            #[rustfmt::skip]
            image: vec![
                0xba, lo, hi,   // mov dx, port
                0xee,           // out dx, al
                0xeb, 0xfe,     // jmp $
            ],
            load_addr: 0x1000,
            protocol: BootProtocol::RealMode,
        },
        ..spinner(root, vec![])
    }
}

#[test]
fn a_panicking_vcpu_thread_ends_the_vm_inline_and_jailed() {
    if !can_jail() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let expect = |exit: ExitReason| match exit {
        ExitReason::VcpuError(text) => assert!(text.contains("panicked"), "{text}"),
        other => panic!("{other:?}"),
    };
    let inline = shim::vmm::Vm::start(panicker(&root)).unwrap();
    expect(inline.wait().exit);
    let jailed = JailedVm::start(&panicker(&root), &jail(&root, "panic")).unwrap();
    expect(jailed.wait().exit);
}

/// A guest that drives the VMM into a system call its filter forbids (a
/// test-build port: the vCPU thread calls `getppid`) kills the jailed VMM
/// with SIGSYS, reported as a seccomp denial; with the filters off, the
/// same call returns and the VM ends with the port's own error.
#[test]
fn a_forbidden_system_call_kills_the_jailed_vmm_and_is_reported() {
    if !can_jail() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let forbidden = writes_port(&root, shim::vmm::TEST_FORBIDDEN_SYSCALL_PORT);
    // The guest's first instruction makes the call: the VMM may die before
    // its start is even answered.
    let exit = match JailedVm::start(&forbidden, &jail(&root, "sigsys")) {
        Ok(jailed) => jailed.wait().exit,
        Err(JailError::Ended(exit)) => exit,
        Err(e) => panic!("{e:#?}"),
    };
    match exit {
        ExitReason::VmmDied(text) => {
            assert!(
                text.contains("SIGSYS") && text.contains("seccomp"),
                "{text}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The control: no filter, no death (a fresh root: the killed VMM
    // left its vsock socket).
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let forbidden = writes_port(&root, shim::vmm::TEST_FORBIDDEN_SYSCALL_PORT);
    let mut unfiltered = jail(&root, "nosigsys");
    unfiltered.seccomp = false;
    let exit = match JailedVm::start(&forbidden, &unfiltered) {
        Ok(jailed) => jailed.wait().exit,
        Err(JailError::Ended(exit)) => exit,
        Err(e) => panic!("{e:#?}"),
    };
    match exit {
        ExitReason::VcpuError(text) => assert!(text.contains("no filter?"), "{text}"),
        other => panic!("{other:?}"),
    }
}
