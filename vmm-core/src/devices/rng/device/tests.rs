//! virtio-rng device tests, driven through a mock driver.

use core::cell::RefCell;
use std::vec;
use std::vec::Vec;

use super::*;
use crate::irq::CountingIrq;
use crate::memory::SliceMemory;
use crate::mmio::{
    Interrupt, MmioTransport, DEVICE_FEATURES_OFFSET, DEVICE_FEATURES_SEL_OFFSET, DEVICE_ID_OFFSET,
    QUEUE_NUM_MAX_OFFSET, QUEUE_SEL_OFFSET, VIRTIO_F_VERSION_1,
};
use crate::queue::mock::MockSplitQueue;
use crate::queue::{
    Descriptor, Queue, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};

const MEM_SIZE: usize = 0x6_0000;
const QUEUE_AT: GuestAddress = GuestAddress(0x1000);
const BUF: u64 = 0x1_0000;
/// What the tests put in guest memory before the device runs.
const FILL: u8 = 0xaa;

/// A source that counts: byte `i` of everything it hands out is `i`
/// (wrapping), so a test can tell which bytes went where.
#[derive(Default)]
struct Counter {
    next: u8,
    calls: u32,
    fail: bool,
}

impl EntropySource for Counter {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
        self.calls += 1;
        if self.fail {
            return Err(EntropyError { errno: 5 });
        }
        for b in buf {
            *b = self.next;
            self.next = self.next.wrapping_add(1);
        }
        Ok(())
    }
}

/// The bytes a fresh [`Counter`] hands out first.
fn counted(from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| i as u8).collect()
}

fn wr(addr: u64, len: u32) -> Descriptor {
    Descriptor {
        addr: GuestAddress(addr),
        len,
        flags: VIRTQ_DESC_F_WRITE,
        next: 0,
    }
}

fn rd(addr: u64, len: u32) -> Descriptor {
    Descriptor {
        addr: GuestAddress(addr),
        len,
        flags: 0,
        next: 0,
    }
}

fn memory() -> Vec<u8> {
    vec![FILL; MEM_SIZE]
}

fn read(mem: &SliceMemory<'_>, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    mem.read(GuestAddress(addr), &mut b).unwrap();
    b
}

/// Activates `dev` on `drv`'s queue and notifies it once; returns the
/// interrupts raised.
fn notify<S: EntropySource>(dev: &mut Rng<S>, mem: &SliceMemory<'_>, queue: &mut Queue) -> u32 {
    let mut queues = [queue.clone()];
    let mut interrupt = Interrupt::new(CountingIrq::default());
    let mut ctx = VirtioContext {
        mem,
        queues: &mut queues,
        interrupt: &mut interrupt,
        features: 0,
    };
    dev.activate(&mut ctx).unwrap();
    dev.queue_notify(0, &mut ctx).unwrap();
    *queue = queues[0].clone();
    interrupt.line().count()
}

/// Publishes `descs` as one chain, runs a fresh device once; returns the
/// device, the used length and the interrupts raised.
fn run_chain(bytes: &mut [u8], source: Counter, descs: &[Descriptor]) -> (Rng<Counter>, u32, u32) {
    let mem = SliceMemory::new(GuestAddress(0), bytes);
    let mut drv = MockSplitQueue::new(&mem, QUEUE_AT, 16).unwrap();
    drv.add_chain(descs).unwrap();
    let mut queue = drv.create_queue(0);
    let mut dev = Rng::new(source);
    let irqs = notify(&mut dev, &mem, &mut queue);
    assert_eq!(drv.used_idx().unwrap(), 1, "every request is answered");
    let (_, len) = drv.used_elem(0).unwrap();
    (dev, len, irqs)
}

#[test]
fn fills_a_one_descriptor_chain() {
    let mut bytes = memory();
    let (dev, len, irqs) = run_chain(&mut bytes, Counter::default(), &[wr(BUF, 64)]);
    assert_eq!((len, irqs), (64, 1));
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    assert_eq!(read(&mem, BUF, 64), counted(0, 64));
    assert_eq!(read(&mem, BUF + 64, 1), [FILL], "nothing past the buffer");
    let stats = dev.stats();
    assert_eq!((stats.requests, stats.bytes, stats.rejected), (1, 64, 0));
}

