//! virtio-net device tests, driven through a mock driver.

use core::cell::RefCell;
use std::collections::VecDeque;
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::devices::net::{
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4,
};
use crate::irq::CountingIrq;
use crate::memory::{GuestAddress, SliceMemory};
use crate::mmio::{
    Interrupt, MmioTransport, CONFIG_OFFSET, DEVICE_ID_OFFSET, DRIVER_FEATURES_OFFSET,
    DRIVER_FEATURES_SEL_OFFSET, QUEUE_DESC_LOW_OFFSET, QUEUE_DEVICE_LOW_OFFSET,
    QUEUE_DRIVER_LOW_OFFSET, QUEUE_NUM_MAX_OFFSET, QUEUE_NUM_OFFSET, QUEUE_READY_OFFSET,
    QUEUE_SEL_OFFSET, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    STATUS_OFFSET, VIRTIO_F_VERSION_1,
};
use crate::queue::mock::MockSplitQueue;
use crate::queue::{
    Descriptor, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};

const MEM_SIZE: usize = 0x20_0000;
const RX_RING: GuestAddress = GuestAddress(0x1000);
const TX_RING: GuestAddress = GuestAddress(0x4000);
const INDIRECT_TABLE: GuestAddress = GuestAddress(0x8000);
const RX_BUFS: u64 = 0x1_0000;
const TX_BUFS: u64 = 0x10_0000;
/// What guest memory holds before the device writes.
const FILL: u8 = 0xaa;
/// What the tap leaves in `num_buffers` (it skips those two bytes).
const STALE: [u8; 2] = [0xee, 0xee];

const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const INDIRECT: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
const CSUM: u64 = 1 << VIRTIO_NET_F_CSUM;
const HOST_TSO4: u64 = 1 << VIRTIO_NET_F_HOST_TSO4;

/// A tap: records what it is sent, hands out what it is given.
#[derive(Default)]
struct Tap {
    sent: Vec<Vec<u8>>,
    incoming: VecDeque<Vec<u8>>,
    /// Every send would block.
    blocked: bool,
    /// Sends that fail with EIO before they work again.
    failing_sends: u32,
    /// Every recv fails with this errno.
    recv_errno: Option<i32>,
    offloads: Vec<u64>,
    offload_error: bool,
    recvs: u32,
}

impl NetBackend for Tap {
    fn send(&mut self, packet: &[u8]) -> Result<(), NetBackendError> {
        if self.blocked {
            return Err(NetBackendError::WouldBlock);
        }
        if self.failing_sends > 0 {
            self.failing_sends -= 1;
            return Err(NetBackendError::Io { errno: 5 });
        }
        self.sent.push(packet.to_vec());
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetBackendError> {
        self.recvs += 1;
        assert_eq!(buf.len(), MAX_PACKET_SIZE);
        if let Some(errno) = self.recv_errno {
            return Err(NetBackendError::Io { errno });
        }
        let Some(p) = self.incoming.pop_front() else {
            return Ok(None);
        };
        buf[..p.len()].copy_from_slice(&p);
        Ok(Some(p.len()))
    }

    fn set_offloads(&mut self, guest_features: u64) -> Result<(), NetBackendError> {
        self.offloads.push(guest_features);
        if self.offload_error {
            return Err(NetBackendError::Io { errno: 22 });
        }
        Ok(())
    }
}

fn config() -> NetConfig {
    NetConfig {
        mac: [0x02, 0x00, 0x00, 0xab, 0xcd, 0xef],
        mtu: 1500,
        offloads: true,
    }
}

fn device() -> Net<Tap> {
    Net::new(config(), Tap::default()).unwrap()
}

fn memory() -> Vec<u8> {
    vec![FILL; MEM_SIZE]
}

fn rd(addr: u64, len: u32) -> Descriptor {
    Descriptor {
        addr: GuestAddress(addr),
        len,
        flags: 0,
        next: 0,
    }
}

fn wr(addr: u64, len: u32) -> Descriptor {
    Descriptor {
        addr: GuestAddress(addr),
        len,
        flags: VIRTQ_DESC_F_WRITE,
        next: 0,
    }
}

/// A packet: `header`, then a frame of `frame_len` bytes whose byte `i` is
/// `i ^ seed`.
fn packet_with(header: NetHeader, frame_len: usize, seed: u8) -> Vec<u8> {
    let mut p = header.to_bytes().to_vec();
    p.extend((0..frame_len).map(|i| i as u8 ^ seed));
    p
}

/// A packet with an all-zero header.
fn packet(frame_len: usize, seed: u8) -> Vec<u8> {
    packet_with(NetHeader::default(), frame_len, seed)
}

/// A packet as the tap hands it over: a header with a checksum offload
/// and stale `num_buffers` bytes.
fn tap_packet(frame_len: usize, seed: u8) -> Vec<u8> {
    let header = NetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: u16::from_le_bytes(STALE),
        ..NetHeader::default()
    };
    packet_with(header, frame_len, seed)
}

/// `p` as the guest should see it: with `num_buffers` set.
fn with_num_buffers(p: &[u8], n: u16) -> Vec<u8> {
    let mut p = p.to_vec();
    p[10..12].copy_from_slice(&n.to_le_bytes());
    p
}

/// The driver's side of both queues.
struct Guest<'a, 'b> {
    mem: &'a SliceMemory<'b>,
    rx: MockSplitQueue<'a, SliceMemory<'b>>,
    tx: MockSplitQueue<'a, SliceMemory<'b>>,
    queues: [Queue; 2],
    interrupt: Interrupt<CountingIrq>,
    features: u64,
    /// Every rx chain posted, in order.
    posted: Vec<Vec<Descriptor>>,
    next_rx_buf: u64,
    next_tx_buf: u64,
}

impl<'a, 'b> Guest<'a, 'b> {
    fn new(mem: &'a SliceMemory<'b>, features: u64) -> Self {
        Self::with_size(mem, features, NET_QUEUE_SIZE)
    }

    fn with_size(mem: &'a SliceMemory<'b>, features: u64, size: u16) -> Self {
        Self::at(mem, features, size, RX_RING, TX_RING)
    }

    fn at(
        mem: &'a SliceMemory<'b>,
        features: u64,
        size: u16,
        rx_ring: GuestAddress,
        tx_ring: GuestAddress,
    ) -> Self {
        let rx = MockSplitQueue::new(mem, rx_ring, size).unwrap();
        let tx = MockSplitQueue::new(mem, tx_ring, size).unwrap();
        let queues = [rx.create_queue(features), tx.create_queue(features)];
        Guest {
            mem,
            rx,
            tx,
            queues,
            interrupt: Interrupt::new(CountingIrq::default()),
            features,
            posted: Vec::new(),
            next_rx_buf: RX_BUFS,
            next_tx_buf: TX_BUFS,
        }
    }

