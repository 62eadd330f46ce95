//! The VM's disk slots: which host directory's image each holds, and how
//! many containers use it.
//!
//! Slot `i` is `/dev/vd{a+i}` in the guest: Linux names virtio-blk disks in
//! probe order, which is slot order.

use std::path::{Path, PathBuf};

use super::error::VmSandboxError;
use crate::vmm;

/// The guest's device for disk slot `slot`: `/dev/vda`, `/dev/vdb`, ...
pub fn guest_disk(slot: usize) -> String {
    format!("/dev/{}", vmm::disk_name(slot))
}

/// A disk slot's use.
#[derive(Debug)]
struct SlotUse {
    /// The directory the image was built from.
    host: PathBuf,
    /// Containers using it: the slot is emptied when the last one goes.
    users: usize,
}

/// What [`DiskSlots::reserve`] found for a directory.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reserved {
    /// The directory already has a slot; one more user counted.
    Shared(usize),
    /// A free slot, now reserved: build and attach its image, then
    /// [`DiskSlots::release`] it if that fails.
    Free(usize),
}

/// The slot table.
#[derive(Debug)]
pub(super) struct DiskSlots {
    slots: Vec<Option<SlotUse>>,
}

impl DiskSlots {
    /// `count` slots (at least one), the first holding `first`'s image
    /// (the first container's rootfs, attached at boot, no user counted
    /// yet).
    pub(super) fn new(count: usize) -> Self {
        Self {
            slots: (0..count.max(1)).map(|_| None).collect(),
        }
    }

    fn find(&mut self, host: &Path) -> Option<(usize, &mut SlotUse)> {
        self.slots
            .iter_mut()
            .enumerate()
            .find_map(|(i, d)| d.as_mut().filter(|d| d.host == host).map(|d| (i, d)))
    }

    /// Counts one more user of `host`'s slot, or reserves a free slot for
    /// it.
    pub(super) fn reserve(&mut self, host: &Path) -> Result<Reserved, VmSandboxError> {
        if let Some((slot, used)) = self.find(host) {
            used.users += 1;
            return Ok(Reserved::Shared(slot));
        }
        let slots = self.slots.len();
        let slot = self.slots.iter().position(Option::is_none).ok_or_else(|| {
            VmSandboxError::NoFreeDisk {
                path: host.to_owned(),
                slots,
            }
        })?;
        self.slots[slot] = Some(SlotUse {
            host: host.to_owned(),
            users: 1,
        });
        Ok(Reserved::Free(slot))
    }

    /// Counts one user of `host`'s slot less; returns the slot if that was
    /// the last one (empty it, then [`DiskSlots::release`] it). `None`:
    /// still in use, or `host` has no slot.
    pub(super) fn drop_user(&mut self, host: &Path) -> Option<usize> {
        let (slot, used) = self.find(host)?;
        used.users = used.users.saturating_sub(1);
        (used.users == 0).then_some(slot)
    }

    /// Frees `slot`.
    pub(super) fn release(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_disk_names_follow_slots() {
        assert_eq!(guest_disk(0), "/dev/vda");
        assert_eq!(guest_disk(3), "/dev/vdd");
        assert_eq!(guest_disk(25), "/dev/vdz");
        assert_eq!(guest_disk(26), "/dev/vdaa");
    }

    #[test]
    fn slots_are_counted_shared_and_bounded() {
        let (a, b, c) = (Path::new("/a"), Path::new("/b"), Path::new("/c"));
        let mut slots = DiskSlots::new(2);
        assert_eq!(slots.reserve(a).unwrap(), Reserved::Free(0));
        assert_eq!(slots.reserve(a).unwrap(), Reserved::Shared(0));
        assert_eq!(slots.reserve(b).unwrap(), Reserved::Free(1));
        assert_eq!(slots.reserve(b).unwrap(), Reserved::Shared(1));
        let err = slots.reserve(c).unwrap_err().to_string();
        assert!(err.contains("all 2 disk slots are in use"), "{err}");
        assert_eq!(slots.drop_user(b), None);
        assert_eq!(slots.drop_user(b), Some(1));
        slots.release(1);
        assert_eq!(slots.drop_user(b), None);
        assert_eq!(slots.reserve(c).unwrap(), Reserved::Free(1));
    }
}
