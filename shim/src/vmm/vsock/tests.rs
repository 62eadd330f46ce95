//! The muxer and the `vmm-core` device together, with a fake guest driver
//! in memory and real host processes (threads) on the unix sockets.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vmm_core::devices::vsock::mock::{MockVsockDriver, MOCK_MAX_PAYLOAD, MOCK_MEM_SIZE};
use vmm_core::devices::vsock::{
    PacketHeader, Vsock, HEADER_SIZE, VIRTIO_VSOCK_HOST_CID, VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_F_SEND, VIRTIO_VSOCK_TYPE_STREAM,
};
use vmm_core::memory::{GuestAddress, GuestMemory, MemoryError};
use vmm_core::queue::VIRTIO_RING_F_EVENT_IDX;

use super::muxer::tests::TempDir;
use super::{Muxer, MAX_CONNECTIONS};

const CID: u64 = 3;
/// The guest's receive buffer per connection.
const GUEST_BUF_ALLOC: u32 = 256 * 1024;
const GUEST_LISTEN_PORT: u32 = 1024;
const HOST_LISTEN_PORT: u32 = 2000;

/// Host-initiated connections all use guest port 1024; the fake guest keys
/// them by this bit plus their host port's low bits (guest-initiated ones
/// by their guest port).
const HOST_INITIATED_KEY: u32 = 1 << 31;

fn host_initiated_key(host_port: u32) -> u32 {
    HOST_INITIATED_KEY | (host_port & 0xfff)
}

/// Guest memory over a `Vec` (fast enough for tens of MiB).
struct VecMem(RefCell<Vec<u8>>);

fn span(size: usize, addr: GuestAddress, len: u64) -> Result<std::ops::Range<usize>, MemoryError> {
    let err = MemoryError::OutOfBounds { addr: addr.0, len };
    let start = usize::try_from(addr.0).map_err(|_| err)?;
    let end = start
        .checked_add(usize::try_from(len).map_err(|_| err)?)
        .ok_or(err)?;
    if end > size {
        return Err(err);
    }
    Ok(start..end)
}

impl GuestMemory for VecMem {
    fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
        let m = self.0.borrow();
        let r = span(m.len(), addr, buf.len() as u64)?;
        buf.copy_from_slice(&m[r]);
        Ok(())
    }
    fn write(&self, addr: GuestAddress, buf: &[u8]) -> Result<(), MemoryError> {
        let mut m = self.0.borrow_mut();
        let r = span(m.len(), addr, buf.len() as u64)?;
        m[r].copy_from_slice(buf);
        Ok(())
    }
    fn check_range(&self, addr: GuestAddress, len: u64) -> Result<(), MemoryError> {
        span(self.0.borrow().len(), addr, len).map(|_| ())
    }
}

/// Deterministic test bytes: `len` bytes of stream `seed`.
fn pattern(seed: u64, offset: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        let x = (offset + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
        *b = (x >> 29) as u8;
    }
}

/// What one side of a connection sent and received.
#[derive(Debug, Default, PartialEq, Eq)]
struct Transfer {
    sent: (u64, Vec<u8>),
    received: (u64, Vec<u8>),
}

/// A host process's end: sends `len` bytes of stream `seed`, then shuts
/// down its sending side, while reading everything the guest sends.
fn host_side(stream: UnixStream, seed: u64, len: u64) -> Transfer {
    let mut reader = stream.try_clone().unwrap();
    let rx = std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
        }
        (total, h.finalize().to_vec())
    });
    let mut w = stream;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 48 * 1024];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        pattern(seed, off, &mut buf[..n]);
        w.write_all(&buf[..n]).unwrap();
        h.update(&buf[..n]);
        off += n as u64;
    }
    w.shutdown(std::net::Shutdown::Write).unwrap();
    Transfer {
        sent: (len, h.finalize().to_vec()),
        received: rx.join().unwrap(),
    }
}

/// The guest's end of one connection: a minimal stream socket with the
/// credit rules of virtio 5.10.6.3.
struct GuestConn {
    host_port: u32,
    seed: u64,
    to_send: u64,
    sent: u64,
    tx_hash: Sha256,
    rx_hash: Sha256,
    received: u64,
    established: bool,
    shut_sent: bool,
    reset: bool,
    /// Our counters and the device's credit.
    tx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    credit_update_due: bool,
}

