//! The virtio-blk device: config space, features, and the request loop.

use super::request::data_descriptors;
use super::{
    Request, RequestError, RequestType, SECTOR_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_ID_BLOCK,
};
use crate::irq::IrqLine;
use crate::memory::{GuestAddress, GuestMemory, MemoryError};
use crate::mmio::{read_config_window, DeviceError, VirtioContext, VirtioDevice};
use crate::queue::{
    drain, DescriptorChain, Served, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::snapshot::{DeviceState, Persist, Reader, SectionKind, StateError, Writer};

/// Queue size offered to the driver.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Most data segments per request (advertised as `seg_max`).
pub const SEG_MAX: usize = 126;
/// Descriptors per chain: header, data segments, status.
const CHAIN_CAPACITY: usize = SEG_MAX + 2;
/// Bytes copied per backend call.
const BOUNCE_SIZE: usize = 4096;

/// The host end of a block device failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("block backend I/O failed (errno {errno})")]
pub struct BackendError {
    /// The OS error number, for the log.
    pub errno: i32,
}

/// Why a request's data could not be moved between the disk and guest
/// memory; the request is answered with `VIRTIO_BLK_S_IOERR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
enum TransferError {
    /// The block backend failed.
    #[error("block backend failed")]
    Backend(#[from] BackendError),
    /// The guest buffer is not accessible.
    #[error("guest buffer is not accessible")]
    Memory(#[from] MemoryError),
}

/// The host end of a block device: a disk image of
/// [`BlockBackend::capacity`] bytes.
pub trait BlockBackend {
    /// Disk size in bytes (a multiple of 512).
    fn capacity(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> Result<(), BackendError>;
}

/// A snapshot of a [`Block`] device's guest-visible state, from
/// [`Block::state`]: what the driver has read about the disk. Requests are
/// served within the notification that announces them, so none is in
/// flight between two notifications; the queue (in the transport's state)
/// says which ones are done.
///
/// Encoding (29 bytes): `capacity_sectors` (`u64`), `read_only` (`u8`, 0
/// or 1), `id` (20 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockState {
    /// The disk's size in sectors, as the configuration space reports it.
    pub capacity_sectors: u64,
    /// Whether `VIRTIO_BLK_F_RO` is offered.
    pub read_only: bool,
    /// What GET_ID returns.
    pub id: [u8; VIRTIO_BLK_ID_BYTES],
}

impl Persist for BlockState {
    const MAX_LEN: usize = 9 + VIRTIO_BLK_ID_BYTES;

    fn write_to(&self, w: &mut Writer<'_>) -> Result<(), StateError> {
        w.u64(self.capacity_sectors)?;
        w.bool(self.read_only)?;
        w.bytes(&self.id)
    }

    fn read_from(r: &mut Reader<'_>) -> Result<Self, StateError> {
        Ok(BlockState {
            capacity_sectors: r.u64()?,
            read_only: r.bool("read-only flag")?,
            id: r.array()?,
        })
    }
}

impl DeviceState for BlockState {
    const KIND: SectionKind = SectionKind::Block;
}

/// A virtio-blk device over backend `B`.
pub struct Block<B> {
    backend: B,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    config: [u8; 24],
    bounce: [u8; BOUNCE_SIZE],
    /// Requests answered with an error status (for the host's log/metrics).
    failed_requests: u64,
}

impl<B: BlockBackend> Block<B> {
    /// A device over `backend`; `id` is what GET_ID returns (NUL padded).
    pub fn new(backend: B, read_only: bool, id: &[u8]) -> Self {
        let mut dev_id = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = id.len().min(VIRTIO_BLK_ID_BYTES);
        dev_id[..n].copy_from_slice(&id[..n]);
        let mut config = [0u8; 24];
        let sectors = backend.capacity() / SECTOR_SIZE;
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        // size_max (8..12) unused; seg_max at 12.
        config[12..16].copy_from_slice(&(SEG_MAX as u32).to_le_bytes());
        Block {
            backend,
            read_only,
            id: dev_id,
            config,
            bounce: [0; BOUNCE_SIZE],
            failed_requests: 0,
        }
    }

    /// A snapshot of the device's guest-visible state.
    pub fn state(&self) -> BlockState {
        BlockState {
            capacity_sectors: self.capacity_sectors(),
            read_only: self.read_only,
            id: self.id,
        }
    }

    /// A device restored from `state`, over `backend`, which must hold a
    /// disk of the saved size ([`StateError::Mismatch`] otherwise: the
    /// driver would not know of another size). To restore with another
    /// disk, restore with one of the saved size, then
    /// [`Block::replace_backend`]. The failed-request counter starts at
    /// zero.
    pub fn from_state(state: &BlockState, backend: B) -> Result<Self, StateError> {
        let dev = Block::new(backend, state.read_only, &state.id);
        let sectors = dev.capacity_sectors();
        if sectors != state.capacity_sectors {
            return Err(StateError::Mismatch {
                field: "disk capacity in sectors",
                saved: state.capacity_sectors,
                device: sectors,
            });
        }
        Ok(dev)
    }

    /// Disk size in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.backend.capacity() / SECTOR_SIZE
    }

    /// Requests answered with an error status so far.
    pub fn failed_requests(&self) -> u64 {
        self.failed_requests
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Swaps the medium: `backend` replaces the current one (returned) and
    /// config space reports its capacity. For a disk attached to, or taken
    /// out of, a running VM; the caller then raises a configuration change
    /// interrupt ([`crate::mmio::MmioTransport::signal_config_change`]) so
    /// the driver re-reads the capacity. Requests already answered stay
    /// answered; later ones see the new medium and its bounds.
    pub fn replace_backend(&mut self, backend: B) -> B {
        let old = core::mem::replace(&mut self.backend, backend);
        let sectors = self.backend.capacity() / SECTOR_SIZE;
        self.config[0..8].copy_from_slice(&sectors.to_le_bytes());
        old
    }

    /// Runs one parsed request; returns its status.
    fn execute<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        mem: &M,
        req: &Request,
        chain: &DescriptorChain<N>,
    ) -> u8 {
        match req.kind {
            RequestType::In | RequestType::Out => {
                let mut offset = req.sector * SECTOR_SIZE;
                for d in data_descriptors(chain).iter() {
                    if self.copy(mem, req.kind, offset, d.addr, d.len).is_err() {
                        return VIRTIO_BLK_S_IOERR;
                    }
                    offset += u64::from(d.len);
                }
                VIRTIO_BLK_S_OK
            }
            RequestType::Flush => match self.backend.flush() {
                Ok(()) => VIRTIO_BLK_S_OK,
                Err(_) => VIRTIO_BLK_S_IOERR,
            },
            RequestType::GetId => {
                let mut left = &self.id[..];
                for d in data_descriptors(chain).iter() {
                    let n = left.len().min(d.len as usize);
                    if mem.write(d.addr, &left[..n]).is_err() {
                        return VIRTIO_BLK_S_IOERR;
                    }
                    left = &left[n..];
                }
                VIRTIO_BLK_S_OK
            }
            RequestType::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
        }
    }

    /// Moves `len` bytes between the disk at `offset` and guest memory at
    /// `addr`, through the bounce buffer.
    fn copy<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        kind: RequestType,
        mut offset: u64,
        addr: GuestAddress,
        len: u32,
    ) -> Result<(), TransferError> {
        let mut done: u64 = 0;
        while done < u64::from(len) {
            let n = (u64::from(len) - done).min(BOUNCE_SIZE as u64) as usize;
            let at = GuestAddress(addr.0 + done);
            let buf = &mut self.bounce[..n];
            if kind == RequestType::In {
                self.backend.read_at(offset, buf)?;
                mem.write(at, buf)?;
            } else {
                mem.read(at, buf)?;
                self.backend.write_at(offset, buf)?;
            }
            done += n as u64;
            offset += n as u64;
        }
        Ok(())
    }

    /// Serves every available request on queue 0.
    fn process<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        let Some(queue) = ctx.queues.get_mut(0) else {
            return Err(DeviceError::QueueNotReady { index: 0 });
        };
        let notify = drain::<CHAIN_CAPACITY, M, Self>(
            queue,
            ctx.mem,
            self,
            |_| true,
            |blk| blk.failed_requests += 1,
            Self::serve,
        )
        .map_err(|source| DeviceError::Queue { index: 0, source })?;
        if notify {
            ctx.interrupt.signal_used_buffer();
        }
        Ok(())
    }

    /// Serves one request: writes its status and says how many bytes the
    /// device wrote into the chain.
    fn serve<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain<CHAIN_CAPACITY>,
    ) -> Served {
        let (status, written) = match Request::parse(chain, mem, self.capacity_sectors()) {
            Ok(req) if req.kind == RequestType::Out && self.read_only => (VIRTIO_BLK_S_IOERR, 1),
            Ok(req) => {
                let s = self.execute(mem, &req, chain);
                (
                    s,
                    if s == VIRTIO_BLK_S_OK {
                        req.bytes_written()
                    } else {
                        1
                    },
                )
            }
            Err(RequestError::NoStatus) => {
                self.failed_requests += 1;
                return Served::Used(0);
            }
            Err(_) => (VIRTIO_BLK_S_IOERR, 1),
        };
        if status != VIRTIO_BLK_S_OK {
            self.failed_requests += 1;
        }
        // The status address was validated with the chain.
        if let Some(addr) = Request::status_of(chain) {
            let _ = mem.write(addr, &[status]);
        }
        Served::Used(written)
    }
}

impl<B: BlockBackend> VirtioDevice for Block<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        let mut f = (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[BLOCK_QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_window(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in our config space is writable (no WCE feature).
    }

    fn activate<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        match ctx.queues.first() {
            Some(q) if q.ready() => Ok(()),
            _ => Err(DeviceError::QueueNotReady { index: 0 }),
        }
    }

    fn queue_notify<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        queue: u16,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        if queue != 0 {
            return Ok(());
        }
        self.process(ctx)
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests;
