//! Address-range bus for MMIO and port I/O.
//!
//! A [`Bus`] maps non-overlapping address ranges to device handles of a type
//! the caller picks: an index into the caller's own device table, a
//! `&mut dyn BusDevice`, or the device itself. It holds at most `N` ranges in
//! fixed, sorted storage (no allocation) and finds the range of an address
//! by binary search.
//!
//! The same bus type serves MMIO (64-bit guest physical addresses) and port
//! I/O (16-bit ports, widened to `u64`); use one bus for each address space.

use heapless::Vec;

/// Errors of bus operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// A range of length zero cannot hold a device.
    #[error("range at {base:#x} has length zero")]
    ZeroLength {
        /// Start of the rejected range.
        base: u64,
    },
    /// The range's end (`base + len`) does not fit in `u64`.
    #[error("range at {base:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range overlaps a range already on the bus.
    #[error("range {base:#x}+{len:#x} overlaps {existing_base:#x}+{existing_len:#x}")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Start of the range already on the bus.
        existing_base: u64,
        /// Length of the range already on the bus.
        existing_len: u64,
    },
    /// The bus already holds its maximum number of ranges.
    #[error("bus is full ({capacity} ranges)")]
    Full {
        /// The bus capacity.
        capacity: usize,
    },
    /// No range on the bus equals the one to remove.
    #[error("range {base:#x}+{len:#x} is not on the bus")]
    NotFound {
        /// Start of the requested range.
        base: u64,
        /// Length of the requested range.
        len: u64,
    },
    /// No single range on the bus covers the whole access.
    #[error("access {addr:#x}+{len:#x} is not within one range on the bus")]
    Unmapped {
        /// Address of the access.
        addr: u64,
        /// Length of the access in bytes.
        len: u64,
    },
}

/// A half-open address range `[base, base + len)`.
///
/// A range on a [`Bus`] is never empty and its exclusive end `base + len`
/// fits in `u64` (so the very last byte of the address space cannot be
/// mapped); [`Bus::insert`] checks both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BusRange {
    /// First address of the range.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

impl BusRange {
    /// The range `[base, base + len)`, unchecked (see [`BusRange::check`]).
    pub const fn new(base: u64, len: u64) -> BusRange {
        BusRange { base, len }
    }

    /// Checks that the range is non-empty and its end fits in `u64`;
    /// returns the exclusive end.
    pub const fn check(&self) -> Result<u64, BusError> {
        if self.len == 0 {
            return Err(BusError::ZeroLength { base: self.base });
        }
        match self.base.checked_add(self.len) {
            Some(end) => Ok(end),
            None => Err(BusError::Overflow {
                base: self.base,
                len: self.len,
            }),
        }
    }

    /// Whether `addr` lies in the range.
    pub const fn contains(&self, addr: u64) -> bool {
        // `wrapping_sub` is exact when `addr >= base`, and the first
        // condition rules out the other case.
        addr >= self.base && addr.wrapping_sub(self.base) < self.len
    }

    /// Whether the two ranges share at least one address. Empty ranges
    /// overlap nothing.
    pub const fn overlaps(&self, other: &BusRange) -> bool {
        if self.len == 0 || other.len == 0 {
            return false;
        }
        if self.base <= other.base {
            other.base - self.base < self.len
        } else {
            self.base - other.base < other.len
        }
    }
}

/// A device on a bus. Offsets are relative to the base of the device's
/// range.
///
/// Accesses come from the guest: a device must accept any offset and any
/// `data` length (the bus passes only accesses that lie within the range,
/// but a device may be registered with a range larger than it decodes) and
/// must not panic. A read of an unimplemented register should fill `data`
/// with zeros; a write to one should be ignored.
pub trait BusDevice {
    /// Reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);

    /// Writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

impl<T: BusDevice + ?Sized> BusDevice for &mut T {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        (**self).read(offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        (**self).write(offset, data)
    }
}

/// Up to `N` non-overlapping address ranges, each with a device handle `D`.
///
/// Entries are kept sorted by base address; lookups are `O(log N)`.
#[derive(Clone, Debug)]
pub struct Bus<D, const N: usize> {
    entries: Vec<(BusRange, D), N>,
}

impl<D, const N: usize> Default for Bus<D, N> {
    fn default() -> Self {
        Bus::new()
    }
}

impl<D, const N: usize> Bus<D, N> {
    /// An empty bus.
    pub const fn new() -> Self {
        Bus {
            entries: Vec::new(),
        }
    }

