//! virtio device state machines that sit behind the
//! [`MmioTransport`](crate::mmio::MmioTransport). Each parses what the guest
//! put in its queues and hands the I/O to a backend trait the host
//! implements.

pub mod blk;
pub mod fs;
pub mod net;
pub mod rng;
pub mod vsock;
