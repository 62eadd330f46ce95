//! Guest RAM over `vm-memory`, and the adapter through which `vmm-core`
//! devices reach it.

use vm_memory::{
    Bytes, GuestAddress as VmAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_core::memory::{checked_end, GuestAddress, GuestMemory, MemoryError};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Smallest guest we build: enough for the boot structures and a kernel.
pub const MIN_MEM_SIZE: u64 = 16 << 20;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryLayoutError {
    /// The requested size is below the minimum.
    #[error("guest memory of {size} bytes is too small (minimum {MIN_MEM_SIZE})")]
    TooSmall {
        /// Requested size.
        size: u64,
    },
    /// The requested size is not page aligned or does not fit the address space.
    #[error("guest memory of {size} bytes is not a whole number of 4 KiB pages")]
    Unaligned {
        /// Requested size.
        size: u64,
    },
    /// mmap failed.
    #[error("cannot allocate guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
}

/// The RAM ranges `(start, len)` for `size` bytes of guest memory: below the
/// MMIO gap, and the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((MMIO_GAP_END, size - low));
    }
    ranges
}

/// Allocates `size` bytes of anonymous guest memory laid out around the
/// MMIO gap.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryLayoutError> {
    if size < MIN_MEM_SIZE {
        return Err(MemoryLayoutError::TooSmall { size });
    }
    if !size.is_multiple_of(4096) {
        return Err(MemoryLayoutError::Unaligned { size });
    }
    let ranges: Vec<(VmAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(s, l)| usize::try_from(l).map(|l| (VmAddress(s), l)))
        .collect::<Result<_, _>>()
        .map_err(|_| MemoryLayoutError::Unaligned { size })?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryLayoutError::Mmap)
}

/// `vmm-core`'s view of guest RAM.
#[derive(Clone, Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
}

impl GuestRam {
    /// Wraps `mem` (cheap: regions are reference counted).
    pub fn new(mem: GuestMemoryMmap) -> Self {
        GuestRam { mem }
    }

    /// The underlying `vm-memory` object.
    pub fn inner(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }
}

fn oob(addr: GuestAddress, len: usize) -> MemoryError {
    MemoryError::OutOfBounds {
        addr: addr.0,
        len: len as u64,
    }
}

impl GuestMemory for GuestRam {
    fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
        checked_end(addr, buf.len() as u64)?;
        self.mem
            .read_slice(buf, VmAddress(addr.0))
            .map_err(|_| oob(addr, buf.len()))
    }

    fn write(&self, addr: GuestAddress, buf: &[u8]) -> Result<(), MemoryError> {
        checked_end(addr, buf.len() as u64)?;
        // Check first so a failed write leaves memory untouched.
        self.check_range(addr, buf.len() as u64)?;
        self.mem
            .write_slice(buf, VmAddress(addr.0))
            .map_err(|_| oob(addr, buf.len()))
    }

    fn check_range(&self, addr: GuestAddress, len: u64) -> Result<(), MemoryError> {
        checked_end(addr, len)?;
        let err = MemoryError::OutOfBounds { addr: addr.0, len };
        let len = usize::try_from(len).map_err(|_| err)?;
        if len == 0 {
            return self
                .mem
                .find_region(VmAddress(addr.0))
                .map(|_| ())
                .ok_or(err);
        }
        if self.mem.check_range(VmAddress(addr.0), len) {
            Ok(())
        } else {
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(matches!(
            create_guest_memory(1 << 20),
            Err(MemoryLayoutError::TooSmall { .. })
        ));
        assert!(matches!(
            create_guest_memory((32 << 20) + 1),
            Err(MemoryLayoutError::Unaligned { .. })
        ));
    }

    #[test]
    fn adapter_reads_writes_and_checks_bounds() {
        let ram = GuestRam::new(create_guest_memory(32 << 20).unwrap());
        assert_eq!(ram.size(), 32 << 20);
        ram.write_u32(GuestAddress(0x1000), 0xfeed_f00d).unwrap();
        assert_eq!(ram.read_u32(GuestAddress(0x1000)).unwrap(), 0xfeed_f00d);
        let end = 32 << 20;
        assert!(ram.check_range(GuestAddress(end - 4), 4).is_ok());
        assert!(ram.check_range(GuestAddress(end - 4), 8).is_err());
        assert!(ram.write_u64(GuestAddress(end - 4), 1).is_err());
        assert_eq!(ram.read_u32(GuestAddress(end - 4)).unwrap(), 0);
        assert!(matches!(
            ram.read_u16(GuestAddress(u64::MAX)),
            Err(MemoryError::Overflow { .. })
        ));
    }
}
