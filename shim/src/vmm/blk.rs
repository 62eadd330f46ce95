//! The VM's virtio-blk devices: `vmm-core`'s [`Block`] over a [`FileDisk`],
//! behind a virtio-mmio transport, with a medium that can be swapped while
//! the VM runs.
//!
//! A disk keeps its register file and its I/O under two locks, so that a
//! vCPU never waits for the disk's I/O:
//!
//! - `regs` holds the [`MmioTransport`] over [`DiskRegs`]: the device's
//!   identity, features and configuration space (a [`Block`] that knows only
//!   the medium's capacity), and the status, queue and interrupt registers.
//!   The vCPUs take it for every register access (InterruptStatus and
//!   InterruptACK in the guest's interrupt handler, config reads), each
//!   time for one access.
//! - `io` holds the [`Block`] over the medium and a copy of the queue as the
//!   driver activated it. Only the disk's own thread takes it for long
//!   (to serve the queue: `pread`, `pwrite`, `fsync`), and it never holds
//!   it while it takes `regs`: the interrupt the requests earned is raised
//!   through the transport after `io` is released.
//!
//! The transport hands the queue to the I/O side when the driver sets
//! DRIVER_OK ([`DiskRegs`]'s `activate`) and takes it back on a reset,
//! which waits for the request in flight: after a reset the device must
//! not touch the driver's rings. A reset is rare (the driver is unloaded or
//! the guest reboots); the accesses of a running guest never wait.
//! Requests answered after a reset raise no interrupt (the `epoch` check).

use std::sync::{Arc, Mutex};

use vmm_core::devices::blk::{BackendError, Block, BlockBackend};
use vmm_core::irq::IrqLine;
use vmm_core::memory::GuestMemory;
use vmm_core::mmio::MmioTransportState;
use vmm_core::mmio::{
    DeviceError, Interrupt, MmioError, MmioTransport, VirtioContext, VirtioDevice, INT_USED_BUFFER,
    STATUS_FAILED, STATUS_NEEDS_RESET,
};
use vmm_core::queue::Queue;
use vmm_core::snapshot::{Persist, StateError, StateReader, StateWriter, SECTION_HEADER_LEN};
use vmm_sys_util::eventfd::EventFd;

use super::file_disk::FileDisk;
use super::irq::IrqFd;
use super::platform::GuestRam;
use super::slot::{DiskSlotError, VirtioSlot};
use crate::sync::lock;

/// Queues of a virtio-blk device (one request queue).
pub const DISK_QUEUES: usize = 1;

/// The name Linux gives disk `index`: `vda`, `vdb`, ... (it names
/// virtio-blk disks in probe order, which is slot order).
pub fn disk_name(index: usize) -> String {
    let mut name = String::from("vd");
    // vda..vdz, then vdaa.. as Linux does (never reached: 19 devices at most).
    if index >= 26 {
        name.push((b'a' + (index / 26 - 1) as u8) as char);
    }
    name.push((b'a' + (index % 26) as u8) as char);
    name
}

/// What GET_ID answers for disk `index` (Linux: `/sys/block/vdX/serial`):
/// `skiff-vda`, `skiff-vdb`, ..., which the agent checks.
fn disk_id(index: usize) -> String {
    skiff_agent_proto::disk_serial(&disk_name(index))
}

/// A medium's size and nothing else: the register side's [`Block`] answers
/// identity, features and configuration space from it and never does I/O.
struct Capacity(u64);

fn no_io() -> BackendError {
    BackendError { errno: libc::EIO }
}

impl BlockBackend for Capacity {
    fn capacity(&self) -> u64 {
        self.0
    }
    fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> Result<(), BackendError> {
        Err(no_io())
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), BackendError> {
        Err(no_io())
    }
    fn flush(&mut self) -> Result<(), BackendError> {
        Err(no_io())
    }
}

