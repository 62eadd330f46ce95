//! Tests of the virtio-mmio transport, driven register by register the way a
//! driver would, with a small recording device behind it.

use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::irq::{CountingIrq, IrqLine};
use crate::memory::{GuestAddress, GuestMemory, SliceMemory};
use crate::queue::mock::MockSplitQueue;
use crate::queue::{Descriptor, QueueError, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const MEM_SIZE: usize = 0x10000;
const QUEUE0_AT: GuestAddress = GuestAddress(0x1000);
const QUEUE1_AT: GuestAddress = GuestAddress(0x3000);
const DEVICE_TYPE: u32 = 42;
/// A device-specific feature (bit 0), a ring feature, and one in the high
/// window (bit 35) so that both windows carry device bits.
const OFFERED: u64 = 1 | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << 35);
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

/// Records every call the transport makes.
#[derive(Debug)]
struct TestDevice {
    max_sizes: Vec<u16>,
    config: [u8; 16],
    activations: u32,
    activated_with: Option<u64>,
    fail_activate: bool,
    fail_notify: bool,
    notified: Vec<u16>,
    resets: u32,
    config_writes: Vec<(u64, Vec<u8>)>,
}

impl TestDevice {
    fn new() -> Self {
        TestDevice {
            max_sizes: vec![16, 8],
            config: [0; 16],
            activations: 0,
            activated_with: None,
            fail_activate: false,
            fail_notify: false,
            notified: Vec::new(),
            resets: 0,
            config_writes: Vec::new(),
        }
    }

    /// Returns every available chain of `queue` with length 0 and
    /// interrupts if the driver wants it, as a real device would.
    fn drain<M: GuestMemory + ?Sized, I: IrqLine>(
        queue: u16,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        let err = |source| DeviceError::Queue {
            index: queue,
            source,
        };
        let q = ctx
            .queues
            .get_mut(usize::from(queue))
            .ok_or(DeviceError::QueueNotReady { index: queue })?;
        while let Some(chain) = q.pop::<4, _>(ctx.mem).map_err(err)? {
            q.add_used(ctx.mem, chain.head_index(), 0).map_err(err)?;
        }
        if q.needs_notification(ctx.mem).map_err(err)? {
            ctx.interrupt.signal_used_buffer();
        }
        Ok(())
    }
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn avail_features(&self) -> u64 {
        OFFERED
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Each byte reads as its own offset past 0x80, so tests can see
        // which offset arrived.
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            if let Some(v) = usize::try_from(off).ok().and_then(|o| self.config.get(o)) {
                *b = *v;
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
    }

    fn activate<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        self.activations += 1;
        if self.fail_activate {
            return Err(DeviceError::Backend { reason: "test" });
        }
        // Queue 0 is required, queue 1 optional.
        if !ctx.queues.first().is_some_and(|q| q.ready()) {
            return Err(DeviceError::QueueNotReady { index: 0 });
        }
        self.activated_with = Some(ctx.features);
        Ok(())
    }

    fn queue_notify<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        queue: u16,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        self.notified.push(queue);
        if self.fail_notify {
            return Err(DeviceError::Backend { reason: "test" });
        }
        Self::drain(queue, ctx)
    }

    fn reset(&mut self) {
        self.resets += 1;
        self.activated_with = None;
    }
}

type Transport = MmioTransport<TestDevice, CountingIrq, 4>;

fn transport() -> Transport {
    let mut dev = TestDevice::new();
    for (i, b) in dev.config.iter_mut().enumerate() {
        *b = 0x80 + i as u8;
    }
    MmioTransport::new(dev, CountingIrq::default()).unwrap()
}

