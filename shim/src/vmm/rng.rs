//! The VM's virtio-rng device: `vmm-core`'s [`Rng`] over the host's
//! `getrandom(2)` ([`GetRandom`]), behind a virtio-mmio transport.
//!
//! One lock for the registers and the queue, as for vsock, since nothing
//! here blocks: `getrandom` with flags 0 waits only until the host's
//! entropy pool is initialized, early in the host's boot and long before a
//! VM runs, and a notification serves a bounded amount (64 KiB per request,
//! [`MAX_NOTIFY_BYTES`](vmm_core::devices::rng::MAX_NOTIFY_BYTES) in all),
//! so a vCPU's register access waits at most for that.
//!
//! The device has no state of its own to snapshot: the transport's
//! ([`RngSlot::transport_state`]) is all of it.
use std::sync::Mutex;

use vmm_core::devices::rng::{EntropyError, EntropySource, Rng, RngStats};
use vmm_core::mmio::{MmioError, MmioTransport, MmioTransportState};
use vmm_core::snapshot::{Persist, StateError, StateReader, StateWriter, SECTION_HEADER_LEN};

use super::error_chain;
use super::irq::IrqFd;
use super::platform::GuestRam;
use super::slot::VirtioSlot;
use crate::sync::lock;

/// Queues of the virtio-rng device (one request queue).
pub const RNG_QUEUES: usize = 1;

/// The entropy device of one VM.
pub type RngDevice = Rng<GetRandom>;

/// The host's entropy: `getrandom(2)` with flags 0 (the kernel's CRNG, as
/// `/dev/urandom` once the pool is initialized).
#[derive(Clone, Copy, Debug, Default)]
pub struct GetRandom;

