//! The virtio-rng device: the request loop over an [`EntropySource`].

use super::VIRTIO_ID_RNG;
use crate::irq::IrqLine;
use crate::memory::{GuestAddress, GuestMemory, MemoryError};
use crate::mmio::{DeviceError, VirtioContext, VirtioDevice};
use crate::queue::{drain_reporting, ChainError, DescriptorChain, Served};

/// Queue size offered to the driver.
pub const RNG_QUEUE_SIZE: u16 = 64;
/// Most bytes one request is given; the used length tells the driver how
/// many it got.
pub const MAX_CHAIN_BYTES: u32 = 64 << 10;
/// Most requests one notification serves: a full queue.
pub const MAX_CHAINS_PER_NOTIFY: u16 = RNG_QUEUE_SIZE;
/// Most bytes one notification serves (4 MiB).
pub const MAX_NOTIFY_BYTES: u64 = MAX_CHAINS_PER_NOTIFY as u64 * MAX_CHAIN_BYTES as u64;
/// Bytes taken from the source per [`EntropySource::fill`] call.
pub const BOUNCE_SIZE: usize = 4096;
/// Buffers per chain: as many as the queue holds (no indirect tables).
const CHAIN_CAPACITY: usize = RNG_QUEUE_SIZE as usize;

/// The host's entropy source failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("entropy source failed (errno {errno})")]
pub struct EntropyError {
    /// The OS error number, for the log.
    pub errno: i32,
}

/// Where the entropy comes from: the host implements it (the shim over
/// `getrandom(2)`).
///
/// It is called on the device's thread with the device's lock held, so it
/// must not block for long.
pub trait EntropySource {
    /// Fills all of `buf` with random bytes. On an error the request is
    /// answered with 0 bytes, whatever `buf` holds.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError>;
}

/// A request the device refused; it is given back with 0 bytes written.
/// Every variant is guest-triggerable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RngError {
    /// The chain holds a device-readable buffer; an entropy request is
    /// device-writable buffers only.
    #[error("entropy request holds a device-readable buffer {addr:#x}+{len:#x}")]
    ReadableBuffer {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A buffer, or a descriptor, lies outside guest memory.
    #[error("entropy request reaches {addr:#x}+{len:#x}, outside guest memory")]
    OutsideGuestMemory {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// The chain is malformed (a loop, an index out of range, an indirect
    /// descriptor, ...).
    #[error("malformed entropy request chain")]
    Malformed(#[source] ChainError),
    /// Writing the bytes into a buffer failed.
    #[error("cannot write entropy to guest memory")]
    Memory(#[source] MemoryError),
}

impl From<ChainError> for RngError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::Buffer { addr, len } => RngError::OutsideGuestMemory {
                addr,
                len: u64::from(len),
            },
            ChainError::Table(
                MemoryError::OutOfBounds { addr, len } | MemoryError::Overflow { addr, len },
            ) => RngError::OutsideGuestMemory { addr, len },
            other => RngError::Malformed(other),
        }
    }
}

/// Why a request got no bytes.
enum FillError {
    /// The guest's fault.
    Guest(RngError),
    /// The source's.
    Source(EntropyError),
}

/// What the device did so far, for the host's log and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RngStats {
    /// Requests answered with entropy (a request of 0 bytes included).
    pub requests: u64,
    /// Bytes of entropy written to the guest.
    pub bytes: u64,
    /// Requests refused ([`RngError`]), answered with 0 bytes.
    pub rejected: u64,
    /// Requests answered with 0 bytes because the source failed.
    pub source_failures: u64,
    /// Notifications that stopped at [`MAX_CHAINS_PER_NOTIFY`] with
    /// requests left on the queue.
    pub budget_stops: u64,
}

/// A virtio-rng device over entropy source `S`.
pub struct Rng<S> {
    source: S,
    bounce: [u8; BOUNCE_SIZE],
    stats: RngStats,
    last_error: Option<RngError>,
    last_source_error: Option<EntropyError>,
    /// Requests the current notification may still serve.
    chains_left: u16,
}

impl<S: EntropySource> Rng<S> {
    /// A device drawing from `source`.
    pub fn new(source: S) -> Self {
        Rng {
            source,
            bounce: [0; BOUNCE_SIZE],
            stats: RngStats::default(),
            last_error: None,
            last_source_error: None,
            chains_left: 0,
        }
    }

