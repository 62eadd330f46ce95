//! The VM's devices and the buses that route exits to them.
//!
//! Port I/O: the 16550 UART at 0x3f8 and the i8042 at 0x60/0x64. MMIO: the
//! boot-timer pseudo-device and the virtio-mmio windows. Buses are built
//! once and then only read, so lookups take no lock; each device has its own
//! lock, held by a vCPU only for the duration of one access.
//!
//! Each virtio device has its own thread ([`spawn_device_thread`], named
//! `vmm-blk0`, `vmm-blk1`, ..., `vmm-vsock`) with its own epoll over the
//! device's queue-notification ioeventfds, the vsock muxer's host fd, and a
//! wake eventfd that makes it look at the stop flag; all of its life is
//! `serve_device`, whose top is the place for per-thread setup. So a disk
//! busy with synchronous I/O delays only its own queue: not the vsock
//! device (the agent's channel, and with it Delete and Shutdown), not
//! another disk.
//! The vCPUs do not wait for a disk's I/O either: a disk keeps its
//! registers and its I/O under separate locks (see `blk.rs`).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_core::bus::{Bus, BusRange};
use vmm_core::legacy::i8042::{I8042State, ResetSink, I8042, I8042_PORT_SPAN};
use vmm_core::legacy::serial::{Serial, SerialSink, SerialState};
use vmm_core::mmio::QUEUE_NOTIFY_OFFSET;
use vmm_core::snapshot::{
    Persist, StateError, StateReader, StateWriter, HEADER_LEN, SECTION_HEADER_LEN,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::blk::{DiskSlot, DISK_QUEUES};
use super::config::{SerialOutput, VmConfig};
use super::file_disk::{FileDisk, FileDiskError};
use super::fs_slot::{FsSetupError, FsSlot, FS_QUEUES};
use super::irq::IrqFd;
use super::net::{NetSetupError, NetSlot, NET_QUEUES};
use super::platform::layout;
use super::platform::GuestRam;
use super::rng::{RngSlot, RNG_QUEUES};
use super::seccomp::{handoff, Installed, Installer};
use super::serial_log::{SerialLog, SERIAL_LOG_CAP_BYTES};
use super::shared::{ExitReason, Shared};
use super::slot::{DiskSlotError, VirtioSlot};
use super::vsock::{VsockSetupError, VsockSlot, VSOCK_QUEUES};
use crate::sync::lock;

/// The value the guest's init writes to the boot timer.
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// Most virtio devices per VM (IRQs 5..=23).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Errors setting devices up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The serial output file could not be created.
    #[error("cannot create serial output file {}", path.display())]
    SerialFile {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An irqfd or ioeventfd could not be registered.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What we tried.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A bus range collided or the bus is full.
    #[error("cannot place a device on the bus")]
    Bus(#[from] vmm_core::bus::BusError),
    /// A virtio transport could not be built.
    #[error("cannot build a virtio-mmio transport")]
    Transport(#[from] vmm_core::mmio::MmioError),
    /// A disk could not be opened.
    #[error(transparent)]
    Disk(#[from] FileDiskError),
    /// Too many virtio devices.
    #[error("at most {MAX_VIRTIO_DEVICES} virtio devices are supported")]
    TooManyDevices,
    /// The vsock device could not be set up.
    #[error("cannot set up the vsock device")]
    Vsock(#[from] VsockSetupError),
    /// The NIC could not be set up.
    #[error("cannot set up the NIC")]
    Net(#[from] NetSetupError),
    /// The virtio-fs share.
    #[error("cannot set up the virtio-fs share")]
    Fs(#[from] FsSetupError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DeviceSetupError {
    move |source| DeviceSetupError::Kvm { what, source }
}

/// Builds the virtio devices `config` asks for, in window order; device `i`
/// raises IRQ `VIRTIO_IRQ_BASE + i`.
fn build_virtio_devices(vm: &VmFd, config: &VmConfig) -> Result<Vec<VirtioUnit>, DeviceSetupError> {
    let mut units = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let irq = irq_line(vm, layout::VIRTIO_IRQ_BASE + i as u32)?;
        let medium = FileDisk::open(disk)?;
        let notifiers = new_notifiers(DISK_QUEUES)?;
        let kick = notifiers[0]
            .try_clone()
            .map_err(DeviceSetupError::EventFd)?;
        let slot = DiskSlot::new(i, medium, disk.read_only, irq, kick)?;
        units.push(VirtioUnit::new(
            format!("vmm-blk{i}"),
            Box::new(slot),
            notifiers,
        )?);
    }
    if let Some(vsock) = &config.vsock {
        let irq = irq_line(vm, layout::VIRTIO_IRQ_BASE + units.len() as u32)?;
        let slot = VsockSlot::new(vsock, irq)?;
        let notifiers = new_notifiers(VSOCK_QUEUES)?;
        units.push(VirtioUnit::new(
            "vmm-vsock".into(),
            Box::new(slot),
            notifiers,
        )?);
    }
    if config.rng {
        let irq = irq_line(vm, layout::VIRTIO_IRQ_BASE + units.len() as u32)?;
        units.push(VirtioUnit::new(
            "vmm-rng".into(),
            Box::new(RngSlot::new(irq)?),
            new_notifiers(RNG_QUEUES)?,
        )?);
    }
    if let Some(net) = &config.net {
        let irq = irq_line(vm, layout::VIRTIO_IRQ_BASE + units.len() as u32)?;
        units.push(VirtioUnit::new(
            "vmm-net".into(),
            Box::new(NetSlot::new(net, irq)?),
            new_notifiers(NET_QUEUES)?,
        )?);
    }
    if let Some(fs) = &config.fs {
        let irq = irq_line(vm, layout::VIRTIO_IRQ_BASE + units.len() as u32)?;
        units.push(VirtioUnit::new(
            "vmm-fs".into(),
            Box::new(FsSlot::new(fs, irq)?),
            new_notifiers(FS_QUEUES)?,
        )?);
    }
    Ok(units)
}

/// `count` queue-notification eventfds.
fn new_notifiers(count: usize) -> Result<Vec<EventFd>, DeviceSetupError> {
    (0..count)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceSetupError::EventFd))
        .collect()
}

/// An interrupt line for GSI `gsi`: an irqfd registered with `vm`.
fn irq_line(vm: &VmFd, gsi: u32) -> Result<IrqFd, DeviceSetupError> {
    if gsi > layout::IRQ_MAX {
        return Err(DeviceSetupError::TooManyDevices);
    }
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceSetupError::EventFd)?;
    vm.register_irqfd(&evt, gsi)
        .map_err(kvm_err("register a virtio irqfd"))?;
    Ok(IrqFd(evt))
}

/// Most bytes the serial console buffers before it writes them out: a
/// guest that never prints a newline gets its output written in pieces of
/// this size, not held without bound.
pub const SERIAL_LINE_MAX_BYTES: usize = 256;

/// The serial console's host end: line-buffered output (a line longer than
/// [`SERIAL_LINE_MAX_BYTES`] goes out in pieces).
pub struct SerialWriter {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
}

impl SerialWriter {
    fn new(output: &SerialOutput) -> Result<Self, DeviceSetupError> {
        let out: Box<dyn Write + Send> = match output {
            SerialOutput::Stdout => Box::new(std::io::stdout()),
            SerialOutput::File(path) => Box::new(
                SerialLog::create(path, SERIAL_LOG_CAP_BYTES).map_err(|source| {
                    DeviceSetupError::SerialFile {
                        path: path.clone(),
                        source,
                    }
                })?,
            ),
            SerialOutput::Buffer(buf) => Box::new(SharedBuffer(buf.clone())),
            SerialOutput::Discard => Box::new(std::io::sink()),
        };
        Ok(SerialWriter {
            out,
            line: Vec::with_capacity(SERIAL_LINE_MAX_BYTES),
        })
    }

    fn flush_line(&mut self) {
        // Console output is best effort: a closed stdout must not stop the VM.
        let _ = self.out.write_all(&self.line);
        let _ = self.out.flush();
        self.line.clear();
    }
}

impl SerialSink for SerialWriter {
    fn write_byte(&mut self, byte: u8) {
        self.line.push(byte);
        if byte == b'\n' || self.line.len() >= SERIAL_LINE_MAX_BYTES {
            self.flush_line();
        }
    }
}

impl Drop for SerialWriter {
    fn drop(&mut self) {
        self.flush_line();
    }
}

struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The i8042's reset line: ends the VM.
pub struct ResetLine(Arc<Shared>);

impl ResetSink for ResetLine {
    fn reset(&mut self) {
        self.0.request_exit(ExitReason::Reset);
    }
}

#[derive(Clone, Copy, Debug)]
enum Pio {
    Serial,
    I8042,
}

#[derive(Clone, Copy, Debug)]
enum Mmio {
    BootTimer,
    Virtio(usize),
}

/// One virtio device as the VMM runs it: its slot, the eventfds its thread
/// waits on, and the thread's name.
pub struct VirtioUnit {
    /// The thread's name (at most 15 bytes, Linux's limit for `comm`).
    name: String,
    slot: Box<dyn VirtioSlot>,
    /// Queue-notification eventfds, indexed by queue.
    notifiers: Vec<EventFd>,
    /// Written to make the thread look at the stop flag.
    wake: EventFd,
}

impl VirtioUnit {
    /// `slot`, served by a thread named `name`, notified through
    /// `notifiers` (one per queue of the slot).
    pub fn new(
        name: String,
        slot: Box<dyn VirtioSlot>,
        notifiers: Vec<EventFd>,
    ) -> Result<Self, DeviceSetupError> {
        debug_assert_eq!(notifiers.len(), slot.queue_count());
        debug_assert!(name.len() <= 15, "thread name {name} is cut");
        Ok(VirtioUnit {
            name,
            slot,
            notifiers,
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceSetupError::EventFd)?,
        })
    }

    /// Wakes the unit's thread (to make it notice the stop flag).
    pub fn wake(&self) -> std::io::Result<()> {
        self.wake.write(1)
    }
}

/// All devices of one VM.
pub struct Devices {
    pio: Bus<Pio, 4>,
    mmio: Bus<Mmio, { MAX_VIRTIO_DEVICES + 1 }>,
    serial: Mutex<Serial<IrqFd, SerialWriter>>,
    i8042: Mutex<I8042<ResetLine>>,
    virtio: Vec<Arc<VirtioUnit>>,
    boot_timer: Mutex<Option<Duration>>,
    mem: GuestRam,
    shared: Arc<Shared>,
}

impl Devices {
    /// Creates the devices for `config`, registering irqfds and ioeventfds
    /// with `vm`.
    pub fn new(
        vm: &VmFd,
        mem: GuestRam,
        config: &VmConfig,
        shared: Arc<Shared>,
    ) -> Result<Self, DeviceSetupError> {
        let new_evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceSetupError::EventFd);

        let serial_irq = new_evt()?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(kvm_err("register the serial irqfd"))?;
        let serial = Serial::new(IrqFd(serial_irq), SerialWriter::new(&config.serial)?);

        let mut pio = Bus::new();
        pio.insert(
            BusRange::new(u64::from(layout::SERIAL_PORT), 8),
            Pio::Serial,
        )?;
        pio.insert(
            BusRange::new(u64::from(layout::I8042_DATA_PORT), I8042_PORT_SPAN),
            Pio::I8042,
        )?;

        let mut mmio = Bus::new();
        mmio.insert(
            BusRange::new(layout::BOOT_TIMER_START, layout::BOOT_TIMER_SIZE),
            Mmio::BootTimer,
        )?;

        let units = build_virtio_devices(vm, config)?;
        if units.len() > MAX_VIRTIO_DEVICES {
            return Err(DeviceSetupError::TooManyDevices);
        }
        let mut virtio = Vec::with_capacity(units.len());
        for (i, unit) in units.into_iter().enumerate() {
            let base = layout::virtio_mmio_window(i as u32);
            mmio.insert(
                BusRange::new(base, layout::VIRTIO_MMIO_SIZE),
                Mmio::Virtio(i),
            )?;
            for (q, evt) in unit.notifiers.iter().enumerate() {
                vm.register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    q as u32,
                )
                .map_err(kvm_err("register a queue ioeventfd"))?;
            }
            virtio.push(Arc::new(unit));
        }

        Ok(Devices {
            pio,
            mmio,
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042::new(ResetLine(shared.clone()))),
            virtio,
            boot_timer: Mutex::new(None),
            mem,
            shared,
        })
    }

    /// A port read.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match self.pio.get(u64::from(port)) {
            Some((Pio::Serial, off)) => lock(&self.serial).read(off, data),
            Some((Pio::I8042, off)) => lock(&self.i8042).read(off, data),
            None => {}
        }
    }

    /// A port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        match self.pio.get(u64::from(port)) {
            Some((Pio::Serial, off)) => lock(&self.serial).write(off, data),
            Some((Pio::I8042, off)) => lock(&self.i8042).write(off, data),
            None => {}
        }
    }

    /// An MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0);
        match self.mmio.get(addr) {
            Some((Mmio::Virtio(i), off)) => self.virtio[*i].slot.read(off, data),
            Some((Mmio::BootTimer, _)) | None => {}
        }
    }

    /// An MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match self.mmio.get(addr) {
            Some((Mmio::Virtio(i), off)) => self.virtio[*i].slot.write(&self.mem, off, data),
            Some((Mmio::BootTimer, 0)) if data.first() == Some(&BOOT_TIMER_MAGIC) => {
                let at = self.shared.epoch.elapsed();
                let mut t = lock(&self.boot_timer);
                if t.is_none() {
                    log::info!("boot-timer: guest init at {} ms", at.as_millis());
                    *t = Some(at);
                }
            }
            Some((Mmio::BootTimer, _)) | None => {}
        }
    }

    /// Puts `medium` into virtio device `index`, which must be an empty
    /// disk slot, or takes its medium out (see
    /// [`RunningVm::set_disk`](super::RunningVm::set_disk)).
    pub fn swap_disk(&self, index: usize, medium: Option<FileDisk>) -> Result<(), DiskSlotError> {
        let unit = self.virtio.get(index).ok_or(DiskSlotError::NoSuchSlot {
            count: self.virtio.len(),
        })?;
        unit.slot.swap_disk(medium)
    }

    /// When the guest wrote the boot-timer marker.
    pub fn boot_timer(&self) -> Option<Duration> {
        *lock(&self.boot_timer)
    }

    /// Starts one thread per virtio device ([`spawn_device_thread`]).
    /// `started` receives each thread as it starts, so that the caller can
    /// join those that did if a later one cannot start.
    ///
    /// Each thread installs its seccomp filter (when `seccomp` is on)
    /// before it serves anything; `installed` receives the handle to wait
    /// for that.
    pub fn spawn_device_threads(
        &self,
        shared: &Arc<Shared>,
        seccomp: bool,
        started: &mut Vec<JoinHandle<()>>,
        installed: &mut Vec<Installed>,
    ) -> std::io::Result<()> {
        for unit in &self.virtio {
            let (filter, done) = handoff(unit.slot.thread_kind(), seccomp);
            started.push(spawn_device_thread(
                unit.clone(),
                self.mem.clone(),
                shared.clone(),
                filter,
            )?);
            installed.push(done);
        }
        Ok(())
    }

    /// Every device's state in `vmm-core`'s container: the UART and the
    /// i8042 (sections 0), then each virtio device's transport and device
    /// (sections `i`, its window). Call it with the VM paused
    /// ([`Devices::pause`] after the vCPUs).
    pub fn save_state(&self) -> Result<Vec<u8>, StateError> {
        let len = HEADER_LEN
            + 2 * SECTION_HEADER_LEN
            + <SerialState as Persist>::MAX_LEN
            + <I8042State as Persist>::MAX_LEN
            + self
                .virtio
                .iter()
                .map(|u| u.slot.state_len())
                .sum::<usize>();
        let mut buf = vec![0; len];
        let mut w = StateWriter::new(&mut buf)?;
        w.add(0, &lock(&self.serial).state())?;
        w.add(0, &lock(&self.i8042).state())?;
        for (i, unit) in self.virtio.iter().enumerate() {
            unit.slot.save(&mut w, virtio_index(i))?;
        }
        let len = w.finish()?;
        buf.truncate(len);
        Ok(buf)
    }

    /// Puts every device, built from the snapshot's config, back into the
    /// state `bytes` holds ([`Devices::save_state`]), before the VM runs.
    /// The container must hold exactly these devices.
    pub fn restore_state(&self, bytes: &[u8]) -> Result<(), StateError> {
        let r = StateReader::new(bytes)?;
        let expected = 2 + self
            .virtio
            .iter()
            .map(|u| u.slot.state_sections())
            .sum::<usize>();
        let found = r.sections().count();
        if found != expected {
            return Err(StateError::Mismatch {
                field: "device state sections",
                saved: found as u64,
                device: expected as u64,
            });
        }
        let serial: SerialState = r.load(0)?;
        let i8042: I8042State = r.load(0)?;
        for (i, unit) in self.virtio.iter().enumerate() {
            unit.slot.restore(&r, virtio_index(i), &self.mem)?;
        }
        lock(&self.serial).restore(&serial);
        lock(&self.i8042).restore(&i8042);
        Ok(())
    }

    /// Parks every device thread (after it served the notifications the
    /// guest made before its vCPUs paused), so that no queue or guest page
    /// moves while a snapshot is taken; `false` if they did not all park
    /// within `timeout`. [`Devices::resume`] lets them go on.
    pub fn pause(&self, timeout: Duration) -> bool {
        let n = self.virtio.len();
        self.shared.device_pause.request(n, false);
        self.shared
            .device_pause
            .wait_parked(n, timeout, || self.wake_device_threads())
    }

    /// Lets the device threads parked by [`Devices::pause`] go on.
    pub fn resume(&self) {
        self.shared.device_pause.resume();
    }

    /// Wakes every device thread (to make it notice the stop flag).
    pub fn wake_device_threads(&self) {
        for unit in &self.virtio {
            // Fails only if the counter would overflow: a wake-up is
            // pending anyway.
            let _ = unit.wake();
        }
    }
}