    fn ctx(&mut self) -> VirtioContext<'_, SliceMemory<'b>, CountingIrq> {
        VirtioContext {
            mem: self.mem,
            queues: &mut self.queues,
            interrupt: &mut self.interrupt,
            features: self.features,
        }
    }

    fn activate<B: NetBackend>(&mut self, dev: &mut Net<B>) {
        dev.activate(&mut self.ctx()).unwrap();
    }

    fn notify<B: NetBackend>(&mut self, dev: &mut Net<B>, queue: u16) -> Result<(), DeviceError> {
        dev.queue_notify(queue, &mut self.ctx())
    }

    fn irqs(&self) -> u32 {
        self.interrupt.line().count()
    }

    /// Writes `p` into tx buffers cut into `pieces` (the rest in one more)
    /// and publishes the chain; returns its head.
    fn send(&mut self, p: &[u8], pieces: &[usize]) -> u16 {
        let mut descs = Vec::new();
        let mut at = 0;
        for &n in pieces.iter().chain(core::iter::once(&usize::MAX)) {
            let n = n.min(p.len() - at);
            if n == 0 && at == p.len() {
                break;
            }
            let addr = self.next_tx_buf;
            self.mem.write(GuestAddress(addr), &p[at..at + n]).unwrap();
            descs.push(rd(addr, n as u32));
            self.next_tx_buf = (addr + n as u64 + 0xff) & !0xff;
            at += n;
        }
        self.tx.add_chain(&descs).unwrap()
    }

    /// Posts a receive chain of writable buffers of `lens` bytes; returns
    /// its head.
    fn post(&mut self, lens: &[u32]) -> u16 {
        let descs: Vec<Descriptor> = lens
            .iter()
            .map(|&len| {
                let d = wr(self.next_rx_buf, len);
                self.next_rx_buf = (self.next_rx_buf + u64::from(len) + 0xff) & !0xff;
                d
            })
            .collect();
        self.post_descs(&descs)
    }

    fn post_descs(&mut self, descs: &[Descriptor]) -> u16 {
        self.posted.push(descs.to_vec());
        self.rx.add_chain(descs).unwrap()
    }

    /// The first `len` bytes of the `k`-th posted rx chain.
    fn received(&self, k: usize, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        let got = copy_from_chain(self.mem, &self.posted[k], 0, &mut b).unwrap();
        assert_eq!(got, len);
        b
    }
}

/// Sends one tx chain made of `descs` (over memory the caller filled) to
/// a fresh device accepting `features`; returns the device, the chain's
/// used element and the interrupts raised.
fn tx_chain(
    mem: &SliceMemory<'_>,
    features: u64,
    descs: &[Descriptor],
) -> (Net<Tap>, (u32, u32), u32) {
    let mut g = Guest::new(mem, features);
    let mut dev = device();
    g.activate(&mut dev);
    g.tx.add_chain(descs).unwrap();
    g.notify(&mut dev, TX_QUEUE).unwrap();
    assert_eq!(g.tx.used_idx().unwrap(), 1, "every chain is answered");
    (dev, g.tx.used_elem(0).unwrap(), g.irqs())
}

/// Sends `p` in one tx chain cut into `pieces`; returns the device and the
/// used element.
fn tx_packet(features: u64, p: &[u8], pieces: &[usize]) -> (Net<Tap>, (u32, u32)) {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, features);
    let mut dev = device();
    g.activate(&mut dev);
    g.send(p, pieces);
    g.notify(&mut dev, TX_QUEUE).unwrap();
    assert_eq!(g.tx.used_idx().unwrap(), 1, "every chain is answered");
    (dev, g.tx.used_elem(0).unwrap())
}

/// Asserts `dev` refused one chain with `e` and sent nothing.
fn assert_refused(dev: &Net<Tap>, e: NetError) {
    assert_eq!(dev.last_error(), Some(e));
    assert!(dev.backend().sent.is_empty());
    let s = dev.stats();
    assert_eq!((s.rejected, s.tx_frames), (1, 0));
}

#[test]
fn tx_sends_a_packet_spread_over_several_buffers() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, 0);
    let mut dev = device();
    g.activate(&mut dev);
    let p = packet(1514, 7);
    // The header alone, then the frame in two pieces.
    let head = g.send(&p, &[HEADER_SIZE, 100]);
    g.notify(&mut dev, TX_QUEUE).unwrap();
    assert_eq!(dev.backend().sent, [p]);
    assert_eq!(g.tx.used_elem(0).unwrap(), (u32::from(head), 0));
    assert_eq!(g.irqs(), 1);
    let s = dev.stats();
    assert_eq!((s.tx_frames, s.tx_bytes, s.rejected), (1, 1514, 0));
    // The header split across buffers, too.
    let p = packet(60, 1);
    g.send(&p, &[5, 10, 1]);
    g.notify(&mut dev, TX_QUEUE).unwrap();
    assert_eq!(dev.backend().sent[1], p);
    assert_eq!(g.tx.used_idx().unwrap(), 2);
}

#[test]
fn tx_takes_an_indirect_chain() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let p = packet(200, 9);
    mem.write(GuestAddress(TX_BUFS), &p[..HEADER_SIZE]).unwrap();
    mem.write(GuestAddress(TX_BUFS + 0x100), &p[HEADER_SIZE..])
        .unwrap();
    let mut g = Guest::new(&mem, INDIRECT);
    let mut dev = device();
    g.activate(&mut dev);
    g.tx.add_indirect_chain(
        INDIRECT_TABLE,
        &[rd(TX_BUFS, HEADER_SIZE as u32), rd(TX_BUFS + 0x100, 200)],
    )
    .unwrap();
    g.notify(&mut dev, TX_QUEUE).unwrap();
    assert_eq!(dev.backend().sent, [p]);
}

#[test]
fn tx_refuses_a_writable_buffer() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let (dev, (_, len), irqs) = tx_chain(&mem, 0, &[rd(TX_BUFS, 12), wr(TX_BUFS + 0x100, 100)]);
    assert_eq!((len, irqs), (0, 1));
    assert_refused(
        &dev,
        NetError::WritableBuffer {
            addr: TX_BUFS + 0x100,
            len: 100,
        },
    );
    assert_eq!(read(&mem, TX_BUFS + 0x100, 100), [FILL; 100], "untouched");
}

fn read(mem: &SliceMemory<'_>, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    mem.read(GuestAddress(addr), &mut b).unwrap();
    b
}

#[test]
fn tx_refuses_a_packet_shorter_than_two_headers_and_an_empty_chain() {
    for len in [0, 1, 12, 25] {
        let mut bytes = memory();
        let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
        let (dev, (_, used), _) = tx_chain(&mem, 0, &[rd(TX_BUFS, len)]);
        assert_eq!(used, 0);
        assert_refused(&dev, NetError::PacketTooShort { len });
    }
    // A header and an Ethernet header are enough.
    let (dev, _) = tx_packet(0, &packet(MIN_FRAME_SIZE, 0), &[]);
    assert_eq!(dev.stats().tx_frames, 1);
}

