//! The driver side of a split queue, for tests: lays out rings and descriptor
//! chains in guest memory the way a virtio driver would.
//
// Test support only (behind `test-utils`): a mock set up with bad parameters
// is a bug in the test, so it may panic, unlike the rest of the crate.
#![allow(clippy::panic)]

use core::num::Wrapping;
use core::sync::atomic::{fence, Ordering};

use super::{Descriptor, Queue, DESCRIPTOR_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT};
use crate::memory::{GuestAddress, GuestMemory, MemoryError};

/// A driver's view of one split queue in guest memory.
///
/// The descriptor table starts at `base`; the available ring follows it and
/// the used ring follows that, 4-byte aligned.
pub struct MockSplitQueue<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    avail_idx: Wrapping<u16>,
    next_free: u16,
}

impl<'m, M: GuestMemory + ?Sized> MockSplitQueue<'m, M> {
    /// Lays out a queue of `size` entries at `base` (16-byte aligned). The
    /// rings are zeroed.
    pub fn new(mem: &'m M, base: GuestAddress, size: u16) -> Result<Self, MemoryError> {
        let n = u64::from(size);
        let desc_table = base;
        let avail_ring = GuestAddress(base.0 + DESCRIPTOR_SIZE * n);
        let used_ring = GuestAddress((avail_ring.0 + 6 + 2 * n + 3) & !3);
        let q = MockSplitQueue {
            mem,
            size,
            desc_table,
            avail_ring,
            used_ring,
            avail_idx: Wrapping(0),
            next_free: 0,
        };
        let end = q.end().0;
        let mut a = base.0;
        while a < end {
            mem.write(GuestAddress(a), &[0])?;
            a += 1;
        }
        Ok(q)
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptor table address.
    pub fn desc_table(&self) -> GuestAddress {
        self.desc_table
    }

    /// Available ring address.
    pub fn avail_ring(&self) -> GuestAddress {
        self.avail_ring
    }

    /// Used ring address.
    pub fn used_ring(&self) -> GuestAddress {
        self.used_ring
    }

    /// First address after the used ring (including `avail_event`).
    pub fn end(&self) -> GuestAddress {
        GuestAddress(self.used_ring.0 + 6 + 8 * u64::from(self.size))
    }

    /// A device-side [`Queue`] configured for this layout, ready, with the
    /// ring feature bits in `features` applied.
    pub fn create_queue(&self, features: u64) -> Queue {
        let mut q = Queue::new(self.size).unwrap_or_else(|_| panic!("bad mock queue size"));
        q.set_desc_table(self.desc_table);
        q.set_avail_ring(self.avail_ring);
        q.set_used_ring(self.used_ring);
        q.set_features(features);
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` of the main table (no checks: may be garbage).
    pub fn write_desc(&self, index: u16, desc: Descriptor) -> Result<(), MemoryError> {
        Self::write_table_desc(self.mem, self.desc_table, index, desc)
    }

    /// Writes entry `index` of the descriptor table at `table`.
    pub fn write_table_desc(
        mem: &M,
        table: GuestAddress,
        index: u16,
        desc: Descriptor,
    ) -> Result<(), MemoryError> {
        let addr = table
            .checked_add(DESCRIPTOR_SIZE * u64::from(index))
            .ok_or(MemoryError::Overflow {
                addr: table.0,
                len: DESCRIPTOR_SIZE * u64::from(index),
            })?;
        mem.write(addr, &desc.to_bytes())
    }

    /// Puts `head` in the next available slot and publishes it.
    pub fn publish(&mut self, head: u16) -> Result<(), MemoryError> {
        let slot = u64::from(self.avail_idx.0 % self.size);
        self.mem
            .write_u16(GuestAddress(self.avail_ring.0 + 4 + 2 * slot), head)?;
        fence(Ordering::Release);
        self.avail_idx += 1;
        self.mem
            .write_u16(GuestAddress(self.avail_ring.0 + 2), self.avail_idx.0)
    }

    /// Writes `bufs` as a chain into free descriptors of the main table
    /// (setting `NEXT`/`next`; keep `WRITE` in the given flags) and publishes
    /// it. Returns the head index.
    pub fn add_chain(&mut self, bufs: &[Descriptor]) -> Result<u16, MemoryError> {
        let head = self.next_free;
        let n = bufs.len() as u16;
        for (i, b) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut d = *b;
            if (i as u16) + 1 < n {
                d.flags |= VIRTQ_DESC_F_NEXT;
                d.next = (index + 1) % self.size;
            } else {
                d.flags &= !VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(index, d)?;
        }
        self.next_free = (head + n) % self.size;
        self.publish(head)?;
        Ok(head)
    }

    /// Writes `bufs` as an indirect table at `table` and publishes a chain of
    /// one descriptor pointing at it. Returns the head index.
    pub fn add_indirect_chain(
        &mut self,
        table: GuestAddress,
        bufs: &[Descriptor],
    ) -> Result<u16, MemoryError> {
        let n = bufs.len() as u16;
        for (i, b) in bufs.iter().enumerate() {
            let mut d = *b;
            if (i as u16) + 1 < n {
                d.flags |= VIRTQ_DESC_F_NEXT;
                d.next = i as u16 + 1;
            } else {
                d.flags &= !VIRTQ_DESC_F_NEXT;
            }
            Self::write_table_desc(self.mem, table, i as u16, d)?;
        }
        let head = self.next_free;
        self.write_desc(
            head,
            Descriptor {
                addr: table,
                len: u32::from(n) * DESCRIPTOR_SIZE as u32,
                flags: VIRTQ_DESC_F_INDIRECT,
                next: 0,
            },
        )?;
        self.next_free = (head + 1) % self.size;
        self.publish(head)?;
        Ok(head)
    }

    /// The driver's `avail.idx`.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx.0
    }

    /// Overwrites `avail.idx` (to test a misbehaving driver).
    pub fn set_avail_idx(&mut self, idx: u16) -> Result<(), MemoryError> {
        self.avail_idx = Wrapping(idx);
        self.mem.write_u16(GuestAddress(self.avail_ring.0 + 2), idx)
    }

    /// Sets `avail.flags`.
    pub fn set_avail_flags(&self, flags: u16) -> Result<(), MemoryError> {
        self.mem.write_u16(self.avail_ring, flags)
    }

    /// Sets `used_event` (event-index mode).
    pub fn set_used_event(&self, idx: u16) -> Result<(), MemoryError> {
        self.mem.write_u16(
            GuestAddress(self.avail_ring.0 + 4 + 2 * u64::from(self.size)),
            idx,
        )
    }

    /// The device's `used.flags`.
    pub fn used_flags(&self) -> Result<u16, MemoryError> {
        self.mem.read_u16(self.used_ring)
    }

    /// The device's `used.idx`.
    pub fn used_idx(&self) -> Result<u16, MemoryError> {
        self.mem.read_u16(GuestAddress(self.used_ring.0 + 2))
    }

    /// Used element in `slot`: `(id, len)`.
    pub fn used_elem(&self, slot: u16) -> Result<(u32, u32), MemoryError> {
        let a = GuestAddress(self.used_ring.0 + 4 + 8 * u64::from(slot % self.size));
        Ok((
            self.mem.read_u32(a)?,
            self.mem.read_u32(GuestAddress(a.0 + 4))?,
        ))
    }

    /// The device's `avail_event` (event-index mode).
    pub fn avail_event(&self) -> Result<u16, MemoryError> {
        self.mem.read_u16(GuestAddress(
            self.used_ring.0 + 4 + 8 * u64::from(self.size),
        ))
    }
}