/// The section index of virtio device `i` (at most [`MAX_VIRTIO_DEVICES`]).
fn virtio_index(i: usize) -> u16 {
    u16::try_from(i).unwrap_or(u16::MAX)
}

/// epoll token of a unit's wake eventfd.
const WAKE_TOKEN: u64 = u64::MAX;
/// epoll token of a unit's host fd; queue `q`'s notifier has token `q`.
const HOST_TOKEN: u64 = u64::MAX - 1;

/// Starts the thread of virtio device `unit`, named after it: it passes
/// the device's queue notifications to its transport
/// ([`VirtioSlot::notify`]) and serves its host side (the vsock muxer's
/// sockets, [`VirtioSlot::host_ready`]) when its fd is ready, until the
/// stop flag in `shared` is set and the unit is woken. The thread
/// installs its seccomp filter with `filter` before it serves anything.
pub fn spawn_device_thread(
    unit: Arc<VirtioUnit>,
    mem: GuestRam,
    shared: Arc<Shared>,
    filter: Installer,
) -> std::io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        unit.wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, WAKE_TOKEN),
    )?;
    for (q, evt) in unit.notifiers.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, q as u64),
        )?;
    }
    if let Some(fd) = unit.slot.host_fd() {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, HOST_TOKEN),
        )?;
    }
    std::thread::Builder::new()
        .name(unit.name.clone())
        .spawn(move || {
            if !filter.install() {
                return;
            }
            // As with a vCPU thread: a bug that panics it ends the VM with
            // a reason rather than leaving a device that never answers.
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                serve_device(&unit, &epoll, &mem, &shared)
            }));
            if served.is_err() {
                shared.request_exit(ExitReason::VcpuError(format!(
                    "device thread {}: the thread panicked",
                    unit.name
                )));
            }
        })
}

