//! virtio-vsock device tests, driven through the mock guest driver.

use std::collections::{BTreeMap, VecDeque};
use std::vec;
use std::vec::Vec;

use super::*;
use crate::devices::vsock::mock::{MockVsockDriver, MOCK_MAX_PAYLOAD, MOCK_MEM_SIZE};
use crate::devices::vsock::{
    VIRTIO_VSOCK_OP_CREDIT_REQUEST, VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE, VIRTIO_VSOCK_TYPE_SEQPACKET,
};
use crate::memory::{GuestAddress, SliceMemory};

const CID: u64 = 3;
const HOST_PORT: u32 = 1024;
const BUF_ALLOC: u32 = 4096;

#[derive(Default)]
struct HostConn {
    to_guest: VecDeque<u8>,
    eof: bool,
    from_guest: Vec<u8>,
    unsent: u32,
    shut: u32,
}

#[derive(Default)]
struct TestBackend {
    listening: Vec<u32>,
    conns: BTreeMap<ConnKey, HostConn>,
    events: VecDeque<HostEvent>,
    connected: Vec<ConnKey>,
    closed: Vec<ConnKey>,
    /// Hold guest data as unsent until `drain`.
    hold: bool,
}

impl TestBackend {
    fn listening_on(port: u32) -> Self {
        TestBackend {
            listening: vec![port],
            ..Default::default()
        }
    }

    fn conn(&mut self, key: ConnKey) -> &mut HostConn {
        self.conns.get_mut(&key).expect("known connection")
    }

    /// The host writes `data` (and maybe closes its end).
    fn host_write(&mut self, key: ConnKey, data: &[u8], eof: bool) {
        let c = self.conns.entry(key).or_default();
        c.to_guest.extend(data);
        c.eof |= eof;
        self.events.push_back(HostEvent::Readable(key));
    }

    /// The host consumes everything buffered for it.
    fn drain(&mut self, key: ConnKey) {
        self.conn(key).unsent = 0;
        self.events.push_back(HostEvent::Drained(key));
    }
}

impl VsockBackend for TestBackend {
    fn buf_alloc(&self) -> u32 {
        BUF_ALLOC
    }
    fn connect(&mut self, key: ConnKey) -> Result<(), VsockBackendError> {
        if !self.listening.contains(&key.host_port) {
            return Err(VsockBackendError::Refused);
        }
        self.conns.insert(key, HostConn::default());
        Ok(())
    }
    fn connected(&mut self, key: ConnKey) {
        self.connected.push(key);
        self.conns.entry(key).or_default();
    }
    fn send(&mut self, key: ConnKey, data: &[u8]) -> Result<(), VsockBackendError> {
        let hold = self.hold;
        let c = self.conns.get_mut(&key).ok_or(VsockBackendError::Broken)?;
        c.from_guest.extend_from_slice(data);
        if hold {
            c.unsent += data.len() as u32;
            assert!(
                c.unsent <= BUF_ALLOC,
                "device let the guest overrun the host"
            );
        }
        Ok(())
    }
    fn unsent(&self, key: ConnKey) -> u32 {
        self.conns.get(&key).map_or(0, |c| c.unsent)
    }
    fn recv(&mut self, key: ConnKey, buf: &mut [u8]) -> Result<Recv, VsockBackendError> {
        let c = self.conns.get_mut(&key).ok_or(VsockBackendError::Broken)?;
        if c.to_guest.is_empty() {
            return Ok(if c.eof { Recv::Eof } else { Recv::WouldBlock });
        }
        let n = buf.len().min(c.to_guest.len());
        for b in buf[..n].iter_mut() {
            *b = c.to_guest.pop_front().unwrap();
        }
        Ok(Recv::Data(n))
    }
    fn shutdown(&mut self, key: ConnKey, flags: u32) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.shut = flags;
        }
    }
    fn close(&mut self, key: ConnKey) {
        self.closed.push(key);
    }
    fn next_event(&mut self) -> Option<HostEvent> {
        self.events.pop_front()
    }
}

type Dev<const C: usize> = Vsock<TestBackend, C>;

