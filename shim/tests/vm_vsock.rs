//! The vsock device in a real VM: a tiny guest reads its virtio-mmio
//! registers and config space, a host process connects to the hybrid vsock
//! socket, and the VM's teardown closes everything. (Data transfer needs a
//! guest kernel with a vsock driver; `vmm::vsock`'s loopback unit test
//! drives the device and the muxer with a fake guest driver instead.)
//!
//! Needs `/dev/kvm`; without it the test says so and returns.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shim::vmm::{self, BootProtocol, BootSource, ExitReason, SerialOutput, VmConfig, VsockConfig};

mod common;
use common::kvm_available;

/// CPU ticks (user + system) the thread named `name` has used.
fn thread_ticks(name: &str) -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // Fields after the parenthesised comm: state is field 3, utime 14.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        return Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?);
    }
    None
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn vsock_device_is_wired_and_torn_down() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("skiff-vm-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("vm.sock");
    let before = fds();

    #[rustfmt::skip]
    let code = vec![
        0xba, 0xf8, 0x03, 0x00, 0x00,             // mov edx, 0x3f8
        0xa1, 0x08, 0x10, 0x00, 0xd0,             // mov eax, [0xd0001008] (DeviceID)
        0x04, b'0', 0xee,                          // add al, '0'; out dx, al
        0xa1, 0x00, 0x11, 0x00, 0xd0,             // mov eax, [0xd0001100] (guest_cid)
        0xee,                                      // out dx, al
        0xb0, b'\n', 0xee,                         // mov al, '\n'; out dx, al
        0xeb, 0xfe,                                // jmp $
    ];
    let out = Arc::new(Mutex::new(Vec::new()));
    let cfg = VmConfig {
        vcpus: 1,
        mem_mib: 32,
        boot: BootSource::Raw {
            image: code,
            load_addr: 0x10_0000,
            protocol: BootProtocol::Pvh,
        },
        disks: vec![],
        vsock: Some(VsockConfig {
            guest_cid: u64::from(b'A'),
            uds_path: uds.clone(),
        }),
        cpu_template: shim::check::detect().template,
        serial: SerialOutput::Buffer(out.clone()),
        epoch: Instant::now(),
    };
    let vm = vmm::Vm::start(cfg).expect("VM starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !out.lock().unwrap().ends_with(b"\n") {
        assert!(Instant::now() < deadline, "guest never wrote its line");
        std::thread::sleep(Duration::from_millis(10));
    }
    // virtio device 19 ('0' + 19 = 'C'), guest CID 'A'.
    assert_eq!(&*out.lock().unwrap(), b"CA\n");
    assert!(uds.exists(), "the muxer listens");

    // A host process connects; the guest has no driver, so it waits for
    // an answer that never comes, and the device thread must not spin.
    let mut client = UnixStream::connect(&uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let mut junk = UnixStream::connect(&uds).unwrap();
    junk.write_all(b"NOT A HANDSHAKE\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t0 = thread_ticks("devices").expect("device thread");
    std::thread::sleep(Duration::from_millis(500));
    let t1 = thread_ticks("devices").expect("device thread");
    assert!(
        t1 - t0 < 10,
        "device thread busy: {} ticks in 500 ms",
        t1 - t0
    );
    let mut b = [0u8; 16];
    let n = junk.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "a bad handshake is closed");

    vm.stop();
    let report = vm.wait();
    assert_eq!(report.exit, ExitReason::Stopped);
    // The VM's end closes the host side and removes the socket.
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(client.read(&mut b).unwrap_or(0), 0);
    assert!(!uds.exists(), "socket removed");
    drop((client, junk));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(fds() <= before, "fds before {before} after {}", fds());
}
