//! The virtio-mmio version 2 register file (virtio 1.2, section 4.2.2).

use heapless::Vec;

use super::device::{
    DeviceError, Interrupt, VirtioContext, VirtioDevice, INT_CONFIG_CHANGE, INT_USED_BUFFER,
    VIRTIO_F_VERSION_1,
};
use crate::irq::IrqLine;
use crate::memory::{GuestAddress, GuestMemory};
use crate::queue::{
    Queue, QueueError, QueueState, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::snapshot::{DeviceState, Persist, Reader, SectionKind, StateError, Writer};

/// MagicValue register (R): [`MMIO_MAGIC_VALUE`].
pub const MAGIC_VALUE_OFFSET: u64 = 0x000;
/// Version register (R): [`MMIO_VERSION`].
pub const VERSION_OFFSET: u64 = 0x004;
/// DeviceID register (R): [`VirtioDevice::device_type`].
pub const DEVICE_ID_OFFSET: u64 = 0x008;
/// VendorID register (R): [`VENDOR_ID`].
pub const VENDOR_ID_OFFSET: u64 = 0x00c;
/// DeviceFeatures register (R): the 32-bit window of the offered features
/// picked by DeviceFeaturesSel.
pub const DEVICE_FEATURES_OFFSET: u64 = 0x010;
/// DeviceFeaturesSel register (W).
pub const DEVICE_FEATURES_SEL_OFFSET: u64 = 0x014;
/// DriverFeatures register (W): the 32-bit window of the accepted features
/// picked by DriverFeaturesSel.
pub const DRIVER_FEATURES_OFFSET: u64 = 0x020;
/// DriverFeaturesSel register (W).
pub const DRIVER_FEATURES_SEL_OFFSET: u64 = 0x024;
/// QueueSel register (W): the queue the queue registers refer to.
pub const QUEUE_SEL_OFFSET: u64 = 0x030;
/// QueueNumMax register (R): the selected queue's maximum size, 0 if there
/// is no such queue.
pub const QUEUE_NUM_MAX_OFFSET: u64 = 0x034;
/// QueueNum register (W): the selected queue's size.
pub const QUEUE_NUM_OFFSET: u64 = 0x038;
/// QueueReady register (RW).
pub const QUEUE_READY_OFFSET: u64 = 0x044;
/// QueueNotify register (W): the index of a queue with new buffers.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;
/// InterruptStatus register (R).
pub const INTERRUPT_STATUS_OFFSET: u64 = 0x060;
/// InterruptACK register (W).
pub const INTERRUPT_ACK_OFFSET: u64 = 0x064;
/// Status register (RW): the device status (virtio 1.2, section 2.1).
pub const STATUS_OFFSET: u64 = 0x070;
/// QueueDescLow register (W): descriptor table address, low 32 bits.
pub const QUEUE_DESC_LOW_OFFSET: u64 = 0x080;
/// QueueDescHigh register (W): descriptor table address, high 32 bits.
pub const QUEUE_DESC_HIGH_OFFSET: u64 = 0x084;
/// QueueDriverLow register (W): available ring address, low 32 bits.
pub const QUEUE_DRIVER_LOW_OFFSET: u64 = 0x090;
/// QueueDriverHigh register (W): available ring address, high 32 bits.
pub const QUEUE_DRIVER_HIGH_OFFSET: u64 = 0x094;
/// QueueDeviceLow register (W): used ring address, low 32 bits.
pub const QUEUE_DEVICE_LOW_OFFSET: u64 = 0x0a0;
/// QueueDeviceHigh register (W): used ring address, high 32 bits.
pub const QUEUE_DEVICE_HIGH_OFFSET: u64 = 0x0a4;
/// SHMSel register (W): the shared memory region the SHM registers refer
/// to.
pub const SHM_SEL_OFFSET: u64 = 0x0ac;
/// SHMLenLow register (R): shared memory region length, low 32 bits.
pub const SHM_LEN_LOW_OFFSET: u64 = 0x0b0;
/// SHMLenHigh register (R): shared memory region length, high 32 bits.
pub const SHM_LEN_HIGH_OFFSET: u64 = 0x0b4;
/// SHMBaseLow register (R): shared memory region address, low 32 bits.
pub const SHM_BASE_LOW_OFFSET: u64 = 0x0b8;
/// SHMBaseHigh register (R): shared memory region address, high 32 bits.
pub const SHM_BASE_HIGH_OFFSET: u64 = 0x0bc;
/// ConfigGeneration register (R).
pub const CONFIG_GENERATION_OFFSET: u64 = 0x0fc;
/// Start of the device configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;

/// The MagicValue register's content: "virt" in memory byte order.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The Version register's content: the non-legacy interface.
pub const MMIO_VERSION: u32 = 2;
/// The VendorID register's content: "SKIF" in memory byte order (bytes
/// `53 4b 49 46`), read like the magic value and QEMU's `0x554d4551`.
/// Drivers do not match on it; it only names the implementation.
pub const VENDOR_ID: u32 = 0x4649_4b53;

/// Device status: the guest found the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status: the guest has a driver for it.
pub const STATUS_DRIVER: u8 = 2;
/// Device status: the driver is set up and the device is live.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status: the device hit an error it cannot recover from; the
/// driver must reset it. Set by the device only.
pub const STATUS_NEEDS_RESET: u8 = 64;
/// Device status: the driver gave up on the device.
pub const STATUS_FAILED: u8 = 128;

/// The bits a driver sets during initialisation, in the order it must set
/// them (virtio 1.2, 3.1.1).
const STATUS_STEPS: [u8; 4] = [
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_FEATURES_OK,
    STATUS_DRIVER_OK,
];

/// Every status bit there is.
const STATUS_ALL: u8 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_FEATURES_OK
    | STATUS_DRIVER_OK
    | STATUS_NEEDS_RESET
    | STATUS_FAILED;

/// Shared memory registers read as all ones: "no such region".
const NO_SHM_REGION: u32 = u32::MAX;

/// Errors of the virtio-mmio transport.
///
/// Only [`MmioTransport::new`] fails for real. The errors a register write
/// returns are reports: the transport has already handled the access (the
/// register keeps its old value, or the device status has
/// `DEVICE_NEEDS_RESET`), the guest sees what the spec prescribes, and the
/// vCPU should log the error and carry on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MmioError {
    /// The device has more queues than the transport can hold.
    #[error("device has {count} queues, transport holds at most {capacity}")]
    TooManyQueues {
        /// Number of queues the device asked for.
        count: usize,
        /// The transport's capacity.
        capacity: usize,
    },
    /// The device gave an invalid maximum queue size.
    #[error("device gave an invalid maximum size for queue {index}")]
    InvalidQueueMaxSize {
        /// Index of the queue.
        index: usize,
        /// Why the size is invalid.
        #[source]
        source: QueueError,
    },
    /// The driver set QueueReady on a queue that fails validation; the queue
    /// stays not ready.
    #[error("driver set up queue {index} invalidly")]
    QueueRejected {
        /// Index of the queue.
        index: u32,
        /// What is wrong with it.
        #[source]
        source: QueueError,
    },
    /// The driver set FEATURES_OK after accepting features the device did
    /// not offer, or without VERSION_1; FEATURES_OK stays clear.
    #[error("driver features {accepted:#x} do not fit the offered {offered:#x}")]
    FeaturesRejected {
        /// Features the driver accepted.
        accepted: u64,
        /// Features the device offered.
        offered: u64,
    },
    /// The driver wrote a device status out of order (cleared bits, skipped
    /// a step, set bits reserved to the device, or continued after FAILED or
    /// DEVICE_NEEDS_RESET); the status is unchanged.
    #[error("status {written:#x} cannot follow status {status:#x}")]
    InvalidStatus {
        /// The status before the write.
        status: u8,
        /// The value written.
        written: u32,
    },
    /// The device failed to activate; the status has DEVICE_NEEDS_RESET.
    #[error("device activation failed")]
    ActivationFailed(#[source] DeviceError),
    /// The device failed on a queue notification; the status has
    /// DEVICE_NEEDS_RESET.
    #[error("device failed on a notification for queue {queue}")]
    NotifyFailed {
        /// The queue notified.
        queue: u16,
        /// The device's error.
        #[source]
        source: DeviceError,
    },
}

/// A snapshot of an [`MmioTransport`]'s guest-visible state, from
/// [`MmioTransport::state`]: the registers the driver wrote and reads back,
/// the interrupt state, and every queue. The device behind the transport
/// has a state of its own.
///
/// Encoding (36 bytes, then 33 per queue): `device_type` (`u32`),
/// `status` (`u8`), `activated` (`u8`, 0 or 1), the number of queues
/// (`u16`, at most `Q`), `device_features_sel`, `driver_features_sel`
/// (`u32`), `driver_features` (`u64`), `queue_sel`, `interrupt_status`,
/// `config_generation` (`u32`), then each [`QueueState`].
///
/// Loading rejects what no transport can reach: unknown status bits or
/// initialisation steps out of order, `activated` without DRIVER_OK,
/// unknown interrupt bits, FEATURES_OK without `VIRTIO_F_VERSION_1`, a
/// queue set up before FEATURES_OK, a ready queue with an invalid size or
/// misaligned rings, and ring features that differ from the negotiated
/// ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MmioTransportState<const Q: usize> {
    /// The DeviceID register: the type of the device behind the transport.
    pub device_type: u32,
    /// The Status register.
    pub status: u8,
    /// Whether the device was activated (after DRIVER_OK).
    pub activated: bool,
    /// The DeviceFeaturesSel register.
    pub device_features_sel: u32,
    /// The DriverFeaturesSel register.
    pub driver_features_sel: u32,
    /// The features the driver accepted (both DriverFeatures windows).
    pub driver_features: u64,
    /// The QueueSel register.
    pub queue_sel: u32,
    /// The InterruptStatus register.
    pub interrupt_status: u32,
    /// The ConfigGeneration register.
    pub config_generation: u32,
    /// The queues, indexed as QueueSel.
    pub queues: Vec<QueueState, Q>,
}

