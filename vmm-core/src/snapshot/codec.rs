//! Cursors that write and read little-endian values in byte slices.

use super::StateError;

/// Appends little-endian values to a caller's buffer; fails, without
/// writing, when the buffer has no room left.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// A writer filling `buf` from its start.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }

    /// A writer filling `buf` from `pos` on (clamped to its length).
    pub(super) fn at(buf: &'a mut [u8], pos: usize) -> Self {
        let pos = pos.min(buf.len());
        Writer { buf, pos }
    }

    /// Bytes written so far (the offset of the next byte).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Appends `bytes`.
    pub fn bytes(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let available = self.buf.len();
        let needed = self.pos.saturating_add(bytes.len());
        let dst = self
            .buf
            .get_mut(self.pos..needed)
            .ok_or(StateError::BufferTooSmall { needed, available })?;
        dst.copy_from_slice(bytes);
        self.pos = needed;
        Ok(())
    }

    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> Result<(), StateError> {
        self.bytes(&[v])
    }

    /// Appends a little-endian `u16`.
    pub fn u16(&mut self, v: u16) -> Result<(), StateError> {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, v: u32) -> Result<(), StateError> {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, v: u64) -> Result<(), StateError> {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a boolean as one byte, 0 or 1.
    pub fn bool(&mut self, v: bool) -> Result<(), StateError> {
        self.u8(u8::from(v))
    }
}

/// Takes little-endian values off the front of a byte slice; every read
/// checks the length first, so short input is a [`StateError::TooShort`],
/// never a panic.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Takes the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let (head, tail) = self.rest.split_at_checked(n).ok_or(StateError::TooShort {
            needed: n,
            available: self.rest.len(),
        })?;
        self.rest = tail;
        Ok(head)
    }

    /// Takes the next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// Takes a byte.
    pub fn u8(&mut self) -> Result<u8, StateError> {
        self.array::<1>().map(|[b]| b)
    }

    /// Takes a little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, StateError> {
        self.array().map(u16::from_le_bytes)
    }

    /// Takes a little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, StateError> {
        self.array().map(u32::from_le_bytes)
    }

    /// Takes a little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, StateError> {
        self.array().map(u64::from_le_bytes)
    }

    /// Takes a boolean byte; anything but 0 or 1 is
    /// [`StateError::InvalidValue`] for `field`.
    pub fn bool(&mut self, field: &'static str) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(StateError::InvalidValue {
                field,
                value: u64::from(v),
            }),
        }
    }

    /// Takes a byte of flags; bits outside `known` are
    /// [`StateError::InvalidValue`] for `field`.
    pub fn flags(&mut self, field: &'static str, known: u8) -> Result<u8, StateError> {
        let v = self.u8()?;
        if v & !known != 0 {
            return Err(StateError::InvalidValue {
                field,
                value: u64::from(v),
            });
        }
        Ok(v)
    }

    /// Ends reading: bytes left over are [`StateError::TrailingBytes`].
    pub fn finish(self) -> Result<(), StateError> {
        match self.rest.len() {
            0 => Ok(()),
            extra => Err(StateError::TrailingBytes { extra }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn little_endian_round_trip() {
        let mut buf = [0u8; 16];
        let mut w = Writer::new(&mut buf);
        w.u8(0xab).unwrap();
        w.u16(0x1234).unwrap();
        w.u32(0x5678_9abc).unwrap();
        w.u64(0x0102_0304_0506_0708).unwrap();
        w.bool(true).unwrap();
        assert_eq!(w.position(), 16);
        assert_eq!(
            buf,
            [0xab, 0x34, 0x12, 0xbc, 0x9a, 0x78, 0x56, 8, 7, 6, 5, 4, 3, 2, 1, 1]
        );
        let mut r = Reader::new(&buf);
        assert_eq!(r.u8().unwrap(), 0xab);
        assert_eq!(r.u16().unwrap(), 0x1234);
        assert_eq!(r.u32().unwrap(), 0x5678_9abc);
        assert_eq!(r.u64().unwrap(), 0x0102_0304_0506_0708);
        assert!(r.bool("flag").unwrap());
        r.finish().unwrap();
    }

    #[test]
    fn full_buffer_is_an_error_and_writes_nothing() {
        let mut buf = [0u8; 3];
        let mut w = Writer::new(&mut buf);
        w.u16(0xffff).unwrap();
        assert_eq!(
            w.u16(1),
            Err(StateError::BufferTooSmall {
                needed: 4,
                available: 3
            })
        );
        assert_eq!(w.position(), 2);
        w.u8(7).unwrap();
        assert_eq!(buf, [0xff, 0xff, 7]);
        let mut w = Writer::at(&mut buf, 10);
        assert_eq!(w.position(), 3);
        assert!(w.bytes(&[]).is_ok());
    }

    #[test]
    fn short_input_and_leftovers_are_errors() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(
            r.u32(),
            Err(StateError::TooShort {
                needed: 4,
                available: 3
            })
        );
        assert_eq!(r.remaining(), 3, "a failed read consumes nothing");
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(
            r.clone().finish(),
            Err(StateError::TrailingBytes { extra: 2 })
        );
        assert_eq!(
            r.bytes(usize::MAX),
            Err(StateError::TooShort {
                needed: usize::MAX,
                available: 2
            })
        );
    }

    #[test]
    fn bools_and_flags_reject_unknown_bits() {
        let mut r = Reader::new(&[0, 1, 2, 0b101, 0b1000]);
        assert!(!r.bool("b").unwrap());
        assert!(r.bool("b").unwrap());
        assert_eq!(
            r.bool("b"),
            Err(StateError::InvalidValue {
                field: "b",
                value: 2
            })
        );
        assert_eq!(r.flags("f", 0b111).unwrap(), 0b101);
        assert_eq!(
            r.flags("f", 0b111),
            Err(StateError::InvalidValue {
                field: "f",
                value: 8
            })
        );
    }
}
