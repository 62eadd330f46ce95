//! Tests of the device-side queue, driven by the driver-side mock.

use std::vec;

use super::mock::MockSplitQueue;
use super::*;
use crate::memory::SliceMemory;

const MEM_BASE: u64 = 0;
const MEM_SIZE: usize = 0x10000;
const QUEUE_AT: GuestAddress = GuestAddress(0x1000);
const INDIRECT: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;

fn buf(addr: u64, len: u32, writable: bool) -> Descriptor {
    Descriptor {
        addr: GuestAddress(addr),
        len,
        flags: if writable { VIRTQ_DESC_F_WRITE } else { 0 },
        next: 0,
    }
}

fn with_mem(f: impl FnOnce(&SliceMemory<'_>)) {
    let mut bytes = vec![0u8; MEM_SIZE];
    let mem = SliceMemory::new(GuestAddress(MEM_BASE), &mut bytes);
    f(&mem);
}

#[test]
fn new_rejects_bad_max_sizes() {
    assert!(Queue::new(0).is_err());
    assert!(Queue::new(3).is_err());
    assert!(Queue::new(65535).is_err());
    assert!(Queue::new(32768).is_ok());
    assert_eq!(Queue::new(256).unwrap().size(), 256);
}

#[test]
fn pop_direct_chain_and_return_it() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 16).unwrap();
        let mut q = drv.create_queue(0);
        q.validate(mem).unwrap();
        assert!(q.pop::<4, _>(mem).unwrap().is_none());
        let head = drv
            .add_chain(&[
                buf(0x8000, 16, false),
                buf(0x9000, 512, true),
                buf(0x9200, 1, true),
            ])
            .unwrap();
        let chain = q.pop::<4, _>(mem).unwrap().unwrap();
        assert_eq!(chain.head_index(), head);
        assert_eq!(chain.len(), 3);
        assert_eq!(chain.total_len(), 529);
        assert_eq!(chain.readable().count(), 1);
        assert_eq!(chain.writable().count(), 2);
        assert_eq!(chain.descriptors()[1].addr, GuestAddress(0x9000));
        assert!(q.pop::<4, _>(mem).unwrap().is_none());

        q.add_used(mem, head, 513).unwrap();
        assert_eq!(drv.used_idx().unwrap(), 1);
        assert_eq!(drv.used_elem(0).unwrap(), (u32::from(head), 513));
        assert_eq!(q.next_used(), 1);
    });
}

#[test]
fn pop_indirect_chain() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 8).unwrap();
        let mut q = drv.create_queue(INDIRECT);
        let table = GuestAddress(0x4000);
        let head = drv
            .add_indirect_chain(table, &[buf(0x8000, 8, false), buf(0x8100, 8, true)])
            .unwrap();
        let chain = q.pop::<4, _>(mem).unwrap().unwrap();
        assert_eq!(chain.head_index(), head);
        assert_eq!(chain.len(), 2);
        assert!(!chain.descriptors()[0].is_write_only());
        assert!(chain.descriptors()[1].is_write_only());
    });
}

#[test]
fn indirect_requires_the_feature() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 8).unwrap();
        let mut q = drv.create_queue(0);
        let head = drv
            .add_indirect_chain(GuestAddress(0x4000), &[buf(0x8000, 8, false)])
            .unwrap();
        assert_eq!(
            q.pop::<4, _>(mem).unwrap_err(),
            QueueError::InvalidChain {
                head,
                source: ChainError::IndirectNotNegotiated
            }
        );
    });
}

fn pop_err(
    mem: &SliceMemory<'_>,
    drv: &mut MockSplitQueue<'_, SliceMemory<'_>>,
    head: u16,
) -> ChainError {
    drv.publish(head).unwrap();
    let mut q = drv.create_queue(INDIRECT);
    match q.pop::<64, _>(mem) {
        Err(QueueError::InvalidChain { head: h, source }) => {
            assert_eq!(h, head);
            // The bad chain was consumed and can be handed back (unless its
            // head is not a descriptor index at all).
            if head < q.size() {
                q.add_used(mem, head, 0).unwrap();
            } else {
                assert!(q.add_used(mem, head, 0).is_err());
            }
            assert!(q.pop::<64, _>(mem).unwrap().is_none());
            source
        }
        other => panic!("expected InvalidChain, got {other:?}"),
    }
}