fn with_mem(f: impl FnOnce(&SliceMemory<'_>)) {
    let mut bytes = vec![0u8; MEM_SIZE];
    let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
    f(&mem);
}

fn r32(t: &Transport, offset: u64) -> u32 {
    let mut b = [0xaau8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn w32<M: GuestMemory + ?Sized>(
    t: &mut Transport,
    mem: &M,
    offset: u64,
    value: u32,
) -> Result<(), MmioError> {
    t.write(mem, offset, &value.to_le_bytes())
}

fn irqs(t: &Transport) -> u32 {
    t.interrupt().line().count()
}

fn set_status<M: GuestMemory + ?Sized>(
    t: &mut Transport,
    mem: &M,
    bits: u8,
) -> Result<(), MmioError> {
    let status = t.status() | bits;
    w32(t, mem, STATUS_OFFSET, u32::from(status))
}

/// Writes the 64-bit driver features through both windows.
fn write_driver_features<M: GuestMemory + ?Sized>(t: &mut Transport, mem: &M, features: u64) {
    w32(t, mem, DRIVER_FEATURES_SEL_OFFSET, 0).unwrap();
    w32(t, mem, DRIVER_FEATURES_OFFSET, features as u32).unwrap();
    w32(t, mem, DRIVER_FEATURES_SEL_OFFSET, 1).unwrap();
    w32(t, mem, DRIVER_FEATURES_OFFSET, (features >> 32) as u32).unwrap();
}

/// ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
fn negotiate<M: GuestMemory + ?Sized>(t: &mut Transport, mem: &M, features: u64) {
    set_status(t, mem, STATUS_ACKNOWLEDGE).unwrap();
    set_status(t, mem, STATUS_DRIVER).unwrap();
    write_driver_features(t, mem, features);
    set_status(t, mem, STATUS_FEATURES_OK).unwrap();
    assert_ne!(t.status() & STATUS_FEATURES_OK, 0);
}

fn write_addr<M: GuestMemory + ?Sized>(t: &mut Transport, mem: &M, low: u64, addr: u64) {
    w32(t, mem, low, addr as u32).unwrap();
    w32(t, mem, low + 4, (addr >> 32) as u32).unwrap();
}

/// Programs queue `index` with the layout of `q` and sets it ready.
fn setup_queue<M: GuestMemory + ?Sized>(
    t: &mut Transport,
    mem: &M,
    index: u32,
    q: &MockSplitQueue<'_, M>,
) -> Result<(), MmioError> {
    w32(t, mem, QUEUE_SEL_OFFSET, index).unwrap();
    w32(t, mem, QUEUE_NUM_OFFSET, u32::from(q.size())).unwrap();
    write_addr(t, mem, QUEUE_DESC_LOW_OFFSET, q.desc_table().raw());
    write_addr(t, mem, QUEUE_DRIVER_LOW_OFFSET, q.avail_ring().raw());
    write_addr(t, mem, QUEUE_DEVICE_LOW_OFFSET, q.used_ring().raw());
    w32(t, mem, QUEUE_READY_OFFSET, 1)
}

/// A fully initialised, activated transport with both queues ready.
fn with_live_device(
    f: impl FnOnce(&SliceMemory<'_>, &mut Transport, [MockSplitQueue<'_, SliceMemory<'_>>; 2]),
) {
    with_mem(|mem| {
        let mut t = transport();
        negotiate(&mut t, mem, OFFERED | VERSION_1);
        let q0 = MockSplitQueue::new(mem, QUEUE0_AT, 16).unwrap();
        let q1 = MockSplitQueue::new(mem, QUEUE1_AT, 8).unwrap();
        setup_queue(&mut t, mem, 0, &q0).unwrap();
        setup_queue(&mut t, mem, 1, &q1).unwrap();
        set_status(&mut t, mem, STATUS_DRIVER_OK).unwrap();
        assert!(t.is_activated());
        assert!(t.is_live());
        f(mem, &mut t, [q0, q1]);
    });
}

fn buf(addr: u64, len: u32) -> Descriptor {
    Descriptor {
        addr: GuestAddress(addr),
        len,
        flags: 0,
        next: 0,
    }
}

#[test]
fn magic_version_and_ids() {
    let t = transport();
    assert_eq!(r32(&t, MAGIC_VALUE_OFFSET), 0x7472_6976);
    assert_eq!(MMIO_MAGIC_VALUE.to_le_bytes(), *b"virt");
    assert_eq!(r32(&t, VERSION_OFFSET), 2);
    assert_eq!(r32(&t, DEVICE_ID_OFFSET), DEVICE_TYPE);
    assert_eq!(r32(&t, VENDOR_ID_OFFSET), VENDOR_ID);
    assert_eq!(VENDOR_ID.to_le_bytes(), *b"SKIF");
}

#[test]
fn construction_checks_the_queues() {
    let too_many: Result<MmioTransport<_, _, 1>, _> =
        MmioTransport::new(TestDevice::new(), CountingIrq::default());
    assert_eq!(
        too_many.err(),
        Some(MmioError::TooManyQueues {
            count: 2,
            capacity: 1
        })
    );
    let mut dev = TestDevice::new();
    dev.max_sizes = vec![16, 3];
    let bad: Result<Transport, _> = MmioTransport::new(dev, CountingIrq::default());
    assert!(matches!(
        bad.err(),
        Some(MmioError::InvalidQueueMaxSize {
            index: 1,
            source: QueueError::InvalidSize { size: 3, .. }
        })
    ));
    let mut dev = TestDevice::new();
    dev.max_sizes = vec![];
    let none: Transport = MmioTransport::new(dev, CountingIrq::default()).unwrap();
    assert!(none.queues().is_empty());
    assert_eq!(r32(&none, QUEUE_NUM_MAX_OFFSET), 0);
}

#[test]
fn device_feature_windows() {
    with_mem(|mem| {
        let mut t = transport();
        let all = OFFERED | VERSION_1;
        assert_eq!(t.device_features(), all);
        // Selector 0 after creation.
        assert_eq!(r32(&t, DEVICE_FEATURES_OFFSET), all as u32);
        w32(&mut t, mem, DEVICE_FEATURES_SEL_OFFSET, 1).unwrap();
        let high = r32(&t, DEVICE_FEATURES_OFFSET);
        assert_eq!(high, (all >> 32) as u32);
        assert_ne!(high & 1, 0, "VERSION_1 is bit 0 of the high window");
        assert_ne!(high & (1 << 3), 0);
        for sel in [2, 3, u32::MAX] {
            w32(&mut t, mem, DEVICE_FEATURES_SEL_OFFSET, sel).unwrap();
            assert_eq!(r32(&t, DEVICE_FEATURES_OFFSET), 0);
        }
        w32(&mut t, mem, DEVICE_FEATURES_SEL_OFFSET, 0).unwrap();
        assert_eq!(r32(&t, DEVICE_FEATURES_OFFSET), all as u32);
        // Write-only selectors read as zero.
        assert_eq!(r32(&t, DEVICE_FEATURES_SEL_OFFSET), 0);
        assert_eq!(r32(&t, DRIVER_FEATURES_OFFSET), 0);
    });
}

#[test]
fn driver_features_must_be_a_subset() {
    with_mem(|mem| {
        let mut t = transport();
        set_status(&mut t, mem, STATUS_ACKNOWLEDGE | STATUS_DRIVER).unwrap();
        let unoffered = VERSION_1 | (1 << VIRTIO_RING_F_INDIRECT_DESC);
        write_driver_features(&mut t, mem, unoffered);
        assert_eq!(t.driver_features(), unoffered);
        assert_eq!(
            set_status(&mut t, mem, STATUS_FEATURES_OK),
            Err(MmioError::FeaturesRejected {
                accepted: unoffered,
                offered: OFFERED | VERSION_1
            })
        );
        assert_eq!(r32(&t, STATUS_OFFSET), 3, "FEATURES_OK stays clear");
        // The driver may try again with a subset.
        write_driver_features(&mut t, mem, VERSION_1 | 1);
        set_status(&mut t, mem, STATUS_FEATURES_OK).unwrap();
        assert_eq!(r32(&t, STATUS_OFFSET), 11);
        assert_eq!(t.driver_features(), VERSION_1 | 1);
    });
}

#[test]
fn features_ok_requires_version_1() {
    with_mem(|mem| {
        let mut t = transport();
        set_status(&mut t, mem, STATUS_ACKNOWLEDGE | STATUS_DRIVER).unwrap();
        write_driver_features(&mut t, mem, OFFERED);
        assert!(matches!(
            set_status(&mut t, mem, STATUS_FEATURES_OK),
            Err(MmioError::FeaturesRejected { .. })
        ));
        assert_eq!(t.status() & STATUS_FEATURES_OK, 0);
        // Not even an empty set is fine without VERSION_1.
        write_driver_features(&mut t, mem, 0);
        assert!(set_status(&mut t, mem, STATUS_FEATURES_OK).is_err());
        write_driver_features(&mut t, mem, VERSION_1);
        set_status(&mut t, mem, STATUS_FEATURES_OK).unwrap();
    });
}

#[test]
fn driver_features_windows_and_freeze() {
    with_mem(|mem| {
        let mut t = transport();
        set_status(&mut t, mem, STATUS_ACKNOWLEDGE | STATUS_DRIVER).unwrap();
        w32(&mut t, mem, DRIVER_FEATURES_OFFSET, 1).unwrap();
        w32(&mut t, mem, DRIVER_FEATURES_SEL_OFFSET, 1).unwrap();
        w32(&mut t, mem, DRIVER_FEATURES_OFFSET, 1).unwrap();
        assert_eq!(t.driver_features(), 1 | VERSION_1);
        // Windows above 1 hold nothing.
        w32(&mut t, mem, DRIVER_FEATURES_SEL_OFFSET, 2).unwrap();
        w32(&mut t, mem, DRIVER_FEATURES_OFFSET, u32::MAX).unwrap();
        assert_eq!(t.driver_features(), 1 | VERSION_1);
        set_status(&mut t, mem, STATUS_FEATURES_OK).unwrap();
        // Frozen after FEATURES_OK.
        w32(&mut t, mem, DRIVER_FEATURES_SEL_OFFSET, 0).unwrap();
        w32(&mut t, mem, DRIVER_FEATURES_OFFSET, 0).unwrap();
        assert_eq!(t.driver_features(), 1 | VERSION_1);
    });
}

#[test]
fn features_reach_the_queues() {
    with_mem(|mem| {
        let mut t = transport();
        negotiate(&mut t, mem, VERSION_1 | (1 << VIRTIO_RING_F_EVENT_IDX));
        assert!(t.queues().iter().all(|q| q.event_idx()));
        w32(&mut t, mem, STATUS_OFFSET, 0).unwrap();
        negotiate(&mut t, mem, VERSION_1);
        assert!(t.queues().iter().all(|q| !q.event_idx()));
    });
}

#[test]
fn queue_num_max_and_nonexistent_queues() {
    with_mem(|mem| {
        let mut t = transport();
        assert_eq!(r32(&t, QUEUE_NUM_MAX_OFFSET), 16);
        w32(&mut t, mem, QUEUE_SEL_OFFSET, 1).unwrap();
        assert_eq!(r32(&t, QUEUE_NUM_MAX_OFFSET), 8);
        negotiate(&mut t, mem, VERSION_1);
        for sel in [2, 4, 0x1_0000, u32::MAX] {
            w32(&mut t, mem, QUEUE_SEL_OFFSET, sel).unwrap();
            assert_eq!(r32(&t, QUEUE_NUM_MAX_OFFSET), 0);
            assert_eq!(r32(&t, QUEUE_READY_OFFSET), 0);
            // Writes to a queue that doesn't exist go nowhere.
            w32(&mut t, mem, QUEUE_NUM_OFFSET, 4).unwrap();
            write_addr(&mut t, mem, QUEUE_DESC_LOW_OFFSET, 0x1000);
            w32(&mut t, mem, QUEUE_READY_OFFSET, 1).unwrap();
            assert_eq!(r32(&t, QUEUE_READY_OFFSET), 0);
        }
        assert!(t.queues().iter().all(|q| q.desc_table().raw() == 0));
    });
}

#[test]
fn queue_setup_through_the_address_registers() {
    with_mem(|mem| {
        let mut t = transport();
        negotiate(&mut t, mem, VERSION_1);
        w32(&mut t, mem, QUEUE_SEL_OFFSET, 1).unwrap();
        w32(&mut t, mem, QUEUE_NUM_OFFSET, 4).unwrap();
        write_addr(&mut t, mem, QUEUE_DESC_LOW_OFFSET, 0x1234_5678_9abc_def0);
        write_addr(&mut t, mem, QUEUE_DRIVER_LOW_OFFSET, 0x0fed_cba9_8765_4320);
        write_addr(&mut t, mem, QUEUE_DEVICE_LOW_OFFSET, 0x1111_2222_3333_4440);
        let q = &t.queues()[1];
        assert_eq!(q.size(), 4);
        assert_eq!(q.desc_table(), GuestAddress(0x1234_5678_9abc_def0));
        assert_eq!(q.avail_ring(), GuestAddress(0x0fed_cba9_8765_4320));
        assert_eq!(q.used_ring(), GuestAddress(0x1111_2222_3333_4440));
        // Each half changes only its own bits.
        w32(&mut t, mem, QUEUE_DESC_HIGH_OFFSET, 0).unwrap();
        assert_eq!(t.queues()[1].desc_table(), GuestAddress(0x9abc_def0));
        w32(&mut t, mem, QUEUE_DESC_LOW_OFFSET, 0x2000).unwrap();
        assert_eq!(t.queues()[1].desc_table(), GuestAddress(0x2000));
        // Queue 0 was not touched.
        assert_eq!(t.queues()[0].desc_table(), GuestAddress(0));
        // Write-only: they read as zero.
        assert_eq!(r32(&t, QUEUE_DESC_LOW_OFFSET), 0);
        assert_eq!(r32(&t, QUEUE_NUM_OFFSET), 0);

        let drv = MockSplitQueue::new(mem, QUEUE1_AT, 8).unwrap();
        setup_queue(&mut t, mem, 1, &drv).unwrap();
        assert_eq!(r32(&t, QUEUE_READY_OFFSET), 1);
        w32(&mut t, mem, QUEUE_SEL_OFFSET, 0).unwrap();
        assert_eq!(r32(&t, QUEUE_READY_OFFSET), 0);
    });
}

#[test]
fn queue_registers_need_features_ok() {
    with_mem(|mem| {
        let mut t = transport();
        set_status(&mut t, mem, STATUS_ACKNOWLEDGE | STATUS_DRIVER).unwrap();
        let drv = MockSplitQueue::new(mem, QUEUE0_AT, 16).unwrap();
        setup_queue(&mut t, mem, 0, &drv).unwrap();
        assert_eq!(r32(&t, QUEUE_READY_OFFSET), 0);
        assert_eq!(t.queues()[0].desc_table(), GuestAddress(0));
    });
}

#[test]
fn queue_ready_with_a_bad_queue_stays_zero() {
    with_mem(|mem| {
        let mut t = transport();
        negotiate(&mut t, mem, VERSION_1);
        let drv = MockSplitQueue::new(mem, QUEUE0_AT, 16).unwrap();
        let not_ready = |t: &mut Transport| {
            assert_eq!(r32(t, QUEUE_READY_OFFSET), 0);
            assert!(!t.queues()[0].ready());
        };

        write_addr(&mut t, mem, QUEUE_DESC_LOW_OFFSET, drv.desc_table().raw());
        write_addr(&mut t, mem, QUEUE_DRIVER_LOW_OFFSET, drv.avail_ring().raw());
        write_addr(&mut t, mem, QUEUE_DEVICE_LOW_OFFSET, drv.used_ring().raw());

        // Bad sizes: zero, not a power of two, above the maximum, above u16.
        for size in [0, 12, 32, 0x1_0010] {
            w32(&mut t, mem, QUEUE_NUM_OFFSET, size).unwrap();
            assert!(matches!(
                w32(&mut t, mem, QUEUE_READY_OFFSET, 1),
                Err(MmioError::QueueRejected {
                    index: 0,
                    source: QueueError::InvalidSize { .. }
                })
            ));
            not_ready(&mut t);
        }
        w32(&mut t, mem, QUEUE_NUM_OFFSET, 16).unwrap();

        // Misaligned descriptor table.
        write_addr(&mut t, mem, QUEUE_DESC_LOW_OFFSET, QUEUE0_AT.raw() + 8);
        assert!(matches!(
            w32(&mut t, mem, QUEUE_READY_OFFSET, 1),
            Err(MmioError::QueueRejected {
                source: QueueError::Misaligned { .. },
                ..
            })
        ));
        not_ready(&mut t);
        write_addr(&mut t, mem, QUEUE_DESC_LOW_OFFSET, drv.desc_table().raw());

        // Used ring outside guest memory, and one overflowing the address
        // space.
        for used in [MEM_SIZE as u64, 0x1_0000_0000, u64::MAX - 3] {
            write_addr(&mut t, mem, QUEUE_DEVICE_LOW_OFFSET, used);
            assert!(matches!(
                w32(&mut t, mem, QUEUE_READY_OFFSET, 1),
                Err(MmioError::QueueRejected {
                    source: QueueError::RingOutOfBounds { .. },
                    ..
                })
            ));
            not_ready(&mut t);
        }

        // Fixed up, the same queue is accepted; the status never got
        // NEEDS_RESET.
        write_addr(&mut t, mem, QUEUE_DEVICE_LOW_OFFSET, drv.used_ring().raw());
        w32(&mut t, mem, QUEUE_READY_OFFSET, 1).unwrap();
        assert_eq!(r32(&t, QUEUE_READY_OFFSET), 1);
        assert_eq!(t.status() & STATUS_NEEDS_RESET, 0);
    });
}

#[test]
fn queue_registers_are_frozen_once_ready() {
    with_mem(|mem| {
        let mut t = transport();
        negotiate(&mut t, mem, VERSION_1);
        let drv = MockSplitQueue::new(mem, QUEUE0_AT, 16).unwrap();
        setup_queue(&mut t, mem, 0, &drv).unwrap();
        let before = t.queues()[0].state();
        w32(&mut t, mem, QUEUE_NUM_OFFSET, 4).unwrap();
        for low in [
            QUEUE_DESC_LOW_OFFSET,
            QUEUE_DRIVER_LOW_OFFSET,
            QUEUE_DEVICE_LOW_OFFSET,
        ] {
            write_addr(&mut t, mem, low, 0x8000);
        }
        // Setting ready again is a no-op.
        w32(&mut t, mem, QUEUE_READY_OFFSET, 1).unwrap();
        assert_eq!(t.queues()[0].state(), before);

        // Before DRIVER_OK the driver may take the queue back.
        w32(&mut t, mem, QUEUE_READY_OFFSET, 0).unwrap();
        assert_eq!(r32(&t, QUEUE_READY_OFFSET), 0);
        w32(&mut t, mem, QUEUE_READY_OFFSET, 1).unwrap();

        // After DRIVER_OK nothing changes, not even QueueReady.
        set_status(&mut t, mem, STATUS_DRIVER_OK).unwrap();
        w32(&mut t, mem, QUEUE_READY_OFFSET, 0).unwrap();
        assert_eq!(r32(&t, QUEUE_READY_OFFSET), 1);
        w32(&mut t, mem, QUEUE_SEL_OFFSET, 1).unwrap();
        let drv1 = MockSplitQueue::new(mem, QUEUE1_AT, 8).unwrap();
        setup_queue(&mut t, mem, 1, &drv1).unwrap();
        assert_eq!(r32(&t, QUEUE_READY_OFFSET), 0);
        assert_eq!(t.queues()[1].desc_table(), GuestAddress(0));
        assert_eq!(t.queues()[0].state(), before);
    });
}

#[test]
fn driver_ok_activates_once() {
    with_live_device(|mem, t, _| {
        assert_eq!(t.device().activations, 1);
        assert_eq!(t.device().activated_with, Some(OFFERED | VERSION_1));
        assert_eq!(t.status(), 15);
        // Rewriting the same status, or adding nothing, does not activate
        // again.
        set_status(t, mem, STATUS_DRIVER_OK).unwrap();
        set_status(t, mem, 0).unwrap();
        assert_eq!(t.device().activations, 1);
        assert_eq!(irqs(t), 0);
    });
}

#[test]
fn activation_failure_sets_needs_reset() {
    with_mem(|mem| {
        let mut t = transport();
        negotiate(&mut t, mem, VERSION_1);
        // Queue 0 is required but was never set up.
        assert_eq!(
            set_status(&mut t, mem, STATUS_DRIVER_OK),
            Err(MmioError::ActivationFailed(DeviceError::QueueNotReady {
                index: 0
            }))
        );
        assert!(!t.is_activated());
        assert!(!t.is_live());
        assert_eq!(
            t.status(),
            15 | STATUS_NEEDS_RESET,
            "DRIVER_OK stays, NEEDS_RESET joins"
        );
        // The driver hears about it through a configuration change.
        assert_eq!(r32(&t, INTERRUPT_STATUS_OFFSET), INT_CONFIG_CHANGE);
        assert_eq!(r32(&t, CONFIG_GENERATION_OFFSET), 1);
        assert_eq!(irqs(&t), 1);
        // Notifications go nowhere.
        w32(&mut t, mem, QUEUE_NOTIFY_OFFSET, 0).unwrap();
        assert!(t.device().notified.is_empty());
        // A reset and a proper setup recover.
        w32(&mut t, mem, STATUS_OFFSET, 0).unwrap();
        negotiate(&mut t, mem, VERSION_1);
        let drv = MockSplitQueue::new(mem, QUEUE0_AT, 16).unwrap();
        setup_queue(&mut t, mem, 0, &drv).unwrap();
        set_status(&mut t, mem, STATUS_DRIVER_OK).unwrap();
        assert!(t.is_activated());
        assert!(t.is_live());
        assert_eq!(t.device().activations, 2);
        assert_eq!(t.status(), 15);
    });
}

#[test]
fn backend_activation_failure_is_reported() {
    with_mem(|mem| {
        let mut t = transport();
        t.device_mut().fail_activate = true;
        negotiate(&mut t, mem, VERSION_1);
        let drv = MockSplitQueue::new(mem, QUEUE0_AT, 16).unwrap();
        setup_queue(&mut t, mem, 0, &drv).unwrap();
        let err = set_status(&mut t, mem, STATUS_DRIVER_OK).unwrap_err();
        assert_eq!(
            err,
            MmioError::ActivationFailed(DeviceError::Backend { reason: "test" })
        );
        assert_eq!(std::format!("{err}"), "device activation failed");
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
    });
}

#[test]
fn notify_reaches_the_device_with_the_queue_index() {
    with_live_device(|mem, t, [_, mut q1]| {
        let head = q1.add_chain(&[buf(0x8000, 16)]).unwrap();
        w32(t, mem, QUEUE_NOTIFY_OFFSET, 1).unwrap();
        assert_eq!(t.device().notified, [1]);
        assert_eq!(q1.used_idx().unwrap(), 1);
        assert_eq!(q1.used_elem(0).unwrap(), (u32::from(head), 0));
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), INT_USED_BUFFER);
        assert_eq!(irqs(t), 1);
        w32(t, mem, QUEUE_NOTIFY_OFFSET, 0).unwrap();
        assert_eq!(t.device().notified, [1, 0]);
    });
}

#[test]
fn bad_notifications_are_ignored() {
    with_mem(|mem| {
        let mut t = transport();
        negotiate(&mut t, mem, VERSION_1);
        let drv = MockSplitQueue::new(mem, QUEUE0_AT, 16).unwrap();
        setup_queue(&mut t, mem, 0, &drv).unwrap();
        // Before DRIVER_OK.
        w32(&mut t, mem, QUEUE_NOTIFY_OFFSET, 0).unwrap();
        assert!(t.device().notified.is_empty());
        set_status(&mut t, mem, STATUS_DRIVER_OK).unwrap();
        // Out of range, including values that alias a queue in 16 bits;
        // queue 1 exists but is not ready.
        for value in [1, 2, 4, 0x1_0000, 0x1_0001, u32::MAX] {
            w32(&mut t, mem, QUEUE_NOTIFY_OFFSET, value).unwrap();
        }
        assert!(t.device().notified.is_empty());
        // Wrong width.
        t.write(mem, QUEUE_NOTIFY_OFFSET, &[0, 0]).unwrap();
        assert!(t.device().notified.is_empty());
        w32(&mut t, mem, QUEUE_NOTIFY_OFFSET, 0).unwrap();
        assert_eq!(t.device().notified, [0]);
        // After the driver gave up.
        set_status(&mut t, mem, STATUS_FAILED).unwrap();
        w32(&mut t, mem, QUEUE_NOTIFY_OFFSET, 0).unwrap();
        assert_eq!(t.device().notified, [0]);
    });
}

#[test]
fn notify_failure_sets_needs_reset() {
    with_live_device(|mem, t, _| {
        t.device_mut().fail_notify = true;
        assert_eq!(
            w32(t, mem, QUEUE_NOTIFY_OFFSET, 1),
            Err(MmioError::NotifyFailed {
                queue: 1,
                source: DeviceError::Backend { reason: "test" }
            })
        );
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), INT_CONFIG_CHANGE);
        // Further notifications are dropped until the driver resets.
        w32(t, mem, QUEUE_NOTIFY_OFFSET, 1).unwrap();
        assert_eq!(t.device().notified, [1]);
        // And the device's own fault is reported once.
        t.set_needs_reset();
        assert_eq!(irqs(t), 1);
    });
}