#[test]
fn tx_refuses_a_packet_longer_than_the_bounce_buffer() {
    let first = 0x8000u32;
    let rest = (MAX_PACKET_SIZE as u32 - first) + 1;
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let (dev, (_, used), _) = tx_chain(
        &mem,
        0,
        &[rd(TX_BUFS, first), rd(TX_BUFS + u64::from(first), rest)],
    );
    assert_eq!(used, 0);
    assert_refused(
        &dev,
        NetError::PacketTooLong {
            len: MAX_PACKET_SIZE as u32 + 1,
        },
    );
    // Exactly the maximum goes through.
    let p = packet(MAX_FRAME_SIZE, 3);
    let (dev, _) = tx_packet(0, &p, &[0x8000]);
    assert_eq!(dev.backend().sent, [p]);
    assert_eq!(dev.stats().tx_bytes, MAX_FRAME_SIZE as u64);
}

#[test]
fn tx_refuses_a_buffer_outside_guest_memory() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let outside = MEM_SIZE as u64 - 8;
    let (dev, (_, used), _) = tx_chain(&mem, 0, &[rd(TX_BUFS, 12), rd(outside, 64)]);
    assert_eq!(used, 0);
    assert_refused(
        &dev,
        NetError::OutsideGuestMemory {
            addr: outside,
            len: 64,
        },
    );
}

#[test]
fn tx_refuses_malformed_chains_and_serves_the_next() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, 0);
    let mut dev = device();
    g.activate(&mut dev);
    // 0 links to 999, past the table.
    let link = |next| Descriptor {
        addr: GuestAddress(TX_BUFS),
        len: 64,
        flags: VIRTQ_DESC_F_NEXT,
        next,
    };
    g.tx.write_desc(0, link(999)).unwrap();
    g.tx.publish(0).unwrap();
    // 1 and 2 link to each other.
    g.tx.write_desc(1, link(2)).unwrap();
    g.tx.write_desc(2, link(1)).unwrap();
    g.tx.publish(1).unwrap();
    // An indirect table, not negotiated.
    g.tx.write_desc(
        3,
        Descriptor {
            addr: INDIRECT_TABLE,
            len: 32,
            flags: VIRTQ_DESC_F_INDIRECT,
            next: 0,
        },
    )
    .unwrap();
    g.tx.publish(3).unwrap();
    // And a good one in descriptor 4.
    let p = packet(100, 2);
    mem.write(GuestAddress(TX_BUFS + 0x1000), &p).unwrap();
    g.tx.write_desc(4, rd(TX_BUFS + 0x1000, p.len() as u32))
        .unwrap();
    g.tx.publish(4).unwrap();
    g.notify(&mut dev, TX_QUEUE).unwrap();
    assert_eq!(g.tx.used_idx().unwrap(), 4);
    for (slot, head) in [(0, 0), (1, 1), (2, 3)] {
        assert_eq!(g.tx.used_elem(slot).unwrap(), (head, 0));
    }
    assert_eq!(g.tx.used_elem(3).unwrap(), (4, 0));
    assert_eq!(dev.backend().sent, [p]);
    assert_eq!(
        dev.last_error(),
        Some(NetError::Malformed(ChainError::IndirectNotNegotiated))
    );
    let s = dev.stats();
    assert_eq!((s.rejected, s.tx_frames), (3, 1));
}

#[test]
fn tx_offloads_need_the_features_that_allow_them() {
    let header = |flags, gso_type| NetHeader {
        flags,
        gso_type,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    let tcp4 = VIRTIO_NET_HDR_GSO_TCPV4;
    let cases = [
        (header(csum, 0), 0, false),
        (header(csum, 0), CSUM, true),
        (header(csum, tcp4), CSUM, false),
        (header(csum, tcp4), CSUM | HOST_TSO4, true),
        (
            header(csum, VIRTIO_NET_HDR_GSO_TCPV6),
            CSUM | HOST_TSO4,
            false,
        ),
        (
            header(csum, VIRTIO_NET_HDR_GSO_TCPV6),
            CSUM | (1 << VIRTIO_NET_F_HOST_TSO6),
            true,
        ),
        // ECN, UFO: never offered.
        (
            header(csum, tcp4 | VIRTIO_NET_HDR_GSO_ECN),
            CSUM | HOST_TSO4,
            false,
        ),
        (
            header(csum, VIRTIO_NET_HDR_GSO_UDP),
            OFFLOAD_FEATURES,
            false,
        ),
        // Not a GSO type at all.
        (header(0, 2), OFFLOAD_FEATURES, false),
        // DATA_VALID is the backend's business.
        (header(2, 0), 0, true),
    ];
    for (h, features, ok) in cases {
        let p = packet_with(h, 200, 0);
        let (dev, (_, used)) = tx_packet(features, &p, &[]);
        assert_eq!(used, 0);
        if ok {
            assert_eq!(dev.backend().sent, [p], "{h:?} with {features:#x}");
        } else {
            assert_refused(
                &dev,
                NetError::OffloadNotNegotiated {
                    flags: h.flags,
                    gso_type: h.gso_type,
                },
            );
        }
    }
}

#[test]
fn tx_that_would_block_keeps_its_chain_until_the_tap_is_writable() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, EVENT_IDX);
    let mut dev = device();
    g.activate(&mut dev);
    dev.backend_mut().blocked = true;
    let (p, q) = (packet(100, 1), packet(200, 2));
    g.send(&p, &[]);
    g.send(&q, &[]);
    g.notify(&mut dev, TX_QUEUE).unwrap();
    assert!(dev.backend().sent.is_empty());
    assert_eq!(
        g.tx.used_idx().unwrap(),
        0,
        "the chain stays with the device"
    );
    assert_eq!(g.queues[1].next_avail(), 0);
    assert_eq!(g.irqs(), 0);
    assert_eq!(
        dev.interest(),
        NetInterest {
            readable: true,
            writable: true,
            again: false
        }
    );
    // A notification while blocked tries again, and blocks again.
    g.notify(&mut dev, TX_QUEUE).unwrap();
    assert_eq!(dev.stats().tx_blocked, 2);
    // The tap became writable.
    dev.backend_mut().blocked = false;
    dev.process_tx(&mut g.ctx()).unwrap();
    assert_eq!(dev.backend().sent, [p, q]);
    assert_eq!(g.tx.used_idx().unwrap(), 2);
    assert_eq!(g.irqs(), 1);
    assert!(!dev.interest().writable);
    assert_eq!(dev.stats().budget_stops, 0);
}