#[test]
fn guest_faults_are_typed_errors() {
    let d = |addr: u64, len: u32, flags: u16, next: u16| Descriptor {
        addr: GuestAddress(addr),
        len,
        flags,
        next,
    };
    // A loop 0 -> 1 -> 0.
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
        drv.write_desc(0, d(0x8000, 1, VIRTQ_DESC_F_NEXT, 1))
            .unwrap();
        drv.write_desc(1, d(0x8000, 1, VIRTQ_DESC_F_NEXT, 0))
            .unwrap();
        assert_eq!(
            pop_err(mem, &mut drv, 0),
            ChainError::Loop { table_size: 4 }
        );
    });
    // A self-loop.
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
        drv.write_desc(2, d(0x8000, 1, VIRTQ_DESC_F_NEXT, 2))
            .unwrap();
        assert_eq!(
            pop_err(mem, &mut drv, 2),
            ChainError::Loop { table_size: 4 }
        );
    });
    // Head outside the table.
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
        assert_eq!(
            pop_err(mem, &mut drv, 4),
            ChainError::IndexOutOfRange {
                index: 4,
                table_size: 4
            }
        );
    });
    // `next` outside the table.
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
        drv.write_desc(0, d(0x8000, 1, VIRTQ_DESC_F_NEXT, 9))
            .unwrap();
        assert_eq!(
            pop_err(mem, &mut drv, 0),
            ChainError::IndexOutOfRange {
                index: 9,
                table_size: 4
            }
        );
    });
    // Buffer outside memory, and a buffer whose end overflows.
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
        drv.write_desc(0, d(MEM_SIZE as u64 - 4, 8, 0, 0)).unwrap();
        assert_eq!(
            pop_err(mem, &mut drv, 0),
            ChainError::Buffer {
                addr: MEM_SIZE as u64 - 4,
                len: 8
            }
        );
    });
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
        drv.write_desc(1, d(u64::MAX - 2, 8, 0, 0)).unwrap();
        assert!(matches!(
            pop_err(mem, &mut drv, 1),
            ChainError::Buffer { .. }
        ));
    });
    // Zero-length buffers are not dereferenced, so any address is fine.
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
        drv.write_desc(2, d(u64::MAX, 0, 0, 0)).unwrap();
        drv.publish(2).unwrap();
        let mut q = drv.create_queue(0);
        assert_eq!(q.pop::<4, _>(mem).unwrap().unwrap().total_len(), 0);
    });
    // Nested indirect table.
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
        let table = GuestAddress(0x4000);
        drv.write_desc(0, d(table.0, 32, VIRTQ_DESC_F_INDIRECT, 0))
            .unwrap();
        MockSplitQueue::write_table_desc(mem, table, 0, d(0x8000, 1, VIRTQ_DESC_F_NEXT, 1))
            .unwrap();
        MockSplitQueue::write_table_desc(mem, table, 1, d(0x5000, 16, VIRTQ_DESC_F_INDIRECT, 0))
            .unwrap();
        assert_eq!(pop_err(mem, &mut drv, 0), ChainError::NestedIndirect);
    });
    // Indirect tables of bad length: zero, not a multiple of 16, too long.
    for len in [0u32, 17, 0x10_0000] {
        with_mem(|mem| {
            let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
            drv.write_desc(0, d(0x4000, len, VIRTQ_DESC_F_INDIRECT, 0))
                .unwrap();
            assert_eq!(
                pop_err(mem, &mut drv, 0),
                ChainError::BadIndirectLength { len }
            );
        });
    }
    // Indirect table outside memory.
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
        drv.write_desc(0, d(u64::MAX - 15, 32, VIRTQ_DESC_F_INDIRECT, 0))
            .unwrap();
        assert!(matches!(pop_err(mem, &mut drv, 0), ChainError::Table(_)));
    });
    // A loop inside an indirect table.
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
        let table = GuestAddress(0x4000);
        drv.write_desc(0, d(table.0, 48, VIRTQ_DESC_F_INDIRECT, 0))
            .unwrap();
        for i in 0..3 {
            MockSplitQueue::write_table_desc(
                mem,
                table,
                i,
                d(0x8000, 1, VIRTQ_DESC_F_NEXT, (i + 1) % 3),
            )
            .unwrap();
        }
        assert_eq!(
            pop_err(mem, &mut drv, 0),
            ChainError::Loop { table_size: 3 }
        );
    });
    // Buffers adding up to more than 4 GiB (in a memory that claims to back
    // every address, so the sum is the only fault).
    struct Huge<'a>(SliceMemory<'a>);
    impl GuestMemory for Huge<'_> {
        fn read(&self, a: GuestAddress, b: &mut [u8]) -> Result<(), MemoryError> {
            self.0.read(a, b)
        }
        fn write(&self, a: GuestAddress, b: &[u8]) -> Result<(), MemoryError> {
            self.0.write(a, b)
        }
        fn check_range(&self, a: GuestAddress, len: u64) -> Result<(), MemoryError> {
            crate::memory::checked_end(a, len).map(|_| ())
        }
    }
    let mut bytes = vec![0u8; MEM_SIZE];
    let mem = Huge(SliceMemory::new(GuestAddress(MEM_BASE), &mut bytes));
    let mut drv = MockSplitQueue::new(&mem, QUEUE_AT, 4).unwrap();
    drv.write_desc(0, d(0x1_0000_0000, u32::MAX, VIRTQ_DESC_F_NEXT, 1))
        .unwrap();
    drv.write_desc(1, d(0x2_0000_0000, 2, 0, 0)).unwrap();
    drv.publish(0).unwrap();
    let mut q = drv.create_queue(0);
    assert_eq!(
        q.pop::<4, _>(&mem).unwrap_err(),
        QueueError::InvalidChain {
            head: 0,
            source: ChainError::TooLarge
        }
    );
}