/// The loop of one device thread: everything such a thread does, from its
/// start (the place for per-thread setup) to the stop flag.
fn serve_device(unit: &VirtioUnit, epoll: &Epoll, mem: &GuestRam, shared: &Shared) {
    let mut events = vec![EpollEvent::default(); unit.notifiers.len() + 2];
    while !shared.stop.load(std::sync::atomic::Ordering::SeqCst) {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                shared.request_exit(ExitReason::VcpuError(format!(
                    "device thread {}: epoll failed: {e}",
                    unit.name
                )));
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                WAKE_TOKEN => {
                    let _ = unit.wake.read();
                }
                HOST_TOKEN => unit.slot.host_ready(mem),
                q => {
                    let Some(evt) = unit.notifiers.get(q as usize) else {
                        continue;
                    };
                    if evt.read().is_ok() {
                        unit.slot.notify(mem, q as u16);
                    }
                }
            }
        }
        if shared.device_pause.requested() {
            // What the guest notified before its vCPUs paused is served
            // first: a snapshot holds no notification in flight.
            for (q, evt) in unit.notifiers.iter().enumerate() {
                if evt.read().is_ok() {
                    unit.slot.notify(mem, q as u16);
                }
            }
            shared.device_pause.park_idle(&shared.stop);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::*;
    use crate::vmm::serial_log::rotated_path;

    fn send(writer: &mut SerialWriter, bytes: &[u8]) {
        for &b in bytes {
            writer.write_byte(b);
        }
    }

    /// The names of this process's threads.
    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|c| c.trim().to_owned())
            .collect()
    }

    #[test]
    fn a_disk_blocked_in_io_holds_up_neither_vsock_nor_another_disk() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        use std::sync::mpsc;
        use std::time::Instant;

        use crate::vmm::blk::testing::{gated_slot, guest_ram, read32, Driver, Gate, PATIENCE};
        use crate::vmm::config::VsockConfig;

        let mem = guest_ram();
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.sock");
        let shared = Arc::new(Shared::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Instant::now(),
        ));

        // blk0 holds its I/O until the gate opens; blk1 does not.
        let gate = Gate::new(false);
        let unit = |name: &str, slot: Box<dyn VirtioSlot>, kick: EventFd| {
            Arc::new(VirtioUnit::new(name.into(), slot, vec![kick]).unwrap())
        };
        let busy = gated_slot(0, gate.clone());
        let mut busy_driver = Driver::activate(&busy.slot, &mem, 0x10_0000);
        let blk0 = unit("vmm-blk0", Box::new(busy.slot), busy.kick);
        let idle = gated_slot(1, Gate::new(true));
        let mut idle_driver = Driver::activate(&idle.slot, &mem, 0x20_0000);
        let blk1 = unit("vmm-blk1", Box::new(idle.slot), idle.kick);
        let vsock_irq = IrqFd(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let vsock_slot = VsockSlot::new(
            &VsockConfig {
                guest_cid: 3,
                uds_path: uds.clone(),
            },
            vsock_irq,
        )
        .unwrap();
        let vsock = Arc::new(
            VirtioUnit::new(
                "vmm-vsock".into(),
                Box::new(vsock_slot),
                new_notifiers(VSOCK_QUEUES).unwrap(),
            )
            .unwrap(),
        );
        let units = [blk0.clone(), blk1.clone(), vsock.clone()];
        let threads: Vec<_> = units
            .iter()
            .map(|u| {
                // No filter: the test process's other threads are not a VMM's.
                let (filter, _) = handoff(super::super::seccomp::ThreadKind::Devices, false);
                spawn_device_thread(u.clone(), mem.clone(), shared.clone(), filter).unwrap()
            })
            .collect();
        // A thread names itself once it runs.
        let deadline = Instant::now() + PATIENCE;
        for name in ["vmm-blk0", "vmm-blk1", "vmm-vsock"] {
            while !thread_names().iter().any(|n| n == name) {
                assert!(Instant::now() < deadline, "no thread {name}");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }

        // The guest notifies blk0 (what KVM does with the ioeventfd); its
        // thread blocks in the read.
        busy_driver.queue_read();
        blk0.notifiers[0].write(1).unwrap();
        assert!(gate.wait_entered(), "blk0's request reached its disk");

        // blk1 is served meanwhile.
        idle_driver.queue_read();
        blk1.notifiers[0].write(1).unwrap();
        let deadline = Instant::now() + PATIENCE;
        while idle_driver.used() == 0 {
            assert!(Instant::now() < deadline, "blk1 waited for blk0's I/O");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        // So is the vsock device's host side: the muxer closes a bad
        // handshake.
        let mut junk = UnixStream::connect(&uds).unwrap();
        std::io::Write::write_all(&mut junk, b"NOT A HANDSHAKE\n").unwrap();
        junk.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut b = [0u8; 16];
        let n = junk
            .read(&mut b)
            .expect("the vsock thread waited for blk0's I/O");
        assert_eq!(n, 0, "a bad handshake is closed");

        // And a vCPU reads blk0's registers (on its own thread, so that a
        // regression fails the test instead of hanging it).
        let (tx, rx) = mpsc::channel();
        {
            let blk0 = blk0.clone();
            std::thread::spawn(move || {
                let _ = tx.send(read32(&*blk0.slot, vmm_core::mmio::STATUS_OFFSET));
            });
        }
        let status = rx
            .recv_timeout(PATIENCE)
            .expect("a vCPU waited for blk0's I/O");
        assert_eq!(status, 0xf);
        assert_eq!(busy_driver.used(), 0, "blk0's request is still in flight");

        // Stop: every thread ends once blk0's I/O is let through.
        shared.request_exit(ExitReason::Stopped);
        for u in &units {
            u.wake().unwrap();
        }
        gate.open();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for t in threads {
                t.join().unwrap();
            }
            let _ = tx.send(());
        });
        rx.recv_timeout(PATIENCE)
            .expect("every device thread ended");
        assert_eq!(busy_driver.used(), 1, "blk0's request was answered");
        let names = thread_names();
        assert!(!names.iter().any(|n| n.starts_with("vmm-")), "{names:?}");
    }

    #[test]
    fn a_line_without_newline_is_flushed_at_the_bound() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut writer = SerialWriter::new(&SerialOutput::Buffer(buf.clone())).unwrap();
        send(&mut writer, b"short\n");
        assert_eq!(lock(&buf).as_slice(), b"short\n");
        send(&mut writer, &[b'z'; 3 * SERIAL_LINE_MAX_BYTES + 10]);
        assert_eq!(lock(&buf).len(), 6 + 3 * SERIAL_LINE_MAX_BYTES);
        assert_eq!(writer.line.len(), 10);
        assert!(writer.line.capacity() <= 2 * SERIAL_LINE_MAX_BYTES);
        send(&mut writer, b"\n");
        assert_eq!(lock(&buf).len(), 6 + 3 * SERIAL_LINE_MAX_BYTES + 11);
        assert!(writer.line.is_empty());
        send(&mut writer, b"tail");
        drop(writer);
        assert!(lock(&buf).ends_with(b"z\ntail"));
    }

    #[test]
    fn the_serial_file_is_capped_rotated_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let old = rotated_path(&path);
        let mut writer = SerialWriter::new(&SerialOutput::File(path.clone())).unwrap();
        let cap = SERIAL_LOG_CAP_BYTES;
        // 100-byte lines, a cap and a half of them.
        let mut line = vec![b'g'; 99];
        line.push(b'\n');
        let lines = (cap + cap / 2) / 100;
        for _ in 0..lines {
            send(&mut writer, &line);
        }
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert!(size(&old) <= cap, "{}", size(&old));
        assert!(size(&old) > cap - 100, "{}", size(&old));
        assert!(size(&path) <= cap);
        assert_eq!(size(&old) + size(&path), lines * 100);
        // Whole lines in each file.
        assert_eq!(size(&old) % 100, 0);
        // A guest that never prints a newline is capped as well.
        for _ in 0..2 * cap / SERIAL_LINE_MAX_BYTES as u64 + 5 {
            send(&mut writer, &[b'n'; SERIAL_LINE_MAX_BYTES]);
        }
        drop(writer);
        assert!(size(&old) <= cap && size(&path) <= cap);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&path), mode(&old)), (0o600, 0o600));
    }
}