fn hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
    PacketHeader {
        src_cid: CID,
        dst_cid: VIRTIO_VSOCK_HOST_CID,
        src_port,
        dst_port,
        len,
        type_: VIRTIO_VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn key(guest_port: u32) -> ConnKey {
    ConnKey {
        host_port: HOST_PORT,
        guest_port,
    }
}

/// Everything the device delivered, payloads included.
fn received<M: GuestMemory + ?Sized>(
    g: &mut MockVsockDriver<'_, M>,
) -> Vec<(PacketHeader, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; MOCK_MAX_PAYLOAD];
    while let Some(p) = g.recv(&mut buf).unwrap() {
        out.push((p.header, buf[..p.payload_len].to_vec()));
    }
    out
}

fn ops(pkts: &[(PacketHeader, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

/// Sends one packet and lets the device take it.
fn send<M: GuestMemory + ?Sized, const C: usize>(
    g: &mut MockVsockDriver<'_, M>,
    dev: &mut Dev<C>,
    h: PacketHeader,
    payload: &[u8],
) {
    assert!(g.send(&h, payload).unwrap());
    g.notify_tx(dev).unwrap();
}

fn memory() -> Vec<u8> {
    vec![0u8; MOCK_MEM_SIZE as usize]
}

/// Connects guest port `port` to HOST_PORT and checks the RESPONSE.
fn guest_connect<M: GuestMemory + ?Sized, const C: usize>(
    g: &mut MockVsockDriver<'_, M>,
    dev: &mut Dev<C>,
    port: u32,
) {
    send(
        g,
        dev,
        hdr(VIRTIO_VSOCK_OP_REQUEST, port, HOST_PORT, 0),
        &[],
    );
    let got = received(g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_RESPONSE]);
    let h = got[0].0;
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (VIRTIO_VSOCK_HOST_CID, CID, HOST_PORT, port)
    );
    assert_eq!(h.buf_alloc, BUF_ALLOC);
    g.fill_rx().unwrap();
}

#[test]
fn config_space_and_identity() {
    let dev: Dev<4> = Vsock::new(0x1234_5678, TestBackend::default()).unwrap();
    assert_eq!(dev.device_type(), VIRTIO_ID_VSOCK);
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1234_5678);
    let mut w = [0u8; 4];
    dev.read_config(0, &mut w);
    assert_eq!(u32::from_le_bytes(w), 0x1234_5678);
    dev.read_config(4, &mut w);
    assert_eq!(u32::from_le_bytes(w), 0);
    let mut past = [0u8; 4];
    dev.read_config(6, &mut past);
    assert_eq!(past, [0; 4]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    for cid in [0, 1, 2, 0xffff_ffff, 1 << 32, u64::MAX] {
        assert!(Dev::<4>::new(cid, TestBackend::default()).is_err());
    }
}

#[test]
fn activation_needs_rx_and_tx() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::default()).unwrap();
    g.queues_mut()[1].set_ready(false);
    assert_eq!(
        g.activate(&mut dev),
        Err(DeviceError::QueueNotReady { index: 1 })
    );
    g.queues_mut()[1].set_ready(true);
    g.queues_mut()[2].set_ready(false);
    assert_eq!(g.activate(&mut dev), Ok(()));
}

#[test]
fn guest_connects_and_data_flows_both_ways() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    guest_connect(&mut g, &mut dev, 5000);
    assert!(g.irq_count() > 0);

    // Guest to host.
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_RW, 5000, HOST_PORT, 5),
        b"hello",
    );
    assert_eq!(dev.backend_mut().conn(key(5000)).from_guest, b"hello");
    assert!(received(&mut g).is_empty(), "no credit update needed yet");

    // Host to guest.
    dev.backend_mut().host_write(key(5000), b"world", false);
    dev.process_host_events(&mut g.context()).unwrap();
    let got = received(&mut g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_RW]);
    assert_eq!(got[0].1, b"world");
    assert_eq!(got[0].0.len, 5);
    assert_eq!(got[0].0.fwd_cnt, 5, "all 5 guest bytes were forwarded");
    assert_eq!(dev.connection_count(), 1);

    // A payload bigger than one rx buffer is split.
    let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    dev.backend_mut().host_write(key(5000), &big, false);
    dev.process_host_events(&mut g.context()).unwrap();
    let got = received(&mut g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_RW; 3]);
    let joined: Vec<u8> = got.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(joined, big);
}