#[test]
fn chain_longer_than_capacity_is_rejected() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 16).unwrap();
        let mut q = drv.create_queue(0);
        let bufs = [buf(0x8000, 4, false); 5];
        let head = drv.add_chain(&bufs).unwrap();
        assert_eq!(
            q.pop::<4, _>(mem).unwrap_err(),
            QueueError::InvalidChain {
                head,
                source: ChainError::CapacityExceeded { capacity: 4 }
            }
        );
        // The longest legal chain: exactly the queue size.
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 16).unwrap();
        let mut q = drv.create_queue(0);
        drv.add_chain(&[buf(0x8000, 4, false); 16]).unwrap();
        assert_eq!(q.pop::<16, _>(mem).unwrap().unwrap().len(), 16);
    });
}

#[test]
fn avail_index_jump_is_rejected() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 8).unwrap();
        let mut q = drv.create_queue(0);
        drv.set_avail_idx(9).unwrap();
        assert_eq!(
            q.pop::<4, _>(mem).unwrap_err(),
            QueueError::InvalidAvailIndex {
                avail_idx: 9,
                next_avail: 0
            }
        );
        // Exactly the queue size ahead is fine.
        drv.set_avail_idx(8).unwrap();
        assert_eq!(q.pending(mem).unwrap(), 8);
    });
}

#[test]
fn indices_wrap_around_u16() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
        let mut q = drv.create_queue(0);
        // Start both sides just below the wrap.
        let start = u16::MAX - 2;
        drv.set_avail_idx(start).unwrap();
        q = Queue::from_state(&QueueState {
            next_avail: start,
            next_used: start,
            ..q.state()
        })
        .unwrap();
        for i in 0..8u16 {
            let head = drv.add_chain(&[buf(0x8000, u32::from(i), true)]).unwrap();
            let chain = q.pop::<1, _>(mem).unwrap().unwrap();
            assert_eq!(chain.head_index(), head);
            assert_eq!(chain.total_len(), u32::from(i));
            q.add_used(mem, head, u32::from(i)).unwrap();
            let idx = start.wrapping_add(i + 1);
            assert_eq!(drv.used_idx().unwrap(), idx);
            assert_eq!(
                drv.used_elem(idx.wrapping_sub(1) % 4).unwrap(),
                (u32::from(head), u32::from(i))
            );
        }
        assert_eq!(q.next_avail(), start.wrapping_add(8));
    });
}

#[test]
fn not_ready_or_bad_size_is_an_error_not_a_panic() {
    with_mem(|mem| {
        let drv = MockSplitQueue::new(mem, QUEUE_AT, 8).unwrap();
        let mut q = drv.create_queue(0);
        q.set_ready(false);
        assert_eq!(q.pop::<4, _>(mem).unwrap_err(), QueueError::NotReady);
        assert_eq!(q.add_used(mem, 0, 0).unwrap_err(), QueueError::NotReady);
        q.set_ready(true);
        for size in [0u16, 3, 16] {
            q.set_size(size);
            assert!(matches!(
                q.pop::<4, _>(mem),
                Err(QueueError::InvalidSize { .. })
            ));
            assert!(matches!(
                q.add_used(mem, 0, 0),
                Err(QueueError::InvalidSize { .. })
            ));
            assert!(matches!(
                q.validate(mem),
                Err(QueueError::InvalidSize { .. })
            ));
        }
        q.set_size(8);
        assert_eq!(
            q.add_used(mem, 8, 0).unwrap_err(),
            QueueError::InvalidUsedHead { head: 8, size: 8 }
        );
        // Rings at the top of the address space: no overflow panic.
        q.set_avail_ring(GuestAddress(u64::MAX - 1));
        q.set_used_ring(GuestAddress(u64::MAX - 3));
        assert!(q.pop::<4, _>(mem).is_err());
        assert!(q.add_used(mem, 0, 0).is_err());
        assert!(q.needs_notification(mem).is_err());
        assert!(q.enable_notification(mem).is_err());
    });
}