impl EntropySource for GetRandom {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
        let mut done = 0;
        while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
            // SAFETY: `rest` is valid for writes of `rest.len()` bytes for
            // the whole call, and nothing else refers to it meanwhile.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            match usize::try_from(n) {
                // A signal may cut a fill short (above 256 bytes): go on.
                Ok(n) if n > 0 => done += n,
                // Never for a non-empty buffer; do not loop on it.
                Ok(_) => return Err(EntropyError { errno: libc::EIO }),
                Err(_) => {
                    let err = std::io::Error::last_os_error();
                    if err.kind() != std::io::ErrorKind::Interrupted {
                        return Err(EntropyError {
                            errno: err.raw_os_error().unwrap_or(libc::EIO),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// The entropy device behind its transport, as its thread and the vCPUs
/// see it.
pub struct RngSlot {
    transport: Mutex<MmioTransport<RngDevice, IrqFd, RNG_QUEUES>>,
}

impl RngSlot {
    /// The device, raising interrupts on `irq`.
    pub fn new(irq: IrqFd) -> Result<Self, MmioError> {
        Ok(RngSlot {
            transport: Mutex::new(MmioTransport::new(Rng::new(GetRandom), irq)?),
        })
    }

    /// The transport's state, for a snapshot: all the device's state.
    pub fn transport_state(&self) -> MmioTransportState<RNG_QUEUES> {
        lock(&self.transport).state()
    }

    #[cfg(test)]
    /// The device's counters.
    pub fn stats(&self) -> RngStats {
        lock(&self.transport).device().stats()
    }
}

/// Logs what went wrong since `before`: the first refused request and the
/// first source failure as warnings, later ones at debug level (a guest
/// can refuse requests at will, and must not flood the log).
fn report(before: RngStats, device: &RngDevice) {
    let after = device.stats();
    let level = super::first_warn;
    if after.rejected > before.rejected {
        if let Some(e) = device.last_error() {
            log::log!(
                level(before.rejected),
                "virtio-rng: refused {} request(s), {} so far: {}",
                after.rejected - before.rejected,
                after.rejected,
                error_chain(&e)
            );
        }
    }
    if after.source_failures > before.source_failures {
        if let Some(e) = device.last_source_error() {
            log::log!(
                level(before.source_failures),
                "virtio-rng: answered {} request(s) with no bytes, {} so far: {e}",
                after.source_failures - before.source_failures,
                after.source_failures
            );
        }
    }
    if after.budget_stops > before.budget_stops {
        log::debug!("virtio-rng: a notification's budget ran out; the rest waits for the next");
    }
}

impl VirtioSlot for RngSlot {
    fn read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.transport).read(offset, data)
    }

    fn write(&self, mem: &GuestRam, offset: u64, data: &[u8]) {
        let mut transport = lock(&self.transport);
        let before = transport.device().stats();
        // A QueueNotify write without an ioeventfd is served here.
        if let Err(e) = transport.write(mem, offset, data) {
            log::warn!("virtio-rng: {}", error_chain(&e));
        }
        report(before, transport.device());
    }

    fn notify(&self, mem: &GuestRam, queue: u16) {
        let mut transport = lock(&self.transport);
        let before = transport.device().stats();
        if let Err(e) = transport.notify(mem, queue) {
            log::warn!("virtio-rng: {}", error_chain(&e));
        }
        report(before, transport.device());
    }

    fn queue_count(&self) -> usize {
        RNG_QUEUES
    }

    fn state_len(&self) -> usize {
        SECTION_HEADER_LEN + <MmioTransportState<RNG_QUEUES> as Persist>::MAX_LEN
    }

    fn state_sections(&self) -> usize {
        1
    }

    fn save(&self, w: &mut StateWriter<'_>, index: u16) -> Result<(), StateError> {
        w.add(index, &self.transport_state())
    }

    /// The transport only, and the queue served once: a request the guest
    /// queued as the snapshot was taken is answered (with this host's
    /// entropy, never the template's).
    fn restore(&self, r: &StateReader<'_>, index: u16, mem: &GuestRam) -> Result<(), StateError> {
        let state: MmioTransportState<RNG_QUEUES> = r.load(index)?;
        let mut t = lock(&self.transport);
        t.restore(&state, mem)?;
        if let Err(e) = t.notify(mem, 0) {
            log::warn!("virtio-rng: after restore: {}", error_chain(&e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vmm_core::devices::rng::VIRTIO_ID_RNG;
    use vmm_core::memory::{GuestAddress, GuestMemory};
    use vmm_core::mmio::{
        DEVICE_ID_OFFSET, INTERRUPT_STATUS_OFFSET, INT_USED_BUFFER, QUEUE_NOTIFY_OFFSET,
        STATUS_OFFSET,
    };
    use vmm_core::queue::{Descriptor, VIRTQ_DESC_F_WRITE};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::vmm::blk::testing::{guest_ram, read32, Driver};

    /// Where the driver's queue is, and its buffers.
    const QUEUE_AT: u64 = 0x10_0000;
    const BUF: u64 = 0x20_0000;

    /// An rng slot and its interrupt line's eventfd.
    fn rng_slot() -> (RngSlot, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let slot = RngSlot::new(IrqFd(irq.try_clone().unwrap())).unwrap();
        (slot, irq)
    }

    fn buffer(len: u32, flags: u16) -> Descriptor {
        Descriptor {
            addr: GuestAddress(BUF),
            len,
            flags,
            next: 0,
        }
    }

    fn guest_bytes(mem: &GuestRam, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        mem.read(GuestAddress(BUF), &mut b).unwrap();
        b
    }

    #[test]
    fn the_guest_gets_random_bytes() {
        let mem = guest_ram();
        let (slot, irq) = rng_slot();
        assert_eq!(read32(&slot, DEVICE_ID_OFFSET), VIRTIO_ID_RNG);
        assert_eq!(slot.queue_count(), 1);
        let mut driver = Driver::activate(&slot, &mem, QUEUE_AT);
        mem.write(GuestAddress(BUF), &[0; 64]).unwrap();
        let head = driver.add_chain(&[buffer(64, VIRTQ_DESC_F_WRITE)]);
        slot.notify(&mem, 0);
        assert_eq!(driver.used(), 1);
        assert_eq!(driver.used_elem(0), (u32::from(head), 64));
        // 2^-512 to fail by chance.
        assert_ne!(guest_bytes(&mem, 64), [0; 64]);
        assert_eq!(read32(&slot, INTERRUPT_STATUS_OFFSET), INT_USED_BUFFER);
        assert!(irq.read().is_ok(), "the interrupt line fired");
        let stats = slot.stats();
        assert_eq!((stats.requests, stats.bytes, stats.rejected), (1, 64, 0));

        let state = slot.transport_state();
        assert_eq!(state.device_type, VIRTIO_ID_RNG);
        assert!(state.activated);
        assert_eq!(state.queues.len(), RNG_QUEUES);
        assert_eq!(state.queues[0].next_used, 1);
    }

    #[test]
    fn a_queue_notify_register_write_is_served_on_the_vcpu() {
        let mem = guest_ram();
        let (slot, _irq) = rng_slot();
        let mut driver = Driver::activate(&slot, &mem, QUEUE_AT);
        mem.write(GuestAddress(BUF), &[0; 32]).unwrap();
        driver.add_chain(&[buffer(32, VIRTQ_DESC_F_WRITE)]);
        slot.write(&mem, QUEUE_NOTIFY_OFFSET, &0u32.to_le_bytes());
        assert_eq!(driver.used_elem(0).1, 32);
        assert_ne!(guest_bytes(&mem, 32), [0; 32]);
    }

    #[test]
    fn a_readable_buffer_gets_nothing_and_the_device_stays_live() {
        let mem = guest_ram();
        let (slot, _irq) = rng_slot();
        let mut driver = Driver::activate(&slot, &mem, QUEUE_AT);
        mem.write(GuestAddress(BUF), &[0; 64]).unwrap();
        driver.add_chain(&[buffer(64, 0)]);
        slot.notify(&mem, 0);
        assert_eq!(driver.used_elem(0).1, 0);
        assert_eq!(guest_bytes(&mem, 64), [0; 64]);
        assert_eq!(slot.stats().rejected, 1);
        assert_eq!(read32(&slot, STATUS_OFFSET), 0xf, "no NEEDS_RESET");
        // The next request is served.
        driver.add_chain(&[buffer(64, VIRTQ_DESC_F_WRITE)]);
        slot.notify(&mem, 0);
        assert_eq!(driver.used_elem(1).1, 64);
    }

    #[test]
    fn get_random_fills_every_byte_of_a_large_buffer() {
        let mut source = GetRandom;
        source.fill(&mut []).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        source.fill(&mut buf).unwrap();
        // Every 4 KiB chunk got bytes (2^-32768 each to fail by chance).
        assert!(buf.chunks(4096).all(|c| c.iter().any(|&b| b != 0)));
    }
}
