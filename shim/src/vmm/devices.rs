//! The VM's devices and the buses that route exits to them.
//!
//! Port I/O: the 16550 UART at 0x3f8 and the i8042 at 0x60/0x64. MMIO: the
//! boot-timer pseudo-device and the virtio-mmio windows. Buses are built
//! once and then only read, so lookups take no lock; each device has its own
//! mutex, held only for the duration of one access.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_core::bus::{Bus, BusRange};
use vmm_core::legacy::i8042::{ResetSink, I8042, I8042_PORT_SPAN};
use vmm_core::legacy::serial::{Serial, SerialSink};
use vmm_core::mmio::QUEUE_NOTIFY_OFFSET;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::blk::DiskSlot;
use super::config::{SerialOutput, VmConfig};
use super::file_disk::{FileDisk, FileDiskError};
use super::irq::IrqFd;
use super::platform::layout;
use super::platform::GuestRam;
use super::seccomp::Installer;
use super::serial_log::{SerialLog, SERIAL_LOG_CAP_BYTES};
use super::shared::{ExitReason, Shared};
use super::slot::{DiskSlotError, VirtioSlot};
use super::vsock::{VsockSetupError, VsockSlot};
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
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DeviceSetupError {
    move |source| DeviceSetupError::Kvm { what, source }
}

/// Builds the virtio devices `config` asks for, in window order; device `i`
/// raises IRQ `VIRTIO_IRQ_BASE + i`.
fn build_virtio_devices(
    vm: &VmFd,
    config: &VmConfig,
) -> Result<Vec<Box<dyn VirtioSlot>>, DeviceSetupError> {
    let mut slots: Vec<Box<dyn VirtioSlot>> = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let irq = irq_line(vm, layout::VIRTIO_IRQ_BASE + i as u32)?;
        let medium = FileDisk::open(disk)?;
        slots.push(Box::new(DiskSlot::new(i, medium, disk.read_only, irq)?));
    }
    if let Some(vsock) = &config.vsock {
        let irq = irq_line(vm, layout::VIRTIO_IRQ_BASE + slots.len() as u32)?;
        slots.push(Box::new(VsockSlot::new(vsock, irq)?));
    }
    Ok(slots)
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

/// A queue notification eventfd: (eventfd, device index, queue index).
struct Notifier {
    evt: EventFd,
    device: usize,
    queue: u16,
}

/// All devices of one VM.
pub struct Devices {
    pio: Bus<Pio, 4>,
    mmio: Bus<Mmio, { MAX_VIRTIO_DEVICES + 1 }>,
    serial: Mutex<Serial<IrqFd, SerialWriter>>,
    i8042: Mutex<I8042<ResetLine>>,
    virtio: Vec<Mutex<Box<dyn VirtioSlot>>>,
    notifiers: Vec<Notifier>,
    wake: EventFd,
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

        let slots = build_virtio_devices(vm, config)?;
        if slots.len() > MAX_VIRTIO_DEVICES {
            return Err(DeviceSetupError::TooManyDevices);
        }
        let mut virtio = Vec::with_capacity(slots.len());
        let mut notifiers = Vec::new();
        for (i, slot) in slots.into_iter().enumerate() {
            let base = layout::virtio_mmio_window(i as u32);
            mmio.insert(
                BusRange::new(base, layout::VIRTIO_MMIO_SIZE),
                Mmio::Virtio(i),
            )?;
            for q in 0..slot.queue_count() {
                let evt = new_evt()?;
                vm.register_ioevent(
                    &evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    q as u32,
                )
                .map_err(kvm_err("register a queue ioeventfd"))?;
                notifiers.push(Notifier {
                    evt,
                    device: i,
                    queue: q as u16,
                });
            }
            virtio.push(Mutex::new(slot));
        }

        Ok(Devices {
            pio,
            mmio,
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042::new(ResetLine(shared.clone()))),
            virtio,
            notifiers,
            wake: new_evt()?,
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
            Some((Mmio::Virtio(i), off)) => lock(&self.virtio[*i]).read(off, data),
            Some((Mmio::BootTimer, _)) | None => {}
        }
    }

    /// An MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match self.mmio.get(addr) {
            Some((Mmio::Virtio(i), off)) => lock(&self.virtio[*i]).write(&self.mem, off, data),
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
        let slot = self.virtio.get(index).ok_or(DiskSlotError::NoSuchSlot {
            count: self.virtio.len(),
        })?;
        lock(slot).swap_disk(medium)
    }

    /// When the guest wrote the boot-timer marker.
    pub fn boot_timer(&self) -> Option<Duration> {
        *lock(&self.boot_timer)
    }

    /// Wakes the device thread (to make it notice the stop flag).
    pub fn wake_device_thread(&self) -> std::io::Result<()> {
        self.wake.write(1)
    }
}

/// Starts the thread that passes queue-notification ioeventfds to their
/// transports ([`VirtioSlot::notify`]), and serves the devices' host
/// sides (the vsock muxer's sockets) when their fds are ready. The thread
/// installs its seccomp filter with `filter` before it serves anything.
pub fn spawn_device_thread(
    devices: Arc<Devices>,
    shared: Arc<Shared>,
    filter: Installer,
) -> std::io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    const WAKE: u64 = u64::MAX;
    epoll.ctl(
        ControlOperation::Add,
        devices.wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, WAKE),
    )?;
    for (i, n) in devices.notifiers.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            n.evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
    }
    // Tokens from HOST_FD up name the device whose host fd is ready.
    const HOST_FD: u64 = 1 << 32;
    let mut host_fds = 0;
    for (i, slot) in devices.virtio.iter().enumerate() {
        if let Some(fd) = lock(slot).host_fd() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, HOST_FD + i as u64),
            )?;
            host_fds += 1;
        }
    }
    std::thread::Builder::new()
        .name("devices".into())
        .spawn(move || {
            if !filter.install() {
                return;
            }
            let mut events = vec![EpollEvent::default(); devices.notifiers.len() + host_fds + 1];
            while !shared.stop.load(std::sync::atomic::Ordering::SeqCst) {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        shared.request_exit(ExitReason::VcpuError(format!(
                            "device thread: epoll failed: {e}"
                        )));
                        return;
                    }
                };
                for ev in &events[..n] {
                    let data = ev.data();
                    if data == WAKE {
                        let _ = devices.wake.read();
                        continue;
                    }
                    if data >= HOST_FD {
                        if let Some(slot) = devices.virtio.get((data - HOST_FD) as usize) {
                            lock(slot).host_ready(&devices.mem);
                        }
                        continue;
                    }
                    let Some(n) = devices.notifiers.get(data as usize) else {
                        continue;
                    };
                    if n.evt.read().is_ok() {
                        lock(&devices.virtio[n.device]).notify(&devices.mem, n.queue);
                    }
                }
            }
        })
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