#[test]
fn validate_checks_alignment_and_bounds() {
    with_mem(|mem| {
        let drv = MockSplitQueue::new(mem, QUEUE_AT, 8).unwrap();
        let good = drv.create_queue(0);
        good.validate(mem).unwrap();

        let mut q = good.clone();
        q.set_desc_table(GuestAddress(0x1008));
        assert!(matches!(
            q.validate(mem),
            Err(QueueError::Misaligned { align: 16, .. })
        ));
        let mut q = good.clone();
        q.set_avail_ring(GuestAddress(0x2001));
        assert!(matches!(
            q.validate(mem),
            Err(QueueError::Misaligned { align: 2, .. })
        ));
        let mut q = good.clone();
        q.set_used_ring(GuestAddress(0x2002));
        assert!(matches!(
            q.validate(mem),
            Err(QueueError::Misaligned { align: 4, .. })
        ));
        let mut q = good.clone();
        q.set_used_ring(GuestAddress(MEM_SIZE as u64 - 8));
        assert!(matches!(
            q.validate(mem),
            Err(QueueError::RingOutOfBounds { .. })
        ));
        let mut q = good.clone();
        q.set_desc_table(GuestAddress(u64::MAX - 15));
        assert!(matches!(
            q.validate(mem),
            Err(QueueError::RingOutOfBounds { .. })
        ));
        let mut q = good;
        q.set_size(16);
        assert!(matches!(
            q.validate(mem),
            Err(QueueError::InvalidSize { size: 16, max: 8 })
        ));
    });
}

#[test]
fn notification_without_event_idx_follows_no_interrupt_flag() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 8).unwrap();
        let mut q = drv.create_queue(0);
        let head = drv.add_chain(&[buf(0x8000, 1, true)]).unwrap();
        q.pop::<1, _>(mem).unwrap().unwrap();
        q.add_used(mem, head, 1).unwrap();
        assert!(q.needs_notification(mem).unwrap());
        drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT).unwrap();
        assert!(!q.needs_notification(mem).unwrap());

        q.disable_notification(mem).unwrap();
        assert_eq!(drv.used_flags().unwrap(), VIRTQ_USED_F_NO_NOTIFY);
        assert!(!q.enable_notification(mem).unwrap());
        assert_eq!(drv.used_flags().unwrap(), 0);
        drv.add_chain(&[buf(0x8000, 1, true)]).unwrap();
        // Work arrived: enable_notification reports it.
        assert!(q.enable_notification(mem).unwrap());
    });
}

#[test]
fn notification_with_event_idx_follows_used_event() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 8).unwrap();
        let mut q = drv.create_queue(EVENT_IDX);
        let complete = |q: &mut Queue, drv: &mut MockSplitQueue<'_, SliceMemory<'_>>| {
            let head = drv.add_chain(&[buf(0x8000, 1, true)]).unwrap();
            q.pop::<1, _>(mem).unwrap().unwrap();
            q.add_used(mem, head, 1).unwrap();
        };
        // The first decision after reset always notifies.
        complete(&mut q, &mut drv);
        assert!(q.needs_notification(mem).unwrap());
        // used_event = 2: the driver wants an interrupt once used.idx passes 2,
        // i.e. when entry 2 (the third) is used.
        drv.set_used_event(2).unwrap();
        complete(&mut q, &mut drv); // used.idx 2
        assert!(!q.needs_notification(mem).unwrap());
        complete(&mut q, &mut drv); // used.idx 3
        assert!(q.needs_notification(mem).unwrap());
        complete(&mut q, &mut drv); // used.idx 4, event 2 already passed
        assert!(!q.needs_notification(mem).unwrap());
        // Several entries at once that cross the event.
        drv.set_used_event(5).unwrap();
        complete(&mut q, &mut drv);
        complete(&mut q, &mut drv); // used.idx 6 crosses 5
        assert!(q.needs_notification(mem).unwrap());
        // Event-idx ignores the NO_INTERRUPT flag.
        drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT).unwrap();
        drv.set_used_event(6).unwrap();
        complete(&mut q, &mut drv);
        assert!(q.needs_notification(mem).unwrap());

        // avail_event tells the driver where to notify next.
        assert!(!q.enable_notification(mem).unwrap());
        assert_eq!(drv.avail_event().unwrap(), q.next_avail());
        // disable is a no-op in event-idx mode: flags stay 0.
        q.disable_notification(mem).unwrap();
        assert_eq!(drv.used_flags().unwrap(), 0);
    });
}

#[test]
fn undo_pop_returns_the_same_chain() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 8).unwrap();
        let mut q = drv.create_queue(0);
        let head = drv.add_chain(&[buf(0x8000, 7, true)]).unwrap();
        q.pop::<1, _>(mem).unwrap().unwrap();
        q.undo_pop();
        assert_eq!(q.pop::<1, _>(mem).unwrap().unwrap().head_index(), head);
    });
}