/// The queue as the driver activated it, owned by the I/O side until the
/// next reset.
struct LiveQueue {
    queue: Queue,
    features: u64,
    /// The register side's epoch at activation.
    epoch: u64,
}

/// A disk's I/O side: the device over its medium and the live queue.
struct DiskIo<B> {
    block: Block<B>,
    live: Option<LiveQueue>,
}

/// A disk's register side: the [`VirtioDevice`] its transport drives on
/// the vCPU threads. It never does I/O.
struct DiskRegs<B> {
    face: Block<Capacity>,
    io: Arc<Mutex<DiskIo<B>>>,
    /// Written when the driver writes QueueNotify through an MMIO exit
    /// (without an ioeventfd): the queue's notifier, which the disk's
    /// thread serves.
    kick: EventFd,
    /// Bumped on every reset.
    epoch: u64,
}

impl<B: BlockBackend> VirtioDevice for DiskRegs<B> {
    fn device_type(&self) -> u32 {
        self.face.device_type()
    }

    fn avail_features(&self) -> u64 {
        self.face.avail_features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.face.queue_max_sizes()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.face.read_config(offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.face.write_config(offset, data)
    }

    fn activate<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        self.face.activate(ctx)?;
        let queue = ctx
            .queues
            .first()
            .ok_or(DeviceError::QueueNotReady { index: 0 })?
            .clone();
        // Nothing is in flight: the last reset emptied the I/O side.
        lock(&self.io).live = Some(LiveQueue {
            queue,
            features: ctx.features,
            epoch: self.epoch,
        });
        Ok(())
    }

    fn queue_notify<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        _queue: u16,
        _ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        // The disk's thread serves the queue, as for an ioeventfd; the
        // write fails only if the counter would overflow, when a wake-up is
        // pending anyway.
        let _ = self.kick.write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        // Waits for the request in flight: after a reset the device must
        // not touch the driver's rings.
        lock(&self.io).live = None;
        self.face.reset();
    }
}

/// An interrupt line that fires nothing: the I/O side serves requests
/// with it and raises what they earned on the transport's line afterwards,
/// once it no longer holds the I/O lock.
struct Deferred;

impl IrqLine for Deferred {
    fn trigger(&self) {}
}

/// A virtio-blk device whose medium can be swapped while the VM runs.
pub struct DiskSlot<B = FileDisk> {
    regs: Mutex<MmioTransport<DiskRegs<B>, IrqFd, DISK_QUEUES>>,
    io: Arc<Mutex<DiskIo<B>>>,
}

impl<B: BlockBackend + Send> DiskSlot<B> {
    /// Disk `index` over `medium`, raising interrupts on `irq`; `kick` is
    /// (a duplicate of) the request queue's notifier, which a QueueNotify
    /// write that reaches the transport is passed on to.
    pub fn new(
        index: usize,
        medium: B,
        read_only: bool,
        irq: IrqFd,
        kick: EventFd,
    ) -> Result<Self, MmioError> {
        let id = disk_id(index);
        let face = Block::new(Capacity(medium.capacity()), read_only, id.as_bytes());
        let io = Arc::new(Mutex::new(DiskIo {
            block: Block::new(medium, read_only, id.as_bytes()),
            live: None,
        }));
        let regs = DiskRegs {
            face,
            io: io.clone(),
            kick,
            epoch: 0,
        };
        Ok(DiskSlot {
            regs: Mutex::new(MmioTransport::new(regs, irq)?),
            io,
        })
    }

