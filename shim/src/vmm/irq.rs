//! Interrupt lines over KVM irqfds.

use vmm_core::irq::IrqLine;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: writing the eventfd makes KVM inject the GSI it was
/// registered for.
#[derive(Debug)]
pub struct IrqFd(pub EventFd);

impl IrqLine for IrqFd {
    fn trigger(&self) {
        // Fails only if the counter would overflow, which means an interrupt
        // is pending anyway.
        let _ = self.0.write(1);
    }
}
