//! A virtio device behind its virtio-mmio transport, as the buses, the
//! vCPUs and the device's own thread see it.
//!
//! A slot does its own locking: the vCPUs call [`VirtioSlot::read`] and
//! [`VirtioSlot::write`] for register accesses while the device's thread
//! calls [`VirtioSlot::notify`] and [`VirtioSlot::host_ready`], and a slot
//! whose queue work may block (a disk's I/O) keeps that work out of the
//! lock the register accesses take.

use std::os::fd::RawFd;

use vmm_core::snapshot::{StateError, StateReader, StateWriter};

use super::file_disk::FileDisk;
use super::platform::GuestRam;

/// Errors putting a disk into a slot or taking it out.
#[derive(Debug, thiserror::Error)]
pub enum DiskSlotError {
    /// The VM has only `count` virtio devices.
    #[error("the VM has {count} virtio devices")]
    NoSuchSlot {
        /// How many it has.
        count: usize,
    },
    /// Not a disk.
    #[error("not a disk")]
    NotADisk,
    /// The slot holds a disk already.
    #[error("the slot holds a disk already")]
    Occupied,
    /// The image is empty.
    #[error("the image is empty")]
    EmptyImage,
}

/// A virtio-mmio transport with a device behind it.
pub trait VirtioSlot: Send + Sync {
    /// A guest read at `offset` in the window (on a vCPU thread).
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A guest write at `offset` in the window (on a vCPU thread).
    fn write(&self, mem: &GuestRam, offset: u64, data: &[u8]);
    /// The driver notified queue `queue` (its ioeventfd fired; on the
    /// device's thread).
    fn notify(&self, mem: &GuestRam, queue: u16);
    /// Number of queues (for ioeventfds).
    fn queue_count(&self) -> usize;
    /// The seccomp filter its thread installs.
    fn thread_kind(&self) -> super::seccomp::ThreadKind {
        super::seccomp::ThreadKind::Devices
    }
    /// An fd the device's thread should watch for the device's host side
    /// (readable when [`VirtioSlot::host_ready`] has work).
    fn host_fd(&self) -> Option<RawFd> {
        None
    }
    /// The [`VirtioSlot::host_fd`] is ready: serve the host side.
    fn host_ready(&self, _mem: &GuestRam) {}
    /// Most bytes [`VirtioSlot::save`] adds to a container, section headers
    /// included.
    fn state_len(&self) -> usize;
    /// Sections [`VirtioSlot::save`] adds: the transport's and the
    /// device's.
    fn state_sections(&self) -> usize {
        2
    }
    /// Adds the slot's state (its transport's, then its device's) to `w`
    /// as sections `index`. Called while the VM is paused: its vCPUs and
    /// its device threads parked, so neither registers nor queues move.
    fn save(&self, w: &mut StateWriter<'_>, index: u16) -> Result<(), StateError>;
    /// Puts the slot, built from the same config, back into sections
    /// `index` of `r`, before the VM runs; then does what a restored device
    /// owes the guest (a disk serves what was queued, vsock sends a
    /// transport reset). On an error the slot is as built.
    fn restore(&self, r: &StateReader<'_>, index: u16, mem: &GuestRam) -> Result<(), StateError>;
    /// Puts `medium` into this disk slot (which must be empty), or takes the
    /// medium out (`None`), and signals a configuration change.
    fn swap_disk(&self, _medium: Option<FileDisk>) -> Result<(), DiskSlotError> {
        Err(DiskSlotError::NotADisk)
    }
}
