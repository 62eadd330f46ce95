//! The queue's hot path never touches the heap.
//!
//! A counting global allocator wraps `System`. It counts only on the thread
//! that switched counting on, and only while it is on, so the test harness's
//! own threads (and the setup of memory and the driver-side mock) do not
//! count. Inside the window the device pops direct chains of 1, 3 and 16
//! descriptors and an indirect chain, returns each to the used ring and asks
//! whether to notify, many times over; and so does the queue-drain helper,
//! and the virtio-net device sending and receiving packets.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use vmm_core::devices::net::{
    Net, NetBackend, NetBackendError, NetConfig, NET_QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
    VIRTIO_NET_F_MRG_RXBUF,
};
use vmm_core::irq::CountingIrq;
use vmm_core::memory::{GuestAddress, SliceMemory};
use vmm_core::mmio::{Interrupt, VirtioContext, VirtioDevice};
use vmm_core::queue::mock::MockSplitQueue;
use vmm_core::queue::{
    drain, Descriptor, Queue, Served, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQ_DESC_F_WRITE,
};

thread_local! {
    /// Whether this thread's allocations are being counted.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    /// Allocations, reallocations and frees this thread made while counting.
    static EVENTS: Cell<usize> = const { Cell::new(0) };
}

/// Forwards to `System`, counting calls on threads that asked for it.
struct CountingAllocator;

fn note() {
    // Const-initialised thread-locals without destructors: reading them never
    // allocates and never fails, even while the thread is being torn down.
    if COUNTING.with(Cell::get) {
        EVENTS.with(|e| e.set(e.get() + 1));
    }
}

// SAFETY: every method forwards its arguments unchanged to `System`, which
// implements `GlobalAlloc` correctly; the bookkeeping in `note` only touches
// thread-local `Cell`s and never allocates or unwinds.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: our caller upholds `GlobalAlloc::alloc`'s contract for
        // `layout`, which is exactly what `System.alloc` requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note();
        // SAFETY: `ptr` came from this allocator, hence from `System`, with
        // `layout`, as our caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: `ptr` came from `System` with `layout`, and our caller
        // upholds `realloc`'s contract for `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `f` with counting on; returns how many heap operations it made.
fn heap_events<R>(f: impl FnOnce() -> R) -> (R, usize) {
    EVENTS.with(|e| e.set(0));
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (r, EVENTS.with(Cell::get))
}

const ITERATIONS: usize = 10_000;
const QUEUE_BASE: GuestAddress = GuestAddress(0x1000);
const INDIRECT_TABLE: GuestAddress = GuestAddress(0x3000);
const BUFFERS: u64 = 0x4000;

fn buf(i: u64, write: bool) -> Descriptor {
    Descriptor {
        addr: GuestAddress(BUFFERS + 0x200 * i),
        len: 0x200,
        flags: if write { VIRTQ_DESC_F_WRITE } else { 0 },
        next: 0,
    }
}

#[test]
fn counter_sees_allocations() {
    let ((), n) = heap_events(|| drop(black_box(Box::new(7u64))));
    assert!(n >= 2, "the counting allocator missed a Box: {n}");
}

