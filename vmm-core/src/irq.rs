//! Interrupt output, injected into devices.
//!
//! A device raises an interrupt through an [`IrqLine`]; the shim implements it
//! with an irqfd, tests with a counter.

/// An edge-triggered interrupt line (for example, a KVM irqfd).
pub trait IrqLine {
    /// Raises the interrupt.
    fn trigger(&self);
}

impl<T: IrqLine + ?Sized> IrqLine for &T {
    fn trigger(&self) {
        (**self).trigger()
    }
}

/// An [`IrqLine`] that counts how often it fired; for tests.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Debug, Default)]
pub struct CountingIrq {
    count: core::cell::Cell<u32>,
}

#[cfg(any(test, feature = "test-utils"))]
impl CountingIrq {
    /// How many times the line was triggered.
    pub fn count(&self) -> u32 {
        self.count.get()
    }
}

#[cfg(any(test, feature = "test-utils"))]
impl IrqLine for CountingIrq {
    fn trigger(&self) {
        self.count.set(self.count.get() + 1);
    }
}
