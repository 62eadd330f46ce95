//! A guest-side vsock driver for tests: lays out the three queues and their
//! buffers in guest memory, posts rx buffers, sends packets on the tx queue
//! and reads what the device put in the rx and event queues.

use heapless::Vec;

use super::{PacketHeader, EVENT_QUEUE, HEADER_SIZE, RX_QUEUE, TX_QUEUE};
use crate::irq::CountingIrq;
use crate::memory::{GuestAddress, GuestMemory, MemoryError};
use crate::mmio::{DeviceError, Interrupt, VirtioContext, VirtioDevice};
use crate::queue::mock::MockSplitQueue;
use crate::queue::{Descriptor, Queue, VIRTQ_DESC_F_WRITE};

/// Entries in each mock queue.
pub const MOCK_QUEUE_SIZE: u16 = 128;
/// Largest payload of one packet the mock sends or receives.
pub const MOCK_MAX_PAYLOAD: usize = 4096;
/// Bytes of guest memory the mock needs from its base address.
pub const MOCK_MEM_SIZE: u64 = 0x130000;

const RING_STRIDE: u64 = 0x2000;
const EVENT_BUFS: u64 = 0x6000;
const RX_BUFS: u64 = 0x10000;
const TX_BUFS: u64 = 0xa0000;
const BUF_STRIDE: u64 = 0x1040;

/// A packet the device delivered on the rx queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxPacket {
    /// Its header (zeroed if the device wrote less than a header).
    pub header: PacketHeader,
    /// The length the device put in the used ring.
    pub used_len: u32,
    /// Payload bytes copied into the caller's buffer.
    pub payload_len: usize,
}

/// A driver's side of a vsock device, over guest memory `M`.
pub struct MockVsockDriver<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    base: GuestAddress,
    rx: MockSplitQueue<'m, M>,
    tx: MockSplitQueue<'m, M>,
    ev: MockSplitQueue<'m, M>,
    queues: [Queue; 3],
    interrupt: Interrupt<CountingIrq>,
    features: u64,
    rx_next: u16,
    rx_seen: u16,
    rx_outstanding: u16,
    tx_next: u16,
    tx_seen: u16,
    tx_outstanding: u16,
    ev_seen: u16,
}

impl<'m, M: GuestMemory + ?Sized> MockVsockDriver<'m, M> {
    /// Lays the queues out at `base` (needs [`MOCK_MEM_SIZE`] bytes) with
    /// the ring features in `features` (event index, indirect) accepted.
    pub fn new(mem: &'m M, base: GuestAddress, features: u64) -> Result<Self, MemoryError> {
        let at = |off: u64| GuestAddress(base.0 + off);
        let rx = MockSplitQueue::new(mem, at(0), MOCK_QUEUE_SIZE)?;
        let tx = MockSplitQueue::new(mem, at(RING_STRIDE), MOCK_QUEUE_SIZE)?;
        let ev = MockSplitQueue::new(mem, at(2 * RING_STRIDE), MOCK_QUEUE_SIZE)?;
        let queues = [
            rx.create_queue(features),
            tx.create_queue(features),
            ev.create_queue(features),
        ];
        Ok(MockVsockDriver {
            mem,
            base,
            rx,
            tx,
            ev,
            queues,
            interrupt: Interrupt::new(CountingIrq::default()),
            features,
            rx_next: 0,
            rx_seen: 0,
            rx_outstanding: 0,
            tx_next: 0,
            tx_seen: 0,
            tx_outstanding: 0,
            ev_seen: 0,
        })
    }

