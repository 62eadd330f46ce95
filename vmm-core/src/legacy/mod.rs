//! Legacy PC devices: the 16550A UART console and the i8042's reset line.
//!
//! Both are byte-wide register files the guest reaches through port I/O on
//! x86 (or MMIO, for the UART on aarch64). Each takes accesses as an offset
//! from its base plus a data slice, so the caller's bus only subtracts the
//! base: see [`serial`] and [`i8042`] for the offsets. Accesses of the wrong
//! width or at unknown offsets are ignored, never a panic.
//!
//! Host capabilities come in as traits: interrupts through
//! [`IrqLine`](crate::irq::IrqLine), console output and input flow control
//! through [`SerialSink`], the reset request through [`ResetSink`]. Snapshot
//! state is a plain struct per device ([`SerialState`], [`I8042State`]).

pub mod i8042;
pub mod serial;

pub use i8042::{I8042State, ResetSink, I8042};
pub use serial::{Serial, SerialError, SerialSink, SerialState, RX_FIFO_SIZE};
