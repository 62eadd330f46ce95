//! virtio-net, the network device (virtio 1.2, section 5.1): one queue
//! pair (rx 0, tx 1), no control queue.
//!
//! Every packet, both ways, is the 12-byte `virtio_net_hdr_v1`
//! ([`NetHeader`]) and an Ethernet frame. The host's [`NetBackend`] (the
//! shim's tap, with a vnet header of the same 12 bytes) takes and gives
//! them in that layout, so the device passes headers through untouched: it
//! only checks that a transmitted header asks for no offload the driver did
//! not accept, and sets `num_buffers` in a received one. A packet is copied
//! once by the device each way, through one of two fixed bounce buffers of
//! [`MAX_PACKET_SIZE`] bytes: guest buffers to bounce buffer to
//! [`NetBackend::send`]; [`NetBackend::recv`] to bounce buffer to guest
//! buffers.
//!
//! Offered: `MAC`, `MTU`, `STATUS` (the link is always up), `MRG_RXBUF`,
//! the event index and indirect descriptors; with [`NetConfig::offloads`]
//! also `CSUM`, `GUEST_CSUM`, `HOST_TSO4/6` and `GUEST_TSO4/6`. Not UFO:
//! the Linux guests we run never send it (4.14 dropped UFO), and without it
//! the tap never has to fragment a guest's UDP.
//!
//! # Transmit
//!
//! A tx chain is device-readable buffers holding one packet, at least a
//! header and an Ethernet header, at most [`MAX_PACKET_SIZE`] bytes. The
//! device copies it into its bounce buffer and sends it; the chain goes
//! back with a used length of 0. When the backend says
//! [`NetBackendError::WouldBlock`], the chain stays on the ring and tx
//! stops until the host calls [`Net::process_tx`] again.
//!
//! # Receive
//!
//! The device reads a packet from the backend into its bounce buffer and
//! writes it into receive chains (device-writable buffers only, each at
//! least a header long). Without `MRG_RXBUF` it takes one chain, which must
//! hold the whole packet; with it, as many chains as the packet fills, and
//! `num_buffers` says how many; they reach the used ring together. A packet
//! that cannot fit (the chain, or a whole ring of chains, is too small) is
//! dropped and the chains stay for the next one. If the guest has not
//! posted enough buffers yet, the device puts the chains back, holds the
//! packet, stops reading the backend and asks the driver to notify the rx
//! queue when it posts more; that notification delivers the held packet and
//! reads on.
//!
//! # What the host calls, and when
//!
//! - A queue notification: [`MmioTransport::notify`] as for every device
//!   ([`VirtioDevice::queue_notify`]: rx serves [`Net::process_rx`], tx
//!   [`Net::process_tx`]).
//! - The backend is readable: [`Net::process_rx`]; writable:
//!   [`Net::process_tx`]. Both through [`MmioTransport::run_device`].
//! - After every call, register writes included: [`Net::interest`] says
//!   what to watch the backend for ([`NetInterest::readable`],
//!   [`NetInterest::writable`]) and whether to call [`Net::process`] again
//!   without waiting ([`NetInterest::again`]); watch nothing while the
//!   transport is not [`MmioTransport::is_live`].
//!
//! # Faults and bounds
//!
//! Every fault is answered, none panics, nothing allocates: a malformed
//! chain, a buffer the wrong way round or outside guest memory, a packet
//! too short or too long, a header asking for an offload not negotiated
//! are each a [`NetError`]; the chain goes back with 0 bytes, is counted in
//! [`NetStats::rejected`], and the device goes on. A guest cannot make the
//! host spin: a call serves at most [`MAX_TX_CHAINS_PER_CALL`] tx chains,
//! or [`MAX_RX_FRAMES_PER_CALL`] frames and [`MAX_RX_CHAINS_PER_CALL`] rx
//! chains. When a call stops at its budget with chains left, no
//! notification may come for them (with the event index the driver
//! notifies only for new chains), so [`NetInterest::again`] asks the host
//! to come back.
//!
//! # Snapshots
//!
//! The device has no state of its own worth saving, as for virtio-rng:
//! its features and queues are its transport's
//! [`MmioTransportState`](crate::mmio::MmioTransportState), so there is no
//! `NetState`. What the device holds between calls is left out on purpose:
//! a packet waiting for receive buffers is dropped (networks drop packets),
//! and a packet the backend would not take is still on the tx ring. A
//! restored device is [`Net::new`] over a fresh backend, with the saved
//! device's `offloads` (the transport refuses features the device does not
//! offer) and whatever MAC and MTU the host picks (the guest keeps those it
//! read at boot, and its agent sets the link's MAC); once the transport is
//! restored, [`Net::resume`] through [`MmioTransport::run_device`] gives
//! the backend the accepted offloads and sends what the tx ring holds.
//!
//! [`MmioTransport::notify`]: crate::mmio::MmioTransport::notify
//! [`MmioTransport::run_device`]: crate::mmio::MmioTransport::run_device
//! [`MmioTransport::is_live`]: crate::mmio::MmioTransport::is_live
//! [`VirtioDevice::queue_notify`]: crate::mmio::VirtioDevice::queue_notify

