//! Split virtqueues (virtio 1.2, section 2.7).
//!
//! A [`Queue`] stores only guest addresses and indices; guest memory is passed
//! to every call. Chains are walked into fixed-capacity
//! [`DescriptorChain`]s. Ordering between the device's and the driver's
//! accesses uses fences, as the spec requires, never locks:
//!
//! - after reading `avail.idx`, an acquire fence before reading ring entries
//!   and descriptors;
//! - after writing a used element, a release fence before publishing
//!   `used.idx`;
//! - a full fence between publishing `used.idx` and reading the driver's
//!   `used_event`/flags (and between writing `avail_event` and re-reading
//!   `avail.idx`), so neither side misses a notification.

mod chain;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;

use core::num::Wrapping;
use core::sync::atomic::{fence, Ordering};

pub(crate) use chain::{copy_from_chain, copy_to_chain};
pub use chain::{
    ChainError, Descriptor, DescriptorChain, DESCRIPTOR_SIZE, VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};

use crate::memory::{GuestAddress, GuestMemory, MemoryError};
use crate::snapshot::{Persist, Reader, StateError, Writer};

/// Largest queue size the split ring allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Feature bit: the driver may use indirect descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: `used_event`/`avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// Driver flag in `avail.flags`: don't interrupt me.
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Device flag in `used.flags`: don't notify me.
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

const AVAIL_RING_OFFSET: u64 = 4;
const USED_RING_OFFSET: u64 = 4;
const USED_ELEM_SIZE: u64 = 8;
const IDX_OFFSET: u64 = 2;

/// Errors of queue operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The driver has not made the queue ready.
    #[error("queue is not ready")]
    NotReady,
    /// The size is zero, not a power of two, or above the device maximum.
    #[error("invalid queue size {size} (maximum {max})")]
    InvalidSize {
        /// Size the driver wrote.
        size: u16,
        /// Device maximum.
        max: u16,
    },
    /// A ring address violates the spec's alignment.
    #[error("{ring} at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which ring.
        ring: &'static str,
        /// Its address.
        addr: u64,
        /// Required alignment.
        align: u64,
    },
    /// A ring lies (partly) outside guest memory.
    #[error("{ring} is outside guest memory")]
    RingOutOfBounds {
        /// Which ring.
        ring: &'static str,
        /// The failed check.
        #[source]
        source: MemoryError,
    },
    /// Reading or writing a ring failed.
    #[error("ring access failed")]
    Memory(#[source] MemoryError),
    /// The driver's `avail.idx` moved by more than the queue size.
    #[error("avail index {avail_idx} is more than the queue size ahead of {next_avail}")]
    InvalidAvailIndex {
        /// `avail.idx` as read.
        avail_idx: u16,
        /// The next entry the device expected.
        next_avail: u16,
    },
    /// The chain at `head` is malformed. Give it back with
    /// [`Queue::add_used`] and a length of 0.
    #[error("invalid descriptor chain at head {head}")]
    InvalidChain {
        /// Head index of the offending chain.
        head: u16,
        /// What is wrong with it.
        #[source]
        source: ChainError,
    },
    /// The device returned a head index outside the table.
    #[error("used head index {head} is outside a queue of {size}")]
    InvalidUsedHead {
        /// The index.
        head: u16,
        /// The queue size.
        size: u16,
    },
}