    fn register_read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.regs).read(offset, data)
    }

    fn register_write(&self, mem: &GuestRam, offset: u64, data: &[u8]) {
        if let Err(e) = lock(&self.regs).write(mem, offset, data) {
            log::warn!("virtio-mmio: {e}");
        }
    }

    /// Serves the request queue: the I/O under the I/O lock only, then the
    /// interrupt (or DEVICE_NEEDS_RESET) through the transport.
    fn serve_queue(&self, mem: &GuestRam, queue: u16) {
        if usize::from(queue) >= DISK_QUEUES {
            return;
        }
        {
            let t = lock(&self.regs);
            if !t.is_activated() || t.status() & (STATUS_FAILED | STATUS_NEEDS_RESET) != 0 {
                return;
            }
        }
        let (epoch, served, used) = {
            let mut io = lock(&self.io);
            let DiskIo { block, live } = &mut *io;
            let Some(live) = live else {
                return;
            };
            let mut interrupt = Interrupt::new(Deferred);
            let mut ctx = VirtioContext {
                mem,
                queues: std::slice::from_mut(&mut live.queue),
                interrupt: &mut interrupt,
                features: live.features,
            };
            let served = block.queue_notify(queue, &mut ctx);
            (
                live.epoch,
                served,
                interrupt.status() & INT_USED_BUFFER != 0,
            )
        };
        let mut t = lock(&self.regs);
        if t.device().epoch != epoch {
            // Reset since: the driver no longer waits for these.
            return;
        }
        if used {
            t.signal_used_buffer();
        }
        if let Err(source) = served {
            t.set_needs_reset();
            log::warn!("virtio-mmio: {}", MmioError::NotifyFailed { queue, source });
        }
    }
}

impl<B: BlockBackend + Send> DiskSlot<B> {
    /// Sections `index`: the transport (its queue as the I/O side has
    /// moved it on), then the disk as the driver knows it.
    fn save_state(&self, w: &mut StateWriter<'_>, index: u16) -> Result<(), StateError> {
        let t = lock(&self.regs);
        let io = lock(&self.io);
        let mut transport = t.state();
        if let (Some(live), Some(saved)) = (&io.live, transport.queues.first_mut()) {
            *saved = live.queue.state();
        }
        w.add(index, &transport)?;
        w.add(index, &t.device().face.state())
    }

    /// Back to sections `index` of `r`: the disk must be the saved one (same
    /// size, mode and id), the transport is restored, and an activated
    /// queue goes to the I/O side, which serves whatever the driver queued
    /// (a notification in flight at the snapshot is not lost).
    fn restore_state(
        &self,
        r: &StateReader<'_>,
        index: u16,
        mem: &GuestRam,
    ) -> Result<(), StateError> {
        let transport: MmioTransportState<DISK_QUEUES> = r.load(index)?;
        let disk: vmm_core::devices::blk::BlockState = r.load(index)?;
        {
            let mut t = lock(&self.regs);
            let built = t.device().face.state();
            if disk.capacity_sectors != built.capacity_sectors {
                return Err(StateError::Mismatch {
                    field: "disk capacity in sectors",
                    saved: disk.capacity_sectors,
                    device: built.capacity_sectors,
                });
            }
            if disk != built {
                return Err(StateError::Mismatch {
                    field: "disk mode or id",
                    saved: u64::from(disk.read_only),
                    device: u64::from(built.read_only),
                });
            }
            t.restore(&transport, mem)?;
            let live = match (t.is_activated(), t.queues().first()) {
                (true, Some(queue)) => Some(LiveQueue {
                    queue: queue.clone(),
                    features: t.driver_features(),
                    epoch: t.device().epoch,
                }),
                _ => None,
            };
            lock(&self.io).live = live;
        }
        self.serve_queue(mem, 0);
        Ok(())
    }
}

/// Most bytes a disk's state takes in a container.
const DISK_STATE_LEN: usize = 2 * SECTION_HEADER_LEN
    + <MmioTransportState<DISK_QUEUES> as Persist>::MAX_LEN
    + <vmm_core::devices::blk::BlockState as Persist>::MAX_LEN;

