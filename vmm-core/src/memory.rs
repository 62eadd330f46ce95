//! Guest physical memory as seen by the device core.
//!
//! The core never holds host pointers: every access goes through
//! [`GuestMemory`] with a [`GuestAddress`], and every access is bounds- and
//! overflow-checked. The platform crates implement the trait over
//! `vm-memory`; tests implement it over a slice ([`SliceMemory`]).

use core::cell::Cell;
use core::fmt;

/// A guest physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestAddress(pub u64);

impl GuestAddress {
    /// The raw address.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// `self + offset`, or `None` on overflow.
    pub const fn checked_add(self, offset: u64) -> Option<GuestAddress> {
        match self.0.checked_add(offset) {
            Some(a) => Some(GuestAddress(a)),
            None => None,
        }
    }

    /// Whether the address is a multiple of `align` (a power of two).
    pub const fn is_aligned(self, align: u64) -> bool {
        self.0 & (align - 1) == 0
    }
}

impl fmt::LowerHex for GuestAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// Errors of guest memory accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// Guest address {addr:#x} plus length {len} overflows the address space.
    #[error("guest address {addr:#x} plus length {len} overflows the address space")]
    Overflow {
        /// Start of the access.
        addr: u64,
        /// Length of the access.
        len: u64,
    },
    /// The range is not backed by guest memory.
    #[error("guest range {addr:#x}+{len:#x} is outside guest memory")]
    OutOfBounds {
        /// Start of the access.
        addr: u64,
        /// Length of the access.
        len: u64,
    },
}

/// Checks that `[addr, addr + len)` does not overflow; returns the exclusive end.
pub fn checked_end(addr: GuestAddress, len: u64) -> Result<u64, MemoryError> {
    addr.0
        .checked_add(len)
        .ok_or(MemoryError::Overflow { addr: addr.0, len })
}

/// Guest physical memory.
///
/// Implementations copy bytes; they must check the whole range before touching
/// any byte, so a failed access has no effect. Multi-byte accessors are
/// little-endian, as virtio requires.
pub trait GuestMemory {
    /// Copies `buf.len()` bytes from guest memory at `addr` into `buf`.
    fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError>;

    /// Copies `buf` into guest memory at `addr`.
    fn write(&self, addr: GuestAddress, buf: &[u8]) -> Result<(), MemoryError>;

    /// Checks that `[addr, addr + len)` is entirely backed by guest memory.
    fn check_range(&self, addr: GuestAddress, len: u64) -> Result<(), MemoryError>;