    /// What the transport would lend the device.
    pub fn context(&mut self) -> VirtioContext<'_, M, CountingIrq> {
        VirtioContext {
            mem: self.mem,
            queues: &mut self.queues,
            interrupt: &mut self.interrupt,
            features: self.features,
        }
    }

    /// The device-side queues (to make one not ready, say).
    pub fn queues_mut(&mut self) -> &mut [Queue; 3] {
        &mut self.queues
    }

    /// Interrupts the device raised so far.
    pub fn irq_count(&self) -> u32 {
        self.interrupt.line().count()
    }

    /// Activates `dev`.
    pub fn activate<D: VirtioDevice>(&mut self, dev: &mut D) -> Result<(), DeviceError> {
        dev.activate(&mut self.context())
    }

    /// Notifies `dev` of queue `queue`.
    pub fn notify<D: VirtioDevice>(&mut self, dev: &mut D, queue: u16) -> Result<(), DeviceError> {
        dev.queue_notify(queue, &mut self.context())
    }

    fn buf(&self, area: u64, index: u16) -> GuestAddress {
        GuestAddress(self.base.0 + area + BUF_STRIDE * u64::from(index))
    }

    /// Posts rx buffers (one descriptor of header plus
    /// [`MOCK_MAX_PAYLOAD`] each) until the rx queue is full.
    pub fn fill_rx(&mut self) -> Result<(), MemoryError> {
        while self.rx_outstanding < MOCK_QUEUE_SIZE {
            let index = self.rx_next;
            let d = Descriptor {
                addr: self.buf(RX_BUFS, index),
                len: (HEADER_SIZE + MOCK_MAX_PAYLOAD) as u32,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            };
            self.rx.add_chain(&[d])?;
            self.rx_next = (index + 1) % MOCK_QUEUE_SIZE;
            self.rx_outstanding += 1;
        }
        Ok(())
    }

    /// rx buffers the device has not used yet.
    pub fn rx_outstanding(&self) -> u16 {
        self.rx_outstanding
    }

    /// The next packet the device used an rx buffer for, its payload copied
    /// into `payload`. The buffer is not posted again; call
    /// [`MockVsockDriver::fill_rx`].
    pub fn recv(&mut self, payload: &mut [u8]) -> Result<Option<RxPacket>, MemoryError> {
        if self.rx.used_idx()? == self.rx_seen {
            return Ok(None);
        }
        let (id, used_len) = self.rx.used_elem(self.rx_seen)?;
        self.rx_seen = self.rx_seen.wrapping_add(1);
        self.rx_outstanding = self.rx_outstanding.saturating_sub(1);
        let addr = self.buf(RX_BUFS, id as u16 % MOCK_QUEUE_SIZE);
        let mut header = PacketHeader::default();
        let mut payload_len = 0;
        if used_len as usize >= HEADER_SIZE {
            let mut raw = [0u8; HEADER_SIZE];
            self.mem.read(addr, &mut raw)?;
            header = PacketHeader::from_bytes(&raw);
            payload_len = (used_len as usize - HEADER_SIZE)
                .min(payload.len())
                .min(MOCK_MAX_PAYLOAD);
            self.mem.read(
                GuestAddress(addr.0 + HEADER_SIZE as u64),
                &mut payload[..payload_len],
            )?;
        }
        Ok(Some(RxPacket {
            header,
            used_len,
            payload_len,
        }))
    }

    fn reclaim_tx(&mut self) -> Result<(), MemoryError> {
        let used = self.tx.used_idx()?;
        while self.tx_seen != used {
            let (id, _) = self.tx.used_elem(self.tx_seen)?;
            self.tx_seen = self.tx_seen.wrapping_add(1);
            // Chains are freed in order; each takes one or more descriptors
            // starting at its head, which we recorded in the buffer.
            let n = self
                .mem
                .read_u16(self.buf(TX_BUFS, id as u16 % MOCK_QUEUE_SIZE))?;
            self.tx_outstanding = self.tx_outstanding.saturating_sub(n);
        }
        Ok(())
    }

    /// Sends a packet: the header in one buffer, the payload (at most
    /// [`MOCK_MAX_PAYLOAD`]) in a second. Returns `false`, sending nothing,
    /// if the tx queue is full.
    pub fn send(&mut self, header: &PacketHeader, payload: &[u8]) -> Result<bool, MemoryError> {
        let hdr = header.to_bytes();
        let split = [HEADER_SIZE as u32];
        self.send_pieces(
            &[&hdr, payload],
            if payload.is_empty() { &[] } else { &split },
        )
    }

    /// Sends raw bytes (at most header plus [`MOCK_MAX_PAYLOAD`]) as one
    /// chain, cut into buffers at the offsets in `split` (increasing; at
    /// most 7).
    pub fn send_raw(&mut self, bytes: &[u8], split: &[u32]) -> Result<bool, MemoryError> {
        self.send_pieces(&[bytes], split)
    }

    fn send_pieces(&mut self, parts: &[&[u8]], split: &[u32]) -> Result<bool, MemoryError> {
        self.reclaim_tx()?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let oob = MemoryError::OutOfBounds {
            addr: 0,
            len: total as u64,
        };
        if total > HEADER_SIZE + MOCK_MAX_PAYLOAD || split.len() > 7 {
            return Err(oob);
        }
        let n = split.len() as u16 + 1;
        if self.tx_outstanding + n > MOCK_QUEUE_SIZE {
            return Ok(false);
        }
        // The descriptor count goes in the first two bytes of the head's
        // buffer slot; the packet bytes follow at offset 64.
        let slot = self.buf(TX_BUFS, self.tx_next);
        self.mem.write_u16(slot, n)?;
        let data = GuestAddress(slot.0 + 64);
        let mut off = 0u64;
        for p in parts {
            self.mem.write(GuestAddress(data.0 + off), p)?;
            off += p.len() as u64;
        }
        let mut descs: Vec<Descriptor, 8> = Vec::new();
        let mut start = 0u32;
        for &cut in split.iter().chain(core::iter::once(&(total as u32))) {
            let cut = cut.min(total as u32).max(start);
            let d = Descriptor {
                addr: GuestAddress(data.0 + u64::from(start)),
                len: cut - start,
                flags: 0,
                next: 0,
            };
            descs.push(d).map_err(|_| oob)?;
            start = cut;
        }
        self.tx.add_chain(&descs)?;
        self.tx_next = (self.tx_next + n) % MOCK_QUEUE_SIZE;
        self.tx_outstanding += n;
        Ok(true)
    }

    /// tx descriptors the device has not returned yet.
    pub fn tx_outstanding(&mut self) -> Result<u16, MemoryError> {
        self.reclaim_tx()?;
        Ok(self.tx_outstanding)
    }

    /// Posts `n` four-byte buffers on the event queue.
    pub fn post_event_buffers(&mut self, n: u16) -> Result<(), MemoryError> {
        for i in 0..n {
            let d = Descriptor {
                addr: GuestAddress(self.base.0 + EVENT_BUFS + 8 * u64::from(i % 64)),
                len: 4,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            };
            self.ev.add_chain(&[d])?;
        }
        Ok(())
    }

    /// The next event the device delivered: its ID.
    pub fn next_event(&mut self) -> Result<Option<u32>, MemoryError> {
        if self.ev.used_idx()? == self.ev_seen {
            return Ok(None);
        }
        let (id, _) = self.ev.used_elem(self.ev_seen)?;
        self.ev_seen = self.ev_seen.wrapping_add(1);
        let d_addr = self.ev.desc_table().0 + 16 * u64::from(id as u16 % MOCK_QUEUE_SIZE);
        let buf = self.mem.read_u64(GuestAddress(d_addr))?;
        self.mem.read_u32(GuestAddress(buf)).map(Some)
    }

    /// Notifies the rx queue (after posting buffers).
    pub fn notify_rx<D: VirtioDevice>(&mut self, dev: &mut D) -> Result<(), DeviceError> {
        self.notify(dev, RX_QUEUE)
    }

    /// Notifies the tx queue (after sending).
    pub fn notify_tx<D: VirtioDevice>(&mut self, dev: &mut D) -> Result<(), DeviceError> {
        self.notify(dev, TX_QUEUE)
    }

    /// Notifies the event queue.
    pub fn notify_event<D: VirtioDevice>(&mut self, dev: &mut D) -> Result<(), DeviceError> {
        self.notify(dev, EVENT_QUEUE)
    }
}