fn hot_path_does_not_allocate(features: u64) {
    let mut bytes = vec![0u8; 0x1_0000];
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut driver = MockSplitQueue::new(&mem, QUEUE_BASE, 32).unwrap();
    let mut queue = driver.create_queue(features);
    queue.validate(&mem).unwrap();

    let bufs: Vec<Descriptor> = (0..16).map(|i| buf(i, i % 2 == 1)).collect();
    let heads = [
        driver.add_chain(&bufs[..1]).unwrap(),
        driver.add_chain(&bufs[..3]).unwrap(),
        driver.add_chain(&bufs[..16]).unwrap(),
        driver
            .add_indirect_chain(INDIRECT_TABLE, &bufs[..8])
            .unwrap(),
    ];
    let lens = [1, 3, 16, 8];
    // The four chains are already published once; consume them first.
    let round = |queue: &mut Queue| {
        for (&head, &len) in heads.iter().zip(&lens) {
            let chain = queue.pop::<16, _>(&mem).unwrap().unwrap();
            assert_eq!(chain.head_index(), head);
            assert_eq!(chain.len(), len);
            let mut sum = 0u64;
            for d in chain.descriptors() {
                sum += black_box(d.addr.raw()) + u64::from(black_box(d.len));
            }
            black_box(sum);
            queue.add_used(&mem, head, chain.total_len()).unwrap();
            black_box(queue.needs_notification(&mem).unwrap());
        }
    };

    let mut total = 0;
    for _ in 0..ITERATIONS {
        let ((), n) = heap_events(|| round(&mut queue));
        total += n;
        for &head in &heads {
            driver.publish(head).unwrap();
        }
    }
    assert_eq!(total, 0, "{total} heap operations on the hot path");
    assert_eq!(
        driver.used_idx().unwrap(),
        (ITERATIONS * heads.len()) as u16
    );
}

#[test]
fn hot_path_does_not_allocate_with_avail_flags() {
    hot_path_does_not_allocate(1 << VIRTIO_RING_F_INDIRECT_DESC);
}

#[test]
fn hot_path_does_not_allocate_with_event_idx() {
    hot_path_does_not_allocate((1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX));
}

#[test]
fn drain_does_not_allocate() {
    let mut bytes = vec![0u8; 0x1_0000];
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut driver = MockSplitQueue::new(&mem, QUEUE_BASE, 32).unwrap();
    let mut queue = driver.create_queue(1 << VIRTIO_RING_F_EVENT_IDX);
    queue.validate(&mem).unwrap();
    let bufs: Vec<Descriptor> = (0..3).map(|i| buf(i, true)).collect();
    let mut served = 0u32;
    let mut total = 0;
    for _ in 0..ITERATIONS / 10 {
        for n in 1..=3 {
            driver.add_chain(&bufs[..n]).unwrap();
        }
        let (wants, n) = heap_events(|| {
            drain::<16, _, _>(
                &mut queue,
                &mem,
                &mut served,
                |_| true,
                |_| {},
                |served, _, chain| {
                    *served += 1;
                    Served::Used(chain.total_len())
                },
            )
        });
        black_box(wants.unwrap());
        total += n;
    }
    assert_eq!(total, 0, "{total} heap operations in drain");
    assert_eq!(served as usize, ITERATIONS / 10 * 3);
}

/// A network backend that allocates nothing: sends go nowhere, and each
/// read hands out the same packet, as many times as it is told to.
struct Loopback {
    packet: [u8; 1526],
    sent: usize,
    reads_left: u32,
}