#[test]
fn header_may_span_buffers_or_share_one_with_data() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    let req = hdr(VIRTIO_VSOCK_OP_REQUEST, 7, HOST_PORT, 0).to_bytes();
    assert!(g.send_raw(&req, &[3, 20, 21, 40]).unwrap());
    g.notify_tx(&mut dev).unwrap();
    assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_RESPONSE]);
    g.fill_rx().unwrap();

    let mut pkt = hdr(VIRTIO_VSOCK_OP_RW, 7, HOST_PORT, 6).to_bytes().to_vec();
    pkt.extend_from_slice(b"abcdef");
    // Header and the first data bytes share a buffer; the rest follows.
    assert!(g.send_raw(&pkt, &[46]).unwrap());
    // Header split in the middle, data in its own buffers.
    assert!(g.send_raw(&pkt, &[30, 44, 47]).unwrap());
    // All in one buffer.
    assert!(g.send_raw(&pkt, &[]).unwrap());
    g.notify_tx(&mut dev).unwrap();
    assert_eq!(
        dev.backend_mut().conn(key(7)).from_guest,
        b"abcdefabcdefabcdef"
    );
    assert_eq!(dev.stats().malformed, 0);
}

#[test]
fn refused_guest_connection_gets_rst() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::default()).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_REQUEST, 9, 80, 0),
        &[],
    );
    let got = received(&mut g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_RST]);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (80, 9));
    assert_eq!(dev.connection_count(), 0);
    assert_eq!(dev.stats().refused, 1);
}

#[test]
fn host_connects_to_the_guest() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::default()).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    let k = ConnKey {
        host_port: 1 << 30,
        guest_port: 1024,
    };
    // Data the host wrote right after connecting waits for the handshake.
    dev.backend_mut().host_write(k, b"early", false);
    dev.backend_mut().events.push_front(HostEvent::Connect(k));
    dev.process_host_events(&mut g.context()).unwrap();
    let got = received(&mut g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_REQUEST]);
    let h = got[0].0;
    assert_eq!((h.src_port, h.dst_port, h.dst_cid), (1 << 30, 1024, CID));
    assert!(dev.backend().connected.is_empty());

    g.fill_rx().unwrap();
    let mut resp = hdr(VIRTIO_VSOCK_OP_RESPONSE, 1024, 1 << 30, 0);
    resp.buf_alloc = 1000;
    send(&mut g, &mut dev, resp, &[]);
    assert_eq!(dev.backend().connected, [k]);
    let got = received(&mut g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_RW]);
    assert_eq!(got[0].1, b"early");

    // A second host connection the guest refuses.
    let k2 = ConnKey {
        host_port: (1 << 30) + 1,
        guest_port: 1024,
    };
    dev.backend_mut().events.push_back(HostEvent::Connect(k2));
    dev.process_host_events(&mut g.context()).unwrap();
    assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_REQUEST]);
    g.fill_rx().unwrap();
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_RST, 1024, (1 << 30) + 1, 0),
        &[],
    );
    assert_eq!(dev.backend().closed, [k2]);
    assert_eq!(dev.connection_count(), 1);
    assert!(received(&mut g).is_empty(), "an RST is never answered");

    // A duplicate Connect is refused on the host side.
    dev.backend_mut().events.push_back(HostEvent::Connect(k));
    dev.process_host_events(&mut g.context()).unwrap();
    assert_eq!(dev.backend().closed, [k2, k]);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    let mut req = hdr(VIRTIO_VSOCK_OP_REQUEST, 5, HOST_PORT, 0);
    req.buf_alloc = 100;
    send(&mut g, &mut dev, req, &[]);
    assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_RESPONSE]);

    dev.backend_mut().host_write(key(5), &[7u8; 250], false);
    dev.process_host_events(&mut g.context()).unwrap();
    let got = received(&mut g);
    // 100 bytes of credit, then one request for more.
    assert_eq!(
        ops(&got),
        [VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_CREDIT_REQUEST]
    );
    assert_eq!(got[0].1.len(), 100);
    // Nothing more until the guest reports progress; no repeated requests.
    dev.process_host_events(&mut g.context()).unwrap();
    g.notify_rx(&mut dev).unwrap();
    assert!(received(&mut g).is_empty());

    let mut upd = hdr(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 5, HOST_PORT, 0);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 60;
    send(&mut g, &mut dev, upd, &[]);
    let got = received(&mut g);
    assert_eq!(ops(&got)[0], VIRTIO_VSOCK_OP_RW);
    assert_eq!(got[0].1.len(), 60);
    assert_eq!(ops(&got)[1..], [VIRTIO_VSOCK_OP_CREDIT_REQUEST]);
    upd.fwd_cnt = 160;
    upd.buf_alloc = 1000;
    send(&mut g, &mut dev, upd, &[]);
    let got = received(&mut g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_RW]);
    assert_eq!(got[0].1.len(), 90);
}

