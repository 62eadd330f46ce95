//! virtio-rng, the entropy device (virtio 1.2, section 5.4).
//!
//! One request queue, no feature bits, no configuration space. Each request
//! is a chain of device-writable buffers; [`Rng`] fills them with bytes from
//! an [`EntropySource`] the host implements (the shim's is `getrandom(2)`)
//! and gives the chain back with the number of bytes written.
//!
//! Every fault is answered, none panics, nothing allocates: a chain with a
//! device-readable buffer, a malformed chain, or a buffer outside guest
//! memory is given back with 0 bytes written and recorded as an
//! [`RngError`]; a failing source is answered the same way (the driver
//! asks again) and counted in [`RngStats::source_failures`]. Bytes go
//! through a fixed bounce buffer of [`BOUNCE_SIZE`] bytes.
//!
//! # Bounds
//!
//! A guest cannot make the host spin: a chain gets at most
//! [`MAX_CHAIN_BYTES`] (the used length tells the driver how many), and a
//! notification serves at most [`MAX_CHAINS_PER_NOTIFY`] chains, so at
//! most [`MAX_NOTIFY_BYTES`]. That budget covers a full queue, so every
//! chain the driver made available before it notified is served by that
//! notification; only chains it keeps adding while the device works can be
//! left for later, and each of those comes with a notification of its own
//! (the device never suppresses notifications).
//!
//! # Snapshots
//!
//! The device has no guest-visible state of its own: no configuration
//! space, no features, and every request is answered within the
//! notification that announced it. Its transport's
//! [`MmioTransportState`](crate::mmio::MmioTransportState) (registers and
//! the queue) is all there is to save, so there is no `RngState`; a
//! restored device is [`Rng::new`] over a fresh source, its counters at
//! zero.

mod device;

pub use device::{
    EntropyError, EntropySource, Rng, RngError, RngStats, BOUNCE_SIZE, MAX_CHAINS_PER_NOTIFY,
    MAX_CHAIN_BYTES, MAX_NOTIFY_BYTES, RNG_QUEUE_SIZE,
};

/// virtio device ID of an entropy device.
pub const VIRTIO_ID_RNG: u32 = 4;
