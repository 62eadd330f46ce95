//! Device state for snapshots: a fixed little-endian binary encoding of each
//! device's state, and the versioned, checksummed container that holds the
//! states of a VM's whole device set.
//!
//! Each device's state is a plain struct that lives with the device, which
//! saves it with `state()` and restores it with `from_state()`:
//! [`QueueState`](crate::queue::QueueState),
//! [`MmioTransportState`](crate::mmio::MmioTransportState),
//! [`VsockState`](crate::devices::vsock::VsockState),
//! [`BlockState`](crate::devices::blk::BlockState),
//! [`SerialState`](crate::legacy::SerialState) and
//! [`I8042State`](crate::legacy::I8042State). This module encodes them,
//! without allocation and without serde: [`Persist`] writes and reads one
//! value through the [`Writer`] and [`Reader`] cursors, and
//! [`StateWriter`] and [`StateReader`] put the states of many devices into
//! one buffer the caller provides, and take them out again.
//!
//! # Format, version 1
//!
//! All integers are little-endian; nothing is padded or aligned.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0      | 8    | magic, [`MAGIC`] (`"SKIFFDEV"`) |
//! | 8      | 4    | format version, [`FORMAT_VERSION`] |
//! | 12     | 4    | payload length `n` in bytes |
//! | 16     | 4    | CRC-32C ([`crc32c`]) of bytes 0 to 15, then of the payload |
//! | 20     | `n`  | payload: sections, back to back |
//!
//! A section is a [`SectionKind`] (`u16`), the device's index among devices
//! of its kind (`u16`), the length of the state (`u32`), and the state as
//! its [`Persist`] implementation encodes it. Each `(kind, index)` appears
//! at most once; their order carries no meaning.
//!
//! # Hostile input
//!
//! A state file may be truncated, corrupted or crafted. Decoding checks
//! every length before it reads and every field before it is used: a bad
//! file is a [`StateError`], never a panic or an out-of-bounds index. The
//! checksum catches accidents, not attackers, so each state's `load`
//! still rejects every value its device could not have produced, and each
//! device's `from_state` checks the state against the device it is
//! restored into (queue sizes, features, capacity, guest memory).
//!
//! Encodings are canonical: every value has exactly one encoding, and every
//! byte string that loads re-encodes to itself.

mod codec;
mod crc;
mod file;

#[cfg(test)]
mod tests;

pub use codec::{Reader, Writer};
pub use crc::{crc32c, Crc32c};
pub use file::{
    Section, Sections, StateReader, StateWriter, FORMAT_VERSION, HEADER_LEN, MAGIC,
    SECTION_HEADER_LEN,
};

use crate::queue::QueueError;

