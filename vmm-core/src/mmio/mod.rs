//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2), and the
//! [`VirtioDevice`] trait that devices implement to sit behind it.
//!
//! [`MmioTransport`] is the register file the guest's driver programs: it
//! negotiates features, owns the device's [`Queue`](crate::queue::Queue)s,
//! runs the device status state machine, and keeps the InterruptStatus
//! register. A device only supplies its identity, features, queue sizes and
//! configuration space, and is called directly when the driver activates it
//! or notifies a queue. It raises interrupts through the [`Interrupt`] in
//! the [`VirtioContext`] it is handed, which fires the injected
//! [`IrqLine`](crate::irq::IrqLine).
//!
//! Nothing the guest writes to the registers can make the transport panic;
//! misuse is ignored, as the spec allows, and the cases worth a log line are
//! reported as [`MmioError`].

mod device;
mod transport;

#[cfg(test)]
mod tests;

pub use device::{
    read_config_window, DeviceError, Interrupt, VirtioContext, VirtioDevice, INT_CONFIG_CHANGE,
    INT_USED_BUFFER, VIRTIO_F_VERSION_1,
};
pub use transport::{
    MmioError, MmioTransport, MmioTransportState, CONFIG_GENERATION_OFFSET, CONFIG_OFFSET,
    DEVICE_FEATURES_OFFSET, DEVICE_FEATURES_SEL_OFFSET, DEVICE_ID_OFFSET, DRIVER_FEATURES_OFFSET,
    DRIVER_FEATURES_SEL_OFFSET, INTERRUPT_ACK_OFFSET, INTERRUPT_STATUS_OFFSET, MAGIC_VALUE_OFFSET,
    MMIO_MAGIC_VALUE, MMIO_VERSION, QUEUE_DESC_HIGH_OFFSET, QUEUE_DESC_LOW_OFFSET,
    QUEUE_DEVICE_HIGH_OFFSET, QUEUE_DEVICE_LOW_OFFSET, QUEUE_DRIVER_HIGH_OFFSET,
    QUEUE_DRIVER_LOW_OFFSET, QUEUE_NOTIFY_OFFSET, QUEUE_NUM_MAX_OFFSET, QUEUE_NUM_OFFSET,
    QUEUE_READY_OFFSET, QUEUE_SEL_OFFSET, SHM_BASE_HIGH_OFFSET, SHM_BASE_LOW_OFFSET,
    SHM_LEN_HIGH_OFFSET, SHM_LEN_LOW_OFFSET, SHM_SEL_OFFSET, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, STATUS_OFFSET,
    VENDOR_ID, VENDOR_ID_OFFSET, VERSION_OFFSET,
};
