//! The 12-byte `virtio_net_hdr_v1` in front of every frame, and the
//! features a transmitted header needs the driver to have accepted.

use super::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO,
};

/// Size of `struct virtio_net_hdr_v1`. `VIRTIO_F_VERSION_1` is always in
/// effect, so `num_buffers` is always there, in both directions.
pub const HEADER_SIZE: usize = 12;
/// Byte offset of `num_buffers` in the header.
pub(super) const NUM_BUFFERS_OFFSET: usize = 10;

/// Header flag: the checksum from `csum_start` on is still to be computed
/// and stored at `csum_start + csum_offset`.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// Header flag (device to driver): the checksums are known to be valid.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// GSO type: not a segmentation offload.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// GSO type: TCP over IPv4, to be segmented.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// GSO type: UDP, to be fragmented.
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// GSO type: TCP over IPv6, to be segmented.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// GSO type: UDP, to be segmented.
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// GSO type bit: the TCP segments carry the ECN CWR flag.
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// `struct virtio_net_hdr_v1` (virtio 1.2, 5.1.6), fields little-endian on
/// the wire.
///
/// The device passes headers through as they are: the guest's to the
/// backend, the backend's to the guest. It only reads a transmitted one
/// ([`NetHeader::tx_features`]) and sets `num_buffers` in a received one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, maybe with [`VIRTIO_NET_HDR_GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum goes.
    pub csum_offset: u16,
    /// Receive buffers the frame spans (set by the device).
    pub num_buffers: u16,
}

impl NetHeader {
    /// Decodes a header.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(NUM_BUFFERS_OFFSET),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[NUM_BUFFERS_OFFSET..].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// The feature bits the driver must have accepted to send this header
    /// (virtio 1.2, 5.1.6.2): `NEEDS_CSUM` takes `VIRTIO_NET_F_CSUM`, a
    /// TCPv4 segmentation `HOST_TSO4`, TCPv6 `HOST_TSO6`, UDP
    /// fragmentation `HOST_UFO`, UDP segmentation `HOST_USO`, and the ECN
    /// bit `HOST_ECN`. `None` for a GSO type the spec does not define.
    ///
    /// Other flag bits are left to the backend (a tap ignores them).
    pub fn tx_features(&self) -> Option<u64> {
        let mut needed = 0u64;
        if self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            needed |= 1 << VIRTIO_NET_F_CSUM;
        }
        if self.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 {
            needed |= 1 << VIRTIO_NET_F_HOST_ECN;
        }
        needed |= match self.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => 0,
            VIRTIO_NET_HDR_GSO_TCPV4 => 1 << VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_UDP => 1 << VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_HDR_GSO_TCPV6 => 1 << VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP_L4 => 1 << VIRTIO_NET_F_HOST_USO,
            _ => return None,
        };
        Some(needed)
    }
}
