//! virtio-vsock (virtio 1.2, section 5.10): packet parsing, the connection
//! state machine with credit-based flow control, and the device.
//!
//! Parse, then execute: [`PacketHeader`] and [`TxPacket::parse`] check what
//! the guest put on the tx queue; [`Vsock`] runs the connections against a
//! [`VsockBackend`] that the host implements (the shim's unix-socket muxer).
//! The device only speaks `VIRTIO_VSOCK_TYPE_STREAM` and only to the host
//! (CID 2). Every malformed or unexpected packet is answered with
//! `VIRTIO_VSOCK_OP_RST` or dropped; none panics, none allocates, and no
//! call blocks.
//!
//! Connections: a guest REQUEST becomes [`VsockBackend::connect`]; a host
//! connection ([`HostEvent::Connect`]) becomes a REQUEST to the guest. A
//! SHUTDOWN with `F_SEND` is that side's end of stream (the host's is its
//! socket's EOF). Once neither side will send any more, or the guest shut
//! both ways, the device sends the RST that ends a clean disconnect
//! (5.10.6.6) and forgets the connection, so it never waits on the guest
//! and needs no timer.
//!
//! Flow control follows 5.10.6.3: each side advertises `buf_alloc` (its
//! receive buffer per connection) and `fwd_cnt` (bytes it has consumed),
//! and a sender never has more than `buf_alloc - (tx_cnt - fwd_cnt)` bytes
//! in flight. Our `buf_alloc` is the backend's per-connection buffer, and
//! our `fwd_cnt` counts the bytes the backend has handed to the host socket,
//! so a guest that respects the credit can never overrun the host, and the
//! host is read only while the guest has credit.

mod connection;
mod device;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
mod packet;

pub use connection::ConnKey;
pub use device::{
    HostEvent, Recv, ReservedCidError, Vsock, VsockBackend, VsockBackendError, VsockState,
    VsockStats, VSOCK_QUEUE_SIZE,
};
pub use packet::{Op, PacketError, PacketHeader, TxPacket, HEADER_SIZE, MAX_PAYLOAD};

/// virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's CID: the only peer this device connects the guest to.
pub const VIRTIO_VSOCK_HOST_CID: u64 = 2;
/// Feature: stream sockets (the only type this device implements).
pub const VIRTIO_VSOCK_F_STREAM: u32 = 0;
/// Socket type: stream.
pub const VIRTIO_VSOCK_TYPE_STREAM: u16 = 1;
/// Socket type: seqpacket (not implemented; answered with RST).
pub const VIRTIO_VSOCK_TYPE_SEQPACKET: u16 = 2;
/// Operation: connection request.
pub const VIRTIO_VSOCK_OP_REQUEST: u16 = 1;
/// Operation: connection accepted.
pub const VIRTIO_VSOCK_OP_RESPONSE: u16 = 2;
/// Operation: connection reset (refused or aborted).
pub const VIRTIO_VSOCK_OP_RST: u16 = 3;
/// Operation: the sender will no longer receive and/or send.
pub const VIRTIO_VSOCK_OP_SHUTDOWN: u16 = 4;
/// Operation: stream data.
pub const VIRTIO_VSOCK_OP_RW: u16 = 5;
/// Operation: the sender's credit (buf_alloc, fwd_cnt) changed.
pub const VIRTIO_VSOCK_OP_CREDIT_UPDATE: u16 = 6;
/// Operation: please send a credit update.
pub const VIRTIO_VSOCK_OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flag: the sender will receive no more data.
pub const VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const VIRTIO_VSOCK_SHUTDOWN_F_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const VIRTIO_VSOCK_SHUTDOWN_F_BOTH: u32 =
    VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE | VIRTIO_VSOCK_SHUTDOWN_F_SEND;
/// Event ID: the transport was reset (all connections are gone).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Index of the receive queue (device to driver).
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue (driver to device).
pub const TX_QUEUE: u16 = 1;
/// Index of the event queue.
pub const EVENT_QUEUE: u16 = 2;
