//! The container: a checksummed header and the sections behind it.

use super::{Crc32c, DeviceState, Reader, SectionKind, StateError, Writer};

/// The first eight bytes of a device state container.
pub const MAGIC: [u8; 8] = *b"SKIFFDEV";
/// The container format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the container header: magic, version, payload length, checksum.
pub const HEADER_LEN: usize = 20;
/// Size of a section header: kind, index, length.
pub const SECTION_HEADER_LEN: usize = 8;

/// The header bytes the checksum covers before the payload.
const CHECKED_HEADER_LEN: usize = 16;

/// The header of a payload of `len` bytes, without its checksum.
fn checked_header(len: u32) -> [u8; CHECKED_HEADER_LEN] {
    let mut h = [0u8; CHECKED_HEADER_LEN];
    let (magic, rest) = h.split_at_mut(MAGIC.len());
    magic.copy_from_slice(&MAGIC);
    let (version, length) = rest.split_at_mut(4);
    version.copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    length.copy_from_slice(&len.to_le_bytes());
    h
}

fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    let mut crc = Crc32c::new();
    crc.update(header);
    crc.update(payload);
    crc.finish()
}

/// One section of a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Section<'a> {
    /// What it holds.
    pub kind: SectionKind,
    /// Which device of that kind.
    pub index: u16,
    /// The encoded state.
    pub bytes: &'a [u8],
}

/// Decodes the section at the front of `r`.
fn read_section<'a>(r: &mut Reader<'a>) -> Result<Section<'a>, StateError> {
    let kind = SectionKind::try_from(r.u16()?)?;
    let index = r.u16()?;
    let len = r.u32()?;
    let bytes = r.bytes(usize::try_from(len).unwrap_or(usize::MAX))?;
    Ok(Section { kind, index, bytes })
}

/// The sections of a container, in order (from [`StateReader::sections`]).
#[derive(Clone, Debug)]
pub struct Sections<'a> {
    rest: Reader<'a>,
}

impl<'a> Iterator for Sections<'a> {
    type Item = Section<'a>;

    fn next(&mut self) -> Option<Section<'a>> {
        if self.rest.remaining() == 0 {
            return None;
        }
        let section = read_section(&mut self.rest).ok();
        if section.is_none() {
            // Only checked payloads are iterated; stop for good anyway.
            self.rest = Reader::new(&[]);
        }
        section
    }
}

/// Whether the (checked) payload holds a section `(kind, index)`.
fn contains(payload: &[u8], kind: SectionKind, index: u16) -> bool {
    Sections {
        rest: Reader::new(payload),
    }
    .any(|s| s.kind == kind && s.index == index)
}

/// Writes a container into a caller's buffer: [`StateWriter::add`] each
/// device's state, then [`StateWriter::finish`].
///
/// A buffer of [`HEADER_LEN`] plus, per state, [`SECTION_HEADER_LEN`] and
/// its [`Persist::MAX_LEN`](super::Persist::MAX_LEN) bytes is always large
/// enough.
#[derive(Debug)]
pub struct StateWriter<'a> {
    buf: &'a mut [u8],
    /// End of the sections written so far.
    end: usize,
}

impl<'a> StateWriter<'a> {
    /// Starts a container in `buf`. Lengths in the format are 32-bit, so
    /// room beyond 4 GiB is left unused.
    pub fn new(buf: &'a mut [u8]) -> Result<Self, StateError> {
        let max = HEADER_LEN.saturating_add(usize::try_from(u32::MAX).unwrap_or(usize::MAX));
        let cap = buf.len().min(max);
        let (buf, _) = buf.split_at_mut(cap);
        if buf.len() < HEADER_LEN {
            return Err(StateError::BufferTooSmall {
                needed: HEADER_LEN,
                available: buf.len(),
            });
        }
        Ok(StateWriter {
            buf,
            end: HEADER_LEN,
        })
    }

    /// The sections written so far (not counting the header).
    fn payload(&self) -> &[u8] {
        self.buf.get(HEADER_LEN..self.end).unwrap_or_default()
    }