impl<const Q: usize> MmioTransportState<Q> {
    /// Checks what the state says about itself (see the type's
    /// documentation); [`MmioTransport::from_state`] checks the rest against
    /// the device.
    fn check(&self) -> Result<(), StateError> {
        let invalid = |field, value| Err(StateError::InvalidValue { field, value });
        let status = self.status;
        // The driver's steps come in order: each one set has all the
        // earlier ones set too (FAILED and NEEDS_RESET may come any time).
        let mut missing = false;
        for step in STATUS_STEPS {
            if status & step == 0 {
                missing = true;
            } else if missing {
                return invalid("device status", u64::from(status));
            }
        }
        if status & !STATUS_ALL != 0 {
            return invalid("device status", u64::from(status));
        }
        if self.activated && status & STATUS_DRIVER_OK == 0 {
            return invalid("status of an activated device", u64::from(status));
        }
        if self.interrupt_status & !(INT_USED_BUFFER | INT_CONFIG_CHANGE) != 0 {
            return invalid("interrupt status", u64::from(self.interrupt_status));
        }
        let features_ok = status & STATUS_FEATURES_OK != 0;
        if features_ok && self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return invalid("driver features", self.driver_features);
        }
        // Queues take the ring features at FEATURES_OK, and lose them (and
        // readiness) only in a reset, which clears FEATURES_OK too.
        let negotiated = |bit: u32| features_ok && self.driver_features & (1 << bit) != 0;
        let event_idx = negotiated(VIRTIO_RING_F_EVENT_IDX);
        let indirect = negotiated(VIRTIO_RING_F_INDIRECT_DESC);
        for (index, q) in self.queues.iter().enumerate() {
            Queue::from_state(q).map_err(|source| StateError::Queue { index, source })?;
            // The driver configures queues only after FEATURES_OK.
            let pristine = QueueState {
                max_size: q.max_size,
                size: q.max_size,
                ..QueueState::default()
            };
            if !features_ok && *q != pristine {
                return invalid(
                    "queue set up before FEATURES_OK (queue index)",
                    index as u64,
                );
            }
            if (q.event_idx, q.indirect) != (event_idx, indirect) {
                return invalid("ring features of a queue (queue index)", index as u64);
            }
        }
        Ok(())
    }
}