impl DiskSlot<FileDisk> {
    fn replace_medium(&self, medium: Option<FileDisk>) -> Result<(), DiskSlotError> {
        let capacity = medium.as_ref().map_or(0, BlockBackend::capacity);
        let old = {
            // Waits for the request in flight (taking a medium out), never
            // long for an empty slot (its requests fail at once).
            let mut io = lock(&self.io);
            let busy = io.block.backend().has_medium();
            match (&medium, busy) {
                (Some(_), true) => return Err(DiskSlotError::Occupied),
                (None, false) => return Ok(()),
                _ => {}
            }
            io.block
                .replace_backend(medium.unwrap_or_else(FileDisk::none))
        };
        let mut t = lock(&self.regs);
        t.device_mut().face.replace_backend(Capacity(capacity));
        t.signal_config_change();
        drop(t);
        if let Some(path) = old.path() {
            log::debug!("disk {} taken out", path.display());
        }
        Ok(())
    }
}

impl VirtioSlot for DiskSlot<FileDisk> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.register_read(offset, data)
    }
    fn write(&self, mem: &GuestRam, offset: u64, data: &[u8]) {
        self.register_write(mem, offset, data)
    }
    fn notify(&self, mem: &GuestRam, queue: u16) {
        self.serve_queue(mem, queue)
    }
    fn queue_count(&self) -> usize {
        DISK_QUEUES
    }
    fn swap_disk(&self, medium: Option<FileDisk>) -> Result<(), DiskSlotError> {
        self.replace_medium(medium)
    }
    fn state_len(&self) -> usize {
        DISK_STATE_LEN
    }
    fn save(&self, w: &mut StateWriter<'_>, index: u16) -> Result<(), StateError> {
        self.save_state(w, index)
    }
    fn restore(&self, r: &StateReader<'_>, index: u16, mem: &GuestRam) -> Result<(), StateError> {
        self.restore_state(r, index, mem)
    }
}

/// A disk whose I/O blocks until the test lets it through, and a driver
/// that sets a disk slot up and queues requests: for the tests of the
/// disk's locks and of the device threads.
#[cfg(test)]
pub(super) mod testing {
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    use vmm_core::devices::blk::{BackendError, BlockBackend, VIRTIO_BLK_T_IN};
    use vmm_core::memory::{GuestAddress, GuestMemory};
    use vmm_core::mmio::{
        DRIVER_FEATURES_OFFSET, DRIVER_FEATURES_SEL_OFFSET, QUEUE_DESC_HIGH_OFFSET,
        QUEUE_DESC_LOW_OFFSET, QUEUE_DEVICE_HIGH_OFFSET, QUEUE_DEVICE_LOW_OFFSET,
        QUEUE_DRIVER_HIGH_OFFSET, QUEUE_DRIVER_LOW_OFFSET, QUEUE_NUM_OFFSET, QUEUE_READY_OFFSET,
        QUEUE_SEL_OFFSET, STATUS_OFFSET,
    };
    use vmm_core::queue::mock::MockSplitQueue;
    use vmm_core::queue::{Descriptor, VIRTQ_DESC_F_WRITE};
    use vmm_core::snapshot::{StateError, StateReader, StateWriter};
    use vmm_sys_util::eventfd::EventFd;

    use super::{DiskSlot, IrqFd};
    use crate::sync::{lock, wait};
    use crate::vmm::platform::{create_guest_memory, GuestRam};
    use crate::vmm::slot::VirtioSlot;

    /// What every byte read from a [`GatedDisk`] is.
    pub const GATED_BYTE: u8 = 0xab;
    /// Capacity of a [`GatedDisk`].
    pub const GATED_CAPACITY: u64 = 1 << 20;
    /// Bounded waits of these tests: generous, since a loaded host can be
    /// slow; a pass never waits this long.
    pub const PATIENCE: Duration = Duration::from_secs(20);

    #[derive(Default)]
    struct GateState {
        open: bool,
        entered: usize,
    }

