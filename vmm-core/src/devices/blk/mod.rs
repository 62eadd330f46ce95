//! virtio-blk (virtio 1.2, section 5.2): request parsing and the device.
//!
//! Parse, then execute: [`Request::parse`] checks a descriptor chain's
//! shape; [`Block`] runs parsed requests against a [`BlockBackend`] that the
//! host implements over a file. Every malformed request is answered (with
//! `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP` when the guest gave us a
//! status byte, or a zero-length used entry when it did not); none panics.

mod device;
mod request;

pub use device::{BackendError, Block, BlockBackend, BlockState, BLOCK_QUEUE_SIZE, SEG_MAX};
pub use request::{Request, RequestError, RequestType};

/// virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Sector size the protocol counts in.
pub const SECTOR_SIZE: u64 = 512;
/// Feature: `seg_max` in config space is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature: the device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature: the device supports `VIRTIO_BLK_T_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Request type: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error (or a malformed request).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the device ID string.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