#[test]
fn guest_to_host_respects_our_credit() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut backend = TestBackend::listening_on(HOST_PORT);
    backend.hold = true;
    let mut dev: Dev<4> = Vsock::new(CID, backend).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    guest_connect(&mut g, &mut dev, 5);

    // 3000 of 4096 bytes: the guest still sees 1096 free, below half.
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_RW, 5, HOST_PORT, 3000),
        &[1; 3000],
    );
    assert!(received(&mut g).is_empty(), "nothing forwarded, no update");
    // The guest asks; the answer reports nothing consumed yet.
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 5, HOST_PORT, 0),
        &[],
    );
    let got = received(&mut g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_CREDIT_UPDATE]);
    assert_eq!((got[0].0.buf_alloc, got[0].0.fwd_cnt), (BUF_ALLOC, 0));
    g.fill_rx().unwrap();

    // The host drains: the guest hears of it unasked.
    dev.backend_mut().drain(key(5));
    dev.process_host_events(&mut g.context()).unwrap();
    let got = received(&mut g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_CREDIT_UPDATE]);
    assert_eq!(got[0].0.fwd_cnt, 3000);
    g.fill_rx().unwrap();

    // Exactly the credit is fine; a byte more is a reset.
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_RW, 5, HOST_PORT, 4000),
        &[2; 4000],
    );
    received(&mut g);
    g.fill_rx().unwrap();
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_RW, 5, HOST_PORT, 97),
        &[3; 97],
    );
    let got = received(&mut g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_RST]);
    assert_eq!(dev.backend().closed, [key(5)]);
    assert_eq!(dev.connection_count(), 0);
    assert_eq!(dev.backend_mut().conn(key(5)).from_guest.len(), 7000);
}

#[test]
fn guest_half_close_then_host_eof() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    guest_connect(&mut g, &mut dev, 5);

    let mut shut = hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 5, HOST_PORT, 0);
    shut.flags = VIRTIO_VSOCK_SHUTDOWN_F_SEND;
    send(&mut g, &mut dev, shut, &[]);
    assert_eq!(
        dev.backend_mut().conn(key(5)).shut,
        VIRTIO_VSOCK_SHUTDOWN_F_SEND
    );
    assert_eq!(dev.connection_count(), 1);
    // Data after SHUTDOWN(SEND) is a protocol violation... later. First the
    // host answers and closes.
    dev.backend_mut().host_write(key(5), b"bye", true);
    dev.process_host_events(&mut g.context()).unwrap();
    let got = received(&mut g);
    assert_eq!(
        ops(&got),
        [
            VIRTIO_VSOCK_OP_RW,
            VIRTIO_VSOCK_OP_SHUTDOWN,
            VIRTIO_VSOCK_OP_RST
        ]
    );
    assert_eq!(got[1].0.flags, VIRTIO_VSOCK_SHUTDOWN_F_SEND);
    assert_eq!(dev.connection_count(), 0);
    assert_eq!(dev.backend().closed, [key(5)]);
}

#[test]
fn host_eof_then_guest_closes() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    guest_connect(&mut g, &mut dev, 5);

    dev.backend_mut().host_write(key(5), b"", true);
    dev.process_host_events(&mut g.context()).unwrap();
    let got = received(&mut g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_SHUTDOWN]);
    g.fill_rx().unwrap();
    // The guest may still send.
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_RW, 5, HOST_PORT, 2),
        b"ok",
    );
    assert_eq!(dev.backend_mut().conn(key(5)).from_guest, b"ok");
    // Then closes both ways: RST ends it.
    let mut shut = hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 5, HOST_PORT, 0);
    shut.flags = VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
    send(&mut g, &mut dev, shut, &[]);
    assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_RST]);
    assert_eq!(dev.connection_count(), 0);
    assert_eq!(dev.backend().closed, [key(5)]);
}

#[test]
fn guest_shut_receive_stops_host_reads() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    guest_connect(&mut g, &mut dev, 5);
    let mut shut = hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 5, HOST_PORT, 0);
    shut.flags = VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE;
    send(&mut g, &mut dev, shut, &[]);
    dev.backend_mut().host_write(key(5), b"unwanted", false);
    dev.process_host_events(&mut g.context()).unwrap();
    assert!(received(&mut g).is_empty());
    assert_eq!(dev.backend_mut().conn(key(5)).to_guest.len(), 8);
}