impl<const Q: usize> Persist for MmioTransportState<Q> {
    const MAX_LEN: usize = 36 + Q * QueueState::MAX_LEN;

    fn write_to(&self, w: &mut Writer<'_>) -> Result<(), StateError> {
        let count = u16::try_from(self.queues.len()).map_err(|_| StateError::InvalidValue {
            field: "queue count",
            value: self.queues.len() as u64,
        })?;
        w.u32(self.device_type)?;
        w.u8(self.status)?;
        w.bool(self.activated)?;
        w.u16(count)?;
        w.u32(self.device_features_sel)?;
        w.u32(self.driver_features_sel)?;
        w.u64(self.driver_features)?;
        w.u32(self.queue_sel)?;
        w.u32(self.interrupt_status)?;
        w.u32(self.config_generation)?;
        for q in self.queues.iter() {
            q.write_to(w)?;
        }
        Ok(())
    }

    fn read_from(r: &mut Reader<'_>) -> Result<Self, StateError> {
        let device_type = r.u32()?;
        let status = r.u8()?;
        let activated = r.bool("activated flag")?;
        let count = r.u16()?;
        let mut state = MmioTransportState {
            device_type,
            status,
            activated,
            device_features_sel: r.u32()?,
            driver_features_sel: r.u32()?,
            driver_features: r.u64()?,
            queue_sel: r.u32()?,
            interrupt_status: r.u32()?,
            config_generation: r.u32()?,
            queues: Vec::new(),
        };
        if usize::from(count) > Q {
            return Err(StateError::InvalidValue {
                field: "queue count",
                value: u64::from(count),
            });
        }
        for _ in 0..count {
            let q = QueueState::read_from(r)?;
            state.queues.push(q).map_err(|_| StateError::InvalidValue {
                field: "queue count",
                value: u64::from(count),
            })?;
        }
        state.check()?;
        Ok(state)
    }
}