#[test]
fn tx_backend_failure_loses_the_packet_and_goes_on() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, 0);
    let mut dev = device();
    g.activate(&mut dev);
    dev.backend_mut().failing_sends = 1;
    let (p, q) = (packet(100, 1), packet(200, 2));
    g.send(&p, &[]);
    g.send(&q, &[]);
    g.notify(&mut dev, TX_QUEUE).unwrap();
    assert_eq!(dev.backend().sent, [q]);
    assert_eq!(g.tx.used_idx().unwrap(), 2);
    let s = dev.stats();
    assert_eq!(
        (s.tx_frames, s.tx_dropped, s.backend_errors, s.rejected),
        (1, 1, 1, 0)
    );
    assert_eq!(
        dev.last_backend_error(),
        Some(NetBackendError::Io { errno: 5 })
    );
    assert_eq!(dev.last_error(), None);
}

#[test]
fn tx_serves_at_most_its_budget_and_asks_to_be_called_again() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, EVENT_IDX);
    let mut dev = device();
    g.activate(&mut dev);
    let p = packet(MIN_FRAME_SIZE, 0);
    for _ in 0..100 {
        g.send(&p, &[]);
    }
    g.notify(&mut dev, TX_QUEUE).unwrap();
    assert_eq!(dev.backend().sent.len(), MAX_TX_CHAINS_PER_CALL as usize);
    assert!(dev.interest().again);
    assert_eq!(dev.stats().budget_stops, 1);
    assert_eq!(g.irqs(), 1);
    dev.process(&mut g.ctx()).unwrap();
    assert_eq!(dev.backend().sent.len(), 100);
    assert_eq!(g.tx.used_idx().unwrap(), 100);
    assert!(!dev.interest().again);
    assert_eq!(dev.stats().budget_stops, 1);
    // Drained, it re-armed the notification past what it consumed.
    assert_eq!(g.tx.avail_event().unwrap(), 100);
}

#[test]
fn no_interrupt_when_the_driver_wants_none() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, 0);
    let mut dev = device();
    g.activate(&mut dev);
    g.tx.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT).unwrap();
    g.rx.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT).unwrap();
    g.send(&packet(100, 0), &[]);
    g.post(&[2048]);
    dev.backend_mut().incoming.push_back(tap_packet(100, 0));
    dev.process(&mut g.ctx()).unwrap();
    assert_eq!(g.tx.used_idx().unwrap(), 1);
    assert_eq!(g.rx.used_idx().unwrap(), 1);
    assert_eq!(g.irqs(), 0);
}

#[test]
fn rx_delivers_a_packet_into_one_chain() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, 0);
    let mut dev = device();
    g.activate(&mut dev);
    // The header in a buffer of its own, as older drivers post them.
    let head = g.post(&[HEADER_SIZE as u32, 1514]);
    let p = tap_packet(1000, 3);
    dev.backend_mut().incoming.push_back(p.clone());
    dev.process_rx(&mut g.ctx()).unwrap();
    assert_eq!(g.rx.used_elem(0).unwrap(), (u32::from(head), 1012));
    assert_eq!(g.received(0, 1012), with_num_buffers(&p, 1));
    assert_eq!(
        read(&mem, g.posted[0][1].addr.0 + 1000, 1),
        [FILL],
        "nothing past the frame"
    );
    assert_eq!(g.irqs(), 1);
    let s = dev.stats();
    assert_eq!((s.rx_frames, s.rx_bytes, s.rejected), (1, 1000, 0));
    assert_eq!(dev.backend().recvs, 2, "read until the tap was empty");
    assert_eq!(
        dev.interest(),
        NetInterest {
            readable: true,
            ..NetInterest::default()
        }
    );
    assert_eq!(dev.held(), None);
}

#[test]
fn rx_with_mergeable_buffers_spreads_a_packet_over_chains() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, MRG);
    let mut dev = device();
    g.activate(&mut dev);
    let heads: Vec<u16> = (0..5).map(|_| g.post(&[1536])).collect();
    let p = tap_packet(5000, 5);
    let small = tap_packet(60, 6);
    dev.backend_mut()
        .incoming
        .extend([p.clone(), small.clone()]);
    dev.process_rx(&mut g.ctx()).unwrap();
    assert_eq!(g.rx.used_idx().unwrap(), 5);
    for k in 0..3 {
        assert_eq!(
            g.rx.used_elem(k).unwrap(),
            (u32::from(heads[k as usize]), 1536)
        );
    }
    assert_eq!(
        g.rx.used_elem(3).unwrap(),
        (u32::from(heads[3]), 5012 - 3 * 1536)
    );
    let mut got = Vec::new();
    for k in 0..4 {
        let (_, len) = g.rx.used_elem(k as u16).unwrap();
        got.extend(g.received(k, len as usize));
    }
    assert_eq!(got, with_num_buffers(&p, 4));
    // The small one fits one chain.
    assert_eq!(g.rx.used_elem(4).unwrap(), (u32::from(heads[4]), 72));
    assert_eq!(g.received(4, 72), with_num_buffers(&small, 1));
    assert_eq!(g.irqs(), 1);
    assert_eq!(dev.stats().rx_frames, 2);
}

#[test]
fn rx_without_mergeable_buffers_drops_a_packet_too_large_for_the_chain() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, 0);
    let mut dev = device();
    g.activate(&mut dev);
    let head = g.post(&[100]);
    let small = tap_packet(50, 1);
    dev.backend_mut()
        .incoming
        .extend([tap_packet(200, 0), small.clone()]);
    dev.process_rx(&mut g.ctx()).unwrap();
    // The large one is gone; its chain took the next.
    assert_eq!(g.rx.used_idx().unwrap(), 1);
    assert_eq!(g.rx.used_elem(0).unwrap(), (u32::from(head), 62));
    assert_eq!(g.received(0, 62), with_num_buffers(&small, 1));
    assert_eq!(
        dev.last_error(),
        Some(NetError::BuffersTooSmall {
            len: 212,
            room: 100
        })
    );
    let s = dev.stats();
    assert_eq!((s.rx_frames, s.rx_dropped, s.rejected), (1, 1, 0));
}

#[test]
fn rx_with_mergeable_buffers_drops_a_packet_a_whole_ring_cannot_hold() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::with_size(&mem, MRG, 4);
    let mut dev = device();
    g.activate(&mut dev);
    let heads: Vec<u16> = (0..4).map(|_| g.post(&[100])).collect();
    let small = tap_packet(50, 1);
    dev.backend_mut()
        .incoming
        .extend([tap_packet(1000, 0), small.clone()]);
    dev.process_rx(&mut g.ctx()).unwrap();
    assert_eq!(
        dev.last_error(),
        Some(NetError::BuffersTooSmall {
            len: 1012,
            room: 400
        })
    );
    assert_eq!(g.rx.used_idx().unwrap(), 1);
    assert_eq!(g.rx.used_elem(0).unwrap(), (u32::from(heads[0]), 62));
    assert_eq!(g.received(0, 62), with_num_buffers(&small, 1));
    assert_eq!(dev.stats().rx_dropped, 1);
    assert_eq!(dev.held(), None);
}