#[test]
fn garbage_gets_rst_or_is_dropped() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();

    // Shorter than a header: nothing to answer.
    assert!(g.send_raw(&[0xff; 20], &[]).unwrap());
    // Announced length beyond the chain.
    let bad_len = hdr(VIRTIO_VSOCK_OP_RW, 1, HOST_PORT, 100).to_bytes();
    assert!(g.send_raw(&bad_len, &[]).unwrap());
    // Unknown op.
    assert!(g.send(&hdr(99, 2, HOST_PORT, 0), &[]).unwrap());
    // RW on no connection.
    assert!(g
        .send(&hdr(VIRTIO_VSOCK_OP_RW, 3, HOST_PORT, 1), b"x")
        .unwrap());
    // Another VM's CID.
    let mut other = hdr(VIRTIO_VSOCK_OP_REQUEST, 4, HOST_PORT, 0);
    other.dst_cid = 7;
    assert!(g.send(&other, &[]).unwrap());
    // Seqpacket.
    let mut seq = hdr(VIRTIO_VSOCK_OP_REQUEST, 5, HOST_PORT, 0);
    seq.type_ = VIRTIO_VSOCK_TYPE_SEQPACKET;
    assert!(g.send(&seq, &[]).unwrap());
    // A spoofed source CID: dropped.
    let mut spoof = hdr(VIRTIO_VSOCK_OP_REQUEST, 6, HOST_PORT, 0);
    spoof.src_cid = 42;
    assert!(g.send(&spoof, &[]).unwrap());
    // An RST for nothing: dropped.
    assert!(g
        .send(&hdr(VIRTIO_VSOCK_OP_RST, 8, HOST_PORT, 0), &[])
        .unwrap());
    g.notify_tx(&mut dev).unwrap();

    let got = received(&mut g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_RST; 5]);
    let ports: Vec<u32> = got.iter().map(|(h, _)| h.dst_port).collect();
    assert_eq!(ports, [1, 2, 3, 4, 5]);
    assert_eq!(got[3].0.src_cid, 7, "the RST comes from the CID asked for");
    assert_eq!(got[4].0.type_, VIRTIO_VSOCK_TYPE_SEQPACKET);
    assert!(got.iter().all(|(h, _)| h.dst_cid == CID));
    assert_eq!(dev.connection_count(), 0);
    assert_eq!(g.tx_outstanding().unwrap(), 0, "every chain was returned");
}

#[test]
fn protocol_violations_reset_the_connection() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();

    // RESPONSE on an established connection.
    guest_connect(&mut g, &mut dev, 1);
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_RESPONSE, 1, HOST_PORT, 0),
        &[],
    );
    assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_RST]);
    g.fill_rx().unwrap();
    // A second REQUEST for a live connection.
    guest_connect(&mut g, &mut dev, 2);
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_REQUEST, 2, HOST_PORT, 0),
        &[],
    );
    assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_RST]);
    g.fill_rx().unwrap();
    // Data after SHUTDOWN(SEND).
    guest_connect(&mut g, &mut dev, 3);
    let mut shut = hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 3, HOST_PORT, 0);
    shut.flags = VIRTIO_VSOCK_SHUTDOWN_F_SEND;
    send(&mut g, &mut dev, shut, &[]);
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_RW, 3, HOST_PORT, 1),
        b"x",
    );
    assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_RST]);
    assert_eq!(dev.connection_count(), 0);
    assert_eq!(dev.backend().closed, [key(1), key(2), key(3)]);
}