#[test]
fn fills_a_multi_descriptor_chain_in_order() {
    // The last buffer is larger than the bounce buffer.
    let big = BOUNCE_SIZE as u32 + 904;
    let mut bytes = memory();
    let (dev, len, _) = run_chain(
        &mut bytes,
        Counter::default(),
        &[wr(BUF, 16), wr(BUF + 0x100, 100), wr(BUF + 0x1000, big)],
    );
    assert_eq!(len, 116 + big);
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    assert_eq!(read(&mem, BUF, 16), counted(0, 16));
    assert_eq!(read(&mem, BUF + 0x100, 100), counted(16, 100));
    assert_eq!(
        read(&mem, BUF + 0x1000, big as usize),
        counted(116, big as usize)
    );
    assert_eq!(dev.source().calls, 4, "through the bounce buffer");
    assert_eq!(dev.stats().bytes, u64::from(len));
}

#[test]
fn an_empty_buffer_gets_nothing() {
    let mut bytes = memory();
    let (dev, len, _) = run_chain(&mut bytes, Counter::default(), &[wr(BUF, 0)]);
    assert_eq!(len, 0);
    assert_eq!(dev.stats().requests, 1);
    assert_eq!(dev.last_error(), None);
}

#[test]
fn a_readable_buffer_is_refused_untouched() {
    for descs in [
        [rd(BUF, 64), wr(BUF + 64, 64)],
        [wr(BUF, 64), rd(BUF + 64, 64)],
    ] {
        let mut bytes = memory();
        let (dev, len, irqs) = run_chain(&mut bytes, Counter::default(), &descs);
        assert_eq!((len, irqs), (0, 1), "answered with nothing");
        let readable = descs.iter().find(|d| d.flags & VIRTQ_DESC_F_WRITE == 0);
        assert_eq!(
            dev.last_error(),
            readable.map(|d| RngError::ReadableBuffer {
                addr: d.addr.0,
                len: d.len
            })
        );
        assert_eq!(dev.source().calls, 0);
        let stats = dev.stats();
        assert_eq!((stats.requests, stats.rejected), (0, 1));
        let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
        assert_eq!(read(&mem, BUF, 128), [FILL; 128]);
    }
}

#[test]
fn a_buffer_outside_guest_memory_is_refused() {
    let mut bytes = memory();
    let outside = MEM_SIZE as u64 - 16;
    let (dev, len, _) = run_chain(
        &mut bytes,
        Counter::default(),
        &[wr(BUF, 64), wr(outside, 64)],
    );
    assert_eq!(len, 0);
    assert_eq!(
        dev.last_error(),
        Some(RngError::OutsideGuestMemory {
            addr: outside,
            len: 64
        })
    );
    assert_eq!(dev.source().calls, 0);
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    assert_eq!(read(&mem, BUF, 64), [FILL; 64], "nothing written");
}

#[test]
fn an_indirect_table_outside_guest_memory_is_refused() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut drv = MockSplitQueue::new(&mem, QUEUE_AT, 16).unwrap();
    let table = MEM_SIZE as u64 + 0x1000;
    drv.write_desc(
        0,
        Descriptor {
            addr: GuestAddress(table),
            len: 32,
            flags: crate::queue::VIRTQ_DESC_F_INDIRECT,
            next: 0,
        },
    )
    .unwrap();
    drv.publish(0).unwrap();
    // Indirect tables are allowed by the ring, so the walk reaches the
    // table; the device offers no features, this only tests the mapping.
    let mut queue = drv.create_queue(1 << crate::queue::VIRTIO_RING_F_INDIRECT_DESC);
    let mut dev = Rng::new(Counter::default());
    notify(&mut dev, &mem, &mut queue);
    assert_eq!(drv.used_elem(0).unwrap(), (0, 0));
    assert!(
        matches!(
            dev.last_error(),
            Some(RngError::OutsideGuestMemory { addr, .. }) if addr == table
        ),
        "{:?}",
        dev.last_error()
    );
}

