//! What a virtio device implements, and what the transport lends it.

use crate::irq::IrqLine;
use crate::memory::GuestMemory;
use crate::queue::{Queue, QueueError};

/// Feature bit 32: the device complies with virtio 1.x. The transport
/// always offers it and requires the driver to accept it.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// InterruptStatus bit 0: the device used a buffer in at least one queue.
pub const INT_USED_BUFFER: u32 = 1 << 0;
/// InterruptStatus bit 1: the device configuration changed.
pub const INT_CONFIG_CHANGE: u32 = 1 << 1;

/// Errors a device reports when it cannot go on.
///
/// The transport answers each by setting `DEVICE_NEEDS_RESET` in the device
/// status and sending a configuration change interrupt; the driver must
/// then reset the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The device needs a queue the driver did not make ready.
    #[error("queue {index} is not ready")]
    QueueNotReady {
        /// Index of the queue.
        index: u16,
    },
    /// A queue operation failed in a way the device cannot recover from.
    #[error("queue {index} failed")]
    Queue {
        /// Index of the queue.
        index: u16,
        /// The queue's error.
        #[source]
        source: QueueError,
    },
    /// The device's backend failed.
    #[error("device backend failed: {reason}")]
    Backend {
        /// What went wrong, for the log.
        reason: &'static str,
    },
}

/// The interrupt side of a virtio transport: the InterruptStatus bits, the
/// line that announces them, and the configuration generation that a
/// configuration change bumps.
///
/// Devices raise interrupts through it; only the transport acknowledges
/// them (for the driver's InterruptACK writes).
#[derive(Debug)]
pub struct Interrupt<I> {
    line: I,
    status: u32,
    config_generation: u32,
}

impl<I: IrqLine> Interrupt<I> {
    /// Interrupt state with no pending bits, firing `line`.
    pub fn new(line: I) -> Self {
        Interrupt {
            line,
            status: 0,
            config_generation: 0,
        }
    }

    /// The device put buffers in a used ring: sets [`INT_USED_BUFFER`] and
    /// triggers the line.
    ///
    /// Call it only when [`Queue::needs_notification`] says the driver
    /// wants to hear about them.
    pub fn signal_used_buffer(&mut self) {
        self.status |= INT_USED_BUFFER;
        self.line.trigger();
    }

    /// The device changed its configuration space: bumps the configuration
    /// generation, sets [`INT_CONFIG_CHANGE`] and triggers the line.
    pub fn signal_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.status |= INT_CONFIG_CHANGE;
        self.line.trigger();
    }
}

impl<I> Interrupt<I> {
    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// The interrupt line.
    pub fn line(&self) -> &I {
        &self.line
    }

    /// Interrupt state restored from a snapshot: `status` pending (not
    /// raised again), `config_generation` as saved.
    pub(super) fn from_state(line: I, status: u32, config_generation: u32) -> Self {
        Interrupt {
            line,
            status,
            config_generation,
        }
    }

    /// Back to a snapshot's `status` (pending, not raised again) and
    /// `config_generation`, on the same line.
    pub(super) fn restore(&mut self, status: u32, config_generation: u32) {
        self.status = status;
        self.config_generation = config_generation;
    }

    /// Clears the bits set in `bits` (the driver's InterruptACK).
    pub(super) fn acknowledge(&mut self, bits: u32) {
        self.status &= !bits;
    }

    /// Clears all pending bits (a device reset). The configuration
    /// generation keeps counting, so a driver never sees an old value again.
    pub(super) fn reset(&mut self) {
        self.status = 0;
    }
}

/// What the transport lends a device while it calls into it.
///
/// The fields are public so that a device can borrow them separately, for
/// example walk `queues` and signal `interrupt` in the same loop.
pub struct VirtioContext<'a, M: ?Sized, I> {
    /// Guest memory, for the queue operations.
    pub mem: &'a M,
    /// All of the device's queues, indexed as the driver's QueueSel; a queue
    /// the driver did not make ready has `ready() == false`.
    pub queues: &'a mut [Queue],
    /// Raises interrupts.
    pub interrupt: &'a mut Interrupt<I>,
    /// The features the driver accepted (valid from activation on).
    pub features: u64,
}

/// Copies the window of `data.len()` bytes at `offset` of a device's
/// configuration space `config` into `data`, for
/// [`VirtioDevice::read_config`]. A window that does not lie wholly inside
/// `config` leaves `data` as it is (zeroed).
pub fn read_config_window(config: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = off
        .checked_add(data.len())
        .and_then(|end| config.get(off..end))
    {
        data.copy_from_slice(src);
    }
}

/// A virtio device behind a transport.
///
/// The transport calls these methods directly on the vCPU thread that
/// trapped the access; none may block for long, and none may panic on
/// anything the guest controls (offsets, lengths, queue contents).
pub trait VirtioDevice {
    /// The virtio device ID (virtio 1.2, section 5: 1 for network, 2 for
    /// block, 19 for vsock, ...).
    fn device_type(&self) -> u32;

    /// The feature bits the device offers. The transport adds
    /// [`VIRTIO_F_VERSION_1`]; the ring features the queue implements are
    /// `VIRTIO_RING_F_INDIRECT_DESC` and `VIRTIO_RING_F_EVENT_IDX`. Offer no
    /// transport feature the transport does not implement (such as packed
    /// rings or notification data).
    fn avail_features(&self) -> u64;

    /// The maximum size of each queue (a power of two, at most
    /// [`MAX_QUEUE_SIZE`](crate::queue::MAX_QUEUE_SIZE)); the slice's length
    /// is the number of queues. Read once, when the transport is created.
    fn queue_max_sizes(&self) -> &[u16];

    /// Reads `data.len()` (1, 2, 4 or 8) bytes of the configuration space at
    /// `offset`. `data` arrives zeroed; leave it so for offsets past the end
    /// of the configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes `data` (1, 2, 4 or 8 bytes) to the configuration space at
    /// `offset`. Ignore writes to read-only fields and past the end.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set `DRIVER_OK`: start working on `ctx.queues` with the
    /// features in `ctx.features`. Called at most once between resets.
    ///
    /// An error leaves the device inactive and makes the transport set
    /// `DEVICE_NEEDS_RESET`.
    fn activate<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError>;

    /// The driver notified queue `queue` (ready, and `ctx.queues[queue]`
    /// exists) after the device was activated.
    ///
    /// Return an error only for failures the device cannot recover from; it
    /// makes the transport set `DEVICE_NEEDS_RESET`.
    fn queue_notify<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        queue: u16,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError>;

    /// The driver reset the device: drop all queue-related state and go
    /// back to the state before activation. Called on every reset, whether
    /// or not the device was activated.
    fn reset(&mut self);
}