#[test]
fn random_garbage_never_panics() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut buf = vec![0u8; MOCK_MAX_PAYLOAD];
    for _ in 0..3000 {
        let mut h = hdr(
            (rnd() % 9) as u16,
            (rnd() % 4) as u32,
            if rnd() % 4 == 0 { 1 } else { HOST_PORT },
            (rnd() % 80) as u32,
        );
        if rnd() % 8 == 0 {
            h.type_ = (rnd() % 4) as u16;
        }
        h.flags = (rnd() % 8) as u32;
        h.buf_alloc = (rnd() % 5000) as u32;
        h.fwd_cnt = (rnd() % 5000) as u32;
        let mut pkt = h.to_bytes().to_vec();
        let extra = (rnd() % 64) as usize;
        pkt.extend((0..extra).map(|_| rnd() as u8));
        let cut = (rnd() % pkt.len() as u64) as usize;
        if rnd() % 10 == 0 {
            pkt.truncate(cut);
        }
        let a = (rnd() % 60) as u32;
        let b = a + (rnd() % 60) as u32;
        if !g.send_raw(&pkt, &[a, b]).unwrap() {
            g.notify_tx(&mut dev).unwrap();
            assert!(g.send_raw(&pkt, &[a, b]).unwrap());
        }
        if rnd() % 3 == 0 {
            g.fill_rx().unwrap();
            g.notify_tx(&mut dev).unwrap();
            while let Some(p) = g.recv(&mut buf).unwrap() {
                assert_eq!(p.header.dst_cid, CID);
                assert_ne!(p.header.op, VIRTIO_VSOCK_OP_REQUEST);
            }
        }
    }
    g.notify_tx(&mut dev).unwrap();
    assert!(dev.stats().malformed > 0);
}

#[test]
fn full_table_refuses_both_ways() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<2> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    guest_connect(&mut g, &mut dev, 1);
    guest_connect(&mut g, &mut dev, 2);
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_REQUEST, 3, HOST_PORT, 0),
        &[],
    );
    assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_RST]);
    let k = ConnKey {
        host_port: 1 << 30,
        guest_port: 9,
    };
    dev.backend_mut().events.push_back(HostEvent::Connect(k));
    dev.process_host_events(&mut g.context()).unwrap();
    assert_eq!(dev.backend().closed, [k]);
    assert_eq!(dev.stats().refused, 2);
    // A slot frees up when a connection ends.
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_RST, 1, HOST_PORT, 0),
        &[],
    );
    g.fill_rx().unwrap();
    guest_connect(&mut g, &mut dev, 3);
}

#[test]
fn rx_waits_for_buffers() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_REQUEST, 1, HOST_PORT, 0),
        &[],
    );
    dev.backend_mut().host_write(key(1), b"data", false);
    dev.process_host_events(&mut g.context()).unwrap();
    assert!(received(&mut g).is_empty());
    g.fill_rx().unwrap();
    g.notify_rx(&mut dev).unwrap();
    let got = received(&mut g);
    assert_eq!(ops(&got), [VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RW]);
    assert_eq!(got[1].1, b"data");
}

#[test]
fn event_idx_mode_works() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let features = (1u64 << VIRTIO_RING_F_EVENT_IDX) | (1u64 << VIRTIO_RING_F_INDIRECT_DESC);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), features).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    guest_connect(&mut g, &mut dev, 1);
    dev.backend_mut().host_write(key(1), b"x", false);
    dev.process_host_events(&mut g.context()).unwrap();
    assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_RW]);
}

#[test]
fn transport_reset_event_drops_every_connection() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    guest_connect(&mut g, &mut dev, 1);
    guest_connect(&mut g, &mut dev, 2);

    // No event buffer yet: the event waits.
    dev.transport_reset(&mut g.context()).unwrap();
    assert_eq!(dev.connection_count(), 0);
    assert_eq!(dev.backend().closed, [key(1), key(2)]);
    assert_eq!(g.next_event().unwrap(), None);
    let irqs = g.irq_count();
    g.post_event_buffers(2).unwrap();
    g.notify_event(&mut dev).unwrap();
    assert_eq!(
        g.next_event().unwrap(),
        Some(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
    );
    assert_eq!(g.next_event().unwrap(), None, "one event per reset");
    assert!(g.irq_count() > irqs);
    assert!(
        received(&mut g).is_empty(),
        "no RSTs after a transport reset"
    );
    // Old connections are unknown now.
    send(
        &mut g,
        &mut dev,
        hdr(VIRTIO_VSOCK_OP_RW, 1, HOST_PORT, 1),
        b"x",
    );
    assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_RST]);
}

#[test]
fn host_side_failure_resets_the_guest_side() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    guest_connect(&mut g, &mut dev, 1);
    dev.backend_mut()
        .events
        .push_back(HostEvent::Closed(key(1)));
    dev.process_host_events(&mut g.context()).unwrap();
    assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_RST]);
    assert_eq!(dev.backend().closed, [key(1)]);
    assert_eq!(dev.connection_count(), 0);

    // A host connection that fails before the guest heard of it vanishes.
    let k = ConnKey {
        host_port: 1 << 30,
        guest_port: 5,
    };
    g.queues_mut()[0].set_ready(false);
    dev.backend_mut().events.push_back(HostEvent::Connect(k));
    dev.process_host_events(&mut g.context()).unwrap();
    g.queues_mut()[0].set_ready(true);
    dev.backend_mut().events.push_back(HostEvent::Closed(k));
    dev.process_host_events(&mut g.context()).unwrap();
    assert!(received(&mut g).is_empty());
    assert_eq!(dev.connection_count(), 0);
    assert_eq!(dev.backend().closed, [key(1), k]);
}

