//! The 44-byte packet header and parsing a tx packet out of a descriptor
//! chain.

use super::{
    VIRTIO_VSOCK_OP_CREDIT_REQUEST, VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN,
};
use crate::memory::{GuestMemory, MemoryError};
use crate::queue::{copy_from_chain, DescriptorChain};

/// Size of `struct virtio_vsock_hdr`.
pub const HEADER_SIZE: usize = 44;
/// Largest payload the device accepts in one tx packet (Linux sends at most
/// 64 KiB).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// `struct virtio_vsock_hdr` (all fields little-endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`VIRTIO_VSOCK_TYPE_*`).
    pub type_: u16,
    /// Operation (`VIRTIO_VSOCK_OP_*`).
    pub op: u16,
    /// Operation flags (SHUTDOWN flags).
    pub flags: u32,
    /// The sender's receive buffer for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Decodes a header.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let u32_at = |o: usize| {
            let mut x = [0u8; 4];
            x.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(x)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        PacketHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The operation, if it is one the spec defines.
    pub fn operation(&self) -> Option<Op> {
        Op::from_raw(self.op)
    }
}

/// A vsock operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `VIRTIO_VSOCK_OP_REQUEST`.
    Request,
    /// `VIRTIO_VSOCK_OP_RESPONSE`.
    Response,
    /// `VIRTIO_VSOCK_OP_RST`.
    Rst,
    /// `VIRTIO_VSOCK_OP_SHUTDOWN`.
    Shutdown,
    /// `VIRTIO_VSOCK_OP_RW`.
    Rw,
    /// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`.
    CreditUpdate,
    /// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`.
    CreditRequest,
}

impl Op {
    /// The operation with wire value `op`.
    pub fn from_raw(op: u16) -> Option<Op> {
        Some(match op {
            VIRTIO_VSOCK_OP_REQUEST => Op::Request,
            VIRTIO_VSOCK_OP_RESPONSE => Op::Response,
            VIRTIO_VSOCK_OP_RST => Op::Rst,
            VIRTIO_VSOCK_OP_SHUTDOWN => Op::Shutdown,
            VIRTIO_VSOCK_OP_RW => Op::Rw,
            VIRTIO_VSOCK_OP_CREDIT_UPDATE => Op::CreditUpdate,
            VIRTIO_VSOCK_OP_CREDIT_REQUEST => Op::CreditRequest,
            _ => return None,
        })
    }

    /// The wire value.
    pub fn raw(self) -> u16 {
        match self {
            Op::Request => VIRTIO_VSOCK_OP_REQUEST,
            Op::Response => VIRTIO_VSOCK_OP_RESPONSE,
            Op::Rst => VIRTIO_VSOCK_OP_RST,
            Op::Shutdown => VIRTIO_VSOCK_OP_SHUTDOWN,
            Op::Rw => VIRTIO_VSOCK_OP_RW,
            Op::CreditUpdate => VIRTIO_VSOCK_OP_CREDIT_UPDATE,
            Op::CreditRequest => VIRTIO_VSOCK_OP_CREDIT_REQUEST,
        }
    }
}

/// A malformed tx packet. Every variant is guest-triggerable; those that
/// carry the header can be answered with RST.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain's readable buffers hold fewer than 44 bytes.
    #[error("tx chain holds {len} readable bytes, less than a header")]
    TooShort {
        /// Readable bytes in the chain.
        len: u32,
    },
    /// A tx chain contains a device-writable buffer.
    #[error("tx chain contains a device-writable buffer")]
    WritableBuffer,
    /// The header's `len` exceeds the bytes that follow it in the chain.
    #[error("header says {len} payload bytes, the chain holds {available}")]
    BadLength {
        /// The header.
        header: PacketHeader,
        /// The header's `len`.
        len: u32,
        /// Payload bytes in the chain.
        available: u32,
    },
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("payload of {len} bytes exceeds the maximum")]
    TooLong {
        /// The header.
        header: PacketHeader,
        /// The header's `len`.
        len: u32,
    },
    /// Reading the chain failed.
    #[error("cannot read the tx chain")]
    Memory(#[source] MemoryError),
}

impl PacketError {
    /// The packet's header, if it could be read (then the packet can be
    /// answered with RST).
    pub fn header(&self) -> Option<PacketHeader> {
        match self {
            PacketError::BadLength { header, .. } | PacketError::TooLong { header, .. } => {
                Some(*header)
            }
            _ => None,
        }
    }
}

/// A parsed tx packet: the header and where its payload lies in the chain
/// (right after the header, in the readable buffers; the header may span
/// buffers or share one with the payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxPacket {
    /// The header.
    pub header: PacketHeader,
}

impl TxPacket {
    /// Parses the header of the packet in `chain` and checks that the
    /// payload it announces is there.
    pub fn parse<M: GuestMemory + ?Sized, const N: usize>(
        chain: &DescriptorChain<N>,
        mem: &M,
    ) -> Result<TxPacket, PacketError> {
        if chain.writable().next().is_some() {
            return Err(PacketError::WritableBuffer);
        }
        // Walked chains add up to less than 4 GiB.
        let total: u32 = chain.readable().map(|d| d.len).sum();
        if (total as usize) < HEADER_SIZE {
            return Err(PacketError::TooShort { len: total });
        }
        let mut raw = [0u8; HEADER_SIZE];
        copy_from_chain(mem, chain.descriptors(), 0, &mut raw).map_err(PacketError::Memory)?;
        let header = PacketHeader::from_bytes(&raw);
        let available = total - HEADER_SIZE as u32;
        if header.len > MAX_PAYLOAD {
            return Err(PacketError::TooLong {
                header,
                len: header.len,
            });
        }
        if header.len > available {
            return Err(PacketError::BadLength {
                header,
                len: header.len,
                available,
            });
        }
        Ok(TxPacket { header })
    }
}