    /// Appends the state of device `index` of its kind. A second state of
    /// the same kind and index is [`StateError::DuplicateSection`]; a full
    /// buffer is [`StateError::BufferTooSmall`] and leaves the container as
    /// it was.
    pub fn add<T: DeviceState>(&mut self, index: u16, state: &T) -> Result<(), StateError> {
        if contains(self.payload(), T::KIND, index) {
            return Err(StateError::DuplicateSection {
                kind: T::KIND,
                index,
            });
        }
        let start = self.end;
        let body = start.saturating_add(SECTION_HEADER_LEN);
        let available = self.buf.len();
        if body > available {
            return Err(StateError::BufferTooSmall {
                needed: body,
                available,
            });
        }
        let mut w = Writer::at(self.buf, body);
        state.write_to(&mut w)?;
        let end = w.position();
        // The buffer is capped so that every length fits.
        let len = u32::try_from(end - body).map_err(|_| StateError::BufferTooSmall {
            needed: end,
            available,
        })?;
        let mut w = Writer::at(self.buf, start);
        w.u16(T::KIND.raw())?;
        w.u16(index)?;
        w.u32(len)?;
        self.end = end;
        Ok(())
    }

    /// Writes the header and returns the container's length: the first
    /// that many bytes of the buffer.
    pub fn finish(self) -> Result<usize, StateError> {
        let end = self.end;
        let len = u32::try_from(end - HEADER_LEN).map_err(|_| StateError::BufferTooSmall {
            needed: end,
            available: self.buf.len(),
        })?;
        let head = checked_header(len);
        let crc = checksum(&head, self.payload());
        let mut w = Writer::new(self.buf);
        w.bytes(&head)?;
        w.u32(crc)?;
        Ok(end)
    }
}

/// Reads a container: checks it whole when created, then hands out its
/// sections.
#[derive(Clone, Debug)]
pub struct StateReader<'a> {
    payload: &'a [u8],
}

impl<'a> StateReader<'a> {
    /// Checks the container in `bytes` (exactly its length): magic,
    /// version, length, checksum, and that its sections are well formed,
    /// of known kinds and not duplicated.
    pub fn new(bytes: &'a [u8]) -> Result<Self, StateError> {
        let mut r = Reader::new(bytes);
        let mut header = Reader::new(r.bytes(HEADER_LEN)?);
        if header.array::<8>()? != MAGIC {
            return Err(StateError::BadMagic);
        }
        let version = header.u32()?;
        if version != FORMAT_VERSION {
            return Err(StateError::UnsupportedVersion { version });
        }
        let len = header.u32()?;
        let stored = header.u32()?;
        let payload = r
            .bytes(usize::try_from(len).unwrap_or(usize::MAX))
            .map_err(|_| StateError::TooShort {
                needed: HEADER_LEN.saturating_add(usize::try_from(len).unwrap_or(usize::MAX)),
                available: bytes.len(),
            })?;
        r.finish()?;
        let computed = checksum(&checked_header(len), payload);
        if computed != stored {
            return Err(StateError::ChecksumMismatch { stored, computed });
        }
        let mut sections = Reader::new(payload);
        while sections.remaining() > 0 {
            let before = payload.len() - sections.remaining();
            let s = read_section(&mut sections)?;
            if contains(payload.get(..before).unwrap_or_default(), s.kind, s.index) {
                return Err(StateError::DuplicateSection {
                    kind: s.kind,
                    index: s.index,
                });
            }
        }
        Ok(StateReader { payload })
    }

    /// The sections, in the order they were written.
    pub fn sections(&self) -> Sections<'a> {
        Sections {
            rest: Reader::new(self.payload),
        }
    }

    /// The encoded state of section `(kind, index)`, if there is one.
    pub fn section(&self, kind: SectionKind, index: u16) -> Option<&'a [u8]> {
        self.sections()
            .find(|s| s.kind == kind && s.index == index)
            .map(|s| s.bytes)
    }

    /// Decodes the state of device `index` of `T`'s kind
    /// ([`StateError::MissingSection`] if there is none).
    pub fn load<T: DeviceState>(&self, index: u16) -> Result<T, StateError> {
        let bytes = self
            .section(T::KIND, index)
            .ok_or(StateError::MissingSection {
                kind: T::KIND,
                index,
            })?;
        T::load(bytes)
    }
}