#[test]
fn device_reset_closes_connections() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
    let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
    g.activate(&mut dev).unwrap();
    g.fill_rx().unwrap();
    guest_connect(&mut g, &mut dev, 1);
    dev.reset();
    assert_eq!(dev.connection_count(), 0);
    assert_eq!(dev.backend().closed, [key(1)]);
}

mod state {
    use proptest::prelude::*;

    use super::*;
    use crate::snapshot::{Persist, StateError};

    fn encode(state: &VsockState) -> Vec<u8> {
        let mut out = vec![0u8; VsockState::MAX_LEN];
        let len = state.save(&mut out).unwrap();
        out.truncate(len);
        out
    }

    /// Saves `dev`, encodes and loads the state, and restores it over a
    /// fresh backend.
    fn restore<const C: usize>(dev: &Dev<C>) -> Dev<C> {
        let state = VsockState::load(&encode(&dev.state())).unwrap();
        assert_eq!(state, dev.state());
        Vsock::from_state(&state, TestBackend::listening_on(HOST_PORT)).unwrap()
    }

    #[test]
    fn encoding_is_fixed() {
        let state = VsockState {
            guest_cid: 0x0102_0304,
            transport_reset_pending: true,
        };
        assert_eq!(encode(&state), [4, 3, 2, 1, 0, 0, 0, 0, 1]);
        assert_eq!(VsockState::load(&encode(&state)), Ok(state));
        let mut bad = encode(&state);
        bad[8] = 2;
        assert_eq!(
            VsockState::load(&bad),
            Err(StateError::InvalidValue {
                field: "transport reset flag",
                value: 2
            })
        );
        for cid in [0, 1, 2, 0xffff_ffff, 1 << 32, u64::MAX] {
            let state = VsockState {
                guest_cid: cid,
                transport_reset_pending: false,
            };
            let err = StateError::InvalidValue {
                field: "guest CID",
                value: cid,
            };
            assert_eq!(VsockState::load(&encode(&state)), Err(err));
            assert_eq!(
                Dev::<4>::from_state(&state, TestBackend::default()).err(),
                Some(err)
            );
        }
        assert!(matches!(
            VsockState::load(&[3, 0, 0, 0]),
            Err(StateError::TooShort { .. })
        ));
    }

    #[test]
    fn a_reset_is_owed_only_for_connections_or_a_pending_event() {
        let mut bytes = memory();
        let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
        let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
        let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
        assert!(!dev.state().transport_reset_pending);
        g.activate(&mut dev).unwrap();
        g.fill_rx().unwrap();
        guest_connect(&mut g, &mut dev, 1);
        assert!(dev.state().transport_reset_pending);
        send(
            &mut g,
            &mut dev,
            hdr(VIRTIO_VSOCK_OP_RST, 1, HOST_PORT, 0),
            &[],
        );
        assert_eq!(dev.connection_count(), 0);
        assert!(!dev.state().transport_reset_pending);
        // A reset event the guest has no buffer for yet.
        dev.transport_reset(&mut g.context()).unwrap();
        assert!(dev.state().transport_reset_pending);
        assert_eq!(restore(&dev).state(), dev.state());
    }

