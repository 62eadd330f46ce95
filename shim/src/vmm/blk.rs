//! The VM's virtio-blk devices: `vmm-core`'s [`Block`] over a [`FileDisk`],
//! behind a virtio-mmio transport, with a medium that can be swapped while
//! the VM runs.

use vmm_core::devices::blk::Block;
use vmm_core::mmio::{MmioError, MmioTransport};

use super::file_disk::FileDisk;
use super::irq::IrqFd;
use super::platform::GuestRam;
use super::slot::{DiskSlotError, VirtioSlot};

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

/// A virtio-blk device whose medium can be swapped while the VM runs.
pub struct DiskSlot(MmioTransport<Block<FileDisk>, IrqFd, 1>);

impl DiskSlot {
    /// Disk `index` over `medium`, raising interrupts on `irq`.
    pub fn new(
        index: usize,
        medium: FileDisk,
        read_only: bool,
        irq: IrqFd,
    ) -> Result<Self, MmioError> {
        let dev = Block::new(medium, read_only, disk_id(index).as_bytes());
        Ok(DiskSlot(MmioTransport::new(dev, irq)?))
    }
}

impl VirtioSlot for DiskSlot {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn write(&mut self, mem: &GuestRam, offset: u64, data: &[u8]) {
        if let Err(e) = self.0.write(mem, offset, data) {
            log::warn!("virtio-mmio: {e}");
        }
    }
    fn notify(&mut self, mem: &GuestRam, queue: u16) {
        if let Err(e) = self.0.notify(mem, queue) {
            log::warn!("virtio-mmio: {e}");
        }
    }
    fn queue_count(&self) -> usize {
        self.0.queues().len()
    }
    fn swap_disk(&mut self, medium: Option<FileDisk>) -> Result<(), DiskSlotError> {
        let busy = self.0.device().backend().has_medium();
        match (&medium, busy) {
            (Some(_), true) => return Err(DiskSlotError::Occupied),
            (None, false) => return Ok(()),
            _ => {}
        }
        let old = self
            .0
            .device_mut()
            .replace_backend(medium.unwrap_or_else(FileDisk::none));
        self.0.signal_config_change();
        if let Some(path) = old.path() {
            log::debug!("disk {} taken out", path.display());
        }
        Ok(())
    }
}