#[test]
fn rx_holds_a_packet_until_the_guest_posts_buffers() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, EVENT_IDX);
    let mut dev = device();
    g.activate(&mut dev);
    let (p, q) = (tap_packet(300, 1), tap_packet(400, 2));
    dev.backend_mut().incoming.extend([p.clone(), q.clone()]);
    dev.process_rx(&mut g.ctx()).unwrap();
    assert_eq!(dev.held(), Some(312));
    assert_eq!(
        dev.interest(),
        NetInterest::default(),
        "the tap is not watched"
    );
    assert_eq!(dev.stats().held, 1);
    assert_eq!(dev.backend().recvs, 1);
    assert_eq!(g.irqs(), 0);
    // The driver's next buffer notifies.
    assert_eq!(g.rx.avail_event().unwrap(), 0);
    // Called anyway: still held, the tap not read, not counted twice.
    dev.process_rx(&mut g.ctx()).unwrap();
    assert_eq!((dev.backend().recvs, dev.stats().held), (1, 1));

    let first = g.post(&[2048]);
    g.notify(&mut dev, RX_QUEUE).unwrap();
    assert_eq!(g.rx.used_elem(0).unwrap(), (u32::from(first), 312));
    assert_eq!(g.received(0, 312), with_num_buffers(&p, 1));
    assert_eq!(g.irqs(), 1);
    // It read on: the next packet waits in turn.
    assert_eq!(dev.held(), Some(412));
    assert_eq!(dev.stats().held, 2);
    assert_eq!(g.rx.avail_event().unwrap(), 1);

    let second = g.post(&[2048]);
    g.notify(&mut dev, RX_QUEUE).unwrap();
    assert_eq!(g.rx.used_elem(1).unwrap(), (u32::from(second), 412));
    assert_eq!(g.received(1, 412), with_num_buffers(&q, 1));
    assert_eq!(dev.held(), None);
    assert!(dev.interest().readable);
    assert_eq!(dev.stats().rx_frames, 2);
}

#[test]
fn rx_with_mergeable_buffers_holds_a_packet_the_ring_cannot_hold_yet() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    // No event index: the device asks with used.flags.
    let mut g = Guest::new(&mem, MRG);
    let mut dev = device();
    g.activate(&mut dev);
    let mut heads: Vec<u16> = (0..2).map(|_| g.post(&[1536])).collect();
    let p = tap_packet(5000, 5);
    dev.backend_mut().incoming.push_back(p.clone());
    dev.process_rx(&mut g.ctx()).unwrap();
    assert_eq!(dev.held(), Some(5012));
    assert_eq!(g.rx.used_idx().unwrap(), 0);
    assert_eq!(g.queues[0].next_avail(), 0, "both chains put back");
    assert_eq!(g.rx.used_flags().unwrap(), 0, "notifications wanted");

    heads.extend((0..2).map(|_| g.post(&[1536])));
    g.notify(&mut dev, RX_QUEUE).unwrap();
    assert_eq!(g.rx.used_idx().unwrap(), 4);
    let mut got = Vec::new();
    for (k, &head) in heads.iter().enumerate() {
        let (id, len) = g.rx.used_elem(k as u16).unwrap();
        assert_eq!(id, u32::from(head));
        got.extend(g.received(k, len as usize));
    }
    assert_eq!(got, with_num_buffers(&p, 4));
    assert_eq!(dev.held(), None);
    assert_eq!(
        g.rx.used_flags().unwrap(),
        VIRTQ_USED_F_NO_NOTIFY,
        "not wanted while nothing waits"
    );
}

#[test]
fn rx_refuses_bad_chains_and_uses_the_next() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, 0);
    let mut dev = device();
    g.activate(&mut dev);
    let readable = g.post_descs(&[wr(RX_BUFS, 12), rd(RX_BUFS + 0x100, 1500)]);
    let short = g.post_descs(&[wr(RX_BUFS + 0x1000, 8)]);
    let good = g.post_descs(&[wr(RX_BUFS + 0x2000, 2048)]);
    let p = tap_packet(100, 0);
    dev.backend_mut().incoming.push_back(p.clone());
    dev.process_rx(&mut g.ctx()).unwrap();
    assert_eq!(g.rx.used_elem(0).unwrap(), (u32::from(readable), 0));
    assert_eq!(g.rx.used_elem(1).unwrap(), (u32::from(short), 0));
    assert_eq!(g.rx.used_elem(2).unwrap(), (u32::from(good), 112));
    assert_eq!(g.received(2, 112), with_num_buffers(&p, 1));
    assert_eq!(read(&mem, RX_BUFS, 12), [FILL; 12], "refused untouched");
    assert_eq!(dev.last_error(), Some(NetError::BufferTooShort { len: 8 }));
    let s = dev.stats();
    assert_eq!((s.rejected, s.rx_frames), (2, 1));
}

#[test]
fn rx_refuses_a_malformed_chain() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, 0);
    let mut dev = device();
    g.activate(&mut dev);
    g.rx.write_desc(
        0,
        Descriptor {
            addr: GuestAddress(RX_BUFS),
            len: 64,
            flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            next: 300,
        },
    )
    .unwrap();
    g.rx.publish(0).unwrap();
    g.rx.write_desc(1, wr(RX_BUFS + 0x1000, 2048)).unwrap();
    g.rx.publish(1).unwrap();
    dev.backend_mut().incoming.push_back(tap_packet(100, 0));
    dev.process_rx(&mut g.ctx()).unwrap();
    assert_eq!(g.rx.used_elem(0).unwrap(), (0, 0));
    assert_eq!(g.rx.used_elem(1).unwrap(), (1, 112));
    assert_eq!(
        dev.last_error(),
        Some(NetError::Malformed(ChainError::IndexOutOfRange {
            index: 300,
            table_size: NET_QUEUE_SIZE
        }))
    );
}

#[test]
fn rx_with_mergeable_buffers_starts_over_after_a_bad_chain() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, MRG);
    let mut dev = device();
    g.activate(&mut dev);
    let small = g.post(&[100]);
    let bad = g.post_descs(&[rd(RX_BUFS + 0x1000, 100)]);
    let big = g.post_descs(&[wr(RX_BUFS + 0x2000, 2000)]);
    g.posted.swap(0, 2);
    let p = tap_packet(1000, 4);
    dev.backend_mut().incoming.push_back(p.clone());
    dev.process_rx(&mut g.ctx()).unwrap();
    // The bad one goes back as it is found, the frame's first chain after
    // it, empty; then the frame starts over.
    assert_eq!(g.rx.used_elem(0).unwrap(), (u32::from(bad), 0));
    assert_eq!(g.rx.used_elem(1).unwrap(), (u32::from(small), 0));
    assert_eq!(g.rx.used_elem(2).unwrap(), (u32::from(big), 1012));
    assert_eq!(g.received(0, 1012), with_num_buffers(&p, 1));
    let s = dev.stats();
    assert_eq!((s.rejected, s.rx_frames, s.rx_dropped), (1, 1, 0));
}