mod device;
mod header;

pub use device::{
    Net, NetBackend, NetBackendError, NetConfig, NetConfigError, NetError, NetInterest, NetStats,
    MAX_FRAME_SIZE, MAX_PACKET_SIZE, MAX_RX_CHAINS_PER_CALL, MAX_RX_FRAMES_PER_CALL,
    MAX_TX_CHAINS_PER_CALL, MIN_FRAME_SIZE, NET_QUEUE_SIZE,
};
pub use header::{
    NetHeader, HEADER_SIZE, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4,
};

/// virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Index of the receive queue (device to driver).
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue (driver to device).
pub const TX_QUEUE: u16 = 1;

/// Feature: the driver hands packets with partial checksums (tx).
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// Feature: the driver takes packets with partial checksums (rx).
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
/// Feature: `mtu` in the configuration space is valid.
pub const VIRTIO_NET_F_MTU: u32 = 3;
/// Feature: `mac` in the configuration space is valid.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// Feature: the driver takes TCPv4 segmentation offloads (rx).
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
/// Feature: the driver takes TCPv6 segmentation offloads (rx).
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
/// Feature: the driver takes TSO with ECN (rx; not offered).
pub const VIRTIO_NET_F_GUEST_ECN: u32 = 9;
/// Feature: the driver takes UDP fragmentation offloads (rx; not offered).
pub const VIRTIO_NET_F_GUEST_UFO: u32 = 10;
/// Feature: the device takes TCPv4 segmentation offloads (tx).
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
/// Feature: the device takes TCPv6 segmentation offloads (tx).
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
/// Feature: the device takes TSO with ECN (tx; not offered).
pub const VIRTIO_NET_F_HOST_ECN: u32 = 13;
/// Feature: the device takes UDP fragmentation offloads (tx; not offered).
pub const VIRTIO_NET_F_HOST_UFO: u32 = 14;
/// Feature: the driver can merge receive buffers (`num_buffers` > 1).
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// Feature: `status` in the configuration space is valid.
pub const VIRTIO_NET_F_STATUS: u32 = 16;
/// Feature: the device takes UDP segmentation offloads (tx; not offered).
pub const VIRTIO_NET_F_HOST_USO: u32 = 56;

/// `status` bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Configuration space: `mac`, 6 bytes.
pub const CONFIG_MAC_OFFSET: usize = 0;
/// Configuration space: `status`, `u16`.
pub const CONFIG_STATUS_OFFSET: usize = 6;
/// Configuration space: `max_virtqueue_pairs`, `u16` (1).
pub const CONFIG_MAX_VIRTQUEUE_PAIRS_OFFSET: usize = 8;
/// Configuration space: `mtu`, `u16`.
pub const CONFIG_MTU_OFFSET: usize = 10;
/// Size of the configuration space the device implements; reads past it
/// are zero.
pub const CONFIG_SIZE: usize = 12;