#[test]
fn direct_notify_is_the_register_write() {
    with_live_device(|mem, t, [mut q0, mut q1]| {
        let head = q1.add_chain(&[buf(0x8000, 16)]).unwrap();
        t.notify(mem, 1).unwrap();
        assert_eq!(t.device().notified, [1]);
        assert_eq!(q1.used_elem(0).unwrap(), (u32::from(head), 0));
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), INT_USED_BUFFER);
        assert_eq!(irqs(t), 1);
        q0.add_chain(&[buf(0x8000, 1)]).unwrap();
        t.notify(mem, 0).unwrap();
        assert_eq!(t.device().notified, [1, 0]);
        assert_eq!(q0.used_idx().unwrap(), 1);
        // Queues that do not exist are ignored.
        for queue in [2, 4, u16::MAX] {
            t.notify(mem, queue).unwrap();
        }
        assert_eq!(t.device().notified, [1, 0]);
    });
}

#[test]
fn direct_notify_needs_a_live_device() {
    with_mem(|mem| {
        let mut t = transport();
        negotiate(&mut t, mem, VERSION_1);
        let drv = MockSplitQueue::new(mem, QUEUE0_AT, 16).unwrap();
        setup_queue(&mut t, mem, 0, &drv).unwrap();
        // Before DRIVER_OK.
        t.notify(mem, 0).unwrap();
        assert!(t.device().notified.is_empty());
        set_status(&mut t, mem, STATUS_DRIVER_OK).unwrap();
        // Queue 1 exists but is not ready.
        t.notify(mem, 1).unwrap();
        assert!(t.device().notified.is_empty());
        t.notify(mem, 0).unwrap();
        assert_eq!(t.device().notified, [0]);
        // After the driver gave up.
        assert!(t.is_live());
        set_status(&mut t, mem, STATUS_FAILED).unwrap();
        assert!(t.is_activated() && !t.is_live());
        t.notify(mem, 0).unwrap();
        assert_eq!(t.device().notified, [0]);
    });
}