#[test]
fn undoing_several_pops_returns_them_in_order() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 8).unwrap();
        let mut q = drv.create_queue(0);
        let heads: std::vec::Vec<u16> = (0..3)
            .map(|i| drv.add_chain(&[buf(0x8000 + 0x10 * i, 7, true)]).unwrap())
            .collect();
        for _ in 0..3 {
            q.pop::<1, _>(mem).unwrap().unwrap();
        }
        for _ in 0..3 {
            q.undo_pop();
        }
        for &head in &heads {
            assert_eq!(q.pop::<1, _>(mem).unwrap().unwrap().head_index(), head);
        }
        assert!(q.pop::<1, _>(mem).unwrap().is_none());
    });
}

#[test]
fn add_used_batch_publishes_all_at_once_and_wraps() {
    with_mem(|mem| {
        let drv = MockSplitQueue::new(mem, QUEUE_AT, 4).unwrap();
        let mut q = drv.create_queue(0);
        q.add_used(mem, 0, 1).unwrap();
        q.add_used(mem, 1, 1).unwrap();
        // Three more wrap around the four slots.
        q.add_used_batch(mem, &[(2, 10), (3, 20), (0, 30)]).unwrap();
        assert_eq!(drv.used_idx().unwrap(), 5);
        assert_eq!(q.next_used(), 5);
        assert_eq!(drv.used_elem(2).unwrap(), (2, 10));
        assert_eq!(drv.used_elem(3).unwrap(), (3, 20));
        assert_eq!(drv.used_elem(0).unwrap(), (0, 30));
        // A bad head anywhere writes nothing.
        assert_eq!(
            q.add_used_batch(mem, &[(1, 1), (4, 1)]),
            Err(QueueError::InvalidUsedHead { head: 4, size: 4 })
        );
        assert_eq!(drv.used_idx().unwrap(), 5);
        assert_eq!(drv.used_elem(1).unwrap(), (1, 1), "slot 1 untouched");
        // An empty batch publishes the same index again.
        q.add_used_batch(mem, &[]).unwrap();
        assert_eq!(drv.used_idx().unwrap(), 5);
    });
}

#[test]
fn chain_copies_cross_buffers_at_any_offset() {
    with_mem(|mem| {
        let descs = [
            buf(0x8000, 3, true),
            buf(0x9000, 0, true),
            buf(0xa000, 5, true),
        ];
        assert_eq!(copy_to_chain(mem, &descs, 1, &[1, 2, 3, 4, 5]).unwrap(), 5);
        let mut b = [0u8; 8];
        mem.read(GuestAddress(0x8000), &mut b[..3]).unwrap();
        mem.read(GuestAddress(0xa000), &mut b[3..]).unwrap();
        assert_eq!(b, [0, 1, 2, 3, 4, 5, 0, 0]);
        let mut out = [0u8; 10];
        assert_eq!(copy_from_chain(mem, &descs, 2, &mut out).unwrap(), 6);
        assert_eq!(out[..6], [2, 3, 4, 5, 0, 0]);
        // Past the end: nothing.
        assert_eq!(copy_to_chain(mem, &descs, 8, &[9]).unwrap(), 0);
    });
}

#[test]
fn reset_and_state_round_trip() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 8).unwrap();
        let mut q = drv.create_queue(EVENT_IDX | INDIRECT);
        let head = drv.add_chain(&[buf(0x8000, 7, true)]).unwrap();
        q.pop::<1, _>(mem).unwrap().unwrap();
        q.add_used(mem, head, 7).unwrap();
        let s = q.state();
        assert_eq!(Queue::from_state(&s).unwrap().state(), s);
        assert!(s.event_idx && s.indirect && s.ready);
        assert_eq!((s.next_avail, s.next_used), (1, 1));
        assert!(Queue::from_state(&QueueState { max_size: 5, ..s }).is_err());

        q.reset();
        let r = q.state();
        assert_eq!(r, Queue::new(8).unwrap().state());
        assert!(!r.ready && r.desc_table == 0 && r.next_avail == 0);
    });
}

#[test]
fn descriptor_wire_format_round_trips() {
    let d = Descriptor {
        addr: GuestAddress(0x0102_0304_0506_0708),
        len: 0x1122_3344,
        flags: 0x5566,
        next: 0x7788,
    };
    let b = d.to_bytes();
    assert_eq!(b[0], 0x08);
    assert_eq!(b[8], 0x44);
    assert_eq!(b[12], 0x66);
    assert_eq!(b[14], 0x88);
    assert_eq!(Descriptor::from_bytes(&b), d);
}

/// Counts reads of one address.
struct CountReads<'a, 'm> {
    mem: &'a SliceMemory<'m>,
    watched: GuestAddress,
    reads: core::cell::Cell<u32>,
}

