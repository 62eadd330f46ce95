//! skiff's allocation-free device core.
//!
//! Everything a guest can touch on the hot path lives here: split virtqueues,
//! the virtio-mmio transport, the address-range bus, and the legacy UART and
//! i8042; and, for snapshots, the binary encoding of their state
//! ([`snapshot`]). Guest memory, interrupts and time come in through small
//! traits ([`memory::GuestMemory`], [`irq::IrqLine`]), so the crate is
//! `#![no_std]`, never allocates, and contains no `unsafe`.
//!
//! It must never depend on `std`, `alloc`, KVM, or any other skiff crate. A
//! guest writing garbage into any structure gets a typed error, never a panic.
#![no_std]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

#[cfg(test)]
extern crate std;

pub mod bus;
pub mod devices;
pub mod irq;
pub mod legacy;
pub mod memory;
pub mod mmio;
pub mod queue;
pub mod snapshot;