/// A queue's state, for snapshots: from [`Queue::state`], back with
/// [`Queue::from_state`], encoded by its [`Persist`] implementation.
///
/// Two things a queue knows are not part of it, and a restored queue
/// starts without them: the last `avail.idx` it read (it reads the index
/// again), and the `used.idx` of its last event-index notification
/// decision (so its first [`Queue::needs_notification`] says yes; a
/// spurious interrupt is harmless, a lost one is not).
///
/// Encoding (33 bytes): `max_size`, `size`, `next_avail`, `next_used` as
/// `u16`; a flags byte (bit 0 `ready`, bit 1 `event_idx`, bit 2
/// `indirect`); `desc_table`, `avail_ring`, `used_ring` as `u64`. Loading
/// checks only the flags; [`Queue::from_state`] checks the sizes and
/// rings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    /// Device maximum size.
    pub max_size: u16,
    /// Size set by the driver.
    pub size: u16,
    /// Whether the driver made the queue ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available ring entry the device will consume.
    pub next_avail: u16,
    /// Next used ring entry the device will fill.
    pub next_used: u16,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` is in effect.
    pub event_idx: bool,
    /// Whether `VIRTIO_RING_F_INDIRECT_DESC` is in effect.
    pub indirect: bool,
}

const QUEUE_READY: u8 = 1 << 0;
const QUEUE_EVENT_IDX: u8 = 1 << 1;
const QUEUE_INDIRECT: u8 = 1 << 2;

impl Persist for QueueState {
    const MAX_LEN: usize = 33;

    fn write_to(&self, w: &mut Writer<'_>) -> Result<(), StateError> {
        let mut flags = 0;
        for (set, bit) in [
            (self.ready, QUEUE_READY),
            (self.event_idx, QUEUE_EVENT_IDX),
            (self.indirect, QUEUE_INDIRECT),
        ] {
            if set {
                flags |= bit;
            }
        }
        w.u16(self.max_size)?;
        w.u16(self.size)?;
        w.u16(self.next_avail)?;
        w.u16(self.next_used)?;
        w.u8(flags)?;
        w.u64(self.desc_table)?;
        w.u64(self.avail_ring)?;
        w.u64(self.used_ring)
    }

    fn read_from(r: &mut Reader<'_>) -> Result<Self, StateError> {
        let max_size = r.u16()?;
        let size = r.u16()?;
        let next_avail = r.u16()?;
        let next_used = r.u16()?;
        let flags = r.flags(
            "queue flags",
            QUEUE_READY | QUEUE_EVENT_IDX | QUEUE_INDIRECT,
        )?;
        Ok(QueueState {
            max_size,
            size,
            ready: flags & QUEUE_READY != 0,
            desc_table: r.u64()?,
            avail_ring: r.u64()?,
            used_ring: r.u64()?,
            next_avail,
            next_used,
            event_idx: flags & QUEUE_EVENT_IDX != 0,
            indirect: flags & QUEUE_INDIRECT != 0,
        })
    }
}

/// The device side of a split virtqueue.
#[derive(Clone, Debug)]
pub struct Queue {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// `avail.idx` as last read by [`Queue::pop`]: entries up to it are
    /// known to be available, so `pop` re-reads the index only once it has
    /// consumed them (as virtio-queue does). Equal to `next_avail` when
    /// nothing is known. Not part of the snapshot state.
    avail_idx_seen: Wrapping<u16>,
    event_idx: bool,
    indirect: bool,
    /// `used.idx` when we last decided about an interrupt (event-idx mode).
    signalled_used: Option<Wrapping<u16>>,
}

impl Queue {
    /// A queue whose device maximum is `max_size` (a power of two, at most
    /// [`MAX_QUEUE_SIZE`]); the driver may pick any power of two up to it.
    pub fn new(max_size: u16) -> Result<Queue, QueueError> {
        if max_size == 0 || !max_size.is_power_of_two() || max_size > MAX_QUEUE_SIZE {
            return Err(QueueError::InvalidSize {
                size: max_size,
                max: MAX_QUEUE_SIZE,
            });
        }
        Ok(Queue {
            max_size,
            size: max_size,
            ready: false,
            desc_table: GuestAddress(0),
            avail_ring: GuestAddress(0),
            used_ring: GuestAddress(0),
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
            avail_idx_seen: Wrapping(0),
            event_idx: false,
            indirect: false,
            signalled_used: None,
        })
    }

    /// Back to the state after [`Queue::new`] (a device reset).
    pub fn reset(&mut self) {
        let max = self.max_size;
        *self = Queue {
            max_size: max,
            size: max,
            ready: false,
            desc_table: GuestAddress(0),
            avail_ring: GuestAddress(0),
            used_ring: GuestAddress(0),
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
            avail_idx_seen: Wrapping(0),
            event_idx: false,
            indirect: false,
            signalled_used: None,
        };
    }

    /// Device maximum size.
    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    /// Size chosen by the driver.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Records the driver's size; checked by [`Queue::validate`].
    pub fn set_size(&mut self, size: u16) {
        self.size = size;
        self.forget_avail_idx();
    }

    /// Whether the driver made the queue ready.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Records the driver's ready bit.
    pub fn set_ready(&mut self, ready: bool) {
        self.ready = ready;
        self.forget_avail_idx();
    }

    /// Descriptor table address.
    pub fn desc_table(&self) -> GuestAddress {
        self.desc_table
    }

    /// Sets the descriptor table address.
    pub fn set_desc_table(&mut self, addr: GuestAddress) {
        self.desc_table = addr;
    }

    /// Available ring ("driver area") address.
    pub fn avail_ring(&self) -> GuestAddress {
        self.avail_ring
    }

    /// Sets the available ring address.
    pub fn set_avail_ring(&mut self, addr: GuestAddress) {
        self.avail_ring = addr;
        self.forget_avail_idx();
    }

    /// Makes the next [`Queue::pop`] read `avail.idx` from memory.
    fn forget_avail_idx(&mut self) {
        self.avail_idx_seen = self.next_avail;
    }

    /// Used ring ("device area") address.
    pub fn used_ring(&self) -> GuestAddress {
        self.used_ring
    }

    /// Sets the used ring address.
    pub fn set_used_ring(&mut self, addr: GuestAddress) {
        self.used_ring = addr;
    }

    /// Applies the negotiated feature bits that concern the ring
    /// (`VIRTIO_RING_F_EVENT_IDX`, `VIRTIO_RING_F_INDIRECT_DESC`).
    pub fn set_features(&mut self, driver_features: u64) {
        self.event_idx = driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.indirect = driver_features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0;
    }

    /// Whether event-index notification suppression is in effect.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// The next available entry the device will consume.
    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    /// The next used entry the device will fill.
    pub fn next_used(&self) -> u16 {
        self.next_used.0
    }

    /// Snapshot of the queue.
    pub fn state(&self) -> QueueState {
        QueueState {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table.0,
            avail_ring: self.avail_ring.0,
            used_ring: self.used_ring.0,
            next_avail: self.next_avail.0,
            next_used: self.next_used.0,
            event_idx: self.event_idx,
            indirect: self.indirect,
        }
    }

    /// Restores a snapshot. The maximum size is checked as by
    /// [`Queue::new`]; a ready queue must also pass the checks of
    /// [`Queue::validate`] that need no guest memory (size and ring
    /// alignment), since no driver will set it ready again.
    pub fn from_state(state: &QueueState) -> Result<Queue, QueueError> {
        let mut q = Queue::new(state.max_size)?;
        q.size = state.size;
        q.ready = state.ready;
        q.desc_table = GuestAddress(state.desc_table);
        q.avail_ring = GuestAddress(state.avail_ring);
        q.used_ring = GuestAddress(state.used_ring);
        q.next_avail = Wrapping(state.next_avail);
        q.next_used = Wrapping(state.next_used);
        q.avail_idx_seen = q.next_avail;
        q.event_idx = state.event_idx;
        q.indirect = state.indirect;
        if q.ready {
            q.check_layout()?;
        }
        Ok(q)
    }

    /// The ring areas: name, address, alignment and length in bytes.
    fn areas(&self) -> [(&'static str, GuestAddress, u64, u64); 3] {
        let n = u64::from(self.size);
        [
            ("descriptor table", self.desc_table, 16, DESCRIPTOR_SIZE * n),
            ("available ring", self.avail_ring, 2, 6 + 2 * n),
            ("used ring", self.used_ring, 4, 6 + USED_ELEM_SIZE * n),
        ]
    }

    /// The checks of [`Queue::validate`] that need no guest memory: the
    /// size, and the alignment of the three areas.
    fn check_layout(&self) -> Result<(), QueueError> {
        let size = self.size;
        if size == 0 || !size.is_power_of_two() || size > self.max_size {
            return Err(QueueError::InvalidSize {
                size,
                max: self.max_size,
            });
        }
        for (ring, addr, align, _) in self.areas() {
            if !addr.is_aligned(align) {
                return Err(QueueError::Misaligned {
                    ring,
                    addr: addr.0,
                    align,
                });
            }
        }
        Ok(())
    }

    /// Checks size, alignment and that all three areas lie in guest memory
    /// (virtio 1.2, 2.7: descriptor table 16-aligned, available ring
    /// 2-aligned, used ring 4-aligned). Call when the driver sets the queue
    /// ready; a queue that fails must not be used.
    pub fn validate<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), QueueError> {
        self.check_layout()?;
        for (ring, addr, _, len) in self.areas() {
            mem.check_range(addr, len)
                .map_err(|source| QueueError::RingOutOfBounds { ring, source })?;
        }
        Ok(())
    }

    fn avail_idx<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<Wrapping<u16>, QueueError> {
        mem.read_u16(at(self.avail_ring, IDX_OFFSET)?)
            .map(Wrapping)
            .map_err(QueueError::Memory)
    }

    /// Checks the invariants every ring operation relies on; the driver may
    /// have set the queue ready without a valid size.
    fn check_usable(&self) -> Result<(), QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        if self.size == 0 || !self.size.is_power_of_two() || self.size > self.max_size {
            return Err(QueueError::InvalidSize {
                size: self.size,
                max: self.max_size,
            });
        }
        Ok(())
    }

    /// Number of chains the driver has made available and the device has not
    /// consumed yet.
    pub fn pending<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16, QueueError> {
        self.check_usable()?;
        let avail = self.avail_idx(mem)?;
        let pending = (avail - self.next_avail).0;
        if pending > self.size {
            return Err(QueueError::InvalidAvailIndex {
                avail_idx: avail.0,
                next_avail: self.next_avail.0,
            });
        }
        Ok(pending)
    }

    /// Takes the next available chain, walked and validated, holding at most
    /// `N` buffers. `Ok(None)` when the ring is empty.
    ///
    /// A malformed chain is consumed and reported as
    /// [`QueueError::InvalidChain`] with its head, so the device can return it
    /// with [`Queue::add_used`] and carry on with the next one.
    // Inlined so the chain (up to `N` descriptors) is built in the caller's
    // frame: out of line, returning it through `Result`/`Option` costs
    // several memcpys of the whole fixed-capacity buffer per chain.
    #[inline]
    pub fn pop<const N: usize, M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<DescriptorChain<N>>, QueueError> {
        self.check_usable()?;
        let mut seen = self.avail_idx_seen;
        let known = (seen - self.next_avail).0;
        // `known > size` only after `undo_pop` without a pop, or a changed
        // size: read again rather than trust it.
        if known == 0 || known > self.size {
            let avail = self.avail_idx(mem)?;
            let pending = (avail - self.next_avail).0;
            if pending > self.size {
                return Err(QueueError::InvalidAvailIndex {
                    avail_idx: avail.0,
                    next_avail: self.next_avail.0,
                });
            }
            if pending == 0 {
                return Ok(None);
            }
            seen = avail;
            // The ring entries and descriptors the driver wrote before
            // bumping avail.idx must be read after we observed that index.
            // (Entries known from an earlier read were ordered by the fence
            // that followed it.)
            fence(Ordering::Acquire);
        }
        let slot = u64::from(self.next_avail.0 & (self.size - 1));
        let head = mem
            .read_u16(at(self.avail_ring, AVAIL_RING_OFFSET + 2 * slot)?)
            .map_err(QueueError::Memory)?;
        self.avail_idx_seen = seen;
        self.next_avail += 1;
        let mut chain = DescriptorChain::new(head);
        match chain.fill(mem, self.desc_table, self.size, self.indirect) {
            Ok(()) => Ok(Some(chain)),
            Err(source) => Err(QueueError::InvalidChain { head, source }),
        }
    }

    /// Puts back the last chain taken with [`Queue::pop`], so the next pop
    /// returns it again.
    pub fn undo_pop(&mut self) {
        self.next_avail -= 1;
    }

    /// Returns the chain with head `head` to the driver, `len` bytes written.
    pub fn add_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        self.check_usable()?;
        if head >= self.size {
            return Err(QueueError::InvalidUsedHead {
                head,
                size: self.size,
            });
        }
        let slot = u64::from(self.next_used.0 & (self.size - 1));
        let elem = at(self.used_ring, USED_RING_OFFSET + USED_ELEM_SIZE * slot)?;
        let idx = at(self.used_ring, IDX_OFFSET)?;
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        b[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(elem, &b).map_err(QueueError::Memory)?;
        self.next_used += 1;
        // The element must be visible before the index that publishes it.
        fence(Ordering::Release);
        mem.write_u16(idx, self.next_used.0)
            .map_err(QueueError::Memory)
    }

    /// Returns several chains to the driver at once, each `(head, len)` as
    /// for [`Queue::add_used`], in order: every element is written before
    /// one `used.idx` store publishes them all, so the driver sees all of
    /// them or none (a virtio-net frame spread over several buffers must
    /// arrive whole). The heads are checked before anything is written;
    /// give back at most [`Queue::size`] chains per call.
    pub fn add_used_batch<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        used: &[(u16, u32)],
    ) -> Result<(), QueueError> {
        self.check_usable()?;
        if let Some(&(head, _)) = used.iter().find(|(head, _)| *head >= self.size) {
            return Err(QueueError::InvalidUsedHead {
                head,
                size: self.size,
            });
        }
        let idx = at(self.used_ring, IDX_OFFSET)?;
        let mut next = self.next_used;
        for &(head, len) in used {
            let slot = u64::from(next.0 & (self.size - 1));
            let elem = at(self.used_ring, USED_RING_OFFSET + USED_ELEM_SIZE * slot)?;
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            b[4..].copy_from_slice(&len.to_le_bytes());
            mem.write(elem, &b).map_err(QueueError::Memory)?;
            next += 1;
        }
        self.next_used = next;
        // The elements must be visible before the index that publishes them.
        fence(Ordering::Release);
        mem.write_u16(idx, self.next_used.0)
            .map_err(QueueError::Memory)
    }

    /// Whether the driver wants an interrupt for the used entries added since
    /// the last call (virtio 1.2, 2.7.10: `used_event` or
    /// `VIRTQ_AVAIL_F_NO_INTERRUPT`).
    pub fn needs_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, QueueError> {
        // Our used.idx store must be ordered before reading the driver's
        // suppression fields, or both sides may wait for each other.
        fence(Ordering::SeqCst);
        self.check_usable()?;
        let new = self.next_used;
        if self.event_idx {
            let used_event = Wrapping(
                mem.read_u16(at(
                    self.avail_ring,
                    AVAIL_RING_OFFSET + 2 * u64::from(self.size),
                )?)
                .map_err(QueueError::Memory)?,
            );
            let old = self.signalled_used.replace(new);
            Ok(match old {
                None => true,
                // vring_need_event(event, new, old)
                Some(old) => (new - used_event - Wrapping(1)) < (new - old),
            })
        } else {
            let flags = mem.read_u16(self.avail_ring).map_err(QueueError::Memory)?;
            Ok(flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Asks the driver to notify us of new buffers. Returns whether buffers
    /// arrived meanwhile (then the device must process them, since no
    /// notification will come for them).
    pub fn enable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, QueueError> {
        self.check_usable()?;
        if self.event_idx {
            self.set_avail_event(mem, self.next_avail.0)?;
        } else {
            mem.write_u16(self.used_ring, 0)
                .map_err(QueueError::Memory)?;
        }
        // Publish our request before re-checking the ring.
        fence(Ordering::SeqCst);
        Ok(self.pending(mem)? != 0)
    }

    /// The driver's available index, with a request to be notified once it
    /// moves on from there (event-index: `avail_event` set to it), even
    /// though other buffers are available: for a device that waits for
    /// the driver to post a buffer again after handling one.
    pub fn watch_avail<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<u16, QueueError> {
        self.check_usable()?;
        let idx = self.avail_idx(mem)?;
        if self.event_idx {
            self.set_avail_event(mem, idx.0)?;
        } else {
            mem.write_u16(self.used_ring, 0)
                .map_err(QueueError::Memory)?;
        }
        fence(Ordering::SeqCst);
        Ok(idx.0)
    }

    /// The driver's available index.
    pub fn avail_index<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16, QueueError> {
        self.check_usable()?;
        Ok(self.avail_idx(mem)?.0)
    }

    /// Tells the driver not to notify us (a hint; with event-index the
    /// driver keeps notifying until `avail_event` is passed).
    pub fn disable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<(), QueueError> {
        if self.event_idx {
            return Ok(());
        }
        mem.write_u16(self.used_ring, VIRTQ_USED_F_NO_NOTIFY)
            .map_err(QueueError::Memory)
    }

    fn set_avail_event<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        idx: u16,
    ) -> Result<(), QueueError> {
        let addr = at(
            self.used_ring,
            USED_RING_OFFSET + USED_ELEM_SIZE * u64::from(self.size),
        )?;
        mem.write_u16(addr, idx).map_err(QueueError::Memory)
    }
}

/// What a [`drain`] handler made of one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Give the chain back to the driver, this many bytes written to it.
    Used(u32),
    /// Leave the chain on the ring, for a later drain, and stop.
    Later,
}

/// Works through `queue`'s available chains, the loop every device runs:
/// while `wants_more(state)`, pop a chain, let `handle` serve it and give it
/// back with [`Queue::add_used`]. When the ring runs dry, notifications are
/// re-enabled and chains that slipped in meanwhile are served too. A
/// malformed chain is counted with `on_invalid(state)` and given back
/// unread (length 0).
///
/// `state` is the device, handed to each callback in turn, so that they
/// may all use it. Returns whether the driver wants an interrupt for the
/// chains given back ([`Queue::needs_notification`], asked only if there
/// were any); raising it is the caller's job.
#[inline]
pub fn drain<const N: usize, M: GuestMemory + ?Sized, S: ?Sized>(
    queue: &mut Queue,
    mem: &M,
    state: &mut S,
    wants_more: impl FnMut(&S) -> bool,
    mut on_invalid: impl FnMut(&mut S),
    handle: impl FnMut(&mut S, &M, &DescriptorChain<N>) -> Served,
) -> Result<bool, QueueError> {
    drain_reporting(queue, mem, state, wants_more, |s, _| on_invalid(s), handle)
}

/// [`drain`], with what is wrong with each malformed chain: `on_invalid`
/// gets the [`ChainError`] too, for a device that reports it.
#[inline]
pub fn drain_reporting<const N: usize, M: GuestMemory + ?Sized, S: ?Sized>(
    queue: &mut Queue,
    mem: &M,
    state: &mut S,
    mut wants_more: impl FnMut(&S) -> bool,
    mut on_invalid: impl FnMut(&mut S, ChainError),
    mut handle: impl FnMut(&mut S, &M, &DescriptorChain<N>) -> Served,
) -> Result<bool, QueueError> {
    let mut used = false;
    while wants_more(state) {
        let chain = match queue.pop::<N, M>(mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => {
                // Re-arm notifications; if buffers slipped in meanwhile,
                // serve them now.
                if queue.enable_notification(mem)? {
                    continue;
                }
                break;
            }
            Err(QueueError::InvalidChain { head, source }) => {
                on_invalid(state, source);
                if head < queue.size() {
                    queue.add_used(mem, head, 0)?;
                    used = true;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        match handle(state, mem, &chain) {
            Served::Used(len) => {
                queue.add_used(mem, chain.head_index(), len)?;
                used = true;
            }
            Served::Later => {
                queue.undo_pop();
                break;
            }
        }
    }
    Ok(used && queue.needs_notification(mem)?)
}

/// `base + offset`, or an overflow error (ring addresses are guest-chosen).
fn at(base: GuestAddress, offset: u64) -> Result<GuestAddress, QueueError> {
    base.checked_add(offset)
        .ok_or(QueueError::Memory(MemoryError::Overflow {
            addr: base.0,
            len: offset,
        }))
}

#[cfg(test)]
mod tests;