    /// Holds a [`GatedDisk`]'s I/O until opened.
    #[derive(Default)]
    pub struct Gate {
        state: Mutex<GateState>,
        cv: Condvar,
    }

    impl Gate {
        /// A gate that lets I/O through (`open`) or holds it.
        pub fn new(open: bool) -> Arc<Self> {
            let gate = Gate::default();
            lock(&gate.state).open = open;
            Arc::new(gate)
        }

        /// Lets every held and later I/O through.
        pub fn open(&self) {
            lock(&self.state).open = true;
            self.cv.notify_all();
        }

        /// Waits (at most [`PATIENCE`]) until an I/O reached the gate.
        pub fn wait_entered(&self) -> bool {
            let deadline = Instant::now() + PATIENCE;
            let mut s = lock(&self.state);
            while s.entered == 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                s = self
                    .cv
                    .wait_timeout(s, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            true
        }

        fn pass(&self) {
            let mut s = lock(&self.state);
            s.entered += 1;
            self.cv.notify_all();
            while !s.open {
                s = wait(&self.cv, s);
            }
        }
    }

    /// A disk of [`GATED_CAPACITY`] bytes of [`GATED_BYTE`] whose every I/O
    /// waits at its gate.
    pub struct GatedDisk(pub Arc<Gate>);

    impl BlockBackend for GatedDisk {
        fn capacity(&self) -> u64 {
            GATED_CAPACITY
        }
        fn read_at(&mut self, _offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
            self.0.pass();
            buf.fill(GATED_BYTE);
            Ok(())
        }
        fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), BackendError> {
            self.0.pass();
            Ok(())
        }
        fn flush(&mut self) -> Result<(), BackendError> {
            self.0.pass();
            Ok(())
        }
    }

    impl VirtioSlot for DiskSlot<GatedDisk> {
        fn read(&self, offset: u64, data: &mut [u8]) {
            self.register_read(offset, data)
        }
        fn write(&self, mem: &GuestRam, offset: u64, data: &[u8]) {
            self.register_write(mem, offset, data)
        }
        fn notify(&self, mem: &GuestRam, queue: u16) {
            self.serve_queue(mem, queue)
        }
        fn queue_count(&self) -> usize {
            super::DISK_QUEUES
        }
        fn state_len(&self) -> usize {
            super::DISK_STATE_LEN
        }
        fn save(&self, w: &mut StateWriter<'_>, index: u16) -> Result<(), StateError> {
            self.save_state(w, index)
        }
        fn restore(
            &self,
            r: &StateReader<'_>,
            index: u16,
            mem: &GuestRam,
        ) -> Result<(), StateError> {
            self.restore_state(r, index, mem)
        }
    }

    /// Guest memory for the tests.
    pub fn guest_ram() -> GuestRam {
        GuestRam::new(create_guest_memory(16 << 20).unwrap())
    }

    /// A gated disk slot and what the test keeps of it: the interrupt
    /// line's eventfd and the queue notifier.
    pub struct GatedSlot {
        pub slot: DiskSlot<GatedDisk>,
        pub irq: EventFd,
        pub kick: EventFd,
    }

    /// Disk `index` over a [`GatedDisk`] behind `gate`.
    pub fn gated_slot(index: usize, gate: Arc<Gate>) -> GatedSlot {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let slot = DiskSlot::new(
            index,
            GatedDisk(gate),
            false,
            IrqFd(irq.try_clone().unwrap()),
            kick.try_clone().unwrap(),
        )
        .unwrap();
        GatedSlot { slot, irq, kick }
    }

    /// Queue size the driver sets up.
    const QUEUE_SIZE: u16 = 16;

    fn write32(slot: &dyn VirtioSlot, mem: &GuestRam, offset: u64, value: u32) {
        slot.write(mem, offset, &value.to_le_bytes());
    }