    /// Number of ranges on the bus.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the bus has no ranges.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Maximum number of ranges (`N`).
    pub const fn capacity(&self) -> usize {
        N
    }

    /// The ranges and their handles, sorted by base address.
    pub fn iter(&self) -> impl Iterator<Item = (&BusRange, &D)> {
        self.entries.iter().map(|(r, d)| (r, d))
    }

    /// Adds `device` at `range`.
    ///
    /// Fails if the range is empty, its end overflows `u64`, it overlaps a
    /// range already on the bus, or the bus is full; the bus is unchanged
    /// then.
    pub fn insert(&mut self, range: BusRange, device: D) -> Result<(), BusError> {
        range.check()?;
        // Index of the first entry with a base at or above the new one.
        let pos = self.entries.partition_point(|(r, _)| r.base < range.base);
        let neighbours = [pos.checked_sub(1), Some(pos)];
        for existing in neighbours
            .into_iter()
            .flatten()
            .filter_map(|i| self.entries.get(i))
            .map(|(r, _)| r)
        {
            if existing.overlaps(&range) {
                return Err(BusError::Overlap {
                    base: range.base,
                    len: range.len,
                    existing_base: existing.base,
                    existing_len: existing.len,
                });
            }
        }
        self.entries
            .insert(pos, (range, device))
            .map_err(|_| BusError::Full { capacity: N })
    }

    /// Removes the entry whose range equals `range` and returns its handle.
    pub fn remove(&mut self, range: BusRange) -> Result<D, BusError> {
        let not_found = BusError::NotFound {
            base: range.base,
            len: range.len,
        };
        let pos = self
            .entries
            .binary_search_by_key(&range.base, |(r, _)| r.base)
            .map_err(|_| not_found)?;
        match self.entries.get(pos) {
            Some((r, _)) if *r == range => Ok(self.entries.remove(pos).1),
            _ => Err(not_found),
        }
    }

    /// Index of the entry whose range contains `addr`.
    fn position(&self, addr: u64) -> Option<usize> {
        // Entries with a base at or below `addr` come first; the last of
        // them is the only candidate, since ranges do not overlap.
        let pos = self
            .entries
            .partition_point(|(r, _)| r.base <= addr)
            .checked_sub(1)?;
        let (r, _) = self.entries.get(pos)?;
        r.contains(addr).then_some(pos)
    }

    /// Index of the entry whose range contains all of `[addr, addr + len)`.
    fn position_of_access(&self, addr: u64, len: usize) -> Result<usize, BusError> {
        let len = len as u64;
        let unmapped = BusError::Unmapped { addr, len };
        let pos = self.position(addr).ok_or(unmapped)?;
        let (r, _) = self.entries.get(pos).ok_or(unmapped)?;
        // `addr` is in the range, so `addr - base < r.len`.
        let room = r.len - (addr - r.base);
        if len > room {
            return Err(unmapped);
        }
        Ok(pos)
    }

    /// The handle of the range containing `addr` and the offset of `addr`
    /// in it, or `None` if no range contains `addr`.
    pub fn get(&self, addr: u64) -> Option<(&D, u64)> {
        let (r, d) = self.entries.get(self.position(addr)?)?;
        Some((d, addr - r.base))
    }

    /// Like [`Bus::get`], with a mutable handle.
    pub fn get_mut(&mut self, addr: u64) -> Option<(&mut D, u64)> {
        let pos = self.position(addr)?;
        let (r, d) = self.entries.get_mut(pos)?;
        Some((d, addr - r.base))
    }

