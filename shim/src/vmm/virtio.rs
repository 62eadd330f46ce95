//! The virtio devices of a VM, behind their virtio-mmio transports, and
//! their host backends.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

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
        let id = format!("skiff-vd{}", (b'a' + i as u8) as char);
        let dev = Block::new(backend, disk.read_only, id.as_bytes());
        slots.push(Box::new(MmioTransport::<_, _, 1>::new(dev, irq)?));
    }
    if let Some(vsock) = &config.vsock {
        let irq = irq_line(vm, layout::VIRTIO_IRQ_BASE + slots.len() as u32)?;
        slots.push(Box::new(VsockSlot::new(vsock, irq)?));
    }
    Ok(slots)
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

/// A disk image file.
pub struct FileDisk {
    file: File,
    capacity: u64,
}

impl FileDisk {
    /// Opens the image (read-only if the disk is); its size is rounded down
    /// to whole sectors.
    pub fn open(disk: &DiskConfig) -> Result<Self, DeviceSetupError> {
        let err = |source| DeviceSetupError::Disk {
            path: disk.path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "disk {}: size {size} is not a multiple of 512; the last {} bytes are ignored",
                disk.path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(FileDisk {
            file,
            capacity: size - size % SECTOR_SIZE,
        })
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
        self.file.read_exact_at(buf, offset).map_err(backend_error)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        self.file.write_all_at(buf, offset).map_err(backend_error)
    }
    fn flush(&mut self) -> Result<(), BackendError> {
        self.file.sync_data().map_err(backend_error)
    }
}