    /// Reads a 32-bit register.
    pub fn read32(slot: &dyn VirtioSlot, offset: u64) -> u32 {
        let mut b = [0; 4];
        slot.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// The driver of one disk (or of another one-queue device): its request
    /// queue at `base` in `mem` (64 KiB of it: the rings, then one
    /// request's header, data and status).
    pub struct Driver<'m> {
        mem: &'m GuestRam,
        queue: MockSplitQueue<'m, GuestRam>,
        base: u64,
    }

    impl<'m> Driver<'m> {
        /// Initialises `slot` as Linux does, up to DRIVER_OK.
        pub fn activate(slot: &dyn VirtioSlot, mem: &'m GuestRam, base: u64) -> Self {
            Self::activate_queue(slot, mem, base, 0)
        }

        /// Initialises `slot` up to DRIVER_OK with its queue `index` at
        /// `base` (and every other queue of the device ready too, on
        /// rings right after it, which this driver never fills).
        pub fn activate_queue(
            slot: &dyn VirtioSlot,
            mem: &'m GuestRam,
            base: u64,
            index: u32,
        ) -> Self {
            write32(slot, mem, STATUS_OFFSET, 1);
            write32(slot, mem, STATUS_OFFSET, 3);
            write32(slot, mem, DRIVER_FEATURES_SEL_OFFSET, 1);
            write32(slot, mem, DRIVER_FEATURES_OFFSET, 1); // VERSION_1
            write32(slot, mem, STATUS_OFFSET, 0xb);
            let mut driven = None;
            for q in 0..slot.queue_count() as u32 {
                let at = if q == index {
                    base
                } else {
                    base + 0x1_0000 * u64::from(q + 1)
                };
                let queue = MockSplitQueue::new(mem, GuestAddress(at), QUEUE_SIZE).unwrap();
                Self::set_up_queue(slot, mem, q, &queue);
                if q == index {
                    driven = Some(queue);
                }
            }
            write32(slot, mem, STATUS_OFFSET, 0xf);
            assert_eq!(read32(slot, STATUS_OFFSET), 0xf, "the device is live");
            let queue = driven.expect("the device has the queue");
            Driver { mem, queue, base }
        }

        fn set_up_queue(
            slot: &dyn VirtioSlot,
            mem: &GuestRam,
            index: u32,
            queue: &MockSplitQueue<'_, GuestRam>,
        ) {
            write32(slot, mem, QUEUE_SEL_OFFSET, index);
            write32(slot, mem, QUEUE_NUM_OFFSET, u32::from(QUEUE_SIZE));
            for (low, high, addr) in [
                (
                    QUEUE_DESC_LOW_OFFSET,
                    QUEUE_DESC_HIGH_OFFSET,
                    queue.desc_table(),
                ),
                (
                    QUEUE_DRIVER_LOW_OFFSET,
                    QUEUE_DRIVER_HIGH_OFFSET,
                    queue.avail_ring(),
                ),
                (
                    QUEUE_DEVICE_LOW_OFFSET,
                    QUEUE_DEVICE_HIGH_OFFSET,
                    queue.used_ring(),
                ),
            ] {
                write32(slot, mem, low, addr.0 as u32);
                write32(slot, mem, high, (addr.0 >> 32) as u32);
            }
            write32(slot, mem, QUEUE_READY_OFFSET, 1);
        }

        fn header(&self) -> u64 {
            self.base + 0x8000
        }
        fn data(&self) -> u64 {
            self.base + 0x9000
        }
        fn status(&self) -> u64 {
            self.base + 0xa000
        }

        /// Queues a read of sector 0 (without notifying the device).
        pub fn queue_read(&mut self) {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            self.mem
                .write(GuestAddress(self.header()), &header)
                .unwrap();
            self.mem
                .write(GuestAddress(self.status()), &[0xff])
                .unwrap();
            let desc = |addr: u64, len: u32, flags: u16| Descriptor {
                addr: GuestAddress(addr),
                len,
                flags,
                next: 0,
            };
            self.queue
                .add_chain(&[
                    desc(self.header(), 16, 0),
                    desc(self.data(), 512, VIRTQ_DESC_F_WRITE),
                    desc(self.status(), 1, VIRTQ_DESC_F_WRITE),
                ])
                .unwrap();
        }