#[test]
fn direct_notify_failure_sets_needs_reset() {
    with_live_device(|mem, t, _| {
        t.device_mut().fail_notify = true;
        assert_eq!(
            t.notify(mem, 0),
            Err(MmioError::NotifyFailed {
                queue: 0,
                source: DeviceError::Backend { reason: "test" }
            })
        );
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), INT_CONFIG_CHANGE);
        assert_eq!(irqs(t), 1);
        // Further notifications, by either path, are dropped until the
        // driver resets.
        t.notify(mem, 0).unwrap();
        w32(t, mem, QUEUE_NOTIFY_OFFSET, 0).unwrap();
        assert_eq!(t.device().notified, [0]);
    });
}

#[test]
fn run_device_lends_the_device_while_it_is_live() {
    with_live_device(|mem, t, [_, mut q1]| {
        let head = q1.add_chain(&[buf(0x8000, 8)]).unwrap();
        let mut ran = 0;
        t.run_device(mem, |_, ctx| {
            ran += 1;
            assert_eq!(ctx.features, OFFERED | VERSION_1);
            TestDevice::drain(1, ctx)
        })
        .unwrap();
        assert_eq!(ran, 1);
        assert_eq!(q1.used_elem(0).unwrap(), (u32::from(head), 0));
        assert_eq!(irqs(t), 1);
        // A failure sets NEEDS_RESET, and then the work waits.
        assert_eq!(
            t.run_device(mem, |_, _| Err(DeviceError::Backend { reason: "test" })),
            Err(DeviceError::Backend { reason: "test" })
        );
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
        assert_eq!(
            r32(t, INTERRUPT_STATUS_OFFSET),
            INT_USED_BUFFER | INT_CONFIG_CHANGE
        );
        t.run_device(mem, |_, _| {
            ran += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(ran, 1);
    });
}

#[test]
fn run_device_waits_for_activation() {
    with_mem(|mem| {
        let mut t = transport();
        negotiate(&mut t, mem, VERSION_1);
        let mut ran = false;
        t.run_device(mem, |_, _| {
            ran = true;
            Ok(())
        })
        .unwrap();
        assert!(!ran);
        assert_eq!(t.status() & STATUS_NEEDS_RESET, 0);
    });
}

#[test]
fn interrupt_status_and_ack() {
    with_live_device(|mem, t, [mut q0, _]| {
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), 0);
        q0.add_chain(&[buf(0x8000, 1)]).unwrap();
        w32(t, mem, QUEUE_NOTIFY_OFFSET, 0).unwrap();
        t.signal_config_change();
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), 3);
        assert_eq!(irqs(t), 2);
        w32(t, mem, INTERRUPT_ACK_OFFSET, INT_USED_BUFFER).unwrap();
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), INT_CONFIG_CHANGE);
        // Acknowledging bits that are not set is harmless.
        w32(t, mem, INTERRUPT_ACK_OFFSET, 0xffff_fffc).unwrap();
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), INT_CONFIG_CHANGE);
        w32(t, mem, INTERRUPT_ACK_OFFSET, INT_CONFIG_CHANGE).unwrap();
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), 0);
        // The status register is read-only and the ACK write-only.
        w32(t, mem, INTERRUPT_STATUS_OFFSET, 3).unwrap();
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), 0);
        assert_eq!(r32(t, INTERRUPT_ACK_OFFSET), 0);
        // Each used buffer signal fires the line, even with the bit set.
        t.signal_used_buffer();
        t.signal_used_buffer();
        assert_eq!(irqs(t), 4);
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), INT_USED_BUFFER);
    });
}