impl GuestMemory for CountReads<'_, '_> {
    fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
        if addr == self.watched {
            self.reads.set(self.reads.get() + 1);
        }
        self.mem.read(addr, buf)
    }
    fn write(&self, addr: GuestAddress, buf: &[u8]) -> Result<(), MemoryError> {
        self.mem.write(addr, buf)
    }
    fn check_range(&self, addr: GuestAddress, len: u64) -> Result<(), MemoryError> {
        self.mem.check_range(addr, len)
    }
}

#[test]
fn pop_reads_avail_idx_only_once_it_caught_up() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 8).unwrap();
        let mut q = drv.create_queue(0);
        let counted = CountReads {
            mem,
            watched: GuestAddress(drv.avail_ring().0 + 2),
            reads: core::cell::Cell::new(0),
        };
        let heads: vec::Vec<u16> = (0..3)
            .map(|i| drv.add_chain(&[buf(0x8000 + 0x100 * i, 4, true)]).unwrap())
            .collect();
        for &head in &heads {
            assert_eq!(q.pop::<1, _>(&counted).unwrap().unwrap().head_index(), head);
        }
        // One read found all three.
        assert_eq!(counted.reads.get(), 1);
        assert!(q.pop::<1, _>(&counted).unwrap().is_none());
        assert_eq!(counted.reads.get(), 2);
        // An undone pop is popped again from the known entries.
        let head = drv.add_chain(&[buf(0x9000, 4, true)]).unwrap();
        assert_eq!(q.pop::<1, _>(&counted).unwrap().unwrap().head_index(), head);
        q.undo_pop();
        assert_eq!(q.pop::<1, _>(&counted).unwrap().unwrap().head_index(), head);
        assert_eq!(counted.reads.get(), 3);
        // A snapshot restore forgets what was seen: the index is read again
        // and checked.
        drv.set_avail_idx(q.next_avail().wrapping_add(9)).unwrap();
        let mut q = Queue::from_state(&q.state()).unwrap();
        assert!(matches!(
            q.pop::<1, _>(&counted),
            Err(QueueError::InvalidAvailIndex { .. })
        ));
    });
}

/// What a test's drain handler saw.
#[derive(Default)]
struct Drained {
    served: std::vec::Vec<u16>,
    invalid: u32,
    /// Chains to serve before answering [`Served::Later`].
    budget: usize,
}

fn drain_all(q: &mut Queue, mem: &SliceMemory<'_>, d: &mut Drained) -> bool {
    drain::<4, _, _>(
        q,
        mem,
        d,
        |_| true,
        |d| d.invalid += 1,
        |d, _, chain| {
            if d.served.len() == d.budget {
                return Served::Later;
            }
            d.served.push(chain.head_index());
            Served::Used(chain.total_len())
        },
    )
    .unwrap()
}

#[test]
fn drain_serves_every_chain_and_asks_about_the_interrupt() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 16).unwrap();
        let mut q = drv.create_queue(0);
        let mut d = Drained {
            budget: usize::MAX,
            ..Drained::default()
        };
        // Nothing to do: no interrupt.
        assert!(!drain_all(&mut q, mem, &mut d));
        let a = drv.add_chain(&[buf(0x8000, 16, true)]).unwrap();
        let b = drv.add_chain(&[buf(0x9000, 8, true)]).unwrap();
        assert!(drain_all(&mut q, mem, &mut d));
        assert_eq!(d.served, [a, b]);
        assert_eq!(drv.used_idx().unwrap(), 2);
        assert_eq!(drv.used_elem(0).unwrap(), (u32::from(a), 16));
        assert_eq!(drv.used_elem(1).unwrap(), (u32::from(b), 8));
        // The driver does not want interrupts: the chains still go back.
        drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT).unwrap();
        drv.add_chain(&[buf(0x8000, 1, true)]).unwrap();
        assert!(!drain_all(&mut q, mem, &mut d));
        assert_eq!(drv.used_idx().unwrap(), 3);
    });
}

#[test]
fn drain_gives_invalid_chains_back_unread() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 8).unwrap();
        // Indirect descriptors are not negotiated.
        let mut q = drv.create_queue(0);
        let bad = drv
            .add_indirect_chain(GuestAddress(0x4000), &[buf(0x8000, 8, false)])
            .unwrap();
        let good = drv.add_chain(&[buf(0x9000, 4, true)]).unwrap();
        let mut d = Drained {
            budget: usize::MAX,
            ..Drained::default()
        };
        assert!(drain_all(&mut q, mem, &mut d));
        assert_eq!(d.invalid, 1);
        assert_eq!(d.served, [good]);
        assert_eq!(drv.used_elem(0).unwrap(), (u32::from(bad), 0));
        assert_eq!(drv.used_elem(1).unwrap(), (u32::from(good), 4));
    });
}