        /// Requests the device has answered.
        pub fn used(&self) -> u16 {
            self.queue.used_idx().unwrap()
        }

        /// Publishes `bufs` as one chain (without notifying the device);
        /// for a device other than a disk. Returns the chain's head.
        pub fn add_chain(&mut self, bufs: &[Descriptor]) -> u16 {
            self.queue.add_chain(bufs).unwrap()
        }

        /// The used element in `slot`: the chain's head and the bytes the
        /// device wrote.
        pub fn used_elem(&self, slot: u16) -> (u32, u32) {
            self.queue.used_elem(slot).unwrap()
        }

        /// The last request's status byte and first data byte.
        pub fn answer(&self) -> (u8, u8) {
            let mut status = [0u8];
            let mut data = [0u8];
            self.mem
                .read(GuestAddress(self.status()), &mut status)
                .unwrap();
            self.mem.read(GuestAddress(self.data()), &mut data).unwrap();
            (status[0], data[0])
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::Arc;

    use vmm_core::devices::blk::VIRTIO_BLK_S_OK;
    use vmm_core::mmio::{
        CONFIG_GENERATION_OFFSET, CONFIG_OFFSET, INTERRUPT_ACK_OFFSET, INTERRUPT_STATUS_OFFSET,
        INT_CONFIG_CHANGE, INT_USED_BUFFER, STATUS_OFFSET,
    };

    use super::testing::*;
    use super::*;
    use crate::vmm::config::DiskConfig;

    #[test]
    fn a_vcpu_reads_the_registers_while_the_disk_is_in_io() {
        let mem = guest_ram();
        let gate = Gate::new(false);
        let disk = Arc::new(gated_slot(0, gate.clone()));
        let mut driver = Driver::activate(&disk.slot, &mem, 0x10_0000);
        driver.queue_read();

        // The disk's thread serves the queue and blocks in the read.
        let io = {
            let (disk, mem) = (disk.clone(), mem.clone());
            std::thread::spawn(move || disk.slot.notify(&mem, 0))
        };
        assert!(gate.wait_entered(), "the request reached the disk");

        // A vCPU in the guest's interrupt handler and reading the config
        // space: on its own thread, so that a regression fails the test
        // instead of hanging it.
        let (tx, rx) = mpsc::channel();
        {
            let (disk, mem) = (disk.clone(), mem.clone());
            std::thread::spawn(move || {
                let status = read32(&disk.slot, STATUS_OFFSET);
                let pending = read32(&disk.slot, INTERRUPT_STATUS_OFFSET);
                disk.slot
                    .write(&mem, INTERRUPT_ACK_OFFSET, &pending.to_le_bytes());
                let mut capacity = [0u8; 8];
                disk.slot.read(CONFIG_OFFSET, &mut capacity);
                let _ = tx.send((status, pending, u64::from_le_bytes(capacity)));
            });
        }
        let (status, pending, sectors) = rx
            .recv_timeout(PATIENCE)
            .expect("a register access waited for the disk's I/O");
        assert_eq!((status, pending), (0xf, 0));
        assert_eq!(sectors, GATED_CAPACITY / 512);
        assert_eq!(driver.used(), 0, "the request is still in flight");

        gate.open();
        io.join().unwrap();
        assert_eq!(driver.used(), 1);
        assert_eq!(driver.answer(), (VIRTIO_BLK_S_OK, GATED_BYTE));
        assert_eq!(read32(&disk.slot, INTERRUPT_STATUS_OFFSET), INT_USED_BUFFER);
        assert!(disk.irq.read().is_ok(), "the interrupt line fired");
    }

    #[test]
    fn a_reset_waits_for_the_request_in_flight_and_silences_it() {
        let mem = guest_ram();
        let gate = Gate::new(false);
        let disk = Arc::new(gated_slot(0, gate.clone()));
        let mut driver = Driver::activate(&disk.slot, &mem, 0x10_0000);
        driver.queue_read();
        let io = {
            let (disk, mem) = (disk.clone(), mem.clone());
            std::thread::spawn(move || disk.slot.notify(&mem, 0))
        };
        assert!(gate.wait_entered(), "the request reached the disk");

        let (tx, rx) = mpsc::channel();
        {
            let (disk, mem) = (disk.clone(), mem.clone());
            std::thread::spawn(move || {
                disk.slot.write(&mem, STATUS_OFFSET, &0u32.to_le_bytes());
                let _ = tx.send(());
            });
        }
        // After a reset the device must not touch the rings: the reset
        // returns only once the request in flight is done.
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "the reset did not wait for the request in flight"
        );
        gate.open();
        rx.recv_timeout(PATIENCE).expect("the reset finished");
        io.join().unwrap();
        assert_eq!(driver.used(), 1, "the request was answered before");
        // ...but the driver that reset the device hears nothing of it.
        assert_eq!(read32(&disk.slot, STATUS_OFFSET), 0);
        assert_eq!(read32(&disk.slot, INTERRUPT_STATUS_OFFSET), 0);
        assert!(disk.irq.read().is_err(), "no interrupt after the reset");
        // A notification now finds no live queue.
        driver.queue_read();
        disk.slot.notify(&mem, 0);
        assert_eq!(driver.used(), 1);
    }