/// Errors of encoding, decoding and restoring device state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The input ends before the value it holds.
    #[error("state data ends early: {needed} bytes needed, {available} left")]
    TooShort {
        /// Bytes the next item needs.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// The input goes on after the value (or the container) ends.
    #[error("{extra} unexpected bytes after the state data")]
    TrailingBytes {
        /// Bytes left over.
        extra: usize,
    },
    /// The caller's buffer is too small for the encoding.
    #[error("state needs a buffer of {needed} bytes, got {available}")]
    BufferTooSmall {
        /// Bytes the encoding needs so far.
        needed: usize,
        /// The buffer's size.
        available: usize,
    },
    /// The data does not start with [`MAGIC`].
    #[error("not a skiff device state file (bad magic)")]
    BadMagic,
    /// The container's format version is not [`FORMAT_VERSION`].
    #[error("unsupported device state format version {version}")]
    UnsupportedVersion {
        /// The version in the header.
        version: u32,
    },
    /// The container's checksum does not match its content.
    #[error("device state checksum {stored:#010x} does not match the content ({computed:#010x})")]
    ChecksumMismatch {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the content.
        computed: u32,
    },
    /// A section has a kind this version does not know.
    #[error("unknown device state section kind {kind}")]
    UnknownSection {
        /// The raw kind.
        kind: u16,
    },
    /// Two sections have the same kind and index.
    #[error("device state section {kind:?} {index} appears twice")]
    DuplicateSection {
        /// Their kind.
        kind: SectionKind,
        /// Their index.
        index: u16,
    },
    /// The caller asked for a section the container does not hold.
    #[error("no device state section {kind:?} {index}")]
    MissingSection {
        /// The kind asked for.
        kind: SectionKind,
        /// The index asked for.
        index: u16,
    },
    /// A field holds a value its device cannot have: a flag byte with
    /// unknown bits, a count over capacity, an unreachable status, a
    /// reserved register bit.
    #[error("invalid {field} in device state: {value:#x}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// Its value (widened).
        value: u64,
    },
    /// The state does not fit the device it is restored into (another
    /// device type, other queue sizes, features the device does not offer,
    /// another disk size).
    #[error("saved {field} {saved:#x} does not match the device's {device:#x}")]
    Mismatch {
        /// What differs.
        field: &'static str,
        /// The saved value.
        saved: u64,
        /// The device's value.
        device: u64,
    },
    /// A saved queue is unusable: a ready queue whose size or rings are
    /// invalid, or lie outside guest memory.
    #[error("saved queue {index} is invalid")]
    Queue {
        /// Index of the queue.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: QueueError,
    },
}

/// A value with a fixed little-endian binary encoding.
///
/// Implementations write fields in a fixed order with the [`Writer`]'s
/// methods, and read them back in the same order, rejecting every value
/// the type's constructor or device would reject, so that a loaded state
/// is one a device could have saved.
pub trait Persist: Sized {
    /// The longest encoding of any value, in bytes (for sizing buffers).
    const MAX_LEN: usize;

    /// Appends the encoding to `w`.
    fn write_to(&self, w: &mut Writer<'_>) -> Result<(), StateError>;

    /// Decodes and checks a value from the front of `r`.
    fn read_from(r: &mut Reader<'_>) -> Result<Self, StateError>;

    /// Encodes the value at the start of `out`; returns its length.
    fn save(&self, out: &mut [u8]) -> Result<usize, StateError> {
        let mut w = Writer::new(out);
        self.write_to(&mut w)?;
        Ok(w.position())
    }

    /// Decodes a value that takes exactly `bytes`.
    fn load(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = Reader::new(bytes);
        let value = Self::read_from(&mut r)?;
        r.finish()?;
        Ok(value)
    }
}

/// A device's whole state: what one section of the container holds.
pub trait DeviceState: Persist {
    /// The kind of section that holds it.
    const KIND: SectionKind;
}

/// What a section of the container holds. The values are part of the
/// format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum SectionKind {
    /// A virtio-mmio transport: [`MmioTransportState`](crate::mmio::MmioTransportState).
    MmioTransport = 1,
    /// A vsock device: [`VsockState`](crate::devices::vsock::VsockState).
    Vsock = 2,
    /// A block device: [`BlockState`](crate::devices::blk::BlockState).
    Block = 3,
    /// A 16550A UART: [`SerialState`](crate::legacy::SerialState).
    Serial = 4,
    /// An i8042: [`I8042State`](crate::legacy::I8042State).
    I8042 = 5,
}

impl SectionKind {
    /// The kind's number in the format.
    pub const fn raw(self) -> u16 {
        self as u16
    }
}

impl TryFrom<u16> for SectionKind {
    type Error = StateError;

    fn try_from(kind: u16) -> Result<Self, StateError> {
        Ok(match kind {
            1 => SectionKind::MmioTransport,
            2 => SectionKind::Vsock,
            3 => SectionKind::Block,
            4 => SectionKind::Serial,
            5 => SectionKind::I8042,
            _ => return Err(StateError::UnknownSection { kind }),
        })
    }
}