#[test]
fn drain_leaves_a_chain_for_later() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 16).unwrap();
        let mut q = drv.create_queue(0);
        let a = drv.add_chain(&[buf(0x8000, 16, true)]).unwrap();
        let b = drv.add_chain(&[buf(0x9000, 8, true)]).unwrap();
        let mut d = Drained {
            budget: 1,
            ..Drained::default()
        };
        assert!(drain_all(&mut q, mem, &mut d));
        assert_eq!(d.served, [a]);
        assert_eq!(drv.used_idx().unwrap(), 1);
        d.budget = 2;
        assert!(drain_all(&mut q, mem, &mut d));
        assert_eq!(d.served, [a, b]);
        assert_eq!(drv.used_idx().unwrap(), 2);
    });
}

#[test]
fn drain_pops_nothing_while_the_device_wants_nothing() {
    with_mem(|mem| {
        let mut drv = MockSplitQueue::new(mem, QUEUE_AT, 16).unwrap();
        let mut q = drv.create_queue(EVENT_IDX);
        drv.add_chain(&[buf(0x8000, 16, true)]).unwrap();
        let used = drain::<4, _, _>(
            &mut q,
            mem,
            &mut (),
            |_| false,
            |_| unreachable!(),
            |_, _, _| unreachable!(),
        )
        .unwrap();
        assert!(!used);
        assert_eq!(q.next_avail(), 0);
        // Nor does it touch avail_event.
        assert_eq!(drv.avail_event().unwrap(), 0);
    });
}

mod state {
    use std::vec::Vec;

    use proptest::prelude::*;

    use super::*;
    use crate::snapshot::{Persist, StateError};

    fn sample() -> QueueState {
        QueueState {
            max_size: 256,
            size: 64,
            ready: true,
            desc_table: 0x1122_3344_5566_7780,
            avail_ring: 0x0102_0304_0506_0708,
            used_ring: 0xa0b0_c0d0_e0f0_0004,
            next_avail: 0xbeef,
            next_used: 0xcafe,
            event_idx: false,
            indirect: true,
        }
    }

    #[test]
    fn encoding_is_fixed() {
        let mut out = [0u8; QueueState::MAX_LEN];
        assert_eq!(sample().save(&mut out), Ok(33));
        let expected: Vec<u8> = [
            &[0x00, 0x01, 0x40, 0x00, 0xef, 0xbe, 0xfe, 0xca, 0b101][..],
            &0x1122_3344_5566_7780u64.to_le_bytes(),
            &0x0102_0304_0506_0708u64.to_le_bytes(),
            &0xa0b0_c0d0_e0f0_0004u64.to_le_bytes(),
        ]
        .concat();
        assert_eq!(out.to_vec(), expected);
        assert_eq!(QueueState::load(&out), Ok(sample()));
        let mut short = [0u8; 32];
        assert!(matches!(
            sample().save(&mut short),
            Err(StateError::BufferTooSmall { .. })
        ));
    }