#[test]
fn rx_delivers_at_most_its_frame_budget_per_call() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, 0);
    let mut dev = device();
    g.activate(&mut dev);
    for _ in 0..128 {
        g.post(&[128]);
    }
    for i in 0..100 {
        dev.backend_mut().incoming.push_back(tap_packet(60, i));
    }
    dev.process_rx(&mut g.ctx()).unwrap();
    assert_eq!(g.rx.used_idx().unwrap(), MAX_RX_FRAMES_PER_CALL as u16);
    assert_eq!(
        dev.interest(),
        NetInterest {
            readable: true,
            ..NetInterest::default()
        },
        "the tap is still readable: no need to come back otherwise"
    );
    dev.process_rx(&mut g.ctx()).unwrap();
    assert_eq!(g.rx.used_idx().unwrap(), 100);
    assert_eq!(g.irqs(), 2);
}

/// A tap whose every packet arrives with the 200 tiny buffers it needs, as
/// if the guest kept posting them.
struct Reposting<'q, 'a, 'b> {
    rx: &'q RefCell<MockSplitQueue<'a, SliceMemory<'b>>>,
    posted: u64,
}

/// Buffers per [`Reposting`] packet, and their size.
const TINY_BUFS: usize = 200;
const TINY: u32 = 16;

impl NetBackend for Reposting<'_, '_, '_> {
    fn send(&mut self, _: &[u8]) -> Result<(), NetBackendError> {
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetBackendError> {
        for _ in 0..TINY_BUFS {
            let addr = RX_BUFS + (self.posted % 256) * u64::from(TINY);
            self.rx.borrow_mut().add_chain(&[wr(addr, TINY)]).unwrap();
            self.posted += 1;
        }
        let len = TINY_BUFS * TINY as usize;
        buf[..len].fill(0);
        Ok(Some(len))
    }

    fn set_offloads(&mut self, _: u64) -> Result<(), NetBackendError> {
        Ok(())
    }
}

#[test]
fn rx_takes_at_most_its_chain_budget_per_call() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let rx = RefCell::new(MockSplitQueue::new(&mem, RX_RING, NET_QUEUE_SIZE).unwrap());
    let tx = MockSplitQueue::new(&mem, TX_RING, NET_QUEUE_SIZE).unwrap();
    let mut queues = [rx.borrow().create_queue(MRG), tx.create_queue(MRG)];
    let mut interrupt = Interrupt::new(CountingIrq::default());
    let mut ctx = VirtioContext {
        mem: &mem,
        queues: &mut queues,
        interrupt: &mut interrupt,
        features: MRG,
    };
    let mut dev = Net::new(config(), Reposting { rx: &rx, posted: 0 }).unwrap();
    dev.activate(&mut ctx).unwrap();
    dev.process_rx(&mut ctx).unwrap();
    // Five packets take 1000 chains; the sixth finds 24 left, puts them
    // back and waits for the next call.
    let per_call = MAX_RX_CHAINS_PER_CALL as usize / TINY_BUFS;
    assert_eq!(dev.stats().rx_frames, per_call as u64);
    assert_eq!(dev.held(), Some(TINY_BUFS * TINY as usize));
    assert_eq!(ctx.queues[0].next_used() as usize, per_call * TINY_BUFS);
    assert_eq!(ctx.queues[0].next_avail(), ctx.queues[0].next_used());
    assert_eq!(
        dev.interest(),
        NetInterest {
            readable: false,
            writable: false,
            again: true
        }
    );
    assert_eq!(dev.stats().budget_stops, 1);
    dev.process(&mut ctx).unwrap();
    assert_eq!(dev.stats().rx_frames, 2 * per_call as u64);
    assert_eq!(
        rx.borrow().used_idx().unwrap() as usize,
        2 * per_call * TINY_BUFS
    );
    // The last frame said how many buffers it took, in its first (chain
    // 1800 of those posted, in buffer slot 1800 % 256).
    let first = (2 * per_call - 1) * TINY_BUFS;
    let addr = RX_BUFS + (first as u64 % 256) * u64::from(TINY);
    assert_eq!(read(&mem, addr + 10, 2), (TINY_BUFS as u16).to_le_bytes());
}

#[test]
fn rx_backend_failures_and_runt_packets_are_counted() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, 0);
    let mut dev = device();
    g.activate(&mut dev);
    g.post(&[2048]);
    dev.backend_mut()
        .incoming
        .extend([vec![0; 11], tap_packet(10, 0)]);
    dev.process_rx(&mut g.ctx()).unwrap();
    assert_eq!(g.rx.used_elem(0).unwrap().1, 22);
    assert_eq!(dev.stats().rx_dropped, 1);
    dev.backend_mut().recv_errno = Some(77);
    dev.process_rx(&mut g.ctx()).unwrap();
    assert_eq!(dev.stats().backend_errors, 1);
    assert_eq!(
        dev.last_backend_error(),
        Some(NetBackendError::Io { errno: 77 })
    );
    assert!(dev.interest().readable);
}

#[test]
fn features_offered_follow_the_config() {
    let base = (1 << VIRTIO_NET_F_MAC)
        | (1 << VIRTIO_NET_F_MTU)
        | (1 << VIRTIO_NET_F_STATUS)
        | MRG
        | EVENT_IDX
        | INDIRECT;
    assert_eq!(device().avail_features(), base | OFFLOAD_FEATURES);
    let plain = Net::new(
        NetConfig {
            offloads: false,
            ..config()
        },
        Tap::default(),
    )
    .unwrap();
    assert_eq!(plain.avail_features(), base);
    assert_eq!(OFFLOAD_FEATURES.count_ones(), 6);
    let ufo = (1 << VIRTIO_NET_F_HOST_UFO) | (1 << VIRTIO_NET_F_GUEST_UFO);
    assert_eq!(device().avail_features() & ufo, 0);
}

#[test]
fn activation_gives_the_backend_the_accepted_features() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let accepted = CSUM | (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4) | MRG;
    let mut g = Guest::new(&mem, accepted);
    let mut dev = device();
    g.activate(&mut dev);
    assert_eq!(dev.backend().offloads, [accepted]);

    // A backend that cannot set them fails the activation.
    let mut dev = device();
    dev.backend_mut().offload_error = true;
    assert_eq!(
        dev.activate(&mut g.ctx()),
        Err(DeviceError::Backend {
            reason: "cannot set the backend's offloads"
        })
    );
    assert_eq!(
        dev.last_backend_error(),
        Some(NetBackendError::Io { errno: 22 })
    );
}