#[test]
fn a_malformed_chain_is_refused_and_the_next_one_served() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut drv = MockSplitQueue::new(&mem, QUEUE_AT, 16).unwrap();
    // Descriptor 0 links to 99, past the table.
    drv.write_desc(
        0,
        Descriptor {
            addr: GuestAddress(BUF),
            len: 64,
            flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            next: 99,
        },
    )
    .unwrap();
    drv.publish(0).unwrap();
    // An indirect table, which the device did not offer.
    drv.write_desc(
        1,
        Descriptor {
            addr: GuestAddress(BUF + 0x1000),
            len: 16,
            flags: crate::queue::VIRTQ_DESC_F_INDIRECT,
            next: 0,
        },
    )
    .unwrap();
    drv.publish(1).unwrap();
    // A good one.
    drv.write_desc(2, wr(BUF + 0x2000, 8)).unwrap();
    drv.publish(2).unwrap();
    let mut queue = drv.create_queue(0);
    let mut dev = Rng::new(Counter::default());
    notify(&mut dev, &mem, &mut queue);
    assert_eq!(drv.used_idx().unwrap(), 3);
    assert_eq!(drv.used_elem(0).unwrap(), (0, 0));
    assert_eq!(drv.used_elem(1).unwrap(), (1, 0));
    assert_eq!(drv.used_elem(2).unwrap(), (2, 8));
    assert_eq!(
        dev.last_error(),
        Some(RngError::Malformed(ChainError::IndirectNotNegotiated))
    );
    let stats = dev.stats();
    assert_eq!((stats.requests, stats.rejected), (1, 2));
    assert_eq!(read(&mem, BUF, 64), [FILL; 64]);
    assert_eq!(read(&mem, BUF + 0x2000, 8), counted(0, 8));
}

#[test]
fn a_chain_gets_at_most_max_chain_bytes() {
    let mut bytes = memory();
    let (dev, len, _) = run_chain(
        &mut bytes,
        Counter::default(),
        &[
            wr(BUF, 0x1_0000),
            wr(BUF + 0x1_0000, 0x1_0000),
            wr(BUF + 0x2_0000, 16),
        ],
    );
    assert_eq!(MAX_CHAIN_BYTES, 0x1_0000);
    assert_eq!(len, MAX_CHAIN_BYTES);
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    assert_eq!(read(&mem, BUF, 0x1_0000), counted(0, 0x1_0000));
    assert_eq!(read(&mem, BUF + 0x1_0000, 16), [FILL; 16], "past the cap");
    assert_eq!(dev.stats().bytes, u64::from(MAX_CHAIN_BYTES));
}

#[test]
fn a_full_queue_is_served_by_one_notification() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut drv = MockSplitQueue::new(&mem, QUEUE_AT, RNG_QUEUE_SIZE).unwrap();
    for i in 0..u64::from(RNG_QUEUE_SIZE) {
        drv.add_chain(&[wr(BUF + 16 * i, 16)]).unwrap();
    }
    let mut queue = drv.create_queue(0);
    let mut dev = Rng::new(Counter::default());
    assert_eq!(notify(&mut dev, &mem, &mut queue), 1);
    assert_eq!(drv.used_idx().unwrap(), RNG_QUEUE_SIZE);
    let stats = dev.stats();
    assert_eq!((stats.requests, stats.budget_stops), (64, 0));
}

/// A guest that posts a new request whenever the device takes bytes: a
/// driver on another vCPU that never lets the queue run dry.
struct Endless<'q, 'm> {
    driver: &'q RefCell<MockSplitQueue<'m, SliceMemory<'m>>>,
}

impl EntropySource for Endless<'_, '_> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
        buf.fill(1);
        self.driver.borrow_mut().add_chain(&[wr(BUF, 16)]).unwrap();
        Ok(())
    }
}

#[test]
fn a_notification_serves_at_most_its_budget() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let driver = RefCell::new(MockSplitQueue::new(&mem, QUEUE_AT, RNG_QUEUE_SIZE).unwrap());
    driver.borrow_mut().add_chain(&[wr(BUF, 16)]).unwrap();
    let mut queue = driver.borrow().create_queue(0);
    let mut dev = Rng::new(Endless { driver: &driver });
    assert_eq!(notify(&mut dev, &mem, &mut queue), 1, "it returns");
    assert_eq!(driver.borrow().used_idx().unwrap(), MAX_CHAINS_PER_NOTIFY);
    assert_eq!(dev.stats().budget_stops, 1);
    assert_eq!(queue.pending(&mem).unwrap(), 1, "one left for later");
    // The next notification carries on.
    notify(&mut dev, &mem, &mut queue);
    assert_eq!(
        driver.borrow().used_idx().unwrap(),
        2 * MAX_CHAINS_PER_NOTIFY
    );
    assert_eq!(dev.stats().budget_stops, 2);
    assert_eq!(
        MAX_NOTIFY_BYTES,
        u64::from(MAX_CHAINS_PER_NOTIFY) * u64::from(MAX_CHAIN_BYTES)
    );
}