    #[test]
    fn a_restored_device_resets_the_guest_transport_once() {
        let mut bytes = memory();
        let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
        let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
        let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
        g.activate(&mut dev).unwrap();
        g.fill_rx().unwrap();
        g.post_event_buffers(2).unwrap();
        guest_connect(&mut g, &mut dev, 1);
        guest_connect(&mut g, &mut dev, 2);

        // The guest (its memory and queues, in `g`) goes on with a device
        // restored from the snapshot.
        let mut dev = restore(&dev);
        assert_eq!(dev.guest_cid(), CID);
        assert_eq!(dev.connection_count(), 0);
        assert_eq!(dev.stats(), VsockStats::default());
        let irqs = g.irq_count();
        dev.process_host_events(&mut g.context()).unwrap();
        assert_eq!(
            g.next_event().unwrap(),
            Some(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
        );
        assert_eq!(g.next_event().unwrap(), None, "one event");
        assert!(g.irq_count() > irqs);
        assert!(!dev.state().transport_reset_pending);
        dev.process_host_events(&mut g.context()).unwrap();
        assert_eq!(g.next_event().unwrap(), None);
        assert!(received(&mut g).is_empty());
        assert!(
            dev.backend().closed.is_empty(),
            "the new backend never knew the old connections"
        );

        // Old connections are unknown; new ones work.
        send(
            &mut g,
            &mut dev,
            hdr(VIRTIO_VSOCK_OP_RW, 1, HOST_PORT, 1),
            b"x",
        );
        assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_RST]);
        g.fill_rx().unwrap();
        guest_connect(&mut g, &mut dev, 3);
        send(
            &mut g,
            &mut dev,
            hdr(VIRTIO_VSOCK_OP_RW, 3, HOST_PORT, 2),
            b"hi",
        );
        assert_eq!(dev.backend_mut().conn(key(3)).from_guest, b"hi");
    }

    #[test]
    fn host_connections_wait_until_the_guest_has_handled_the_reset() {
        let mut bytes = memory();
        let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
        let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
        let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
        g.activate(&mut dev).unwrap();
        g.fill_rx().unwrap();
        // Two buffers: one is still available once the reset took the
        // other, which says nothing about the guest having handled it.
        g.post_event_buffers(2).unwrap();
        guest_connect(&mut g, &mut dev, 1);
        let mut dev = restore(&dev);
        dev.process_host_events(&mut g.context()).unwrap();
        assert_eq!(
            g.next_event().unwrap(),
            Some(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
        );
        // The host connects at once: the request waits.
        let k = ConnKey {
            host_port: 1 << 30,
            guest_port: 1024,
        };
        dev.backend_mut().events.push_back(HostEvent::Connect(k));
        dev.process_host_events(&mut g.context()).unwrap();
        g.notify_rx(&mut dev).unwrap();
        assert!(
            received(&mut g).is_empty(),
            "no request before the reset is handled"
        );
        assert_eq!(dev.connection_count(), 0);
        // The driver handled the event and posts its buffer again.
        g.post_event_buffers(1).unwrap();
        g.notify_event(&mut dev).unwrap();
        assert_eq!(g.next_event().unwrap(), None, "one event");
        assert_eq!(ops(&received(&mut g)), [VIRTIO_VSOCK_OP_REQUEST]);
    }

    #[test]
    fn a_restored_device_waits_for_an_event_buffer() {
        let mut bytes = memory();
        let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
        let mut g = MockVsockDriver::new(&mem, GuestAddress(0), 0).unwrap();
        let mut dev: Dev<4> = Vsock::new(CID, TestBackend::listening_on(HOST_PORT)).unwrap();
        g.activate(&mut dev).unwrap();
        g.fill_rx().unwrap();
        guest_connect(&mut g, &mut dev, 1);
        let mut dev = restore(&dev);
        dev.process_host_events(&mut g.context()).unwrap();
        assert_eq!(g.next_event().unwrap(), None);
        assert!(dev.state().transport_reset_pending);
        g.post_event_buffers(1).unwrap();
        g.notify_event(&mut dev).unwrap();
        assert_eq!(
            g.next_event().unwrap(),
            Some(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
        );
        // A device reset drops an owed event: the driver starts over.
        let mut dev = restore(&dev);
        assert!(!dev.state().transport_reset_pending);
        dev.transport_reset(&mut g.context()).unwrap();
        dev.reset();
        assert!(!dev.state().transport_reset_pending);
    }

    proptest! {
        /// Loading arbitrary bytes never panics; what loads re-encodes to
        /// the same bytes; every valid state round-trips.
        #[test]
        fn arbitrary_bytes_and_states(
            bytes in proptest::collection::vec(any::<u8>(), 0..12),
            guest_cid in 3u64..0xffff_ffff,
            transport_reset_pending in any::<bool>(),
        ) {
            if let Ok(state) = VsockState::load(&bytes) {
                prop_assert_eq!(encode(&state), bytes);
            }
            let state = VsockState { guest_cid, transport_reset_pending };
            prop_assert_eq!(VsockState::load(&encode(&state)), Ok(state));
            let dev = Dev::<2>::from_state(&state, TestBackend::default()).unwrap();
            prop_assert_eq!(dev.state(), state);
        }
    }
}