impl<const Q: usize> DeviceState for MmioTransportState<Q> {
    const KIND: SectionKind = SectionKind::MmioTransport;
}

/// A virtio-mmio (version 2) transport for device `D`, raising interrupts on
/// `I`, holding at most `Q` queues.
///
/// The VMM maps it on a bus and forwards the guest's accesses, relative to
/// the region base, to [`MmioTransport::read`] and
/// [`MmioTransport::write`]. Guest memory is passed to each write, since
/// queue validation, activation and notification need it.
///
/// Choices where the spec leaves room:
/// - Registers take only aligned 32-bit accesses; others read as 0 and are
///   ignored when written. The configuration space takes 1, 2, 4 and 8-byte
///   accesses.
/// - Status bits must be set in order (ACKNOWLEDGE, DRIVER, FEATURES_OK,
///   DRIVER_OK) and never cleared except by writing 0; out-of-order writes
///   are ignored. FAILED may be set at any time, and then only a reset is
///   accepted.
/// - DriverFeatures is frozen once FEATURES_OK is set; windows above 1 are
///   ignored (no feature above bit 63 exists to accept).
/// - Queue registers are writable only between FEATURES_OK and DRIVER_OK
///   (virtio 1.2, 3.1.1), and QueueNum and the addresses only while the
///   queue is not ready.
/// - A QueueReady write of 1 that fails [`Queue::validate`] leaves the queue
///   not ready, without DEVICE_NEEDS_RESET: the driver can read QueueReady
///   back, fix the queue and retry, since nothing is lost yet. If it goes on
///   to DRIVER_OK anyway, the device decides in
///   [`VirtioDevice::activate`] whether it can work without that queue.
/// - There are no shared memory regions: their length and base read as all
///   ones.
#[derive(Debug)]
pub struct MmioTransport<D, I, const Q: usize> {
    device: D,
    queues: Vec<Queue, Q>,
    interrupt: Interrupt<I>,
    status: u8,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    activated: bool,
}

impl<D: VirtioDevice, I: IrqLine, const Q: usize> MmioTransport<D, I, Q> {
    /// A transport for `device`, with one queue for each of its
    /// [`VirtioDevice::queue_max_sizes`], raising interrupts on `irq`.
    pub fn new(device: D, irq: I) -> Result<Self, MmioError> {
        let sizes = device.queue_max_sizes();
        // Queue indices must also fit the u16 of `queue_notify`.
        if sizes.len() > Q || sizes.len() > usize::from(u16::MAX) + 1 {
            return Err(MmioError::TooManyQueues {
                count: sizes.len(),
                capacity: Q,
            });
        }
        let mut queues = Vec::new();
        for (index, &max) in sizes.iter().enumerate() {
            let queue = Queue::new(max)
                .map_err(|source| MmioError::InvalidQueueMaxSize { index, source })?;
            queues.push(queue).map_err(|_| MmioError::TooManyQueues {
                count: sizes.len(),
                capacity: Q,
            })?;
        }
        Ok(MmioTransport {
            device,
            queues,
            interrupt: Interrupt::new(irq),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            activated: false,
        })
    }

