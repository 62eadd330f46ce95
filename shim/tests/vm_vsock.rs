//! The vsock device in a real VM with tiny hand-written guests: one reads
//! its virtio-mmio registers and config space while a host process
//! connects to the hybrid vsock socket, and the VM's teardown closes
//! everything; another drives the device as a misbehaving driver would.
//! (Data transfer with a Linux guest: `vm_handler.rs`.)
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
        rng: false,
        net: None,
        fs: None,
        seccomp: true,
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
    let t0 = thread_ticks("vmm-vsock").expect("vsock device thread");
    std::thread::sleep(Duration::from_millis(500));
    let t1 = thread_ticks("vmm-vsock").expect("vsock device thread");
    assert!(
        t1 - t0 < 10,
        "vsock device thread busy: {} ticks in 500 ms",
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

/// `mov dword [addr], value` in 32-bit code.
fn store32(code: &mut Vec<u8>, addr: u32, value: u32) {
    code.extend_from_slice(&[0xc7, 0x05]);
    code.extend_from_slice(&addr.to_le_bytes());
    code.extend_from_slice(&value.to_le_bytes());
}

/// Writes `bytes` at guest address `addr` of an image loaded at `base`.
fn place(image: &mut Vec<u8>, base: u32, addr: u32, bytes: &[u8]) {
    let at = (addr - base) as usize;
    if image.len() < at + bytes.len() {
        image.resize(at + bytes.len(), 0);
    }
    image[at..at + bytes.len()].copy_from_slice(bytes);
}

/// A split-virtqueue descriptor.
fn descriptor(addr: u64, len: u32, flags: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&0u16.to_le_bytes());
    d
}

/// A guest driver that misbehaves: a tiny 32-bit guest brings the vsock
/// device up by hand (status, features, an rx and a tx queue) and sends a
/// packet with an operation that does not exist. The device must answer
/// with an RST to the sender's port on the rx queue, and the VM (and the
/// host) carry on. The guest prints the op and port low byte it got back.
#[test]
fn garbage_from_the_guest_driver_is_answered_with_rst() {
    if !kvm_available() {
        return;
    }
    const BASE: u32 = 0x10_0000;
    const MMIO: u32 = 0xd000_1000;
    const GUEST_CID: u64 = 3;
    // Queue layouts (16 entries): rx at 0x101000, tx at 0x102000; the rx
    // buffer at 0x103000, the bad packet at 0x104000.
    let (rx_desc, tx_desc, rx_buf, tx_pkt) =
        (0x10_1000u32, 0x10_2000u32, 0x10_3000u32, 0x10_4000u32);
    let mut code = Vec::new();
    for status in [1, 3] {
        store32(&mut code, MMIO + 0x70, status); // ACKNOWLEDGE, DRIVER
    }
    store32(&mut code, MMIO + 0x24, 1); // DriverFeaturesSel = 1
    store32(&mut code, MMIO + 0x20, 1); // VIRTIO_F_VERSION_1 (bit 32)
    store32(&mut code, MMIO + 0x70, 11); // FEATURES_OK
    for (queue, desc) in [(0, rx_desc), (1, tx_desc)] {
        store32(&mut code, MMIO + 0x30, queue); // QueueSel
        store32(&mut code, MMIO + 0x38, 16); // QueueNum
        store32(&mut code, MMIO + 0x80, desc); // QueueDesc
        store32(&mut code, MMIO + 0x90, desc + 0x100); // QueueDriver (avail)
        store32(&mut code, MMIO + 0xa0, desc + 0x200); // QueueDevice (used)
        store32(&mut code, MMIO + 0x44, 1); // QueueReady
    }
    store32(&mut code, MMIO + 0x70, 15); // DRIVER_OK
    store32(&mut code, MMIO + 0x50, 0); // notify rx
    store32(&mut code, MMIO + 0x50, 1); // notify tx
    #[rustfmt::skip]
    code.extend_from_slice(&[
        0x0f, 0xb7, 0x05, 0x02, 0x12, 0x10, 0x00, // wait: movzx eax, word [rx used.idx]
        0xf3, 0x90,                               // pause
        0x85, 0xc0,                               // test eax, eax
        0x74, 0xf3,                               // jz wait
        0xba, 0xf8, 0x03, 0x00, 0x00,             // mov edx, 0x3f8
        0xa0, 0x1e, 0x30, 0x10, 0x00,             // mov al, [rx_buf + 30] (op)
        0x04, b'0', 0xee,                         // add al, '0'; out dx, al
        0xa0, 0x14, 0x30, 0x10, 0x00,             // mov al, [rx_buf + 20] (dst_port)
        0xee,                                     // out dx, al
        0xb0, b'\n', 0xee,                        // mov al, '\n'; out dx, al
        0xeb, 0xfe,                               // jmp $
    ]);
    let mut image = code;
    // rx: one 4 KiB device-writable buffer, offered.
    place(
        &mut image,
        BASE,
        rx_desc,
        &descriptor(rx_buf.into(), 4096, 2),
    );
    place(&mut image, BASE, rx_desc + 0x100, &[0, 0, 1, 0, 0, 0]);
    place(&mut image, BASE, rx_buf, &[0u8; 4096]);
    // tx: one 44-byte header with op 0x77 from guest port 'p' to host port 9.
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&GUEST_CID.to_le_bytes()); // src_cid
    hdr.extend_from_slice(&2u64.to_le_bytes()); // dst_cid (host)
    hdr.extend_from_slice(&u32::from(b'p').to_le_bytes()); // src_port
    hdr.extend_from_slice(&9u32.to_le_bytes()); // dst_port
    hdr.extend_from_slice(&0u32.to_le_bytes()); // len
    hdr.extend_from_slice(&1u16.to_le_bytes()); // type: stream
    hdr.extend_from_slice(&0x77u16.to_le_bytes()); // op: no such operation
    hdr.extend_from_slice(&[0u8; 12]); // flags, buf_alloc, fwd_cnt
    assert_eq!(hdr.len(), 44);
    place(&mut image, BASE, tx_desc, &descriptor(tx_pkt.into(), 44, 0));
    place(&mut image, BASE, tx_desc + 0x100, &[0, 0, 1, 0, 0, 0]);
    place(&mut image, BASE, tx_desc + 0x200, &[0u8; 8]);
    place(&mut image, BASE, tx_pkt, &hdr);
    place(&mut image, BASE, rx_desc + 0x200, &[0u8; 8 + 16 * 8]);

    let dir = tempfile::tempdir().unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let cfg = VmConfig {
        vcpus: 1,
        mem_mib: 32,
        boot: BootSource::Raw {
            image,
            load_addr: BASE.into(),
            protocol: BootProtocol::Pvh,
        },
        disks: vec![],
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: dir.path().join("vm.sock"),
        }),
        cpu_template: shim::check::detect().template,
        serial: SerialOutput::Buffer(out.clone()),
        epoch: Instant::now(),
        rng: false,
        net: None,
        fs: None,
        seccomp: true,
    };
    let vm = vmm::Vm::start(cfg).expect("VM starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !out.lock().unwrap().ends_with(b"\n") {
        assert!(
            Instant::now() < deadline,
            "no answer on the rx queue; serial: {:?}",
            String::from_utf8_lossy(&out.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // RST is op 3; it goes back to the sender's port 'p'.
    assert_eq!(&*out.lock().unwrap(), b"3p\n");
    assert!(!vm.has_exited(), "the VM carries on");
    vm.stop();
    assert_eq!(vm.wait().exit, ExitReason::Stopped);
}