#[test]
fn activation_needs_both_queues_and_other_queues_are_ignored() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, 0);
    g.queues[1] = Queue::new(NET_QUEUE_SIZE).unwrap();
    let mut dev = device();
    assert_eq!(
        dev.activate(&mut g.ctx()),
        Err(DeviceError::QueueNotReady { index: TX_QUEUE })
    );
    assert_eq!(
        dev.process_tx(&mut g.ctx()),
        Err(DeviceError::QueueNotReady { index: TX_QUEUE })
    );
    assert_eq!(dev.queue_notify(2, &mut g.ctx()), Ok(()));
    assert!(dev.backend().offloads.is_empty());
}

#[test]
fn config_space_holds_mac_status_pairs_and_mtu() {
    let dev = device();
    let read = |offset, len: usize| {
        let mut b = vec![0u8; len];
        dev.read_config(offset, &mut b);
        b
    };
    assert_eq!(read(0, 6), config().mac);
    assert_eq!(read(CONFIG_STATUS_OFFSET as u64, 2), [1, 0]);
    assert_eq!(read(CONFIG_MAX_VIRTQUEUE_PAIRS_OFFSET as u64, 2), [1, 0]);
    assert_eq!(read(CONFIG_MTU_OFFSET as u64, 2), 1500u16.to_le_bytes());
    assert_eq!(read(4, 4), [0xcd, 0xef, 1, 0], "across fields");
    assert_eq!(read(12, 4), [0; 4], "past the end");
    assert_eq!(read(10, 4), [0; 4], "straddling the end");

    // Through the transport, which adds VERSION_1.
    let t: MmioTransport<_, _, 2> = MmioTransport::new(device(), CountingIrq::default()).unwrap();
    let reg = |offset, len: usize| {
        let mut b = [0u8; 8];
        t.read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    };
    assert_eq!(reg(DEVICE_ID_OFFSET, 4), 1);
    assert_eq!(reg(QUEUE_NUM_MAX_OFFSET, 4), u64::from(NET_QUEUE_SIZE));
    assert_eq!(reg(CONFIG_OFFSET + 10, 2), 1500);
    assert_eq!(reg(CONFIG_OFFSET, 4), 0xab00_0002);
    assert_ne!(t.device_features() & (1 << VIRTIO_F_VERSION_1), 0);
    assert_eq!(t.queues().len(), 2);
    // The configuration space is read-only.
    let mut dev = device();
    dev.write_config(0, &[0xff; 4]);
    dev.write_config(CONFIG_MTU_OFFSET as u64, &[0; 2]);
    assert_eq!(dev.config(), config());
}

type NetTransport = MmioTransport<Net<Tap>, CountingIrq, 2>;

/// The driver's register writes: acknowledge, accept `features`, and
/// unless the transport refuses them, set the queues of `g` up and set
/// DRIVER_OK.
fn initialize(
    t: &mut NetTransport,
    g: &Guest<'_, '_>,
    features: u64,
) -> Result<(), crate::mmio::MmioError> {
    let mem = g.mem;
    let w = |t: &mut NetTransport, offset, value: u32| t.write(mem, offset, &value.to_le_bytes());
    w(
        t,
        STATUS_OFFSET,
        u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER),
    )?;
    for sel in 0..2u32 {
        w(t, DRIVER_FEATURES_SEL_OFFSET, sel)?;
        w(t, DRIVER_FEATURES_OFFSET, (features >> (32 * sel)) as u32)?;
    }
    let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    w(t, STATUS_OFFSET, u32::from(status))?;
    for (index, q) in [&g.rx, &g.tx].into_iter().enumerate() {
        w(t, QUEUE_SEL_OFFSET, index as u32)?;
        w(t, QUEUE_NUM_OFFSET, u32::from(q.size()))?;
        for (low, addr) in [
            (QUEUE_DESC_LOW_OFFSET, q.desc_table()),
            (QUEUE_DRIVER_LOW_OFFSET, q.avail_ring()),
            (QUEUE_DEVICE_LOW_OFFSET, q.used_ring()),
        ] {
            w(t, low, addr.raw() as u32)?;
            w(t, low + 4, (addr.raw() >> 32) as u32)?;
        }
        w(t, QUEUE_READY_OFFSET, 1)?;
    }
    w(t, STATUS_OFFSET, u32::from(status | STATUS_DRIVER_OK))
}

#[test]
fn through_the_transport_the_driver_gets_only_the_offloads_offered() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let version_1 = 1u64 << VIRTIO_F_VERSION_1;
    let plain = NetConfig {
        offloads: false,
        ..config()
    };
    let g = Guest::new(&mem, 0);
    let mut t = NetTransport::new(
        Net::new(plain, Tap::default()).unwrap(),
        CountingIrq::default(),
    )
    .unwrap();
    assert!(matches!(
        initialize(&mut t, &g, version_1 | CSUM),
        Err(crate::mmio::MmioError::FeaturesRejected { .. })
    ));
    assert!(!t.is_live());
    assert!(t.device().backend().offloads.is_empty());

    // Offered, accepted, and handed to the backend on DRIVER_OK.
    let mut g = Guest::new(&mem, 0);
    let mut t = NetTransport::new(device(), CountingIrq::default()).unwrap();
    let accepted = version_1 | CSUM | HOST_TSO4 | MRG | EVENT_IDX;
    initialize(&mut t, &g, accepted).unwrap();
    assert!(t.is_live());
    assert_eq!(t.device().backend().offloads, [accepted]);

    // The host's calls: the tap readable, a queue notification.
    let p = tap_packet(100, 1);
    t.device_mut().backend_mut().incoming.push_back(p.clone());
    g.post(&[2048]);
    t.run_device(&mem, |dev, ctx| dev.process_rx(ctx)).unwrap();
    assert_eq!(g.received(0, 112), with_num_buffers(&p, 1));
    let q = packet_with(
        NetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            ..NetHeader::default()
        },
        3000,
        2,
    );
    g.send(&q, &[HEADER_SIZE]);
    t.notify(&mem, TX_QUEUE).unwrap();
    assert_eq!(t.device().backend().sent, [q]);
    assert_eq!(t.interrupt().line().count(), 2);
    assert_eq!(
        t.device().interest(),
        NetInterest {
            readable: true,
            ..NetInterest::default()
        }
    );
}

#[test]
fn config_is_checked() {
    let with = |mac, mtu| {
        Net::new(
            NetConfig {
                mac,
                mtu,
                offloads: false,
            },
            Tap::default(),
        )
        .err()
    };
    let multicast = [0x01, 0, 0x5e, 0, 0, 1];
    assert_eq!(
        with(multicast, 1500),
        Some(NetConfigError::InvalidMac { mac: multicast })
    );
    assert_eq!(
        with([0; 6], 1500),
        Some(NetConfigError::InvalidMac { mac: [0; 6] })
    );
    assert_eq!(
        with(config().mac, 67),
        Some(NetConfigError::InvalidMtu { mtu: 67 })
    );
    assert_eq!(with(config().mac, 68), None);
    assert_eq!(with(config().mac, u16::MAX), None);
    assert_eq!(
        std::format!("{}", NetConfigError::InvalidMac { mac: multicast }),
        "MAC address [01, 00, 5e, 00, 00, 01] is not a unicast address"
    );
}

