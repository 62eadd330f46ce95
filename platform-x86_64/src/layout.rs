//! The guest physical address map.
//!
//! ```text
//! 0x0000_0500  boot GDT            0x0000_7000  zero page (Linux boot)
//! 0x0000_6000  PVH start_info      0x0000_9000  PML4, PDPT, PD (identity map)
//! 0x0002_0000  command line        0x0009_fc00  MP table (EBDA)
//! 0x0010_0000  kernel (1 MiB)      ...          RAM up to the MMIO gap
//! 0xc000_0000  32-bit MMIO gap: boot timer, virtio-mmio windows, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 4 GiB, if any
//! ```

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table (PML4).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages covering the first 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of conventional low memory; the MP table sits just below it.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory, where kernels load.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The boot-timer pseudo-device: the guest's init writes here.
pub const BOOT_TIMER_START: u64 = 0xd000_0000;
/// Size of the boot-timer window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_1000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// TSS for KVM's real-mode emulation (must not overlap guest RAM).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// IRQ of the 16550 UART at 0x3f8.
pub const SERIAL_IRQ: u32 = 4;
/// IRQ of the first virtio-mmio device; the next ones count up.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable IOAPIC pin for virtio devices.
pub const IRQ_MAX: u32 = 23;
/// Port of the first 16550 UART.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Data port of the i8042.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Command/status port of the i8042.
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// Guest address of the `index`th virtio-mmio window.
pub fn virtio_mmio_window(index: u32) -> u64 {
    VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE
}