impl GuestConn {
    fn new(host_port: u32, seed: u64, to_send: u64) -> Self {
        GuestConn {
            host_port,
            seed,
            to_send,
            sent: 0,
            tx_hash: Sha256::new(),
            rx_hash: Sha256::new(),
            received: 0,
            established: false,
            shut_sent: false,
            reset: false,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_update_due: false,
        }
    }

    fn header(&mut self, guest_port: u32, op: u16, len: u32, flags: u32) -> PacketHeader {
        self.last_fwd_cnt = self.fwd_cnt;
        PacketHeader {
            src_cid: CID,
            dst_cid: VIRTIO_VSOCK_HOST_CID,
            src_port: guest_port,
            dst_port: self.host_port,
            len,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

#[test]
fn sixteen_mib_each_way_over_concurrent_connections() {
    const HOST_INITIATED: u64 = 4;
    const GUEST_INITIATED: u64 = 2;
    const HOST_CONN_BYTES: u64 = 4 << 20;
    const GUEST_CONN_BYTES: u64 = 2 << 20;

    let dir = TempDir::new();
    let uds = dir.0.join("vm.sock");
    let muxer = Muxer::new(&uds).unwrap();
    let mut dev: Box<Vsock<Muxer, MAX_CONNECTIONS>> = Box::new(Vsock::new(CID, muxer).unwrap());
    let mem = VecMem(RefCell::new(vec![0u8; MOCK_MEM_SIZE as usize]));
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 1 << VIRTIO_RING_F_EVENT_IDX).unwrap();
    g.activate(dev.as_mut()).unwrap();
    g.fill_rx().unwrap();
    g.notify_rx(dev.as_mut()).unwrap();

    // Host processes connecting to the guest (hybrid vsock CONNECT).
    let mut host_threads: Vec<(u64, JoinHandle<(u32, Transfer)>)> = Vec::new();
    for i in 0..HOST_INITIATED {
        let uds = uds.clone();
        host_threads.push((
            i,
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&uds).unwrap();
                s.write_all(format!("CONNECT {GUEST_LISTEN_PORT}\n").as_bytes())
                    .unwrap();
                // Byte by byte: the guest's data may follow right behind.
                let mut line = String::new();
                let mut b = [0u8; 1];
                while !line.ends_with('\n') {
                    assert_eq!(s.read(&mut b).unwrap(), 1, "muxer closed: {line:?}");
                    line.push(char::from(b[0]));
                }
                let port: u32 = line
                    .strip_prefix("OK ")
                    .and_then(|p| p.trim().parse().ok())
                    .unwrap_or_else(|| panic!("bad reply {line:?}"));
                (port, host_side(s, 100 + i, HOST_CONN_BYTES))
            }),
        ));
    }
    // A host service the guest connects to.
    let listener = UnixListener::bind(format!("{}_{HOST_LISTEN_PORT}", uds.display())).unwrap();
    let service = std::thread::spawn(move || {
        let mut workers = Vec::new();
        for _ in 0..GUEST_INITIATED {
            let (s, _) = listener.accept().unwrap();
            // The guest's first byte names the connection.
            let mut id = [0u8; 1];
            (&s).read_exact(&mut id).unwrap();
            workers.push(std::thread::spawn(move || {
                (
                    id[0],
                    host_side(s, 200 + u64::from(id[0]), GUEST_CONN_BYTES),
                )
            }));
        }
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });

    // The guest: keyed by guest port.
    let mut conns: HashMap<u32, GuestConn> = HashMap::new();
    for i in 0..GUEST_INITIATED {
        let port = 3000 + i as u32;
        let mut c = GuestConn::new(HOST_LISTEN_PORT, 300 + i, GUEST_CONN_BYTES);
        // One byte naming the connection goes first, outside the pattern.
        c.to_send += 1;
        let h = c.header(port, VIRTIO_VSOCK_OP_REQUEST, 0, 0);
        assert!(g.send(&h, &[]).unwrap());
        conns.insert(port, c);
    }
    // Garbage among the real traffic: RW for a connection that does not
    // exist, and a header whose length runs past its buffer.
    let mut junk = GuestConn::new(4242, 0, 0);
    let h = junk.header(9999, VIRTIO_VSOCK_OP_RW, 3, 0);
    assert!(g.send(&h, b"abc").unwrap());
    let mut bad = junk.header(9998, VIRTIO_VSOCK_OP_REQUEST, 0, 0);
    bad.len = 1000;
    assert!(g.send_raw(&bad.to_bytes(), &[]).unwrap());
    g.notify_tx(dev.as_mut()).unwrap();
    let mut rsts_for_garbage = Vec::new();

    let start = Instant::now();
    let deadline = start + Duration::from_secs(120);
    let mut payload = vec![0u8; MOCK_MAX_PAYLOAD];
    let mut chunk = vec![0u8; MOCK_MAX_PAYLOAD];
    let mut idle = false;
    loop {
        assert!(Instant::now() < deadline, "transfer stalled");
        // What the vsock device's thread does when the muxer's fd is ready.
        dev.backend_mut().poll(if idle { 2 } else { 0 }).unwrap();
        dev.process_host_events(&mut g.context()).unwrap();
        idle = true;

        // Guest rx.
        let mut got_any = false;
        while let Some(p) = g.recv(&mut payload).unwrap() {
            got_any = true;
            let h = p.header;
            assert_eq!(h.dst_cid, CID);
            assert!(p.used_len as usize >= HEADER_SIZE);
            if h.op == VIRTIO_VSOCK_OP_REQUEST {
                assert_eq!(h.dst_port, GUEST_LISTEN_PORT);
                // Accept a host-initiated connection.
                let mut c = GuestConn::new(h.src_port, 0, HOST_CONN_BYTES);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                c.established = true;
                let resp = c.header(GUEST_LISTEN_PORT, VIRTIO_VSOCK_OP_RESPONSE, 0, 0);
                assert!(g.send(&resp, &[]).unwrap());
                conns.insert(host_initiated_key(h.src_port), c);
                continue;
            }
            let key = if h.dst_port == GUEST_LISTEN_PORT {
                host_initiated_key(h.src_port)
            } else {
                h.dst_port
            };
            let Some(c) = conns.get_mut(&key) else {
                assert_eq!(h.op, VIRTIO_VSOCK_OP_RST, "unexpected {h:?}");
                rsts_for_garbage.push(h.dst_port);
                continue;
            };
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            match h.op {
                VIRTIO_VSOCK_OP_RESPONSE => c.established = true,
                VIRTIO_VSOCK_OP_RW => {
                    assert_eq!(h.len as usize, p.payload_len);
                    c.rx_hash.update(&payload[..p.payload_len]);
                    c.received += u64::from(h.len);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(h.len);
                    if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt) >= GUEST_BUF_ALLOC / 2 {
                        c.credit_update_due = true;
                    }
                }
                VIRTIO_VSOCK_OP_CREDIT_REQUEST => c.credit_update_due = true,
                VIRTIO_VSOCK_OP_CREDIT_UPDATE => {}
                VIRTIO_VSOCK_OP_SHUTDOWN => {
                    assert_eq!(
                        h.flags & VIRTIO_VSOCK_SHUTDOWN_F_SEND,
                        VIRTIO_VSOCK_SHUTDOWN_F_SEND
                    );
                }
                VIRTIO_VSOCK_OP_RST => c.reset = true,
                op => panic!("unexpected op {op}"),
            }
        }
        if got_any {
            idle = false;
            g.fill_rx().unwrap();
        }

        // Guest tx, as far as credit and the ring allow.
        let mut sent_any = false;
        'conns: for (&key, c) in conns.iter_mut() {
            let port = if key & HOST_INITIATED_KEY != 0 {
                GUEST_LISTEN_PORT
            } else {
                key
            };
            if !c.established || c.reset {
                continue;
            }
            if c.credit_update_due {
                let h = c.header(port, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, 0);
                if !g.send(&h, &[]).unwrap() {
                    break 'conns;
                }
                c.credit_update_due = false;
                sent_any = true;
            }
            while c.sent < c.to_send {
                // Room for this packet (two buffers) and a SHUTDOWN.
                if g.tx_outstanding().unwrap() + 3 > 128 {
                    break 'conns;
                }
                let n = (c.to_send - c.sent)
                    .min(u64::from(c.credit()))
                    .min(MOCK_MAX_PAYLOAD as u64) as usize;
                if n == 0 {
                    break;
                }
                let buf = &mut chunk[..n];
                if port != GUEST_LISTEN_PORT && c.sent == 0 {
                    // The naming byte, then the pattern.
                    buf[0] = (port - 3000) as u8;
                    pattern(c.seed, 0, &mut buf[1..]);
                    c.tx_hash.update(&buf[1..]);
                } else {
                    let off = if port != GUEST_LISTEN_PORT {
                        c.sent - 1
                    } else {
                        c.sent
                    };
                    pattern(c.seed, off, buf);
                    c.tx_hash.update(&*buf);
                }
                let h = c.header(port, VIRTIO_VSOCK_OP_RW, n as u32, 0);
                assert!(g.send(&h, buf).unwrap(), "room was checked");
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                c.sent += n as u64;
                sent_any = true;
            }
            if c.sent == c.to_send && !c.shut_sent {
                let h = c.header(
                    port,
                    VIRTIO_VSOCK_OP_SHUTDOWN,
                    0,
                    VIRTIO_VSOCK_SHUTDOWN_F_SEND,
                );
                if !g.send(&h, &[]).unwrap() {
                    break 'conns;
                }
                c.shut_sent = true;
                sent_any = true;
            }
        }
        if sent_any {
            idle = false;
            g.notify_tx(dev.as_mut()).unwrap();
        }

        let all_done = conns.len() as u64 == HOST_INITIATED + GUEST_INITIATED
            && conns.values().all(|c| c.reset);
        // The muxer keeps flushing what the guest sent after the device is
        // done with a connection, so poll until every host end has all of
        // it.
        if all_done && host_threads.iter().all(|(_, t)| t.is_finished()) && service.is_finished() {
            break;
        }
    }
    let elapsed = start.elapsed();

    // Host-initiated: match guest ends to host threads by host port.
    let mut host_results = HashMap::new();
    for (i, t) in host_threads {
        let (port, transfer) = t.join().unwrap();
        host_results.insert(port, (i, transfer));
    }
    let mut bytes_each_way = 0;
    for (key, c) in conns.iter_mut() {
        if key & HOST_INITIATED_KEY == 0 {
            continue;
        }
        let (i, t) = host_results.remove(&c.host_port).expect("a host thread");
        // The guest never knew the host thread's seed; check by hash.
        let guest_rx = (c.received, c.rx_hash.clone().finalize().to_vec());
        assert_eq!(guest_rx, t.sent, "host {i} -> guest");
        let mut expect = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < HOST_CONN_BYTES {
            pattern(c.seed, off, &mut buf);
            expect.update(&buf);
            off += buf.len() as u64;
        }
        assert_eq!(t.received.0, HOST_CONN_BYTES, "guest -> host {i}");
        assert_eq!(
            t.received.1,
            expect.finalize().to_vec(),
            "guest -> host {i}"
        );
        assert_eq!(c.tx_hash.clone().finalize().to_vec(), t.received.1);
        bytes_each_way += HOST_CONN_BYTES;
    }
    for (id, t) in service.join().unwrap() {
        let port = 3000 + u32::from(id);
        let c = &conns[&port];
        assert_eq!(
            (c.received, c.rx_hash.clone().finalize().to_vec()),
            t.sent,
            "host service -> guest {port}"
        );
        assert_eq!(
            t.received.0, GUEST_CONN_BYTES,
            "guest {port} -> host service"
        );
        assert_eq!(t.received.1, c.tx_hash.clone().finalize().to_vec());
        bytes_each_way += GUEST_CONN_BYTES;
    }
    assert!(bytes_each_way >= 16 << 20);
    rsts_for_garbage.sort();
    assert_eq!(
        rsts_for_garbage,
        [9998, 9999],
        "garbage is answered with RST"
    );
    assert_eq!(dev.connection_count(), 0, "every connection ended");
    let deadline = Instant::now() + Duration::from_secs(5);
    while dev.backend().stream_count() > 0 {
        assert!(Instant::now() < deadline, "host streams left open");
        dev.backend_mut().poll(10).unwrap();
    }
    eprintln!(
        "vsock loopback: {} MiB each way over {} connections in {:.2?}",
        bytes_each_way >> 20,
        HOST_INITIATED + GUEST_INITIATED,
        elapsed
    );
}