    #[test]
    fn a_queue_notify_register_write_is_served_by_the_disks_thread() {
        let mem = guest_ram();
        let disk = gated_slot(0, Gate::new(true));
        let mut driver = Driver::activate(&disk.slot, &mem, 0x10_0000);
        driver.queue_read();
        disk.slot.write(
            &mem,
            vmm_core::mmio::QUEUE_NOTIFY_OFFSET,
            &0u32.to_le_bytes(),
        );
        // The vCPU did no I/O: it passed the notification on.
        assert_eq!(driver.used(), 0);
        assert_eq!(disk.kick.read().unwrap(), 1);
        disk.slot.notify(&mem, 0);
        assert_eq!(driver.used(), 1);
    }

    #[test]
    fn a_swapped_medium_shows_in_the_config_space_with_an_interrupt() {
        let mem = guest_ram();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![7u8; 4096]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let slot = DiskSlot::new(
            0,
            FileDisk::none(),
            false,
            IrqFd(irq.try_clone().unwrap()),
            kick,
        )
        .unwrap();
        let _driver = Driver::activate(&slot, &mem, 0x10_0000);
        let sectors = |slot: &DiskSlot| {
            let mut b = [0u8; 8];
            slot.read(CONFIG_OFFSET, &mut b);
            u64::from_le_bytes(b)
        };
        assert_eq!(sectors(&slot), 0);
        let generation = read32(&slot, CONFIG_GENERATION_OFFSET);

        let disk = DiskConfig {
            path: Some(image),
            read_only: false,
        };
        slot.swap_disk(Some(FileDisk::open(&disk).unwrap()))
            .unwrap();
        assert_eq!(sectors(&slot), 8);
        assert_eq!(read32(&slot, INTERRUPT_STATUS_OFFSET), INT_CONFIG_CHANGE);
        assert_ne!(read32(&slot, CONFIG_GENERATION_OFFSET), generation);
        assert!(irq.read().is_ok());
        assert!(matches!(
            slot.swap_disk(Some(FileDisk::open(&disk).unwrap())),
            Err(DiskSlotError::Occupied)
        ));
        slot.swap_disk(None).unwrap();
        assert_eq!(sectors(&slot), 0);
    }
}