#[test]
fn reset_drops_the_held_packet() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, 0);
    let mut dev = device();
    g.activate(&mut dev);
    dev.backend_mut().incoming.push_back(tap_packet(100, 0));
    dev.backend_mut().blocked = true;
    g.send(&packet(100, 0), &[]);
    dev.process(&mut g.ctx()).unwrap();
    assert_eq!(
        dev.interest(),
        NetInterest {
            readable: false,
            writable: true,
            again: false
        }
    );
    dev.reset();
    assert_eq!(dev.held(), None);
    assert_eq!(
        dev.interest(),
        NetInterest {
            readable: true,
            ..NetInterest::default()
        }
    );
    assert_eq!(dev.stats().rx_dropped, 1);
}

#[test]
fn resume_sets_the_offloads_and_sends_what_the_ring_holds() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut g = Guest::new(&mem, CSUM | EVENT_IDX);
    let p = packet(100, 0);
    g.send(&p, &[]);
    let head = g.post(&[2048]);
    // A device built afresh, as after a restore: never activated.
    let mut dev = device();
    dev.backend_mut().incoming.push_back(tap_packet(10, 0));
    dev.resume(&mut g.ctx()).unwrap();
    assert_eq!(dev.backend().offloads, [CSUM | EVENT_IDX]);
    assert_eq!(dev.backend().sent, [p]);
    assert_eq!(g.rx.used_elem(0).unwrap(), (u32::from(head), 22));
}

#[test]
fn header_round_trips_and_names_the_features_it_needs() {
    let h = NetHeader {
        flags: 1,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV6,
        hdr_len: 0x0201,
        gso_size: 0x0403,
        csum_start: 0x0605,
        csum_offset: 0x0807,
        num_buffers: 0x0a09,
    };
    let b = h.to_bytes();
    assert_eq!(b, [1, 4, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert_eq!(NetHeader::from_bytes(&b), h);
    assert_eq!(h.tx_features(), Some(CSUM | (1 << VIRTIO_NET_F_HOST_TSO6)));
    assert_eq!(NetHeader::default().tx_features(), Some(0));
    let uso = NetHeader {
        gso_type: VIRTIO_NET_HDR_GSO_UDP_L4,
        ..NetHeader::default()
    };
    assert_eq!(uso.tx_features(), Some(1 << VIRTIO_NET_F_HOST_USO));
    for undefined in [2u8, 6, 0x7f] {
        let h = NetHeader {
            gso_type: undefined,
            ..NetHeader::default()
        };
        assert_eq!(h.tx_features(), None);
    }
}

/// Rings for the chains after the garbage, clear of the garbage's rings.
const RX_RING2: GuestAddress = GuestAddress(0xa000);
const TX_RING2: GuestAddress = GuestAddress(0xc000);
/// Queue size of the garbage rings.
const GARBAGE_QUEUE: u16 = 16;

fn any_descriptor() -> impl Strategy<Value = Descriptor> {
    (
        prop_oneof![
            RX_BUFS..MEM_SIZE as u64,
            Just(MEM_SIZE as u64 - 8),
            any::<u64>()
        ],
        prop_oneof![0u32..0x100, 0u32..0x1_2000, any::<u32>()],
        prop_oneof![0u16..8, any::<u16>()],
        prop_oneof![0u16..GARBAGE_QUEUE, any::<u16>()],
    )
        .prop_map(|(addr, len, flags, next)| Descriptor {
            addr: GuestAddress(addr),
            len,
            flags,
            next,
        })
}

fn any_heads() -> impl Strategy<Value = Vec<u16>> {
    proptest::collection::vec(prop_oneof![0u16..GARBAGE_QUEUE, any::<u16>()], 0..24)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the guest puts in its rings, the device neither panics nor
    /// stops working: each call succeeds or fails with a typed error, and
    /// afterwards (reset, if an error asked for one) good chains work.
    #[test]
    fn garbage_chains_never_stop_the_device(
        rx_descs in proptest::collection::vec(any_descriptor(), GARBAGE_QUEUE as usize),
        tx_descs in proptest::collection::vec(any_descriptor(), GARBAGE_QUEUE as usize),
        rx_heads in any_heads(),
        tx_heads in any_heads(),
        tx_skew in prop_oneof![4 => Just(0u16), 1 => any::<u16>()],
        features in any::<u64>(),
        frames in proptest::collection::vec(0usize..3000, 0..4),
    ) {
        let features = features & (MRG | EVENT_IDX | INDIRECT | OFFLOAD_FEATURES);
        let mut bytes = memory();
        let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
        let mut dev = device();
        let failed = {
            let mut g = Guest::with_size(&mem, features, GARBAGE_QUEUE);
            for (i, (r, t)) in rx_descs.iter().zip(&tx_descs).enumerate() {
                g.rx.write_desc(i as u16, *r).unwrap();
                g.tx.write_desc(i as u16, *t).unwrap();
            }
            for &h in &rx_heads {
                g.rx.publish(h).unwrap();
            }
            for &h in &tx_heads {
                g.tx.publish(h).unwrap();
            }
            if tx_skew != 0 {
                let idx = g.tx.avail_idx().wrapping_add(tx_skew);
                g.tx.set_avail_idx(idx).unwrap();
            }
            for (i, &n) in frames.iter().enumerate() {
                dev.backend_mut().incoming.push_back(tap_packet(n, i as u8));
            }
            g.activate(&mut dev);
            let mut failed = false;
            for r in [dev.process_tx(&mut g.ctx()), dev.process_rx(&mut g.ctx())] {
                prop_assert!(
                    matches!(r, Ok(()) | Err(DeviceError::Queue { .. })),
                    "{r:?}"
                );
                failed |= r.is_err();
            }
            failed
        };
        if failed {
            // The transport set DEVICE_NEEDS_RESET; the driver resets.
            dev.reset();
        }
        let mut g = Guest::at(&mem, features & !INDIRECT, 16, RX_RING2, TX_RING2);
        g.activate(&mut dev);
        let p = packet(100, 0x5a);
        g.send(&p, &[]);
        g.post(&[4096]);
        dev.backend_mut().incoming.push_back(tap_packet(64, 0));
        dev.backend_mut().sent.clear();
        prop_assert_eq!(dev.process_tx(&mut g.ctx()), Ok(()));
        prop_assert_eq!(dev.process_rx(&mut g.ctx()), Ok(()));
        prop_assert_eq!(&dev.backend().sent, &[p]);
        prop_assert_eq!(g.rx.used_idx().unwrap(), 1);
        let (_, len) = g.rx.used_elem(0).unwrap();
        prop_assert!(len as usize >= HEADER_SIZE);
        prop_assert_eq!(&g.received(0, HEADER_SIZE)[10..], &[1, 0]);
    }
}
