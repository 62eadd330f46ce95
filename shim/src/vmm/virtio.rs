//! The virtio devices of a VM, behind their virtio-mmio transports, and
//! their host backends.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use kvm_ioctls::VmFd;
use vmm_core::devices::blk::{BackendError, Block, BlockBackend, SECTOR_SIZE};
use vmm_core::mmio::MmioTransport;
use vmm_sys_util::eventfd::EventFd;

use super::devices::{DeviceSetupError, VirtioSlot};
use super::irq::IrqFd;
use super::platform::layout;
use super::platform::GuestRam;
use super::vsock::VsockSlot;
use super::{DiskConfig, VmConfig};

/// How many virtio devices `config` asks for.
pub fn device_count(config: &VmConfig) -> usize {
    config.disks.len() + usize::from(config.vsock.is_some())
}

/// Builds the virtio devices `config` asks for, in window order; device `i`
/// raises IRQ `VIRTIO_IRQ_BASE + i`.
pub fn build_devices(
    vm: &VmFd,
    _mem: &GuestRam,
    config: &VmConfig,
) -> Result<Vec<Box<dyn VirtioSlot>>, DeviceSetupError> {
    let mut slots: Vec<Box<dyn VirtioSlot>> = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let irq = irq_line(vm, layout::VIRTIO_IRQ_BASE + i as u32)?;
        let backend = FileDisk::open(disk)?;
        let dev = Block::new(backend, disk.read_only, disk_id(i).as_bytes());
        slots.push(Box::new(DiskSlot(MmioTransport::new(dev, irq)?)));
    }
    if let Some(vsock) = &config.vsock {
        let irq = irq_line(vm, layout::VIRTIO_IRQ_BASE + slots.len() as u32)?;
        slots.push(Box::new(VsockSlot::new(vsock, irq)?));
    }
    Ok(slots)
}

/// What GET_ID answers for disk `index` (Linux: `/sys/block/vdX/serial`):
/// `skiff-vda`, `skiff-vdb`, ... in slot order, the order Linux names them.
pub fn disk_id(index: usize) -> String {
    let mut name = String::from("vd");
    // vda..vdz, then vdaa.. as Linux does (never reached: 19 devices at most).
    if index >= 26 {
        name.push((b'a' + (index / 26 - 1) as u8) as char);
    }
    name.push((b'a' + (index % 26) as u8) as char);
    skiff_agent_proto::disk_serial(&name)
}

/// A virtio-blk device whose medium can be swapped while the VM runs.
pub struct DiskSlot(MmioTransport<Block<FileDisk>, IrqFd, 1>);

impl VirtioSlot for DiskSlot {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn write(&mut self, mem: &GuestRam, offset: u64, data: &[u8]) {
        VirtioSlot::write(&mut self.0, mem, offset, data)
    }
    fn queue_count(&self) -> usize {
        1
    }
    fn swap_disk(&mut self, medium: Option<FileDisk>) -> Result<(), String> {
        let busy = self.0.device().backend().file.is_some();
        match (&medium, busy) {
            (Some(_), true) => return Err("the slot holds a disk already".into()),
            (None, false) => return Ok(()),
            _ => {}
        }
        let old = self
            .0
            .device_mut()
            .replace_backend(medium.unwrap_or_else(FileDisk::none));
        self.0.signal_config_change();
        if let Some(path) = old.path {
            log::debug!("disk {} taken out", path.display());
        }
        Ok(())
    }
}

fn irq_line(vm: &VmFd, gsi: u32) -> Result<IrqFd, DeviceSetupError> {
    if gsi > layout::IRQ_MAX {
        return Err(DeviceSetupError::TooManyDevices);
    }
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceSetupError::EventFd)?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|source| DeviceSetupError::Kvm {
            what: "register a virtio irqfd",
            source,
        })?;
    Ok(IrqFd(evt))
}

/// A disk image file, or no medium (capacity 0).
pub struct FileDisk {
    file: Option<File>,
    path: Option<PathBuf>,
    capacity: u64,
}

impl FileDisk {
    /// No medium.
    pub fn none() -> Self {
        FileDisk {
            file: None,
            path: None,
            capacity: 0,
        }
    }

    /// Opens the image (read-only if the disk is); its size is rounded down
    /// to whole sectors. A config without a path is [`FileDisk::none`].
    pub fn open(disk: &DiskConfig) -> Result<Self, DeviceSetupError> {
        let Some(path) = &disk.path else {
            return Ok(Self::none());
        };
        let err = |source| DeviceSetupError::Disk {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(path)
            .map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "disk {}: size {size} is not a multiple of 512; the last {} bytes are ignored",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(FileDisk {
            file: Some(file),
            path: Some(path.clone()),
            capacity: size - size % SECTOR_SIZE,
        })
    }
}

fn no_medium() -> BackendError {
    BackendError {
        errno: libc::ENOMEDIUM,
    }
}

fn backend_error(e: std::io::Error) -> BackendError {
    BackendError {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    }
}

impl BlockBackend for FileDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let file = self.file.as_ref().ok_or_else(no_medium)?;
        file.read_exact_at(buf, offset).map_err(backend_error)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        let file = self.file.as_ref().ok_or_else(no_medium)?;
        file.write_all_at(buf, offset).map_err(backend_error)
    }
    fn flush(&mut self) -> Result<(), BackendError> {
        match &self.file {
            Some(file) => file.sync_data().map_err(backend_error),
            None => Ok(()),
        }
    }
}