    /// Reads a little-endian `u16`.
    fn read_u16(&self, addr: GuestAddress) -> Result<u16, MemoryError> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Reads a little-endian `u32`.
    fn read_u32(&self, addr: GuestAddress) -> Result<u32, MemoryError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u64`.
    fn read_u64(&self, addr: GuestAddress) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian `u16`.
    fn write_u16(&self, addr: GuestAddress, v: u16) -> Result<(), MemoryError> {
        self.write(addr, &v.to_le_bytes())
    }

    /// Writes a little-endian `u32`.
    fn write_u32(&self, addr: GuestAddress, v: u32) -> Result<(), MemoryError> {
        self.write(addr, &v.to_le_bytes())
    }

    /// Writes a little-endian `u64`.
    fn write_u64(&self, addr: GuestAddress, v: u64) -> Result<(), MemoryError> {
        self.write(addr, &v.to_le_bytes())
    }
}

impl<M: GuestMemory + ?Sized> GuestMemory for &M {
    fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
        (**self).read(addr, buf)
    }
    fn write(&self, addr: GuestAddress, buf: &[u8]) -> Result<(), MemoryError> {
        (**self).write(addr, buf)
    }
    fn check_range(&self, addr: GuestAddress, len: u64) -> Result<(), MemoryError> {
        (**self).check_range(addr, len)
    }
}

/// Guest memory backed by a slice of cells: one contiguous region starting at
/// `base`. Used by tests and benchmarks; works without `alloc`.
///
/// Build it from a `&mut [u8]` with [`SliceMemory::new`].
pub struct SliceMemory<'a> {
    base: GuestAddress,
    bytes: &'a [Cell<u8>],
}

impl<'a> SliceMemory<'a> {
    /// Guest memory at `base`, backed by `bytes`.
    pub fn new(base: GuestAddress, bytes: &'a mut [u8]) -> Self {
        SliceMemory {
            base,
            bytes: Cell::from_mut(bytes).as_slice_of_cells(),
        }
    }

    /// The first guest address.
    pub fn base(&self) -> GuestAddress {
        self.base
    }

    /// The size in bytes.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn range(&self, addr: GuestAddress, len: usize) -> Result<&'a [Cell<u8>], MemoryError> {
        let len64 = len as u64;
        checked_end(addr, len64)?;
        let oob = MemoryError::OutOfBounds {
            addr: addr.0,
            len: len64,
        };
        let off = addr.0.checked_sub(self.base.0).ok_or(oob)?;
        let off = usize::try_from(off).map_err(|_| oob)?;
        let end = off.checked_add(len).ok_or(oob)?;
        self.bytes.get(off..end).ok_or(oob)
    }
}

impl GuestMemory for SliceMemory<'_> {
    fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
        let src = self.range(addr, buf.len())?;
        for (d, s) in buf.iter_mut().zip(src) {
            *d = s.get();
        }
        Ok(())
    }

    fn write(&self, addr: GuestAddress, buf: &[u8]) -> Result<(), MemoryError> {
        let dst = self.range(addr, buf.len())?;
        for (d, s) in dst.iter().zip(buf) {
            d.set(*s);
        }
        Ok(())
    }

    fn check_range(&self, addr: GuestAddress, len: u64) -> Result<(), MemoryError> {
        let len =
            usize::try_from(len).map_err(|_| MemoryError::OutOfBounds { addr: addr.0, len })?;
        self.range(addr, len).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn little_endian_round_trip() {
        let mut buf = [0u8; 64];
        let m = SliceMemory::new(GuestAddress(0x1000), &mut buf);
        m.write_u16(GuestAddress(0x1000), 0xbeef).unwrap();
        m.write_u32(GuestAddress(0x1004), 0xdead_beef).unwrap();
        m.write_u64(GuestAddress(0x1008), 0x0123_4567_89ab_cdef)
            .unwrap();
        assert_eq!(m.read_u16(GuestAddress(0x1000)).unwrap(), 0xbeef);
        assert_eq!(m.read_u32(GuestAddress(0x1004)).unwrap(), 0xdead_beef);
        assert_eq!(
            m.read_u64(GuestAddress(0x1008)).unwrap(),
            0x0123_4567_89ab_cdef
        );
        let mut b = [0u8; 2];
        m.read(GuestAddress(0x1000), &mut b).unwrap();
        assert_eq!(b, [0xef, 0xbe]);
    }

    #[test]
    fn bounds_are_checked_before_any_byte_moves() {
        let mut buf = [0u8; 16];
        let m = SliceMemory::new(GuestAddress(0x100), &mut buf);
        // Straddles the end: nothing is written.
        assert_eq!(
            m.write(GuestAddress(0x10e), &[1, 2, 3, 4]),
            Err(MemoryError::OutOfBounds {
                addr: 0x10e,
                len: 4
            })
        );
        assert_eq!(m.read_u16(GuestAddress(0x10e)).unwrap(), 0);
        // Below the base.
        assert!(matches!(
            m.read_u32(GuestAddress(0xfe)),
            Err(MemoryError::OutOfBounds { .. })
        ));
        // Overflowing the address space.
        assert_eq!(
            m.read_u64(GuestAddress(u64::MAX - 3)),
            Err(MemoryError::Overflow {
                addr: u64::MAX - 3,
                len: 8
            })
        );
        assert!(m.check_range(GuestAddress(0x100), 16).is_ok());
        assert!(m.check_range(GuestAddress(0x100), 17).is_err());
        assert!(m.check_range(GuestAddress(0x110), 0).is_ok());
        assert!(m.check_range(GuestAddress(u64::MAX), 2).is_err());
    }

    #[test]
    fn address_helpers() {
        assert_eq!(GuestAddress(1).checked_add(2), Some(GuestAddress(3)));
        assert_eq!(GuestAddress(u64::MAX).checked_add(1), None);
        assert!(GuestAddress(0x1000).is_aligned(16));
        assert!(!GuestAddress(0x1002).is_aligned(4));
    }
}