impl NetBackend for Loopback {
    fn send(&mut self, packet: &[u8]) -> Result<(), NetBackendError> {
        self.sent += black_box(packet).len();
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetBackendError> {
        if self.reads_left == 0 {
            return Ok(None);
        }
        self.reads_left -= 1;
        buf[..self.packet.len()].copy_from_slice(&self.packet);
        Ok(Some(self.packet.len()))
    }

    fn set_offloads(&mut self, _: u64) -> Result<(), NetBackendError> {
        Ok(())
    }
}

/// The virtio-net device's tx and rx paths, a packet spread over three
/// receive chains (mergeable buffers) and one held until the guest posts
/// buffers, never touch the heap.
#[test]
fn net_device_does_not_allocate() {
    const RX_RING: GuestAddress = GuestAddress(0x1000);
    const TX_RING: GuestAddress = GuestAddress(0x4000);
    const TX_BUF: u64 = 0x8000;
    const RX_BUFS: u64 = 0x1_0000;
    let features = (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_RING_F_EVENT_IDX);
    let mut bytes = vec![0u8; 0x2_0000];
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut rx = MockSplitQueue::new(&mem, RX_RING, NET_QUEUE_SIZE).unwrap();
    let mut tx = MockSplitQueue::new(&mem, TX_RING, NET_QUEUE_SIZE).unwrap();
    let mut queues = [rx.create_queue(features), tx.create_queue(features)];
    let mut interrupt = Interrupt::new(CountingIrq::default());
    let config = NetConfig {
        mac: [0x02, 0, 0, 0, 0, 1],
        mtu: 1500,
        offloads: true,
    };
    let mut dev = Net::new(
        config,
        Loopback {
            packet: [7; 1526],
            sent: 0,
            reads_left: 0,
        },
    )
    .unwrap();
    let tx_head = tx
        .add_chain(&[Descriptor {
            addr: GuestAddress(TX_BUF),
            len: 1526,
            flags: 0,
            next: 0,
        }])
        .unwrap();
    let rx_heads: Vec<u16> = (0..3)
        .map(|i| {
            rx.add_chain(&[Descriptor {
                addr: GuestAddress(RX_BUFS + 0x400 * i),
                len: 600,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            }])
            .unwrap()
        })
        .collect();
    let mut ctx = VirtioContext {
        mem: &mem,
        queues: &mut queues,
        interrupt: &mut interrupt,
        features,
    };
    dev.activate(&mut ctx).unwrap();

    let mut total = 0;
    for i in 0..ITERATIONS {
        // Every tenth packet finds no receive buffers.
        let hold = i % 10 == 9;
        if i > 0 {
            tx.publish(tx_head).unwrap();
            if !hold {
                for &head in &rx_heads {
                    rx.publish(head).unwrap();
                }
            }
        }
        dev.backend_mut().reads_left = 1;
        let ((), n) = heap_events(|| {
            dev.queue_notify(TX_QUEUE, &mut ctx).unwrap();
            dev.process_rx(&mut ctx).unwrap();
        });
        total += n;
        if hold {
            assert_eq!(dev.held(), Some(1526));
            for &head in &rx_heads {
                rx.publish(head).unwrap();
            }
            let ((), n) = heap_events(|| dev.queue_notify(RX_QUEUE, &mut ctx).unwrap());
            total += n;
        }
        assert_eq!(dev.held(), None);
    }
    assert_eq!(total, 0, "{total} heap operations in the net device");
    let stats = dev.stats();
    assert_eq!(stats.tx_frames, ITERATIONS as u64);
    assert_eq!(stats.rx_frames, ITERATIONS as u64);
    assert_eq!(stats.rejected, 0);
    assert_eq!(
        usize::from(rx.used_idx().unwrap()),
        3 * ITERATIONS,
        "three chains a packet"
    );
    assert_eq!(dev.backend().sent, 1526 * ITERATIONS);
}

/// The virtio-fs device answers a READ, a LOOKUP, a GETATTR and a
/// READDIRPLUS, and takes a FORGET, without touching the heap.
#[test]
fn fs_device_does_not_allocate() {
    use vmm_core::devices::fs::mock::MockFs;
    use vmm_core::devices::fs::{Fs, FS_QUEUE_SIZE, HIPRIO_QUEUE, REQUEST_QUEUE, ROOT_INODE};
    use vmm_core::memory::GuestMemory;

    const HI_RING: GuestAddress = GuestAddress(0x1000);
    const REQ_RING: GuestAddress = GuestAddress(0x4000);
    const IN: u64 = 0x8000;
    const OUT: u64 = 0x1_0000;
    let mut bytes = vec![0u8; 0x2_0000];
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    let mut hi = MockSplitQueue::new(&mem, HI_RING, FS_QUEUE_SIZE).unwrap();
    let mut rq = MockSplitQueue::new(&mem, REQ_RING, FS_QUEUE_SIZE).unwrap();
    let features = 1 << VIRTIO_RING_F_EVENT_IDX;
    let mut queues = [hi.create_queue(features), rq.create_queue(features)];
    let mut interrupt = Interrupt::new(CountingIrq::default());
    let mut dev = Box::new(Fs::new("share", MockFs::new()).unwrap());
    let mut ctx = VirtioContext {
        mem: &mem,
        queues: &mut queues,
        interrupt: &mut interrupt,
        features,
    };
    dev.activate(&mut ctx).unwrap();

    // Requests at IN + 0x400 * i, replies at OUT + 0x1000 * i.
    let header = |len: usize, opcode: u32, nodeid: u64| {
        let mut h = [0u8; 40];
        h[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        h[4..8].copy_from_slice(&opcode.to_le_bytes());
        h[8..16].copy_from_slice(&1u64.to_le_bytes());
        h[16..24].copy_from_slice(&nodeid.to_le_bytes());
        h
    };
    let mut init = header(40 + 64, 26, 0).to_vec();
    init.extend_from_slice(&7u32.to_le_bytes());
    init.extend_from_slice(&38u32.to_le_bytes());
    init.extend_from_slice(&[0; 56]);
    let mut lookup = header(40 + 6, 1, ROOT_INODE).to_vec();
    lookup.extend_from_slice(b"hello\0");
    let mut getattr = header(40 + 16, 3, ROOT_INODE).to_vec();
    getattr.extend_from_slice(&[0; 16]);
    let mut read = header(40 + 40, 15, 2).to_vec();
    let mut args = [0u8; 40];
    args[16..20].copy_from_slice(&4096u32.to_le_bytes());
    read.extend_from_slice(&args);
    let mut readdir = header(40 + 40, 44, ROOT_INODE).to_vec();
    readdir.extend_from_slice(&args);
    let requests = [&lookup, &getattr, &read, &readdir];
    for (i, r) in [&init].iter().chain(requests.iter()).enumerate() {
        mem.write(GuestAddress(IN + 0x400 * i as u64), r).unwrap();
    }
    let mut forget = header(40 + 8, 2, 2).to_vec();
    forget.extend_from_slice(&1u64.to_le_bytes());
    const FORGET_AT: u64 = IN + 0x2000;
    mem.write(GuestAddress(FORGET_AT), &forget).unwrap();

    let chain = |i: usize, len: usize| {
        [
            Descriptor {
                addr: GuestAddress(IN + 0x400 * i as u64),
                len: len as u32,
                flags: 0,
                next: 0,
            },
            Descriptor {
                addr: GuestAddress(OUT + 0x1000 * i as u64),
                len: 0x1000,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            },
        ]
    };
    rq.add_chain(&chain(0, init.len())).unwrap();
    dev.queue_notify(REQUEST_QUEUE, &mut ctx).unwrap();
    let heads: Vec<u16> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| rq.add_chain(&chain(i + 1, r.len())).unwrap())
        .collect();
    let forget_head = hi
        .add_chain(&[Descriptor {
            addr: GuestAddress(FORGET_AT),
            len: forget.len() as u32,
            flags: 0,
            next: 0,
        }])
        .unwrap();

    let mut total = 0;
    for i in 0..ITERATIONS / 10 {
        if i > 0 {
            for &h in &heads {
                rq.publish(h).unwrap();
            }
            hi.publish(forget_head).unwrap();
        }
        let ((), n) = heap_events(|| {
            dev.queue_notify(REQUEST_QUEUE, &mut ctx).unwrap();
            dev.queue_notify(HIPRIO_QUEUE, &mut ctx).unwrap();
        });
        total += n;
    }
    assert_eq!(total, 0, "{total} heap operations in the fs device");
    let stats = dev.stats();
    assert_eq!(stats.replies, 1 + 4 * (ITERATIONS / 10) as u64);
    assert_eq!((stats.error_replies, stats.faults), (0, 0));
    assert_eq!(stats.no_reply, (ITERATIONS / 10) as u64);
}