#[test]
fn writing_zero_to_status_resets_everything() {
    with_live_device(|mem, t, [mut q0, _]| {
        q0.add_chain(&[buf(0x8000, 1)]).unwrap();
        w32(t, mem, QUEUE_NOTIFY_OFFSET, 0).unwrap();
        w32(t, mem, QUEUE_SEL_OFFSET, 1).unwrap();
        w32(t, mem, DEVICE_FEATURES_SEL_OFFSET, 1).unwrap();
        w32(t, mem, DRIVER_FEATURES_SEL_OFFSET, 1).unwrap();
        assert_ne!(t.queues()[0].next_used(), 0);

        w32(t, mem, STATUS_OFFSET, 0).unwrap();
        assert_eq!(t.device().resets, 1);
        assert_eq!(t.device().activated_with, None);
        assert!(!t.is_activated());
        assert_eq!(r32(t, STATUS_OFFSET), 0);
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), 0);
        assert_eq!(t.driver_features(), 0);
        for q in t.queues() {
            assert!(!q.ready());
            assert_eq!(q.size(), q.max_size());
            assert_eq!(q.desc_table(), GuestAddress(0));
            assert_eq!(q.avail_ring(), GuestAddress(0));
            assert_eq!(q.used_ring(), GuestAddress(0));
            assert_eq!(q.next_avail(), 0);
            assert_eq!(q.next_used(), 0);
            assert!(!q.event_idx());
        }
        // Selectors are back at 0.
        assert_eq!(r32(t, QUEUE_NUM_MAX_OFFSET), 16);
        assert_eq!(r32(t, DEVICE_FEATURES_OFFSET), OFFERED as u32);
        w32(t, mem, DRIVER_FEATURES_OFFSET, 1).unwrap();
        assert_eq!(t.driver_features(), 1);
        // The generation keeps counting.
        let generation = r32(t, CONFIG_GENERATION_OFFSET);
        t.signal_config_change();
        assert_eq!(r32(t, CONFIG_GENERATION_OFFSET), generation + 1);
        // A second reset calls the device again.
        t.reset();
        assert_eq!(t.device().resets, 2);
    });
}

#[test]
fn status_bits_must_be_set_in_order() {
    with_mem(|mem| {
        let mut t = transport();
        let invalid = |status, written| MmioError::InvalidStatus { status, written };
        // Skipping steps.
        assert_eq!(w32(&mut t, mem, STATUS_OFFSET, 2), Err(invalid(0, 2)));
        assert_eq!(w32(&mut t, mem, STATUS_OFFSET, 9), Err(invalid(0, 9)));
        assert_eq!(w32(&mut t, mem, STATUS_OFFSET, 4), Err(invalid(0, 4)));
        assert_eq!(t.status(), 0);
        // Several steps at once are fine.
        w32(&mut t, mem, STATUS_OFFSET, 3).unwrap();
        assert_eq!(r32(&t, STATUS_OFFSET), 3);
        // DRIVER_OK before FEATURES_OK.
        assert_eq!(w32(&mut t, mem, STATUS_OFFSET, 7), Err(invalid(3, 7)));
        // Clearing bits.
        assert_eq!(w32(&mut t, mem, STATUS_OFFSET, 1), Err(invalid(3, 1)));
        // Bits reserved to the device, unknown bits, and values above a byte.
        for v in [3 | 64, 3 | 16, 3 | 32, 0x103] {
            assert_eq!(w32(&mut t, mem, STATUS_OFFSET, v), Err(invalid(3, v)));
        }
        assert_eq!(r32(&t, STATUS_OFFSET), 3);
        assert_eq!(t.device().activations, 0);
        assert_eq!(t.device().resets, 0);
    });
}