#[test]
fn a_source_failure_answers_with_nothing_and_is_counted() {
    let mut bytes = memory();
    let source = Counter {
        fail: true,
        ..Counter::default()
    };
    let (dev, len, irqs) = run_chain(&mut bytes, source, &[wr(BUF, 64)]);
    assert_eq!((len, irqs), (0, 1));
    let stats = dev.stats();
    assert_eq!(
        (stats.requests, stats.rejected, stats.source_failures),
        (0, 0, 1)
    );
    assert_eq!(dev.last_source_error(), Some(EntropyError { errno: 5 }));
    assert_eq!(dev.last_error(), None);
}

#[test]
fn no_interrupt_when_the_driver_wants_none() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut drv = MockSplitQueue::new(&mem, QUEUE_AT, 16).unwrap();
    drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT).unwrap();
    drv.add_chain(&[wr(BUF, 8)]).unwrap();
    let mut queue = drv.create_queue(0);
    let mut dev = Rng::new(Counter::default());
    assert_eq!(notify(&mut dev, &mem, &mut queue), 0);
    assert_eq!(drv.used_elem(0).unwrap(), (0, 8));
}

#[test]
fn identity_one_queue_no_features_no_config() {
    let dev = Rng::new(Counter::default());
    assert_eq!(dev.device_type(), 4);
    assert_eq!(dev.avail_features(), 0);
    assert_eq!(dev.queue_max_sizes(), &[RNG_QUEUE_SIZE]);
    let mut data = [0u8; 4];
    dev.read_config(0, &mut data);
    assert_eq!(data, [0; 4]);

    // Through the transport: VERSION_1 is the only feature.
    let transport: MmioTransport<_, _, 1> =
        MmioTransport::new(Rng::new(Counter::default()), CountingIrq::default()).unwrap();
    let reg = |t: &MmioTransport<Rng<Counter>, CountingIrq, 1>, offset| {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(reg(&transport, DEVICE_ID_OFFSET), 4);
    assert_eq!(transport.device_features(), 1 << VIRTIO_F_VERSION_1);
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut transport = transport;
    transport
        .write(&mem, DEVICE_FEATURES_SEL_OFFSET, &0u32.to_le_bytes())
        .unwrap();
    assert_eq!(reg(&transport, DEVICE_FEATURES_OFFSET), 0);
    transport
        .write(&mem, QUEUE_SEL_OFFSET, &0u32.to_le_bytes())
        .unwrap();
    assert_eq!(
        reg(&transport, QUEUE_NUM_MAX_OFFSET),
        u32::from(RNG_QUEUE_SIZE)
    );
    assert_eq!(transport.queues().len(), 1);
}

#[test]
fn activation_needs_the_queue_and_other_queues_are_ignored() {
    let mut bytes = memory();
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut dev = Rng::new(Counter::default());
    let mut interrupt = Interrupt::new(CountingIrq::default());
    let mut queues = [Queue::new(RNG_QUEUE_SIZE).unwrap()];
    let mut ctx = VirtioContext {
        mem: &mem,
        queues: &mut queues,
        interrupt: &mut interrupt,
        features: 0,
    };
    assert_eq!(
        dev.activate(&mut ctx),
        Err(DeviceError::QueueNotReady { index: 0 })
    );
    let mut none: [Queue; 0] = [];
    let mut ctx = VirtioContext {
        mem: &mem,
        queues: &mut none,
        interrupt: &mut interrupt,
        features: 0,
    };
    assert_eq!(
        dev.activate(&mut ctx),
        Err(DeviceError::QueueNotReady { index: 0 })
    );
    assert_eq!(dev.queue_notify(1, &mut ctx), Ok(()));
    assert_eq!(dev.source().calls, 0);
}
