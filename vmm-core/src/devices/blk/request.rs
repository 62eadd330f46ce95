//! Parsing a virtio-blk request out of a descriptor chain.

use super::{
    SECTOR_SIZE, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use crate::memory::{GuestAddress, GuestMemory, MemoryError};
use crate::queue::{Descriptor, DescriptorChain};

/// Size of the request header (`type`, `reserved`, `sector`).
pub const HEADER_SIZE: u32 = 16;

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Return the device ID string.
    GetId,
    /// Anything else; answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

/// A malformed request. Every variant is guest-triggerable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain has no writable status byte at its end; nothing can be
    /// reported to the guest.
    #[error("request has no writable status byte")]
    NoStatus,
    /// The header descriptor is missing, too short, or device-writable.
    #[error("request header is missing, shorter than 16 bytes, or writable")]
    BadHeader,
    /// A data buffer has the wrong direction for the request type.
    #[error("data buffer has the wrong direction for the request")]
    BadDataDirection,
    /// The data length is not a whole number of sectors.
    #[error("data length {len} is not a multiple of 512")]
    UnalignedData {
        /// Total data length.
        len: u32,
    },
    /// The request reaches past the end of the disk.
    #[error("sectors {sector}+{sectors} are past the end of the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
    },
    /// A GET_ID buffer is missing.
    #[error("GET_ID request has no data buffer")]
    NoIdBuffer,
    /// Reading the header from guest memory failed.
    #[error("cannot read the request header")]
    Memory(#[source] MemoryError),
}

/// A parsed request; the data buffers are the chain's descriptors between
/// the header and the status byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The request type.
    pub kind: RequestType,
    /// First sector.
    pub sector: u64,
    /// Total length of the data buffers.
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Parses the chain: header first, status byte last, data in between.
    /// `capacity` is the disk size in sectors.
    ///
    /// On an error other than [`RequestError::NoStatus`], the caller can still
    /// write `VIRTIO_BLK_S_IOERR` to [`Request::status_of`].
    pub fn parse<M: GuestMemory + ?Sized, const N: usize>(
        chain: &DescriptorChain<N>,
        mem: &M,
        capacity: u64,
    ) -> Result<Request, RequestError> {
        let status = Self::status_of(chain).ok_or(RequestError::NoStatus)?;
        let descs = chain.descriptors();
        let header = match descs.first() {
            Some(h) if descs.len() >= 2 && !h.is_write_only() && h.len >= HEADER_SIZE => *h,
            _ => return Err(RequestError::BadHeader),
        };
        let mut raw = [0u8; HEADER_SIZE as usize];
        mem.read(header.addr, &mut raw)
            .map_err(RequestError::Memory)?;
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = raw;
        let kind = match u32::from_le_bytes([t0, t1, t2, t3]) {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        };
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let data = data_descriptors(chain);
        // Chains are walked with a total length that fits u32.
        let data_len: u32 = data.iter().map(|d| d.len).sum();
        let req = Request {
            kind,
            sector,
            data_len,
            status,
        };
        match kind {
            RequestType::In | RequestType::Out => {
                let want_writable = kind == RequestType::In;
                if data.iter().any(|d| d.is_write_only() != want_writable) {
                    return Err(RequestError::BadDataDirection);
                }
                if u64::from(data_len) % SECTOR_SIZE != 0 {
                    return Err(RequestError::UnalignedData { len: data_len });
                }
                let sectors = u64::from(data_len) / SECTOR_SIZE;
                if sector.checked_add(sectors).is_none_or(|end| end > capacity) {
                    return Err(RequestError::OutOfRange { sector, sectors });
                }
            }
            RequestType::GetId => {
                if data.is_empty() {
                    return Err(RequestError::NoIdBuffer);
                }
                if data.iter().any(|d| !d.is_write_only()) {
                    return Err(RequestError::BadDataDirection);
                }
            }
            RequestType::Flush | RequestType::Unsupported(_) => {}
        }
        Ok(req)
    }

    /// The status byte's address: the first byte of the last descriptor, if
    /// that descriptor is device-writable.
    pub fn status_of<const N: usize>(chain: &DescriptorChain<N>) -> Option<GuestAddress> {
        match chain.descriptors().last() {
            Some(d) if d.is_write_only() && d.len >= 1 => {
                // The status is the last byte of the last buffer (a driver
                // may merge data and status into one descriptor).
                d.addr.checked_add(u64::from(d.len) - 1)
            }
            _ => None,
        }
    }

    /// Number of bytes the device writes into guest buffers for this request
    /// when it succeeds (for the used ring), status byte included.
    pub fn bytes_written(&self) -> u32 {
        match self.kind {
            RequestType::In => self.data_len.saturating_add(1),
            RequestType::GetId => (VIRTIO_BLK_ID_BYTES as u32).min(self.data_len) + 1,
            _ => 1,
        }
    }
}

/// The data buffers of a chain: everything between the header and the
/// status descriptor. A status byte merged into the last data buffer is
/// excluded from it.
pub fn data_descriptors<const N: usize>(chain: &DescriptorChain<N>) -> DataBuffers<'_> {
    let descs = chain.descriptors();
    let inner = if descs.len() >= 2 {
        &descs[1..descs.len() - 1]
    } else {
        &[]
    };
    let last = descs
        .last()
        .filter(|d| descs.len() >= 2 && d.len > 1)
        .map(|d| Descriptor {
            len: d.len - 1,
            ..*d
        });
    DataBuffers { inner, last }
}

/// The data buffers of a request (see [`data_descriptors`]).
#[derive(Clone, Copy, Debug)]
pub struct DataBuffers<'a> {
    inner: &'a [Descriptor],
    last: Option<Descriptor>,
}

impl DataBuffers<'_> {
    /// The buffers in order.
    pub fn iter(&self) -> impl Iterator<Item = Descriptor> + '_ {
        self.inner.iter().copied().chain(self.last)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty() && self.last.is_none()
    }
}
