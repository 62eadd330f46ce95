//! virtio-mmio transport (placeholder, written next).
