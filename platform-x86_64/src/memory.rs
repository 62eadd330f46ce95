//! Guest RAM over `vm-memory`, and the adapter through which `vmm-core`
//! devices reach it.

use std::sync::Arc;

use vm_memory::{
    ByteValued, Bytes, GuestAddress as VmAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, MmapRegion, VolatileMemory,
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
    /// Guest memory could not be written to its file.
    #[error("cannot write guest memory to its file")]
    Save(#[source] std::io::Error),
    /// Guest memory could not be read out of its mapping.
    #[error("cannot read guest memory to save it")]
    SaveRead(#[source] vm_memory::VolatileMemoryError),
    /// A guest memory region could not be read for saving.
    #[error("cannot read guest memory to save it")]
    SaveRegion(#[source] vm_memory::GuestMemoryError),
    /// A memory file is shorter than the guest memory it should hold.
    #[error("the memory file holds {len} bytes, not the {size} of the guest's memory")]
    FileSize {
        /// The file's length.
        len: u64,
        /// The guest memory's size.
        size: u64,
    },
    /// A memory file could not be mapped.
    #[error("cannot map the memory file")]
    MapFile(#[source] vm_memory::mmap::MmapRegionError),
    /// A memory file could not be examined or its descriptor duplicated.
    #[error("cannot use the memory file")]
    File(#[source] std::io::Error),
    /// The mapped regions do not form guest memory (cannot happen with
    /// [`ram_ranges`]).
    #[error("the memory file's regions do not form guest memory")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
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

/// Writes guest RAM, region after region, into the empty file `out`,
/// sparsely: a 4 KiB page of zeros is left a hole, which reads back as
/// zeros. A guest that has touched little of its memory makes a small
/// file, written quickly, and restored VMs share no page cache for what is
/// zero. Uses positioned writes and a final `ftruncate`.
pub fn save_guest_memory(
    mem: &GuestMemoryMmap,
    out: &mut std::fs::File,
) -> Result<(), MemoryLayoutError> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    const PAGE: usize = 4096;
    let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
    let mut buf = vec![0u8; CHUNK];
    let mut base = 0u64;
    for region in mem.iter() {
        let slice = region
            .as_volatile_slice()
            .map_err(MemoryLayoutError::SaveRegion)?;
        let len = slice.len();
        let mut at = 0;
        while at < len {
            let n = CHUNK.min(len - at);
            let chunk = slice.subslice(at, n).map_err(MemoryLayoutError::SaveRead)?;
            chunk.copy_to(&mut buf[..n]);
            let mut page = 0;
            while page < n {
                let end = (page + PAGE).min(n);
                if zero(&buf[page..end]) {
                    page = end;
                    continue;
                }
                // A run of pages with data, written at once.
                let mut run_end = end;
                while run_end < n {
                    let next = (run_end + PAGE).min(n);
                    if zero(&buf[run_end..next]) {
                        break;
                    }
                    run_end = next;
                }
                out.write_all_at(&buf[page..run_end], base + (at + page) as u64)
                    .map_err(MemoryLayoutError::Save)?;
                page = run_end;
            }
            at += n;
        }
        base += len as u64;
    }
    out.set_len(base).map_err(MemoryLayoutError::Save)?;
    Ok(())
}

/// Maps a file [`save_guest_memory`] wrote for `size` bytes of guest memory
/// as that memory, copy on write (`MAP_PRIVATE`): the guest's writes stay
/// in this process, and every VM mapping the same file shares its
/// unmodified pages through the page cache.
pub fn guest_memory_from_file(
    size: u64,
    file: &std::fs::File,
) -> Result<GuestMemoryMmap, MemoryLayoutError> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    if size < MIN_MEM_SIZE {
        return Err(MemoryLayoutError::TooSmall { size });
    }
    if !size.is_multiple_of(4096) {
        return Err(MemoryLayoutError::Unaligned { size });
    }
    let len = file.metadata().map_err(MemoryLayoutError::File)?.len();
    if len != size {
        return Err(MemoryLayoutError::FileSize { len, size });
    }
    let mut regions = Vec::new();
    let mut offset = 0;
    for (start, region_len) in ram_ranges(size) {
        let bytes =
            usize::try_from(region_len).map_err(|_| MemoryLayoutError::Unaligned { size })?;
        let file = file.try_clone().map_err(MemoryLayoutError::File)?;
        let map = MmapRegionBuilder::new_with_bitmap(bytes, ())
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryLayoutError::MapFile)?;
        regions.push(
            GuestRegionMmap::new(map, VmAddress(start))
                .ok_or(MemoryLayoutError::Unaligned { size })?,
        );
        offset += region_len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryLayoutError::Regions)
}

/// One guest RAM region, captured when the adapter is built: the guest range
/// and the host mapping behind it.
#[derive(Clone, Debug)]
struct Region {
    /// First guest address.
    start: u64,
    /// Length in bytes (the mapping's size).
    len: u64,
    /// Holding the `Arc` keeps the mapping alive as long as the adapter.
    map: Arc<MmapRegion>,
}

/// `vmm-core`'s view of guest RAM.
///
/// Accesses that fall inside one region take a short path: pick the region
/// (one or two compares: there is RAM below the MMIO gap and maybe above
/// 4 GiB), check the bounds once, then copy through a `VolatileSlice` of that
/// region's mapping. This skips `vm-memory`'s generic per-access region
/// search and `try_access` loop, which dominated the virtqueue hot path.
/// Anything else (a range spanning two adjacent regions, or outside RAM)
/// goes through `vm-memory`'s generic path, so results are the same as with
/// it alone.
#[derive(Clone, Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<Region>,
}

impl GuestRam {
    /// Wraps `mem` (cheap: regions are reference counted).
    pub fn new(mem: GuestMemoryMmap) -> Self {
        // `GuestMemoryMmap` keeps its regions sorted and non-overlapping.
        let regions = mem
            .iter()
            .map(|r| Region {
                start: r.start_addr().0,
                len: r.len(),
                map: r.get_mmap(),
            })
            .collect();
        GuestRam { mem, regions }
    }

    /// The underlying `vm-memory` object.
    pub fn inner(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }

    /// The mapping holding `[addr, addr + len)` and the offset of `addr` in
    /// it, or `None` if the range does not lie inside a single region.
    #[inline(always)]
    fn locate(&self, addr: u64, len: usize) -> Option<(&MmapRegion, usize)> {
        for r in &self.regions {
            let off = addr.wrapping_sub(r.start);
            if off < r.len {
                if len as u64 > r.len - off {
                    return None;
                }
                // `off < r.len`, the mapping's `usize` size, so it fits.
                return Some((&r.map, off as usize));
            }
        }
        None
    }

    #[cold]
    #[inline(never)]
    fn read_slow(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
        checked_end(addr, buf.len() as u64)?;
        self.mem
            .read_slice(buf, VmAddress(addr.0))
            .map_err(|_| oob(addr, buf.len()))
    }

    #[cold]
    #[inline(never)]
    fn write_slow(&self, addr: GuestAddress, buf: &[u8]) -> Result<(), MemoryError> {
        checked_end(addr, buf.len() as u64)?;
        // Check first so a failed write leaves memory untouched.
        self.check_range_slow(addr, buf.len() as u64)?;
        self.mem
            .write_slice(buf, VmAddress(addr.0))
            .map_err(|_| oob(addr, buf.len()))
    }

    #[cold]
    #[inline(never)]
    fn check_range_slow(&self, addr: GuestAddress, len: u64) -> Result<(), MemoryError> {
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

fn oob(addr: GuestAddress, len: usize) -> MemoryError {
    MemoryError::OutOfBounds {
        addr: addr.0,
        len: len as u64,
    }
}

/// A volatile little-endian load of a `T` at `off` in `map`: one move, where
/// a byte-array load or `VolatileSlice::copy_to` would be a byte loop or a
/// `memcpy` call.
#[inline(always)]
fn load<T: ByteValued>(map: &MmapRegion, off: usize) -> Option<T> {
    map.get_ref::<T>(off).ok().map(|r| r.load())
}

/// A volatile store of a `T` at `off` in `map`.
#[inline(always)]
fn store<T: ByteValued>(map: &MmapRegion, off: usize, v: T) -> Option<()> {
    map.get_ref::<T>(off).ok().map(|r| r.store(v))
}

impl GuestRam {
    /// The fast path of [`GuestMemory::read`]; `None` sends the access to
    /// `vm-memory`'s generic path.
    #[inline(always)]
    fn read_fast(&self, addr: GuestAddress, buf: &mut [u8]) -> Option<()> {
        let (map, off) = self.locate(addr.0, buf.len())?;
        // The length is a constant at the virtqueue's call sites, so only one
        // arm survives inlining.
        match buf.len() {
            2 => buf.copy_from_slice(&load::<u16>(map, off)?.to_ne_bytes()),
            4 => buf.copy_from_slice(&load::<u32>(map, off)?.to_ne_bytes()),
            8 => buf.copy_from_slice(&load::<u64>(map, off)?.to_ne_bytes()),
            16 => {
                // Two moves: a volatile load of a 16-byte array would be
                // split into single bytes.
                let (lo, hi) = buf.split_at_mut(8);
                lo.copy_from_slice(&load::<u64>(map, off)?.to_ne_bytes());
                hi.copy_from_slice(&load::<u64>(map, off + 8)?.to_ne_bytes());
            }
            len => {
                map.get_slice(off, len).ok()?.copy_to(buf);
            }
        }
        Some(())
    }

    /// The fast path of [`GuestMemory::write`].
    #[inline(always)]
    fn write_fast(&self, addr: GuestAddress, buf: &[u8]) -> Option<()> {
        let (map, off) = self.locate(addr.0, buf.len())?;
        match buf.len() {
            2 => store(map, off, u16::from_ne_bytes(buf.try_into().ok()?)),
            4 => store(map, off, u32::from_ne_bytes(buf.try_into().ok()?)),
            8 => store(map, off, u64::from_ne_bytes(buf.try_into().ok()?)),
            len => {
                map.get_slice(off, len).ok()?.copy_from(buf);
                Some(())
            }
        }
    }
}

impl GuestMemory for GuestRam {
    #[inline]
    fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
        match self.read_fast(addr, buf) {
            Some(()) => Ok(()),
            None => self.read_slow(addr, buf),
        }
    }

    #[inline]
    fn write(&self, addr: GuestAddress, buf: &[u8]) -> Result<(), MemoryError> {
        match self.write_fast(addr, buf) {
            Some(()) => Ok(()),
            None => self.write_slow(addr, buf),
        }
    }

    #[inline]
    fn check_range(&self, addr: GuestAddress, len: u64) -> Result<(), MemoryError> {
        for r in &self.regions {
            let off = addr.0.wrapping_sub(r.start);
            if off < r.len && len <= r.len - off {
                return Ok(());
            }
        }
        self.check_range_slow(addr, len)
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
    #[test]
    fn adapter_covers_both_sides_of_the_mmio_gap() {
        // 3 GiB below the gap, 16 MiB above 4 GiB (anonymous mappings are
        // reserved lazily, so this costs no RAM).
        let size = MMIO_GAP_START + (16 << 20);
        let ram = GuestRam::new(create_guest_memory(size).unwrap());
        assert_eq!(ram.size(), size);
        for addr in [
            0,
            MMIO_GAP_START - 16,
            MMIO_GAP_END,
            MMIO_GAP_END + (16 << 20) - 16,
        ] {
            let a = GuestAddress(addr);
            let desc: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
            ram.write(a, &desc).unwrap();
            let mut back = [0u8; 16];
            ram.read(a, &mut back).unwrap();
            assert_eq!(back, desc);
            ram.write_u16(a, 0xabcd).unwrap();
            assert_eq!(ram.read_u16(a).unwrap(), 0xabcd);
            ram.write_u64(a.checked_add(8).unwrap(), 0x1122_3344_5566_7788)
                .unwrap();
            assert_eq!(
                ram.read_u32(a.checked_add(12).unwrap()).unwrap(),
                0x1122_3344
            );
            // Both the fast path and vm-memory see the same bytes.
            let mut via_vm = [0u8; 16];
            ram.inner()
                .read_slice(&mut via_vm, VmAddress(addr))
                .unwrap();
            ram.read(a, &mut back).unwrap();
            assert_eq!(back, via_vm);
            assert!(ram.check_range(a, 16).is_ok());
        }
        // The gap itself, and ranges running into it, are not RAM.
        let low_end = GuestAddress(MMIO_GAP_START - 4);
        assert!(ram.check_range(low_end, 4).is_ok());
        assert!(ram.check_range(low_end, 5).is_err());
        assert!(ram.check_range(GuestAddress(MMIO_GAP_START), 0).is_err());
        assert!(ram.check_range(GuestAddress(MMIO_GAP_END - 1), 2).is_err());
        assert!(ram.read_u32(GuestAddress(MMIO_GAP_START)).is_err());
        assert!(ram.read_u16(GuestAddress(MMIO_GAP_END - 1)).is_err());
        // A write straddling the end of a region fails without writing.
        ram.write_u32(low_end, 0).unwrap();
        assert!(matches!(
            ram.write(low_end, &[0xff; 8]),
            Err(MemoryError::OutOfBounds { .. })
        ));
        assert_eq!(ram.read_u32(low_end).unwrap(), 0);
        let high_end = GuestAddress(size - MMIO_GAP_START + MMIO_GAP_END - 2);
        ram.write_u16(high_end, 0).unwrap();
        assert!(ram.write_u32(high_end, u32::MAX).is_err());
        assert_eq!(ram.read_u16(high_end).unwrap(), 0);
        assert!(ram.write(high_end, &[0xff; 3]).is_err());
        assert_eq!(ram.read_u16(high_end).unwrap(), 0);
    }

    #[test]
    fn adapter_falls_back_to_vm_memory_across_adjacent_regions() {
        // Two regions back to back, then a hole, then a third.
        let mem = GuestMemoryMmap::from_ranges(&[
            (VmAddress(0), 0x1000),
            (VmAddress(0x1000), 0x1000),
            (VmAddress(0x4000), 0x1000),
        ])
        .unwrap();
        let ram = GuestRam::new(mem);
        // Spanning the two adjacent regions works, as with vm-memory alone.
        let data: [u8; 16] = core::array::from_fn(|i| 0xa0 + i as u8);
        ram.write(GuestAddress(0xff8), &data).unwrap();
        let mut back = [0u8; 16];
        ram.read(GuestAddress(0xff8), &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(
            ram.read_u64(GuestAddress(0xffc)).unwrap(),
            0xabaa_a9a8_a7a6_a5a4
        );
        assert!(ram.check_range(GuestAddress(0x800), 0x1800).is_ok());
        // Into the hole: nothing is written, even where the start is RAM.
        assert!(ram.check_range(GuestAddress(0x1800), 0x1000).is_err());
        assert!(ram.write(GuestAddress(0x1ffc), &[0xff; 8]).is_err());
        assert_eq!(ram.read_u32(GuestAddress(0x1ffc)).unwrap(), 0);
        assert!(ram.write_u16(GuestAddress(0x4fff), 0xffff).is_err());
        assert!(ram.read_u16(GuestAddress(0x4ffe)).is_ok());
        assert!(ram.read_u16(GuestAddress(0x3000)).is_err());
        // Odd sizes take the slice copy.
        ram.write(GuestAddress(0x4001), &[1, 2, 3]).unwrap();
        let mut three = [0u8; 3];
        ram.read(GuestAddress(0x4001), &mut three).unwrap();
        assert_eq!(three, [1, 2, 3]);
    }
}