    #[test]
    fn load_rejects_unknown_flags_and_odd_lengths() {
        let mut out = [0u8; 33];
        sample().save(&mut out).unwrap();
        out[8] = 0b1001;
        assert_eq!(
            QueueState::load(&out),
            Err(StateError::InvalidValue {
                field: "queue flags",
                value: 9
            })
        );
        sample().save(&mut out).unwrap();
        assert!(matches!(
            QueueState::load(&out[..20]),
            Err(StateError::TooShort { .. })
        ));
        let mut long = [0u8; 34];
        sample().save(&mut long).unwrap();
        assert_eq!(
            QueueState::load(&long),
            Err(StateError::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn from_state_checks_ready_queues_without_memory() {
        let ready = QueueState {
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            ..sample()
        };
        assert!(Queue::from_state(&ready).is_ok());
        for size in [0, 3, 512] {
            assert_eq!(
                Queue::from_state(&QueueState { size, ..ready }).unwrap_err(),
                QueueError::InvalidSize { size, max: 256 }
            );
        }
        for (bad, align) in [
            (
                QueueState {
                    desc_table: 0x1008,
                    ..ready
                },
                16,
            ),
            (
                QueueState {
                    avail_ring: 0x2001,
                    ..ready
                },
                2,
            ),
            (
                QueueState {
                    used_ring: 0x3002,
                    ..ready
                },
                4,
            ),
        ] {
            assert!(matches!(
                Queue::from_state(&bad),
                Err(QueueError::Misaligned { align: a, .. }) if a == align
            ));
        }
        // The driver may leave anything in a queue it has not set ready.
        let unready = QueueState {
            ready: false,
            size: 3,
            desc_table: 1,
            ..ready
        };
        assert_eq!(Queue::from_state(&unready).unwrap().state(), unready);
        assert!(Queue::from_state(&QueueState {
            max_size: 0,
            ..unready
        })
        .is_err());
    }

    /// Serves every available chain: its length is its head index. Returns
    /// the heads and whether the driver wanted an interrupt after each.
    fn serve_all(q: &mut Queue, mem: &SliceMemory<'_>) -> Vec<(u16, u32, bool)> {
        let mut served = Vec::new();
        while let Some(chain) = q.pop::<2, _>(mem).unwrap() {
            let head = chain.head_index();
            q.add_used(mem, head, chain.total_len()).unwrap();
            served.push((head, chain.total_len(), q.needs_notification(mem).unwrap()));
        }
        served
    }

    #[test]
    fn restored_queue_continues_mid_stream() {
        let mut bytes = vec![0u8; MEM_SIZE];
        let mem = SliceMemory::new(GuestAddress(MEM_BASE), &mut bytes);
        let mut drv = MockSplitQueue::new(&mem, QUEUE_AT, 8).unwrap();
        // Indices start just below the wrap, so the stream crosses it.
        let start = u16::MAX - 2;
        drv.set_avail_idx(start).unwrap();
        let mut q = Queue::from_state(&QueueState {
            next_avail: start,
            next_used: start,
            ..drv.create_queue(EVENT_IDX | INDIRECT).state()
        })
        .unwrap();
        for i in 0..7u32 {
            drv.add_chain(&[buf(0x8000 + 0x100 * u64::from(i), 16 + i, true)])
                .unwrap();
        }
        for _ in 0..4 {
            let chain = q.pop::<2, _>(&mem).unwrap().unwrap();
            q.add_used(&mem, chain.head_index(), chain.total_len())
                .unwrap();
        }
        drv.set_used_event(start.wrapping_add(5)).unwrap();
        assert!(q.needs_notification(&mem).unwrap());

        // Snapshot: guest memory and the queue's encoded state.
        let mut saved_mem = vec![0u8; MEM_SIZE];
        mem.read(GuestAddress(MEM_BASE), &mut saved_mem).unwrap();
        let mut saved = [0u8; QueueState::MAX_LEN];
        let len = q.state().save(&mut saved).unwrap();

        let expected = serve_all(&mut q, &mem);
        assert_eq!(expected.len(), 3);
        let mut final_mem = vec![0u8; MEM_SIZE];
        mem.read(GuestAddress(MEM_BASE), &mut final_mem).unwrap();

        let restored_mem = SliceMemory::new(GuestAddress(MEM_BASE), &mut saved_mem);
        let state = QueueState::load(&saved[..len]).unwrap();
        assert_eq!(
            (state.next_avail, state.next_used),
            (start.wrapping_add(4), start.wrapping_add(4))
        );
        let mut r = Queue::from_state(&state).unwrap();
        r.validate(&restored_mem).unwrap();
        let got = serve_all(&mut r, &restored_mem);
        // The same chains, given back to the same used slots. Only the first
        // interrupt decision may differ: a restored queue does not know what
        // it last signalled, and interrupts rather than risk a lost one.
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!((g.0, g.1), (e.0, e.1));
        }
        assert!(got[0].2, "first decision after a restore interrupts");
        assert_eq!(got[1..], expected[1..]);
        assert_eq!(r.state(), q.state());
        let mut restored_final = vec![0u8; MEM_SIZE];
        restored_mem
            .read(GuestAddress(MEM_BASE), &mut restored_final)
            .unwrap();
        assert!(restored_final == final_mem, "used rings differ");
    }

    fn any_queue_state() -> impl Strategy<Value = QueueState> {
        (
            (any::<u16>(), any::<u16>(), any::<u16>(), any::<u16>()),
            (any::<u64>(), any::<u64>(), any::<u64>()),
            (any::<bool>(), any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |(
                    (max_size, size, next_avail, next_used),
                    (desc, avail, used),
                    (ready, ev, ind),
                )| {
                    QueueState {
                        max_size,
                        size,
                        ready,
                        desc_table: desc,
                        avail_ring: avail,
                        used_ring: used,
                        next_avail,
                        next_used,
                        event_idx: ev,
                        indirect: ind,
                    }
                },
            )
    }

    proptest! {
        /// Every state round-trips through its encoding.
        #[test]
        fn round_trip(state in any_queue_state()) {
            let mut out = [0u8; QueueState::MAX_LEN];
            let len = state.save(&mut out).unwrap();
            prop_assert_eq!(len, QueueState::MAX_LEN);
            prop_assert_eq!(QueueState::load(&out), Ok(state));
            if let Ok(q) = Queue::from_state(&state) {
                prop_assert_eq!(q.state(), state);
            }
        }

        /// Loading arbitrary bytes never panics, and what loads re-encodes
        /// to the same bytes.
        #[test]
        fn load_of_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(state) = QueueState::load(&bytes) {
                let mut out = [0u8; QueueState::MAX_LEN];
                let len = state.save(&mut out).unwrap();
                prop_assert_eq!(&out[..len], &bytes[..]);
            }
        }
    }
}