#[test]
fn failed_is_accepted_any_time_and_then_only_reset() {
    with_mem(|mem| {
        let mut t = transport();
        set_status(&mut t, mem, STATUS_ACKNOWLEDGE).unwrap();
        set_status(&mut t, mem, STATUS_FAILED).unwrap();
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE | STATUS_FAILED);
        assert!(set_status(&mut t, mem, STATUS_DRIVER).is_err());
        // Queue and feature registers no longer take writes.
        w32(&mut t, mem, DRIVER_FEATURES_OFFSET, 1).unwrap();
        assert_eq!(t.driver_features(), 0);
        w32(&mut t, mem, STATUS_OFFSET, 0).unwrap();
        assert_eq!(t.status(), 0);
        set_status(&mut t, mem, STATUS_ACKNOWLEDGE).unwrap();
    });
}

#[test]
fn config_space_is_delegated_with_the_offset() {
    with_mem(|mem| {
        let mut t = transport();
        let mut b1 = [0u8; 1];
        t.read(CONFIG_OFFSET + 4, &mut b1);
        assert_eq!(b1, [0x84]);
        let mut b2 = [0u8; 2];
        t.read(CONFIG_OFFSET + 2, &mut b2);
        assert_eq!(b2, [0x82, 0x83]);
        let mut b4 = [0u8; 4];
        t.read(CONFIG_OFFSET, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 0x8382_8180);
        let mut b8 = [0u8; 8];
        t.read(CONFIG_OFFSET + 8, &mut b8);
        assert_eq!(b8, [0x88, 0x89, 0x8a, 0x8b, 0x8c, 0x8d, 0x8e, 0x8f]);
        // Past the device's config: zeros (the buffer arrives zeroed).
        let mut b4 = [0xffu8; 4];
        t.read(CONFIG_OFFSET + 0x40, &mut b4);
        assert_eq!(b4, [0; 4]);
        t.read(u64::MAX, &mut b4);
        assert_eq!(b4, [0; 4]);

        t.write(mem, CONFIG_OFFSET + 8, &[1, 2]).unwrap();
        t.write(mem, CONFIG_OFFSET, &[7]).unwrap();
        t.write(mem, CONFIG_OFFSET + 4, &[1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap();
        assert_eq!(
            t.device().config_writes,
            [
                (8, vec![1, 2]),
                (0, vec![7]),
                (4, vec![1, 2, 3, 4, 5, 6, 7, 8])
            ]
        );
    });
}

#[test]
fn config_space_rejects_odd_widths() {
    with_mem(|mem| {
        let mut t = transport();
        let mut b3 = [0xffu8; 3];
        t.read(CONFIG_OFFSET, &mut b3);
        assert_eq!(b3, [0; 3]);
        let mut b16 = [0xffu8; 16];
        t.read(CONFIG_OFFSET, &mut b16);
        assert_eq!(b16, [0; 16]);
        let mut empty = [0u8; 0];
        t.read(CONFIG_OFFSET, &mut empty);
        t.write(mem, CONFIG_OFFSET, &[1, 2, 3]).unwrap();
        t.write(mem, CONFIG_OFFSET, &[0; 16]).unwrap();
        t.write(mem, CONFIG_OFFSET, &[]).unwrap();
        assert!(t.device().config_writes.is_empty());
    });
}

#[test]
fn config_generation_follows_device_changes() {
    with_mem(|_| {
        let mut t = transport();
        assert_eq!(r32(&t, CONFIG_GENERATION_OFFSET), 0);
        t.device_mut().config[0] = 0x55;
        t.signal_config_change();
        assert_eq!(r32(&t, CONFIG_GENERATION_OFFSET), 1);
        assert_eq!(r32(&t, INTERRUPT_STATUS_OFFSET), INT_CONFIG_CHANGE);
        assert_eq!(irqs(&t), 1);
        let mut b = [0u8; 1];
        t.read(CONFIG_OFFSET, &mut b);
        assert_eq!(b, [0x55]);
    });
}

#[test]
fn wrong_register_widths_are_ignored() {
    with_mem(|mem| {
        let mut t = transport();
        for len in [1usize, 2, 3, 8] {
            let mut b = [0xffu8; 8];
            t.read(MAGIC_VALUE_OFFSET, &mut b[..len]);
            assert!(b[..len].iter().all(|&x| x == 0), "{len}-byte read");
        }
        // Unaligned offsets are not registers.
        assert_eq!(r32(&t, MAGIC_VALUE_OFFSET + 1), 0);
        assert_eq!(r32(&t, STATUS_OFFSET + 2), 0);
        // Unimplemented and reserved offsets.
        for offset in [0x018, 0x028, 0x040, 0x0c0, 0x0f8] {
            assert_eq!(r32(&t, offset), 0);
        }
        // Narrow and wide writes change nothing.
        t.write(mem, STATUS_OFFSET, &[1]).unwrap();
        t.write(mem, STATUS_OFFSET, &[1, 0]).unwrap();
        t.write(mem, STATUS_OFFSET, &[1, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        assert_eq!(t.status(), 0);
        t.write(mem, QUEUE_SEL_OFFSET, &[1, 0]).unwrap();
        assert_eq!(r32(&t, QUEUE_NUM_MAX_OFFSET), 16);
        t.write(mem, STATUS_OFFSET + 1, &1u32.to_le_bytes())
            .unwrap();
        assert_eq!(t.status(), 0);
        // Read-only registers ignore writes.
        w32(&mut t, mem, MAGIC_VALUE_OFFSET, 0).unwrap();
        w32(&mut t, mem, QUEUE_NUM_MAX_OFFSET, 0).unwrap();
        assert_eq!(r32(&t, MAGIC_VALUE_OFFSET), MMIO_MAGIC_VALUE);
        assert_eq!(r32(&t, QUEUE_NUM_MAX_OFFSET), 16);
    });
}

#[test]
fn there_are_no_shared_memory_regions() {
    with_mem(|mem| {
        let mut t = transport();
        for sel in [0, 1, u32::MAX] {
            w32(&mut t, mem, SHM_SEL_OFFSET, sel).unwrap();
            let len = u64::from(r32(&t, SHM_LEN_LOW_OFFSET))
                | (u64::from(r32(&t, SHM_LEN_HIGH_OFFSET)) << 32);
            let base = u64::from(r32(&t, SHM_BASE_LOW_OFFSET))
                | (u64::from(r32(&t, SHM_BASE_HIGH_OFFSET)) << 32);
            assert_eq!(len, u64::MAX);
            assert_eq!(base, u64::MAX);
        }
        assert_eq!(r32(&t, SHM_SEL_OFFSET), 0);
    });
}

#[test]
fn split_lends_the_device_its_queues() {
    with_live_device(|mem, t, [_, mut q1]| {
        let head = q1.add_chain(&[buf(0x8000, 8)]).unwrap();
        // A backend completes work outside a notification.
        let (device, mut ctx) = t.split(mem);
        assert_eq!(ctx.features, OFFERED | VERSION_1);
        TestDevice::drain(1, &mut ctx).unwrap();
        assert!(device.notified.is_empty());
        assert_eq!(q1.used_elem(0).unwrap(), (u32::from(head), 0));
        assert_eq!(r32(t, INTERRUPT_STATUS_OFFSET), INT_USED_BUFFER);
        assert_eq!(irqs(t), 1);
    });
}

#[test]
fn read_config_window_copies_only_whole_windows() {
    let config = [1u8, 2, 3, 4, 5, 6];
    let mut data = [0u8; 4];
    read_config_window(&config, 2, &mut data);
    assert_eq!(data, [3, 4, 5, 6]);
    for offset in [3, 6, u64::MAX, u64::from(u32::MAX) + 1] {
        let mut data = [0u8; 4];
        read_config_window(&config, offset, &mut data);
        assert_eq!(data, [0; 4], "offset {offset}");
    }
    let mut data = [0u8; 1];
    read_config_window(&config, 5, &mut data);
    assert_eq!(data, [6]);
}

#[test]
fn errors_read_as_sentences() {
    let e = MmioError::QueueRejected {
        index: 3,
        source: QueueError::NotReady,
    };
    assert_eq!(std::format!("{e}"), "driver set up queue 3 invalidly");
    let e = MmioError::InvalidStatus {
        status: 3,
        written: 1,
    };
    assert_eq!(std::format!("{e}"), "status 0x1 cannot follow status 0x3");
}

proptest! {
    /// Whatever the guest writes, in whatever order and width, the transport
    /// neither panics nor leaves the status in a state the machine cannot
    /// reach.
    #[test]
    fn guest_garbage_never_panics(
        accesses in proptest::collection::vec(
            (0u64..0x140, prop_oneof![Just(1usize), Just(2), Just(4), Just(8), Just(3)],
             any::<u64>(), any::<bool>()),
            0..200,
        )
    ) {
        let mut bytes = vec![0u8; MEM_SIZE];
        let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
        let mut t = transport();
        for (offset, len, value, is_write) in accesses {
            // Bias towards real registers: aligned offsets most of the time.
            let offset = if value & 1 == 0 { offset & !3 } else { offset };
            let bytes = value.to_le_bytes();
            if is_write {
                let _ = t.write(&mem, offset, &bytes[..len]);
            } else {
                let mut data = [0u8; 8];
                t.read(offset, &mut data[..len]);
            }
            let s = t.status();
            if s & STATUS_DRIVER_OK != 0 {
                prop_assert_ne!(s & STATUS_FEATURES_OK, 0);
            }
            if s & STATUS_FEATURES_OK != 0 {
                prop_assert_ne!(t.driver_features() & VERSION_1, 0);
                prop_assert_eq!(t.driver_features() & !t.device_features(), 0);
            }
            prop_assert!(t.device().activations <= 1 + t.device().resets);
        }
    }
}

mod state {
    use super::*;
    use crate::queue::QueueState;
    use crate::snapshot::{Persist, StateError};

    type State = MmioTransportState<4>;

    fn encode(state: &State) -> Vec<u8> {
        let mut buf = vec![0u8; State::MAX_LEN];
        let len = state.save(&mut buf).unwrap();
        buf.truncate(len);
        buf
    }

    /// Encodes `state`, loads it, and restores it in front of a fresh
    /// device.
    fn restore<M: GuestMemory + ?Sized>(state: &State, mem: &M) -> Result<Transport, StateError> {
        let loaded = State::load(&encode(state))?;
        assert_eq!(&loaded, state);
        let restored =
            MmioTransport::from_state(TestDevice::new(), CountingIrq::default(), &loaded, mem);
        // In place, over a transport built by `new`: the same transport, or
        // the same error with the transport untouched.
        let mut in_place = Transport::new(TestDevice::new(), CountingIrq::default()).unwrap();
        let fresh = in_place.state();
        match (&restored, in_place.restore(&loaded, mem)) {
            (Ok(t), Ok(())) => assert_eq!(in_place.state(), t.state()),
            (Err(a), Err(b)) => {
                assert_eq!(*a, b);
                assert_eq!(in_place.state(), fresh);
            }
            (a, b) => panic!("from_state {:?} but restore {b:?}", a.as_ref().err()),
        }
        restored
    }

    /// Every register the driver can read, under every selector.
    fn registers(t: &mut Transport, mem: &SliceMemory<'_>) -> Vec<u32> {
        let saved = t.state();
        let mut regs = Vec::new();
        for sel in 0..3 {
            w32(t, mem, QUEUE_SEL_OFFSET, sel).unwrap();
            w32(t, mem, DEVICE_FEATURES_SEL_OFFSET, sel).unwrap();
            regs.extend((0..CONFIG_OFFSET).step_by(4).map(|off| r32(t, off)));
        }
        w32(t, mem, QUEUE_SEL_OFFSET, saved.queue_sel).unwrap();
        w32(
            t,
            mem,
            DEVICE_FEATURES_SEL_OFFSET,
            saved.device_features_sel,
        )
        .unwrap();
        assert_eq!(t.state(), saved);
        regs
    }

    #[test]
    fn layout_is_fixed() {
        with_live_device(|_, t, _| {
            let state = t.state();
            let bytes = encode(&state);
            assert_eq!(bytes.len(), 36 + 2 * 33);
            assert_eq!(State::MAX_LEN, 36 + 4 * 33);
            assert_eq!(bytes[..4], DEVICE_TYPE.to_le_bytes());
            assert_eq!(bytes[4], 0x0f, "status");
            assert_eq!(bytes[5], 1, "activated");
            assert_eq!(bytes[6..8], [2, 0], "queue count");
            assert_eq!(bytes[16..24], (OFFERED | VERSION_1).to_le_bytes());
            let mut q0 = [0u8; 33];
            state.queues[0].save(&mut q0).unwrap();
            assert_eq!(bytes[36..69], q0);
        });
    }

    #[test]
    fn a_live_transport_restores_register_for_register() {
        with_live_device(|mem, t, [mut q0, mut q1]| {
            q0.add_chain(&[buf(0x8000, 1)]).unwrap();
            w32(t, mem, QUEUE_NOTIFY_OFFSET, 0).unwrap();
            q1.add_chain(&[buf(0x8000, 2)]).unwrap();
            w32(t, mem, QUEUE_NOTIFY_OFFSET, 1).unwrap();
            t.signal_config_change();
            w32(t, mem, INTERRUPT_ACK_OFFSET, INT_USED_BUFFER).unwrap();
            w32(t, mem, QUEUE_SEL_OFFSET, 1).unwrap();
            w32(t, mem, DEVICE_FEATURES_SEL_OFFSET, 1).unwrap();
            w32(t, mem, DRIVER_FEATURES_SEL_OFFSET, 7).unwrap();

            let state = t.state();
            assert_eq!(state.interrupt_status, INT_CONFIG_CHANGE);
            assert_eq!(state.config_generation, 1);
            assert_eq!(state.queues[1].next_used, 1);
            let mut r = restore(&state, mem).unwrap();
            assert_eq!(r.state(), state);
            assert!(r.is_activated());
            assert_eq!(irqs(&r), 0, "restoring raises no interrupt");
            assert_eq!(r.device().activations, 0, "nor activates again");
            assert_eq!(registers(&mut r, mem), registers(t, mem));
        });
    }

    #[test]
    fn a_restored_transport_serves_what_the_driver_queued() {
        with_live_device(|mem, t, [mut q0, _]| {
            for i in 0..3 {
                q0.add_chain(&[buf(0x8000, i)]).unwrap();
                w32(t, mem, QUEUE_NOTIFY_OFFSET, 0).unwrap();
            }
            // Two more chains, not yet notified when the snapshot is taken.
            q0.add_chain(&[buf(0x8000, 3)]).unwrap();
            q0.add_chain(&[buf(0x8000, 4)]).unwrap();
            let mut saved_mem = vec![0u8; MEM_SIZE];
            mem.read(GuestAddress(0), &mut saved_mem).unwrap();
            let state = t.state();

            w32(t, mem, QUEUE_NOTIFY_OFFSET, 0).unwrap();
            let mut after = vec![0u8; MEM_SIZE];
            mem.read(GuestAddress(0), &mut after).unwrap();
            assert_eq!(q0.used_idx().unwrap(), 5);

            let copy = SliceMemory::new(GuestAddress(0), &mut saved_mem);
            let mut r = restore(&state, &copy).unwrap();
            w32(&mut r, &copy, QUEUE_NOTIFY_OFFSET, 0).unwrap();
            assert_eq!(r.device().notified, [0]);
            assert_eq!(irqs(&r), 1);
            assert_eq!(r.state(), t.state());
            let mut restored_after = vec![0u8; MEM_SIZE];
            copy.read(GuestAddress(0), &mut restored_after).unwrap();
            assert!(restored_after == after, "used rings differ");
        });
    }

    #[test]
    fn fresh_and_reset_transports_round_trip() {
        with_mem(|mem| {
            let mut t = transport();
            assert_eq!(restore(&t.state(), mem).unwrap().state(), t.state());
            negotiate(&mut t, mem, VERSION_1 | 1);
            assert_eq!(restore(&t.state(), mem).unwrap().state(), t.state());
            set_status(&mut t, mem, STATUS_FAILED).unwrap();
            assert_eq!(restore(&t.state(), mem).unwrap().state(), t.state());
            t.reset();
            assert_eq!(restore(&t.state(), mem).unwrap().state(), t.state());
        });
    }

    #[test]
    fn restore_checks_the_state_against_the_device() {
        with_live_device(|mem, t, _| {
            let live = t.state();
            let restore_err = |s: &State| restore(s, mem).err();
            assert_eq!(
                restore_err(&State {
                    device_type: 19,
                    ..live.clone()
                }),
                Some(StateError::Mismatch {
                    field: "device type",
                    saved: 19,
                    device: u64::from(DEVICE_TYPE)
                })
            );
            let mut fewer = live.clone();
            fewer.queues.pop();
            assert_eq!(
                restore_err(&fewer),
                Some(StateError::Mismatch {
                    field: "queue count",
                    saved: 1,
                    device: 2
                })
            );
            let mut bigger = live.clone();
            bigger.queues[1].max_size = 16;
            assert_eq!(
                restore_err(&bigger),
                Some(StateError::Mismatch {
                    field: "maximum queue size",
                    saved: 16,
                    device: 8
                })
            );
            let unoffered = live.driver_features | 1 << 2;
            assert_eq!(
                restore_err(&State {
                    driver_features: unoffered,
                    ..live.clone()
                }),
                Some(StateError::Mismatch {
                    field: "driver features",
                    saved: unoffered,
                    device: OFFERED | VERSION_1
                })
            );
            let mut outside = live.clone();
            outside.queues[0].used_ring = MEM_SIZE as u64 - 8;
            assert!(matches!(
                restore_err(&outside),
                Some(StateError::Queue {
                    index: 0,
                    source: QueueError::RingOutOfBounds { .. }
                })
            ));
        });
    }

    #[test]
    fn load_rejects_states_no_transport_reaches() {
        with_live_device(|mem, t, _| {
            let live = t.state();
            let load_err = |s: &State| {
                let err = State::load(&encode(s)).unwrap_err();
                // Restoring the struct directly checks the same.
                let direct = MmioTransport::<_, _, 4>::from_state(
                    TestDevice::new(),
                    CountingIrq::default(),
                    s,
                    mem,
                );
                assert_eq!(direct.err(), Some(err));
                err
            };
            let invalid = |field, value| StateError::InvalidValue { field, value };
            let with_status = |status| State {
                status,
                ..live.clone()
            };
            assert_eq!(load_err(&with_status(0x1f)), invalid("device status", 0x1f));
            assert_eq!(
                load_err(&with_status(STATUS_ACKNOWLEDGE | STATUS_FEATURES_OK)),
                invalid("device status", 9)
            );
            assert_eq!(
                load_err(&with_status(0x0b)),
                invalid("status of an activated device", 0x0b)
            );
            assert_eq!(
                load_err(&State {
                    interrupt_status: 4,
                    ..live.clone()
                }),
                invalid("interrupt status", 4)
            );
            assert_eq!(
                load_err(&State {
                    driver_features: OFFERED,
                    ..live.clone()
                }),
                invalid("driver features", OFFERED)
            );
            let early = State {
                status: STATUS_ACKNOWLEDGE | STATUS_DRIVER,
                activated: false,
                ..live.clone()
            };
            assert_eq!(
                load_err(&early),
                invalid("queue set up before FEATURES_OK (queue index)", 0)
            );
            let mut features = live.clone();
            features.queues[1].event_idx = false;
            assert_eq!(
                load_err(&features),
                invalid("ring features of a queue (queue index)", 1)
            );
            let mut size = live.clone();
            size.queues[1].size = 3;
            assert_eq!(
                load_err(&size),
                StateError::Queue {
                    index: 1,
                    source: QueueError::InvalidSize { size: 3, max: 8 }
                }
            );

            // Byte-level faults.
            let mut bytes = encode(&live);
            bytes[5] = 2;
            assert_eq!(State::load(&bytes), Err(invalid("activated flag", 2)));
            let mut bytes = encode(&live);
            bytes[6] = 5;
            assert_eq!(
                MmioTransportState::<4>::load(&bytes),
                Err(invalid("queue count", 5))
            );
            let bytes = encode(&live);
            assert!(matches!(
                MmioTransportState::<1>::load(&bytes),
                Err(StateError::InvalidValue {
                    field: "queue count",
                    value: 2
                })
            ));
            assert!(matches!(
                State::load(&bytes[..bytes.len() - 1]),
                Err(StateError::TooShort { .. })
            ));
        });
    }

    #[test]
    fn a_transport_with_many_queues_is_loaded_by_a_larger_one() {
        with_live_device(|mem, t, _| {
            let bytes = encode(&t.state());
            let wide = MmioTransportState::<8>::load(&bytes).unwrap();
            let r: MmioTransport<_, _, 8> =
                MmioTransport::from_state(TestDevice::new(), CountingIrq::default(), &wide, mem)
                    .unwrap();
            assert_eq!(r.queues().len(), 2);
            let s = r.state();
            assert_eq!(
                s.queues.iter().collect::<Vec<&QueueState>>(),
                t.state().queues.iter().collect::<Vec<_>>()
            );
        });
    }

    proptest! {
        /// Whatever state the guest drives the transport into saves, loads
        /// and restores to the same state.
        #[test]
        fn every_reachable_state_restores(
            accesses in proptest::collection::vec(
                (0u64..0x100, any::<u32>(), any::<bool>()),
                0..200,
            ),
            setup in any::<bool>(),
        ) {
            let mut bytes = vec![0u8; MEM_SIZE];
            let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
            let mut t = transport();
            if setup {
                // Start from a live device, so queues and activation are
                // covered too.
                negotiate(&mut t, &mem, OFFERED | VERSION_1);
                let q0 = MockSplitQueue::new(&mem, QUEUE0_AT, 16).unwrap();
                setup_queue(&mut t, &mem, 0, &q0).unwrap();
                set_status(&mut t, &mem, STATUS_DRIVER_OK).unwrap();
            }
            for (offset, value, small) in accesses {
                // Mostly small values, so status and queue writes land.
                let value = if small { value & 0x1f } else { value };
                let _ = w32(&mut t, &mem, offset & !3, value);
                let state = t.state();
                let r = restore(&state, &mem);
                prop_assert!(r.is_ok(), "{:?} from {:?}", r.err(), state);
                prop_assert_eq!(r.unwrap().state(), state);
            }
        }

        /// Loading arbitrary bytes never panics, and what loads re-encodes
        /// to the same bytes.
        #[test]
        fn load_of_arbitrary_bytes(
            bytes in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..120),
                // A valid prefix with noise in one field.
                (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| {
                    let mut bytes = vec![0u8; State::MAX_LEN];
                    let mut t = transport();
                    t.signal_config_change();
                    let len = t.state().save(&mut bytes).unwrap();
                    bytes.truncate(len);
                    let i = i.index(len);
                    bytes[i] = b;
                    bytes
                }),
            ]
        ) {
            if let Ok(state) = State::load(&bytes) {
                prop_assert_eq!(encode(&state), bytes);
            }
        }
    }
}