    /// The range containing `addr`, with its handle.
    pub fn range_of(&self, addr: u64) -> Option<(BusRange, &D)> {
        let (r, d) = self.entries.get(self.position(addr)?)?;
        Some((*r, d))
    }
}

impl<D: BusDevice, const N: usize> Bus<D, N> {
    /// Dispatches a read of `data.len()` bytes at `addr` to the device whose
    /// range contains the whole access. If there is none, `data` is filled
    /// with zeros and [`BusError::Unmapped`] returned.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let pos = match self.position_of_access(addr, data.len()) {
            Ok(pos) => pos,
            Err(e) => {
                data.fill(0);
                return Err(e);
            }
        };
        if let Some((r, d)) = self.entries.get_mut(pos) {
            d.read(addr - r.base, data);
        }
        Ok(())
    }

    /// Dispatches a write of `data` at `addr` to the device whose range
    /// contains the whole access; [`BusError::Unmapped`] if there is none.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let pos = self.position_of_access(addr, data.len())?;
        if let Some((r, d)) = self.entries.get_mut(pos) {
            d.write(addr - r.base, data);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(base: u64, len: u64) -> BusRange {
        BusRange::new(base, len)
    }

    fn bus_with_one() -> Bus<u32, 4> {
        let mut bus = Bus::new();
        bus.insert(r(0x1000, 0x100), 7).unwrap();
        bus
    }

    #[test]
    fn rejects_zero_length() {
        let mut bus: Bus<u32, 4> = Bus::new();
        assert_eq!(
            bus.insert(r(0x1000, 0), 1),
            Err(BusError::ZeroLength { base: 0x1000 })
        );
        assert!(bus.is_empty());
    }

    #[test]
    fn rejects_overflow() {
        let mut bus: Bus<u32, 4> = Bus::new();
        assert_eq!(
            bus.insert(r(u64::MAX, 1), 1),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(r(u64::MAX - 0xf, 0x20), 1),
            Err(BusError::Overflow {
                base: u64::MAX - 0xf,
                len: 0x20
            })
        );
        assert!(matches!(
            bus.insert(r(1, u64::MAX), 1),
            Err(BusError::Overflow { .. })
        ));
        // The largest range whose end still fits.
        bus.insert(r(u64::MAX - 0x10, 0x10), 2).unwrap();
        assert_eq!(bus.get(u64::MAX - 1), Some((&2, 0xf)));
        assert_eq!(bus.get(u64::MAX), None);
    }

    #[test]
    fn rejects_overlap_at_both_edges() {
        let mut bus = bus_with_one();
        let overlap = |base, len| BusError::Overlap {
            base,
            len,
            existing_base: 0x1000,
            existing_len: 0x100,
        };
        // Last byte of the new range is the first byte of the old one.
        assert_eq!(bus.insert(r(0xf00, 0x101), 1), Err(overlap(0xf00, 0x101)));
        // First byte of the new range is the last byte of the old one.
        assert_eq!(bus.insert(r(0x10ff, 0x10), 1), Err(overlap(0x10ff, 0x10)));
        // Same base, inside, and enclosing.
        assert_eq!(bus.insert(r(0x1000, 1), 1), Err(overlap(0x1000, 1)));
        assert_eq!(bus.insert(r(0x1010, 0x10), 1), Err(overlap(0x1010, 0x10)));
        assert_eq!(bus.insert(r(0, 0x10000), 1), Err(overlap(0, 0x10000)));
        assert_eq!(bus.len(), 1);
    }

    #[test]
    fn adjacent_ranges_are_fine() {
        let mut bus = bus_with_one();
        bus.insert(r(0xf00, 0x100), 1).unwrap();
        bus.insert(r(0x1100, 0x100), 2).unwrap();
        assert_eq!(bus.len(), 3);
        assert_eq!(bus.get(0xfff), Some((&1, 0xff)));
        assert_eq!(bus.get(0x1000), Some((&7, 0)));
        assert_eq!(bus.get(0x10ff), Some((&7, 0xff)));
        assert_eq!(bus.get(0x1100), Some((&2, 0)));
        // Kept sorted whatever the insertion order.
        let bases: std::vec::Vec<u64> = bus.iter().map(|(r, _)| r.base).collect();
        assert_eq!(bases, [0xf00, 0x1000, 0x1100]);
    }

    #[test]
    fn lookup_first_and_last_byte_and_outside() {
        let mut bus = bus_with_one();
        bus.insert(r(0x3000, 0x10), 9).unwrap();
        assert_eq!(bus.get(0x1000), Some((&7, 0)));
        assert_eq!(bus.get(0x10ff), Some((&7, 0xff)));
        assert_eq!(bus.get(0x3000), Some((&9, 0)));
        assert_eq!(bus.get(0x300f), Some((&9, 0xf)));
        assert_eq!(bus.get(0xfff), None);
        assert_eq!(bus.get(0x1100), None);
        assert_eq!(bus.get(0x2000), None);
        assert_eq!(bus.get(0x3010), None);
        assert_eq!(bus.get(0), None);
        assert_eq!(bus.get(u64::MAX), None);
        assert_eq!(bus.range_of(0x1010), Some((r(0x1000, 0x100), &7)));
        if let Some((d, off)) = bus.get_mut(0x3004) {
            *d = 10;
            assert_eq!(off, 4);
        }
        assert_eq!(bus.get(0x3000), Some((&10, 0)));
    }

    #[test]
    fn empty_bus_finds_nothing() {
        let bus: Bus<u32, 0> = Bus::new();
        assert_eq!(bus.get(0), None);
        assert_eq!(bus.get(u64::MAX), None);
        let mut bus = bus;
        assert_eq!(bus.insert(r(0, 1), 1), Err(BusError::Full { capacity: 0 }));
    }

    #[test]
    fn capacity_full() {
        let mut bus: Bus<u32, 2> = Bus::default();
        assert_eq!(bus.capacity(), 2);
        bus.insert(r(0x100, 0x10), 1).unwrap();
        bus.insert(r(0x200, 0x10), 2).unwrap();
        assert_eq!(
            bus.insert(r(0x300, 0x10), 3),
            Err(BusError::Full { capacity: 2 })
        );
        // Overlap is reported ahead of fullness.
        assert!(matches!(
            bus.insert(r(0x100, 0x10), 3),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(bus.remove(r(0x100, 0x10)), Ok(1));
        bus.insert(r(0x300, 0x10), 3).unwrap();
        assert_eq!(bus.len(), 2);
    }

    #[test]
    fn remove_needs_the_exact_range() {
        let mut bus = bus_with_one();
        bus.insert(r(0x2000, 0x10), 8).unwrap();
        assert_eq!(
            bus.remove(r(0x1000, 0x10)),
            Err(BusError::NotFound {
                base: 0x1000,
                len: 0x10
            })
        );
        assert!(matches!(
            bus.remove(r(0x1001, 0x100)),
            Err(BusError::NotFound { .. })
        ));
        assert_eq!(bus.remove(r(0x1000, 0x100)), Ok(7));
        assert_eq!(bus.get(0x1000), None);
        assert_eq!(bus.get(0x2000), Some((&8, 0)));
        assert!(matches!(
            bus.remove(r(0x1000, 0x100)),
            Err(BusError::NotFound { .. })
        ));
        // The freed range can be reused.
        bus.insert(r(0x1080, 0x100), 5).unwrap();
        assert_eq!(bus.get(0x1100), Some((&5, 0x80)));
    }

    #[test]
    fn range_helpers() {
        assert!(r(10, 5).contains(10));
        assert!(r(10, 5).contains(14));
        assert!(!r(10, 5).contains(15));
        assert!(!r(10, 5).contains(9));
        assert!(!r(10, 0).contains(10));
        assert!(r(10, 5).overlaps(&r(14, 1)));
        assert!(r(14, 1).overlaps(&r(10, 5)));
        assert!(!r(10, 5).overlaps(&r(15, 1)));
        assert!(!r(15, 1).overlaps(&r(10, 5)));
        assert!(!r(10, 0).overlaps(&r(10, 5)));
        assert_eq!(r(10, 5).check(), Ok(15));
    }

    /// Remembers the last access and answers reads with its offset.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, usize)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for b in data.iter_mut() {
                *b = offset as u8;
            }
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.len()));
        }
    }

    #[test]
    fn dispatch_to_owned_devices() {
        let mut bus: Bus<Recorder, 2> = Bus::new();
        bus.insert(r(0x100, 0x10), Recorder::default()).unwrap();
        let mut data = [0xffu8; 4];
        bus.read(0x104, &mut data).unwrap();
        assert_eq!(data, [4; 4]);
        bus.write(0x10c, &[1, 2, 3, 4]).unwrap();
        assert_eq!(bus.get(0x100).unwrap().0.last_write, Some((0xc, 4)));
        // Straddling the end, or outside: nothing reaches the device.
        let mut data = [0xffu8; 4];
        assert_eq!(
            bus.read(0x10e, &mut data),
            Err(BusError::Unmapped {
                addr: 0x10e,
                len: 4
            })
        );
        assert_eq!(data, [0; 4]);
        assert!(bus.write(0x10d, &[0; 4]).is_err());
        assert!(bus.write(0x200, &[0]).is_err());
        assert_eq!(bus.get(0x100).unwrap().0.last_write, Some((0xc, 4)));
    }

    #[test]
    fn dispatch_through_dyn_handles() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        {
            let mut bus: Bus<&mut dyn BusDevice, 2> = Bus::new();
            bus.insert(r(0x3f8, 8), &mut a).unwrap();
            bus.insert(r(0x60, 1), &mut b).unwrap();
            bus.write(0x3fd, &[0]).unwrap();
            bus.write(0x60, &[1]).unwrap();
            assert!(bus.write(0x61, &[1]).is_err());
        }
        assert_eq!(a.last_write, Some((5, 1)));
        assert_eq!(b.last_write, Some((0, 1)));
    }
}