    /// A snapshot of the transport's state. The device's own state is
    /// saved separately, through the device.
    pub fn state(&self) -> MmioTransportState<Q> {
        let mut queues = Vec::new();
        for q in self.queues.iter() {
            // Both hold Q queues, so this never stops early.
            if queues.push(q.state()).is_err() {
                break;
            }
        }
        MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            activated: self.activated,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            queues,
        }
    }

    /// A transport restored from `state`, in front of `device` (restored
    /// from its own state first), raising interrupts on `irq`, with guest
    /// memory `mem` already restored.
    ///
    /// Besides what loading checks, the state must fit the device: same
    /// device type, same number of queues with the same maximum sizes,
    /// accepted features (once FEATURES_OK) that the device offers; and
    /// every ready queue must pass [`Queue::validate`] in `mem`.
    ///
    /// The device is not activated again: if the state says it was
    /// activated, it goes on as it was. No interrupt is raised; one that
    /// was pending is still in InterruptStatus (and, for an edge that was
    /// in flight, in the interrupt controller's state, which the VMM
    /// restores).
    pub fn from_state<M: GuestMemory + ?Sized>(
        device: D,
        irq: I,
        state: &MmioTransportState<Q>,
        mem: &M,
    ) -> Result<Self, StateError> {
        let queues = Self::restored_queues(&device, state, mem)?;
        Ok(MmioTransport {
            device,
            queues,
            interrupt: Interrupt::from_state(irq, state.interrupt_status, state.config_generation),
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            activated: state.activated,
        })
    }

    /// Puts this transport, with its device and interrupt line, back into
    /// `state` (checked as [`MmioTransport::from_state`] checks it); the
    /// device's own state is restored separately. On an error nothing
    /// changes.
    pub fn restore<M: GuestMemory + ?Sized>(
        &mut self,
        state: &MmioTransportState<Q>,
        mem: &M,
    ) -> Result<(), StateError> {
        self.queues = Self::restored_queues(&self.device, state, mem)?;
        self.interrupt
            .restore(state.interrupt_status, state.config_generation);
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.activated = state.activated;
        Ok(())
    }

    /// `state`'s queues, once `state` is found to fit `device` and `mem`.
    fn restored_queues<M: GuestMemory + ?Sized>(
        device: &D,
        state: &MmioTransportState<Q>,
        mem: &M,
    ) -> Result<Vec<Queue, Q>, StateError> {
        state.check()?;
        let mismatch = |field, saved, device| {
            Err(StateError::Mismatch {
                field,
                saved,
                device,
            })
        };
        if state.device_type != device.device_type() {
            return mismatch(
                "device type",
                u64::from(state.device_type),
                u64::from(device.device_type()),
            );
        }
        let sizes = device.queue_max_sizes();
        if state.queues.len() != sizes.len() {
            return mismatch("queue count", state.queues.len() as u64, sizes.len() as u64);
        }
        let offered = device.avail_features() | (1 << VIRTIO_F_VERSION_1);
        let accepted = state.driver_features;
        if state.status & STATUS_FEATURES_OK != 0 && accepted & !offered != 0 {
            return mismatch("driver features", accepted, offered);
        }
        let mut queues = Vec::new();
        for (index, (saved, &max)) in state.queues.iter().zip(sizes).enumerate() {
            if saved.max_size != max {
                return mismatch(
                    "maximum queue size",
                    u64::from(saved.max_size),
                    u64::from(max),
                );
            }
            let queue_error = |source| StateError::Queue { index, source };
            let queue = Queue::from_state(saved).map_err(queue_error)?;
            if queue.ready() {
                queue.validate(mem).map_err(queue_error)?;
            }
            // At most Q saved queues, so this never fails.
            queues.push(queue).map_err(|_| StateError::InvalidValue {
                field: "queue count",
                value: sizes.len() as u64,
            })?;
        }
        Ok(queues)
    }

    /// The features offered to the driver: the device's plus
    /// [`VIRTIO_F_VERSION_1`].
    pub fn device_features(&self) -> u64 {
        self.device.avail_features() | (1 << VIRTIO_F_VERSION_1)
    }

    /// Lends the device and everything it may touch, to process its queues
    /// outside a notification (for example when a backend completes a
    /// request). Do it only while [`MmioTransport::is_activated`];
    /// [`MmioTransport::run_device`] checks that for you.
    pub fn split<'a, M: GuestMemory + ?Sized>(
        &'a mut self,
        mem: &'a M,
    ) -> (&'a mut D, VirtioContext<'a, M, I>) {
        let ctx = VirtioContext {
            mem,
            queues: &mut self.queues,
            interrupt: &mut self.interrupt,
            features: self.driver_features,
        };
        (&mut self.device, ctx)
    }

    /// The device used buffers (see [`Interrupt::signal_used_buffer`]).
    pub fn signal_used_buffer(&mut self) {
        self.interrupt.signal_used_buffer();
    }

    /// The device changed its configuration space (see
    /// [`Interrupt::signal_config_change`]).
    pub fn signal_config_change(&mut self) {
        self.interrupt.signal_config_change();
    }

    /// The device cannot go on: sets DEVICE_NEEDS_RESET and, if the driver
    /// had set DRIVER_OK, tells it with a configuration change interrupt
    /// (virtio 1.2, 2.1.2).
    pub fn set_needs_reset(&mut self) {
        if self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        self.status |= STATUS_NEEDS_RESET;
        if self.status & STATUS_DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
    }

    /// Resets the transport and the device, as the driver does by writing 0
    /// to Status: the device's [`VirtioDevice::reset`], every queue's
    /// [`Queue::reset`], and cleared interrupt status, features, selectors
    /// and status.
    pub fn reset(&mut self) {
        self.device.reset();
        for queue in self.queues.iter_mut() {
            queue.reset();
        }
        self.interrupt.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.activated = false;
    }

    /// Handles a guest read of `data.len()` bytes at `offset` from the
    /// region base. Unimplemented registers, write-only registers and
    /// accesses of the wrong width read as zeros.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        let Ok(data) = <&mut [u8; 4]>::try_from(data) else {
            return;
        };
        let value = match offset {
            MAGIC_VALUE_OFFSET => MMIO_MAGIC_VALUE,
            VERSION_OFFSET => MMIO_VERSION,
            DEVICE_ID_OFFSET => self.device.device_type(),
            VENDOR_ID_OFFSET => VENDOR_ID,
            DEVICE_FEATURES_OFFSET => {
                feature_window(self.device_features(), self.device_features_sel)
            }
            QUEUE_NUM_MAX_OFFSET => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY_OFFSET => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS_OFFSET => self.interrupt.status(),
            STATUS_OFFSET => u32::from(self.status),
            SHM_LEN_LOW_OFFSET | SHM_LEN_HIGH_OFFSET | SHM_BASE_LOW_OFFSET
            | SHM_BASE_HIGH_OFFSET => NO_SHM_REGION,
            CONFIG_GENERATION_OFFSET => self.interrupt.config_generation(),
            _ => 0,
        };
        *data = value.to_le_bytes();
    }

    /// Handles a guest write of `data` at `offset` from the region base.
    ///
    /// Never fails the access: an `Err` reports a guest or device fault that
    /// the transport has already dealt with (see [`MmioError`]); log it and
    /// resume the vCPU.
    pub fn write<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        offset: u64,
        data: &[u8],
    ) -> Result<(), MmioError> {
        if offset >= CONFIG_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            }
            return Ok(());
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Ok(());
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            DEVICE_FEATURES_SEL_OFFSET => self.device_features_sel = value,
            DRIVER_FEATURES_OFFSET => self.write_driver_features(value),
            DRIVER_FEATURES_SEL_OFFSET => self.driver_features_sel = value,
            QUEUE_SEL_OFFSET => self.queue_sel = value,
            QUEUE_NUM_OFFSET => {
                if let Some(q) = self.unready_queue() {
                    // A size above u16::MAX can never be valid; make it 0 so
                    // that `validate` rejects it.
                    q.set_size(u16::try_from(value).unwrap_or(0));
                }
            }
            QUEUE_READY_OFFSET => return self.write_queue_ready(mem, value),
            QUEUE_NOTIFY_OFFSET => {
                // A value above u16::MAX names no queue.
                if let Ok(queue) = u16::try_from(value) {
                    return self.notify(mem, queue);
                }
            }
            INTERRUPT_ACK_OFFSET => self.interrupt.acknowledge(value),
            STATUS_OFFSET => return self.write_status(mem, value),
            QUEUE_DESC_LOW_OFFSET => {
                self.set_queue_addr(Queue::desc_table, Queue::set_desc_table, Half::Low, value)
            }
            QUEUE_DESC_HIGH_OFFSET => {
                self.set_queue_addr(Queue::desc_table, Queue::set_desc_table, Half::High, value)
            }
            QUEUE_DRIVER_LOW_OFFSET => {
                self.set_queue_addr(Queue::avail_ring, Queue::set_avail_ring, Half::Low, value)
            }
            QUEUE_DRIVER_HIGH_OFFSET => {
                self.set_queue_addr(Queue::avail_ring, Queue::set_avail_ring, Half::High, value)
            }
            QUEUE_DEVICE_LOW_OFFSET => {
                self.set_queue_addr(Queue::used_ring, Queue::set_used_ring, Half::Low, value)
            }
            QUEUE_DEVICE_HIGH_OFFSET => {
                self.set_queue_addr(Queue::used_ring, Queue::set_used_ring, Half::High, value)
            }
            // SHMSel: there are no regions, so every selection reads "none".
            _ => {}
        }
        Ok(())
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    /// The selected queue, if the driver may configure queues now.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        let mask = STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED | STATUS_NEEDS_RESET;
        if self.status & mask != STATUS_FEATURES_OK {
            return None;
        }
        self.queues.get_mut(usize::try_from(self.queue_sel).ok()?)
    }

    /// The selected queue, if the driver may change its size or addresses.
    fn unready_queue(&mut self) -> Option<&mut Queue> {
        self.configurable_queue().filter(|q| !q.ready())
    }

    fn set_queue_addr(
        &mut self,
        get: fn(&Queue) -> GuestAddress,
        set: fn(&mut Queue, GuestAddress),
        half: Half,
        value: u32,
    ) {
        if let Some(q) = self.unready_queue() {
            let old = get(q).raw();
            let value = u64::from(value);
            let new = match half {
                Half::Low => (old & !u64::from(u32::MAX)) | value,
                Half::High => (old & u64::from(u32::MAX)) | (value << 32),
            };
            set(q, GuestAddress(new));
        }
    }

    fn write_queue_ready<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        value: u32,
    ) -> Result<(), MmioError> {
        let index = self.queue_sel;
        let Some(q) = self.configurable_queue() else {
            return Ok(());
        };
        match value {
            0 => q.set_ready(false),
            1 if !q.ready() => {
                q.validate(mem)
                    .map_err(|source| MmioError::QueueRejected { index, source })?;
                q.set_ready(true);
            }
            _ => {}
        }
        Ok(())
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (STATUS_FEATURES_OK | STATUS_FAILED) != 0 {
            return;
        }
        let value = u64::from(value);
        self.driver_features = match self.driver_features_sel {
            0 => (self.driver_features & !u64::from(u32::MAX)) | value,
            1 => (self.driver_features & u64::from(u32::MAX)) | (value << 32),
            _ => return,
        };
    }

    fn write_status<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        value: u32,
    ) -> Result<(), MmioError> {
        if value == 0 {
            self.reset();
            return Ok(());
        }
        let old = self.status;
        let invalid = MmioError::InvalidStatus {
            status: old,
            written: value,
        };
        let new = u8::try_from(value).map_err(|_| invalid)?;
        if new & old != old {
            // Clearing bits takes a reset.
            return Err(invalid);
        }
        let added = new & !old;
        if added == 0 {
            return Ok(());
        }
        if added & STATUS_FAILED != 0 {
            // The driver gave up; whatever else it wrote no longer matters.
            self.status |= STATUS_FAILED;
            return Ok(());
        }
        if old & (STATUS_FAILED | STATUS_NEEDS_RESET) != 0 {
            return Err(invalid);
        }
        // Only the driver's steps, each with all earlier steps set by now.
        let mut earlier = 0;
        for step in STATUS_STEPS {
            if new & step != 0 && new & earlier != earlier {
                return Err(invalid);
            }
            earlier |= step;
        }
        if added & !earlier != 0 {
            return Err(invalid);
        }

        self.status |= added & (STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device_features();
            let accepted = self.driver_features;
            if accepted & !offered != 0 || accepted & (1 << VIRTIO_F_VERSION_1) == 0 {
                return Err(MmioError::FeaturesRejected { accepted, offered });
            }
            for queue in self.queues.iter_mut() {
                queue.set_features(accepted);
            }
            self.status |= STATUS_FEATURES_OK;
        }
        if added & STATUS_DRIVER_OK != 0 {
            self.status |= STATUS_DRIVER_OK;
            return self.activate(mem);
        }
        Ok(())
    }

    fn activate<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), MmioError> {
        if self.activated {
            return Ok(());
        }
        let (device, mut ctx) = self.split(mem);
        match device.activate(&mut ctx) {
            Ok(()) => {
                self.activated = true;
                Ok(())
            }
            Err(e) => {
                self.set_needs_reset();
                Err(MmioError::ActivationFailed(e))
            }
        }
    }

    /// The driver notified queue `queue`: the QueueNotify register, or an
    /// ioeventfd the VMM registered on it. Calls
    /// [`VirtioDevice::queue_notify`] if the device is live (activated, and
    /// neither FAILED nor DEVICE_NEEDS_RESET) and the queue exists and is
    /// ready; other notifications are ignored, as the spec allows.
    ///
    /// A device error sets DEVICE_NEEDS_RESET (see
    /// [`MmioTransport::set_needs_reset`]) and is reported as
    /// [`MmioError::NotifyFailed`].
    pub fn notify<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        queue: u16,
    ) -> Result<(), MmioError> {
        if !self
            .queues
            .get(usize::from(queue))
            .is_some_and(|q| q.ready())
        {
            return Ok(());
        }
        self.run_device(mem, |device, ctx| device.queue_notify(queue, ctx))
            .map_err(|source| MmioError::NotifyFailed { queue, source })
    }

    /// The device has work outside a notification (its backend completed
    /// something): calls `work` with the device and what it may touch, if
    /// the device is live (activated, and neither FAILED nor
    /// DEVICE_NEEDS_RESET); otherwise the work waits, and `work` is not
    /// called.
    ///
    /// A device error sets DEVICE_NEEDS_RESET (see
    /// [`MmioTransport::set_needs_reset`]) and is returned, for the log.
    pub fn run_device<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        work: impl FnOnce(&mut D, &mut VirtioContext<'_, M, I>) -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        if !self.is_live() {
            return Ok(());
        }
        let (device, mut ctx) = self.split(mem);
        let result = work(device, &mut ctx);
        if result.is_err() {
            self.set_needs_reset();
        }
        result
    }
}

impl<D, I, const Q: usize> MmioTransport<D, I, Q> {
    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, to change it from outside (after a configuration change,
    /// call [`MmioTransport::signal_config_change`]).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device's queues.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// The interrupt state (InterruptStatus, ConfigGeneration, the line).
    pub fn interrupt(&self) -> &Interrupt<I> {
        &self.interrupt
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The features the driver accepted so far (final once FEATURES_OK is
    /// set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Whether the device was activated since the last reset.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Whether the device is live: activated, and neither FAILED nor
    /// DEVICE_NEEDS_RESET. Only a live device is called by
    /// [`MmioTransport::notify`] and [`MmioTransport::run_device`], so a
    /// host that watches a backend on a device's behalf (a tap for a
    /// network device) watches it only while this holds.
    pub fn is_live(&self) -> bool {
        self.activated && self.status & (STATUS_FAILED | STATUS_NEEDS_RESET) == 0
    }
}

/// Which half of a 64-bit register pair a write targets.
#[derive(Clone, Copy)]
enum Half {
    Low,
    High,
}

/// The 32-bit window `sel` of `features`; windows above 1 are zero.
fn feature_window(features: u64, sel: u32) -> u32 {
    match sel {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}
