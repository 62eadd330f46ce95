//! The virtio devices of a VM, behind their virtio-mmio transports.

use kvm_ioctls::VmFd;

use super::devices::{DeviceSetupError, VirtioSlot};
use super::platform::GuestRam;
use super::VmConfig;

/// Builds the virtio devices `config` asks for, in window order.
pub fn build_devices(
    _vm: &VmFd,
    _mem: &GuestRam,
    config: &VmConfig,
) -> Result<Vec<Box<dyn VirtioSlot>>, DeviceSetupError> {
    if let Some(d) = config.disks.first() {
        return Err(DeviceSetupError::Disk {
            path: d.path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "virtio-blk is not wired up yet",
            ),
        });
    }
    Ok(Vec::new())
}

/// How many virtio devices `config` asks for.
pub fn device_count(config: &VmConfig) -> usize {
    config.disks.len()
}