    /// The counters.
    pub fn stats(&self) -> RngStats {
        self.stats
    }

    /// Why the last refused request was refused.
    pub fn last_error(&self) -> Option<RngError> {
        self.last_error
    }

    /// The source's last failure.
    pub fn last_source_error(&self) -> Option<EntropyError> {
        self.last_source_error
    }

    /// The entropy source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Serves up to [`MAX_CHAINS_PER_NOTIFY`] requests on queue 0.
    fn process<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        let Some(queue) = ctx.queues.get_mut(0) else {
            return Err(DeviceError::QueueNotReady { index: 0 });
        };
        self.chains_left = MAX_CHAINS_PER_NOTIFY;
        let notify = drain_reporting::<CHAIN_CAPACITY, M, Self>(
            queue,
            ctx.mem,
            self,
            |rng| rng.chains_left > 0,
            Self::malformed,
            Self::serve,
        )
        .map_err(|source| DeviceError::Queue { index: 0, source })?;
        // Notifications stay enabled (the device never disables them), so
        // the driver notifies again for what it adds; what is left here
        // waits for that.
        if self.chains_left == 0 && queue.pending(ctx.mem).is_ok_and(|n| n > 0) {
            self.stats.budget_stops += 1;
        }
        if notify {
            ctx.interrupt.signal_used_buffer();
        }
        Ok(())
    }

    /// Counts a chain the queue could not walk.
    fn malformed(&mut self, e: ChainError) {
        self.chains_left = self.chains_left.saturating_sub(1);
        self.reject(e.into());
    }

    fn reject(&mut self, e: RngError) {
        self.stats.rejected += 1;
        self.last_error = Some(e);
    }

    /// Serves one request: says how many bytes the device wrote into it.
    fn serve<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain<CHAIN_CAPACITY>,
    ) -> Served {
        self.chains_left = self.chains_left.saturating_sub(1);
        match self.fill_chain(mem, chain) {
            Ok(written) => {
                self.stats.requests += 1;
                self.stats.bytes += u64::from(written);
                Served::Used(written)
            }
            Err(FillError::Guest(e)) => {
                self.reject(e);
                Served::Used(0)
            }
            Err(FillError::Source(e)) => {
                self.stats.source_failures += 1;
                self.last_source_error = Some(e);
                Served::Used(0)
            }
        }
    }

    /// Fills the chain's buffers in order, at most [`MAX_CHAIN_BYTES`] in
    /// all; returns the bytes written.
    fn fill_chain<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain<CHAIN_CAPACITY>,
    ) -> Result<u32, FillError> {
        if let Some(d) = chain.readable().next() {
            return Err(FillError::Guest(RngError::ReadableBuffer {
                addr: d.addr.0,
                len: d.len,
            }));
        }
        let mut written: u32 = 0;
        for d in chain.descriptors() {
            let n = d.len.min(MAX_CHAIN_BYTES - written);
            self.fill_buffer(mem, d.addr, n)?;
            written += n;
            if written == MAX_CHAIN_BYTES {
                break;
            }
        }
        Ok(written)
    }

    /// Writes `len` bytes from the source at `addr`, through the bounce
    /// buffer.
    fn fill_buffer<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        addr: GuestAddress,
        len: u32,
    ) -> Result<(), FillError> {
        let mut done: u32 = 0;
        while done < len {
            let n = ((len - done) as usize).min(BOUNCE_SIZE);
            let buf = &mut self.bounce[..n];
            self.source.fill(buf).map_err(FillError::Source)?;
            // The chain's walk checked the buffer lies in guest memory.
            addr.checked_add(u64::from(done))
                .ok_or(MemoryError::Overflow {
                    addr: addr.0,
                    len: u64::from(done),
                })
                .and_then(|at| mem.write(at, buf))
                .map_err(|e| FillError::Guest(RngError::Memory(e)))?;
            done += n as u32;
        }
        Ok(())
    }
}

impl<S: EntropySource> VirtioDevice for Rng<S> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn avail_features(&self) -> u64 {
        // None defined (5.4.3); one buffer per request needs no indirect
        // tables, and no event index.
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, _data: &mut [u8]) {
        // No configuration space: reads stay zero.
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

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

    fn reset(&mut self) {
        // Requests never outlive their notification: nothing to drop.
    }
}

#[cfg(test)]
mod tests;
