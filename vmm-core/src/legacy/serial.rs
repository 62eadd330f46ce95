//! A 16550A UART, enough for Linux's 8250 driver as a console.
//!
//! The guest sees eight byte-wide registers at offsets 0 to 7 from the
//! device's base (0x3f8 for `ttyS0` on x86; an MMIO window on aarch64). The
//! host end of the line is a [`SerialSink`]: every byte the guest writes to
//! THR goes to [`SerialSink::write_byte`], and the host feeds guest input with
//! [`Serial::enqueue_raw_bytes`], checking [`Serial::fifo_capacity`] (or
//! waiting for [`SerialSink::rx_fifo_drained`]) so it never outruns the
//! 64-byte receive FIFO. Interrupts go out through an [`IrqLine`].
//!
//! What is modelled:
//!
//! - the divisor latch (DLL/DLM behind LCR's DLAB bit), LCR, SCR and the
//!   FCR's FIFO-enable and trigger-level bits are stored and read back, but
//!   have no effect on timing: transmission is instantaneous, so LSR always
//!   reports THRE and TEMT;
//! - the receive FIFO holds [`RX_FIFO_SIZE`] bytes. The received-data
//!   interrupt fires as soon as any byte is present (there is no trigger
//!   level and no character timeout), and the FIFO is kept even when the
//!   guest has not enabled FIFOs;
//! - all four interrupt sources, reported in IIR by the 16550's priority:
//!   receiver line status (overrun) over received data over THR empty over
//!   modem status. IIR's bits 6 and 7 are set while FCR enables FIFOs, which
//!   is how Linux tells a 16550A;
//! - loopback (MCR bit 4): THR bytes land in the receive FIFO instead of the
//!   sink, and MSR's status bits follow MCR (RTS to CTS, DTR to DSR, OUT1 to
//!   RI, OUT2 to DCD). Outside loopback, the modem lines read as a connected
//!   null modem: DCD, DSR and CTS set, RI clear.
//!
//! The interrupt line is treated as edge-triggered: the device triggers it
//! whenever an enabled interrupt condition is newly raised, even if another
//! is already pending. OUT2 does not gate the interrupt.
//!
//! Accesses at offsets above 7, or of any width other than one byte, are
//! ignored; such reads fill the buffer with `0xff`, as an undriven ISA bus
//! reads.

use heapless::{Deque, Vec};

use crate::irq::IrqLine;
use crate::snapshot::{DeviceState, Persist, Reader, SectionKind, StateError, Writer};

/// Offset of the data register: RBR on read, THR on write (DLL while DLAB is
/// set).
pub const DATA_OFFSET: u64 = 0;
/// Offset of the divisor latch's low byte while LCR's DLAB bit is set.
pub const DLL_OFFSET: u64 = 0;
/// Offset of the interrupt enable register (DLM while DLAB is set).
pub const IER_OFFSET: u64 = 1;
/// Offset of the divisor latch's high byte while LCR's DLAB bit is set.
pub const DLM_OFFSET: u64 = 1;
/// Offset of the interrupt identification register (read only).
pub const IIR_OFFSET: u64 = 2;
/// Offset of the FIFO control register (write only; shares IIR's offset).
pub const FCR_OFFSET: u64 = 2;
/// Offset of the line control register.
pub const LCR_OFFSET: u64 = 3;
/// Offset of the modem control register.
pub const MCR_OFFSET: u64 = 4;
/// Offset of the line status register (writes are ignored).
pub const LSR_OFFSET: u64 = 5;
/// Offset of the modem status register (writes are ignored).
pub const MSR_OFFSET: u64 = 6;
/// Offset of the scratch register.
pub const SCR_OFFSET: u64 = 7;
/// Size of the register window: offsets `0..SERIAL_REGISTER_SPAN`.
pub const SERIAL_REGISTER_SPAN: u64 = 8;
/// Capacity of the receive FIFO, in bytes.
pub const RX_FIFO_SIZE: usize = 64;

// Interrupt enable register.
const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_RLSI: u8 = 0x04;
const IER_MSI: u8 = 0x08;
const IER_MASK: u8 = 0x0f;

// Interrupt identification register.
const IIR_MSI: u8 = 0x00;
const IIR_NO_INT: u8 = 0x01;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_FIFO_BITS: u8 = 0xc0;

// FIFO control register.
const FCR_ENABLE_FIFO: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;
// Bits that persist: FIFO enable, DMA mode, receive trigger level. Bits 1 and
// 2 (FIFO resets) are self-clearing.
const FCR_KEPT: u8 = 0xc9;

// Line control register.
const LCR_DLAB: u8 = 0x80;

// Modem control register.
const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1f;

// Line status register.
const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

// Modem status register.
const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_DELTA_MASK: u8 = 0x0f;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

// Power-on values. Divisor 12 is 9600 baud from the PC's 1.8432 MHz clock;
// 8N1; OUT2 set, as PC firmware leaves it so the IRQ is routed.
const DEFAULT_DIVISOR_LOW: u8 = 12;
const DEFAULT_DIVISOR_HIGH: u8 = 0;
const DEFAULT_LCR: u8 = 0x03;
const DEFAULT_MCR: u8 = MCR_OUT2;

// What an access that hits no register reads as.
const UNDRIVEN: u8 = 0xff;

/// Errors of feeding the receive FIFO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SerialError {
    /// The receive FIFO is full; retry after the guest has read from it.
    #[error("the serial receive FIFO is full")]
    RxFifoFull,
}

/// The host end of the serial line.
///
/// Implementations must not block for long: they run on the vCPU thread, in
/// the middle of the guest's register write. They handle their own I/O errors
/// (the UART has no way to report them to the guest).
pub trait SerialSink {
    /// Takes one byte the guest transmitted.
    fn write_byte(&mut self, byte: u8);

    /// Called when a guest read empties the receive FIFO, so a host that
    /// stopped feeding input on [`SerialError::RxFifoFull`] can resume. Does
    /// nothing by default.
    fn rx_fifo_drained(&mut self) {}
}

impl<T: SerialSink + ?Sized> SerialSink for &mut T {
    fn write_byte(&mut self, byte: u8) {
        (**self).write_byte(byte)
    }

    fn rx_fifo_drained(&mut self) {
        (**self).rx_fifo_drained()
    }
}

/// A snapshot of a [`Serial`]'s guest-visible state, from [`Serial::state`].
///
/// Every combination of field values is accepted by [`Serial::from_state`];
/// reserved register bits are masked off there.
///
/// Encoding (10 bytes plus the FIFO's, at most 74): `divisor_low`,
/// `divisor_high`, `interrupt_enable`, `fifo_control`, `line_control`,
/// `modem_control`, `modem_status_delta`, `scratch`; a flags byte (bit 0
/// `overrun`, bit 1 `thr_interrupt_pending`); the FIFO's length (at most
/// [`RX_FIFO_SIZE`]) and its bytes. Loading is stricter than
/// [`Serial::from_state`]: it rejects reserved register bits, and a
/// pending THR-empty interrupt that is not enabled, which a UART never
/// saves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialState {
    /// Divisor latch, low byte (DLL).
    pub divisor_low: u8,
    /// Divisor latch, high byte (DLM).
    pub divisor_high: u8,
    /// Interrupt enable register (bits 0 to 3).
    pub interrupt_enable: u8,
    /// The persistent FIFO control bits: FIFO enable, DMA mode, trigger level.
    pub fifo_control: u8,
    /// Line control register.
    pub line_control: u8,
    /// Modem control register (bits 0 to 4).
    pub modem_control: u8,
    /// Whether LSR's overrun error bit is set.
    pub overrun: bool,
    /// MSR's delta bits (0 to 3), not yet cleared by a read of MSR.
    pub modem_status_delta: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Whether a THR-empty interrupt is pending (not yet cleared by an IIR
    /// read).
    pub thr_interrupt_pending: bool,
    /// Bytes in the receive FIFO, oldest first.
    pub rx_fifo: Vec<u8, RX_FIFO_SIZE>,
}

impl Default for SerialState {
    /// The power-on state.
    fn default() -> Self {
        SerialState {
            divisor_low: DEFAULT_DIVISOR_LOW,
            divisor_high: DEFAULT_DIVISOR_HIGH,
            interrupt_enable: 0,
            fifo_control: 0,
            line_control: DEFAULT_LCR,
            modem_control: DEFAULT_MCR,
            overrun: false,
            modem_status_delta: 0,
            scratch: 0,
            thr_interrupt_pending: false,
            rx_fifo: Vec::new(),
        }
    }
}

const STATE_OVERRUN: u8 = 1 << 0;
const STATE_THR_PENDING: u8 = 1 << 1;

impl Persist for SerialState {
    const MAX_LEN: usize = 10 + RX_FIFO_SIZE;

    fn write_to(&self, w: &mut Writer<'_>) -> Result<(), StateError> {
        let mut flags = 0;
        if self.overrun {
            flags |= STATE_OVERRUN;
        }
        if self.thr_interrupt_pending {
            flags |= STATE_THR_PENDING;
        }
        w.bytes(&[
            self.divisor_low,
            self.divisor_high,
            self.interrupt_enable,
            self.fifo_control,
            self.line_control,
            self.modem_control,
            self.modem_status_delta,
            self.scratch,
            flags,
        ])?;
        // A heapless::Vec of RX_FIFO_SIZE (64) bytes: the length fits.
        w.u8(self.rx_fifo.len() as u8)?;
        w.bytes(&self.rx_fifo)
    }

    fn read_from(r: &mut Reader<'_>) -> Result<Self, StateError> {
        let [divisor_low, divisor_high, ier, fcr, lcr, mcr, msr_delta, scratch] = r.array()?;
        let flags = r.flags("serial flags", STATE_OVERRUN | STATE_THR_PENDING)?;
        let invalid = |field, value: u8| StateError::InvalidValue {
            field,
            value: u64::from(value),
        };
        for (field, value, mask) in [
            ("interrupt enable register", ier, IER_MASK),
            ("FIFO control register", fcr, FCR_KEPT),
            ("modem control register", mcr, MCR_MASK),
            ("modem status deltas", msr_delta, MSR_DELTA_MASK),
        ] {
            if value & !mask != 0 {
                return Err(invalid(field, value));
            }
        }
        let thr_interrupt_pending = flags & STATE_THR_PENDING != 0;
        if thr_interrupt_pending && ier & IER_THRI == 0 {
            return Err(invalid(
                "interrupt enable register for a pending THR interrupt",
                ier,
            ));
        }
        let len = r.u8()?;
        if usize::from(len) > RX_FIFO_SIZE {
            return Err(invalid("receive FIFO length", len));
        }
        let rx_fifo = Vec::from_slice(r.bytes(usize::from(len))?)
            .map_err(|_| invalid("receive FIFO length", len))?;
        Ok(SerialState {
            divisor_low,
            divisor_high,
            interrupt_enable: ier,
            fifo_control: fcr,
            line_control: lcr,
            modem_control: mcr,
            overrun: flags & STATE_OVERRUN != 0,
            modem_status_delta: msr_delta,
            scratch,
            thr_interrupt_pending,
            rx_fifo,
        })
    }
}

impl DeviceState for SerialState {
    const KIND: SectionKind = SectionKind::Serial;
}

/// A 16550A UART raising interrupts on `I` and transmitting into `S`.
#[derive(Debug)]
pub struct Serial<I: IrqLine, S: SerialSink> {
    irq: I,
    sink: S,
    divisor_low: u8,
    divisor_high: u8,
    ier: u8,
    fcr: u8,
    lcr: u8,
    mcr: u8,
    overrun: bool,
    msr_delta: u8,
    scr: u8,
    thr_pending: bool,
    rx: Deque<u8, RX_FIFO_SIZE>,
}

impl<I: IrqLine, S: SerialSink> Serial<I, S> {
    /// A UART in its power-on state.
    pub fn new(irq: I, sink: S) -> Self {
        Self::from_state(&SerialState::default(), irq, sink)
    }

    /// A UART restored from `state`. Raises no interrupt: one that was
    /// pending is still reported in IIR.
    pub fn from_state(state: &SerialState, irq: I, sink: S) -> Self {
        let mut serial = Serial {
            irq,
            sink,
            divisor_low: 0,
            divisor_high: 0,
            ier: 0,
            fcr: 0,
            lcr: 0,
            mcr: 0,
            overrun: false,
            msr_delta: 0,
            scr: 0,
            thr_pending: false,
            rx: Deque::new(),
        };
        serial.restore(state);
        serial
    }

    /// Puts the guest-visible state back to `state`, as
    /// [`Serial::from_state`] builds it, keeping this UART's interrupt line
    /// and sink (a VM restored into devices it already made).
    pub fn restore(&mut self, state: &SerialState) {
        let mut rx = Deque::new();
        for &byte in state.rx_fifo.iter() {
            // Both hold RX_FIFO_SIZE bytes, so this never stops early.
            if rx.push_back(byte).is_err() {
                break;
            }
        }
        let ier = state.interrupt_enable & IER_MASK;
        self.divisor_low = state.divisor_low;
        self.divisor_high = state.divisor_high;
        self.ier = ier;
        self.fcr = state.fifo_control & FCR_KEPT;
        self.lcr = state.line_control;
        self.mcr = state.modem_control & MCR_MASK;
        self.overrun = state.overrun;
        self.msr_delta = state.modem_status_delta & MSR_DELTA_MASK;
        self.scr = state.scratch;
        self.thr_pending = state.thr_interrupt_pending && ier & IER_THRI != 0;
        self.rx = rx;
    }

    /// A snapshot of the guest-visible state.
    pub fn state(&self) -> SerialState {
        let mut rx_fifo = Vec::new();
        for &byte in self.rx.iter() {
            // Both hold RX_FIFO_SIZE bytes, so this never stops early.
            if rx_fifo.push(byte).is_err() {
                break;
            }
        }
        SerialState {
            divisor_low: self.divisor_low,
            divisor_high: self.divisor_high,
            interrupt_enable: self.ier,
            fifo_control: self.fcr,
            line_control: self.lcr,
            modem_control: self.mcr,
            overrun: self.overrun,
            modem_status_delta: self.msr_delta,
            scratch: self.scr,
            thr_interrupt_pending: self.thr_pending,
            rx_fifo,
        }
    }

    /// The interrupt line.
    pub fn irq(&self) -> &I {
        &self.irq
    }

    /// The host end of the line.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The host end of the line, mutably.
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        RX_FIFO_SIZE - self.rx.len()
    }

    /// Appends host input to the receive FIFO and returns how many bytes of
    /// `bytes` fit; the caller keeps the rest for later. Raises the
    /// received-data interrupt if the guest enabled it and anything was
    /// added.
    ///
    /// Input is accepted in loopback mode too, although real hardware
    /// disconnects the line then.
    ///
    /// # Errors
    ///
    /// [`SerialError::RxFifoFull`] if `bytes` is not empty and no byte fits.
    pub fn enqueue_raw_bytes(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        if bytes.is_empty() {
            return Ok(0);
        }
        if self.rx.is_full() {
            return Err(SerialError::RxFifoFull);
        }
        let mut added = 0;
        for &byte in bytes {
            if self.rx.push_back(byte).is_err() {
                break;
            }
            added += 1;
        }
        self.raise(IER_RDI);
        Ok(added)
    }

    /// Handles a guest read of `data.len()` bytes at `offset` from the base.
    /// Anything but a one-byte read of offsets 0 to 7 fills `data` with
    /// `0xff` and has no effect.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] if offset < SERIAL_REGISTER_SPAN => *byte = self.read_register(offset),
            _ => data.fill(UNDRIVEN),
        }
    }

    /// Handles a guest write of `data` at `offset` from the base. Anything but
    /// a one-byte write of offsets 0 to 7 is ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data {
            self.write_register(offset, *value);
        }
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    /// Triggers the interrupt if any of `sources` (IER bits of conditions
    /// that were just raised) is enabled.
    fn raise(&self, sources: u8) {
        if sources & self.ier != 0 {
            self.irq.trigger();
        }
    }

    fn read_register(&mut self, offset: u64) -> u8 {
        match offset {
            DLL_OFFSET if self.dlab() => self.divisor_low,
            DLM_OFFSET if self.dlab() => self.divisor_high,
            DATA_OFFSET => self.read_rbr(),
            IER_OFFSET => self.ier,
            IIR_OFFSET => self.read_iir(),
            LCR_OFFSET => self.lcr,
            MCR_OFFSET => self.mcr,
            LSR_OFFSET => self.read_lsr(),
            MSR_OFFSET => self.read_msr(),
            SCR_OFFSET => self.scr,
            _ => UNDRIVEN,
        }
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        match offset {
            DLL_OFFSET if self.dlab() => self.divisor_low = value,
            DLM_OFFSET if self.dlab() => self.divisor_high = value,
            DATA_OFFSET => self.write_thr(value),
            IER_OFFSET => self.write_ier(value),
            FCR_OFFSET => self.write_fcr(value),
            LCR_OFFSET => self.lcr = value,
            MCR_OFFSET => self.write_mcr(value),
            SCR_OFFSET => self.scr = value,
            // LSR and MSR writes (a factory test mode on real parts) and
            // offsets past the window are ignored.
            _ => {}
        }
    }

    fn read_rbr(&mut self) -> u8 {
        match self.rx.pop_front() {
            Some(byte) => {
                if self.rx.is_empty() {
                    self.sink.rx_fifo_drained();
                }
                byte
            }
            None => 0,
        }
    }

    fn write_thr(&mut self, value: u8) {
        let mut raised = IER_THRI;
        if self.loopback() {
            if self.rx.push_back(value).is_ok() {
                raised |= IER_RDI;
            } else {
                self.overrun = true;
                raised |= IER_RLSI;
            }
        } else {
            self.sink.write_byte(value);
        }
        // The byte left THR at once, so THR is empty again.
        self.thr_pending = self.ier & IER_THRI != 0;
        self.raise(raised);
    }

    fn write_ier(&mut self, value: u8) {
        let enabled = value & IER_MASK & !self.ier;
        self.ier = value & IER_MASK;
        // Enabling the THRE interrupt while THR is empty (always, here)
        // raises it, even if an IIR read had cleared it; disabling it
        // drops a pending one.
        if enabled & IER_THRI != 0 {
            self.thr_pending = true;
        } else if self.ier & IER_THRI == 0 {
            self.thr_pending = false;
        }
        let mut pending = IER_THRI;
        if !self.rx.is_empty() {
            pending |= IER_RDI;
        }
        if self.overrun {
            pending |= IER_RLSI;
        }
        if self.msr_delta != 0 {
            pending |= IER_MSI;
        }
        self.raise(enabled & pending);
    }

    fn write_fcr(&mut self, value: u8) {
        if value & FCR_CLEAR_RX != 0 && !self.rx.is_empty() {
            self.rx.clear();
            self.sink.rx_fifo_drained();
        }
        // Clearing the transmit FIFO has nothing to do: it is always empty.
        self.fcr = value & FCR_KEPT;
    }

    fn write_mcr(&mut self, value: u8) {
        let before = self.modem_status_lines();
        self.mcr = value & MCR_MASK;
        let after = self.modem_status_lines();
        let changed = before ^ after;
        let mut delta = 0;
        if changed & MSR_CTS != 0 {
            delta |= MSR_DCTS;
        }
        if changed & MSR_DSR != 0 {
            delta |= MSR_DDSR;
        }
        if before & MSR_RI != 0 && after & MSR_RI == 0 {
            delta |= MSR_TERI;
        }
        if changed & MSR_DCD != 0 {
            delta |= MSR_DDCD;
        }
        if delta != 0 {
            self.msr_delta |= delta;
            self.raise(IER_MSI);
        }
    }

    fn read_iir(&mut self) -> u8 {
        let id = self.interrupt_id();
        // Reading IIR clears a THRE interrupt only when it is the one
        // reported; a higher-priority one hides it until that is served.
        if id == IIR_THRI {
            self.thr_pending = false;
        }
        let fifo = if self.fcr & FCR_ENABLE_FIFO != 0 {
            IIR_FIFO_BITS
        } else {
            0
        };
        id | fifo
    }

    /// The highest-priority pending, enabled interrupt, as IIR's low nibble.
    fn interrupt_id(&self) -> u8 {
        if self.ier & IER_RLSI != 0 && self.overrun {
            IIR_RLSI
        } else if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            IIR_RDI
        } else if self.ier & IER_THRI != 0 && self.thr_pending {
            IIR_THRI
        } else if self.ier & IER_MSI != 0 && self.msr_delta != 0 {
            IIR_MSI
        } else {
            IIR_NO_INT
        }
    }

    fn read_lsr(&mut self) -> u8 {
        let mut lsr = LSR_THRE | LSR_TEMT;
        if !self.rx.is_empty() {
            lsr |= LSR_DR;
        }
        if self.overrun {
            lsr |= LSR_OE;
        }
        self.overrun = false;
        lsr
    }

    fn read_msr(&mut self) -> u8 {
        let msr = self.modem_status_lines() | self.msr_delta;
        self.msr_delta = 0;
        msr
    }

    /// MSR's upper nibble: MCR's outputs in loopback, a null modem otherwise.
    fn modem_status_lines(&self) -> u8 {
        if !self.loopback() {
            return MSR_DCD | MSR_DSR | MSR_CTS;
        }
        let mut lines = 0;
        if self.mcr & MCR_RTS != 0 {
            lines |= MSR_CTS;
        }
        if self.mcr & MCR_DTR != 0 {
            lines |= MSR_DSR;
        }
        if self.mcr & MCR_OUT1 != 0 {
            lines |= MSR_RI;
        }
        if self.mcr & MCR_OUT2 != 0 {
            lines |= MSR_DCD;
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use std::vec;
    use std::vec::Vec as StdVec;

    use proptest::prelude::*;

    use super::*;
    use crate::irq::CountingIrq;

    #[derive(Debug, Default)]
    struct Sink {
        out: StdVec<u8>,
        drained: u32,
    }

    impl SerialSink for Sink {
        fn write_byte(&mut self, byte: u8) {
            self.out.push(byte);
        }

        fn rx_fifo_drained(&mut self) {
            self.drained += 1;
        }
    }

    type TestSerial<'a> = Serial<&'a CountingIrq, Sink>;

    fn rd(s: &mut TestSerial<'_>, offset: u64) -> u8 {
        let mut data = [0x5a];
        s.read(offset, &mut data);
        data[0]
    }

    fn wr(s: &mut TestSerial<'_>, offset: u64, value: u8) {
        s.write(offset, &[value]);
    }

    fn drain(s: &mut TestSerial<'_>) -> StdVec<u8> {
        let mut out = StdVec::new();
        while rd(s, LSR_OFFSET) & LSR_DR != 0 {
            out.push(rd(s, DATA_OFFSET));
        }
        out
    }

    #[test]
    fn power_on_registers() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        assert_eq!(rd(&mut s, IER_OFFSET), 0);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);
        assert_eq!(rd(&mut s, LCR_OFFSET), DEFAULT_LCR);
        assert_eq!(rd(&mut s, MCR_OFFSET), MCR_OUT2);
        assert_eq!(rd(&mut s, LSR_OFFSET), LSR_THRE | LSR_TEMT);
        assert_eq!(rd(&mut s, MSR_OFFSET), MSR_DCD | MSR_DSR | MSR_CTS);
        assert_eq!(rd(&mut s, SCR_OFFSET), 0);
        assert_eq!(rd(&mut s, DATA_OFFSET), 0, "empty RBR reads 0");
        assert_eq!(s.fifo_capacity(), RX_FIFO_SIZE);
        assert_eq!(irq.count(), 0);
    }

    #[test]
    fn dlab_switches_offsets_0_and_1_to_divisor_latch() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, IER_OFFSET, IER_RDI);
        wr(&mut s, LCR_OFFSET, LCR_DLAB | 0x03);
        assert_eq!(rd(&mut s, DLL_OFFSET), DEFAULT_DIVISOR_LOW);
        assert_eq!(rd(&mut s, DLM_OFFSET), DEFAULT_DIVISOR_HIGH);
        wr(&mut s, DLL_OFFSET, 0x01);
        wr(&mut s, DLM_OFFSET, 0x02);
        assert_eq!(rd(&mut s, DLL_OFFSET), 0x01);
        assert_eq!(rd(&mut s, DLM_OFFSET), 0x02);
        assert!(s.sink().out.is_empty(), "DLL write is not transmitted");
        assert_eq!(rd(&mut s, LCR_OFFSET), LCR_DLAB | 0x03);

        wr(&mut s, LCR_OFFSET, 0x03);
        assert_eq!(rd(&mut s, IER_OFFSET), IER_RDI, "IER kept across DLAB");
        wr(&mut s, DATA_OFFSET, b'x');
        assert_eq!(s.sink().out, b"x");

        wr(&mut s, LCR_OFFSET, LCR_DLAB);
        assert_eq!(rd(&mut s, DLL_OFFSET), 0x01, "THR write left DLL alone");
        assert_eq!(rd(&mut s, DLM_OFFSET), 0x02);
        let state = s.state();
        assert_eq!((state.divisor_low, state.divisor_high), (0x01, 0x02));
    }

    #[test]
    fn dlab_read_of_data_does_not_consume_rx() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        s.enqueue_raw_bytes(b"a").unwrap();
        wr(&mut s, LCR_OFFSET, LCR_DLAB);
        assert_eq!(rd(&mut s, DATA_OFFSET), DEFAULT_DIVISOR_LOW);
        wr(&mut s, LCR_OFFSET, 0);
        assert_eq!(rd(&mut s, DATA_OFFSET), b'a');
    }

    #[test]
    fn thr_writes_go_to_sink_in_order() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        for &b in b"hello\n" {
            wr(&mut s, DATA_OFFSET, b);
            assert_eq!(rd(&mut s, LSR_OFFSET) & (LSR_THRE | LSR_TEMT), 0x60);
        }
        assert_eq!(s.sink().out, b"hello\n");
        assert_eq!(rd(&mut s, LSR_OFFSET) & LSR_DR, 0, "no echo into RX");
        assert_eq!(irq.count(), 0, "no interrupt while IER is 0");
    }

    #[test]
    fn loopback_sends_thr_to_rx_fifo() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, MCR_OFFSET, MCR_LOOP);
        wr(&mut s, DATA_OFFSET, b'a');
        wr(&mut s, DATA_OFFSET, b'b');
        assert!(s.sink().out.is_empty());
        assert_eq!(rd(&mut s, LSR_OFFSET) & LSR_DR, LSR_DR);
        assert_eq!(drain(&mut s), b"ab");
        assert_eq!(s.sink().drained, 1);

        wr(&mut s, MCR_OFFSET, 0);
        wr(&mut s, DATA_OFFSET, b'c');
        assert_eq!(s.sink().out, b"c");
        assert_eq!(rd(&mut s, LSR_OFFSET) & LSR_DR, 0);
    }

    #[test]
    fn loopback_interrupts() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, MCR_OFFSET, MCR_LOOP);
        wr(&mut s, IER_OFFSET, IER_RDI);
        wr(&mut s, DATA_OFFSET, b'a');
        assert_eq!(irq.count(), 1);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_RDI);
        assert_eq!(rd(&mut s, DATA_OFFSET), b'a');
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);
    }

    #[test]
    fn loopback_overrun_sets_oe_until_lsr_read() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, MCR_OFFSET, MCR_LOOP);
        for i in 0..RX_FIFO_SIZE {
            wr(&mut s, DATA_OFFSET, i as u8);
        }
        assert_eq!(s.fifo_capacity(), 0);
        assert_eq!(irq.count(), 0);

        wr(&mut s, IER_OFFSET, IER_RLSI);
        assert_eq!(irq.count(), 0, "no overrun yet");
        wr(&mut s, DATA_OFFSET, 0xee);
        assert_eq!(irq.count(), 1, "overrun raises the line status interrupt");
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_RLSI);
        assert_eq!(
            rd(&mut s, LSR_OFFSET),
            LSR_DR | LSR_OE | LSR_THRE | LSR_TEMT
        );
        assert_eq!(rd(&mut s, LSR_OFFSET), LSR_DR | LSR_THRE | LSR_TEMT);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);
        let expected: StdVec<u8> = (0..RX_FIFO_SIZE as u8).collect();
        assert_eq!(drain(&mut s), expected, "the overrun byte was lost");
    }

    #[test]
    fn enabling_rlsi_with_overrun_pending_triggers() {
        let irq = CountingIrq::default();
        let state = SerialState {
            overrun: true,
            ..SerialState::default()
        };
        let mut s = Serial::from_state(&state, &irq, Sink::default());
        wr(&mut s, IER_OFFSET, IER_RLSI);
        assert_eq!(irq.count(), 1);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_RLSI);
    }

    #[test]
    fn lsr_data_ready_tracks_rx_fifo() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        assert_eq!(rd(&mut s, LSR_OFFSET), LSR_THRE | LSR_TEMT);
        assert_eq!(s.enqueue_raw_bytes(b"xy"), Ok(2));
        assert_eq!(rd(&mut s, LSR_OFFSET), LSR_DR | LSR_THRE | LSR_TEMT);
        assert_eq!(rd(&mut s, DATA_OFFSET), b'x');
        assert_eq!(rd(&mut s, LSR_OFFSET), LSR_DR | LSR_THRE | LSR_TEMT);
        assert_eq!(s.sink().drained, 0);
        assert_eq!(rd(&mut s, DATA_OFFSET), b'y');
        assert_eq!(rd(&mut s, LSR_OFFSET), LSR_THRE | LSR_TEMT);
        assert_eq!(s.sink().drained, 1, "drained once, on becoming empty");
        assert_eq!(rd(&mut s, DATA_OFFSET), 0);
        assert_eq!(s.sink().drained, 1, "reading an empty FIFO is no drain");
        assert_eq!(irq.count(), 0, "RDI not enabled");
    }

    #[test]
    fn rx_fifo_full_reports_count_then_error() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        let input: StdVec<u8> = (0..100).collect();
        assert_eq!(s.enqueue_raw_bytes(&input), Ok(RX_FIFO_SIZE));
        assert_eq!(s.fifo_capacity(), 0);
        assert_eq!(s.enqueue_raw_bytes(b"z"), Err(SerialError::RxFifoFull));
        assert_eq!(s.enqueue_raw_bytes(b""), Ok(0));

        assert_eq!(rd(&mut s, DATA_OFFSET), 0);
        assert_eq!(s.fifo_capacity(), 1);
        assert_eq!(s.enqueue_raw_bytes(&input[RX_FIFO_SIZE..]), Ok(1));
        assert_eq!(s.fifo_capacity(), 0);
        assert_eq!(
            rd(&mut s, LSR_OFFSET) & LSR_OE,
            0,
            "host input never overruns"
        );

        let mut expected: StdVec<u8> = (1..RX_FIFO_SIZE as u8).collect();
        expected.push(RX_FIFO_SIZE as u8);
        assert_eq!(drain(&mut s), expected);
        assert_eq!(s.fifo_capacity(), RX_FIFO_SIZE);
    }

    #[test]
    fn rda_interrupt_when_enabled() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        s.enqueue_raw_bytes(b"a").unwrap();
        assert_eq!(irq.count(), 0);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);
        rd(&mut s, DATA_OFFSET);

        wr(&mut s, IER_OFFSET, IER_RDI);
        assert_eq!(irq.count(), 0, "nothing to report yet");
        s.enqueue_raw_bytes(b"bc").unwrap();
        assert_eq!(irq.count(), 1, "one trigger per enqueue");
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_RDI);
        assert_eq!(
            rd(&mut s, IIR_OFFSET),
            IIR_RDI,
            "IIR read does not clear RDA"
        );
        s.enqueue_raw_bytes(b"d").unwrap();
        assert_eq!(irq.count(), 2, "new data triggers again");
        assert_eq!(drain(&mut s), b"bcd");
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);
        assert_eq!(s.enqueue_raw_bytes(&[]), Ok(0));
        assert_eq!(irq.count(), 2, "empty enqueue raises nothing");
    }

    #[test]
    fn enabling_rdi_with_data_pending_triggers() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        s.enqueue_raw_bytes(b"a").unwrap();
        wr(&mut s, IER_OFFSET, IER_RDI);
        assert_eq!(irq.count(), 1);
        wr(&mut s, IER_OFFSET, IER_RDI);
        assert_eq!(irq.count(), 1, "no new edge without a change");
        wr(&mut s, IER_OFFSET, 0);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT, "masked");
    }

    #[test]
    fn thre_interrupt_on_enable_and_cleared_by_iir_read() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, IER_OFFSET, IER_THRI);
        assert_eq!(irq.count(), 1);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_THRI);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT, "IIR read cleared THRE");

        wr(&mut s, IER_OFFSET, IER_THRI);
        assert_eq!(irq.count(), 1, "bit already set: no new THRE");
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);

        // Linux's check for UARTs that don't re-assert THRE.
        wr(&mut s, IER_OFFSET, 0);
        wr(&mut s, IER_OFFSET, IER_THRI);
        assert_eq!(irq.count(), 2);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_THRI);
    }

    #[test]
    fn disabling_thri_drops_pending_thre() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, IER_OFFSET, IER_THRI);
        wr(&mut s, IER_OFFSET, IER_RDI);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);
        assert!(!s.state().thr_interrupt_pending);
    }

    #[test]
    fn thre_interrupt_on_thr_write() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, IER_OFFSET, IER_THRI);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_THRI);
        assert_eq!(irq.count(), 1);
        wr(&mut s, DATA_OFFSET, b'a');
        assert_eq!(irq.count(), 2);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_THRI);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);
        assert_eq!(s.sink().out, b"a");
    }

    #[test]
    fn no_thre_interrupt_when_disabled() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, IER_OFFSET, IER_RDI);
        wr(&mut s, DATA_OFFSET, b'a');
        assert_eq!(irq.count(), 0);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);
    }

    #[test]
    fn iir_priority_rda_over_thre() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, IER_OFFSET, IER_RDI | IER_THRI);
        assert_eq!(irq.count(), 1, "THRE raised on enable");
        s.enqueue_raw_bytes(b"a").unwrap();
        assert_eq!(irq.count(), 2);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_RDI);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_RDI, "THRE hidden, not cleared");
        assert_eq!(rd(&mut s, DATA_OFFSET), b'a');
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_THRI);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);
    }

    #[test]
    fn iir_priority_line_status_first_modem_status_last() {
        let irq = CountingIrq::default();
        let state = SerialState {
            interrupt_enable: IER_MASK,
            overrun: true,
            modem_status_delta: MSR_DCTS,
            thr_interrupt_pending: true,
            rx_fifo: Vec::from_slice(b"a").unwrap(),
            ..SerialState::default()
        };
        let mut s = Serial::from_state(&state, &irq, Sink::default());
        assert_eq!(irq.count(), 0, "restoring raises nothing");
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_RLSI);
        rd(&mut s, LSR_OFFSET);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_RDI);
        rd(&mut s, DATA_OFFSET);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_THRI);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_MSI);
        rd(&mut s, MSR_OFFSET);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);
    }

    #[test]
    fn fcr_fifo_enable_sets_iir_fifo_bits() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, FCR_OFFSET, FCR_ENABLE_FIFO);
        let iir = rd(&mut s, IIR_OFFSET);
        assert_eq!(iir, IIR_FIFO_BITS | IIR_NO_INT);
        assert_eq!(iir >> 6, 3, "Linux identifies a 16550A");
        wr(&mut s, IER_OFFSET, IER_THRI);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_FIFO_BITS | IIR_THRI);
        wr(&mut s, FCR_OFFSET, 0);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);
        wr(&mut s, FCR_OFFSET, 0xff);
        assert_eq!(s.state().fifo_control, FCR_KEPT, "reset bits self-clear");
    }

    #[test]
    fn fcr_clear_rx_empties_fifo() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, IER_OFFSET, IER_RDI);
        s.enqueue_raw_bytes(b"abc").unwrap();
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_RDI);
        wr(&mut s, FCR_OFFSET, FCR_ENABLE_FIFO | FCR_CLEAR_RX);
        assert_eq!(rd(&mut s, LSR_OFFSET) & LSR_DR, 0);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_FIFO_BITS | IIR_NO_INT);
        assert_eq!(s.fifo_capacity(), RX_FIFO_SIZE);
        assert_eq!(s.sink().drained, 1);
        assert_eq!(rd(&mut s, DATA_OFFSET), 0);

        // Clearing the transmit FIFO, or an empty receive FIFO, is a no-op.
        wr(&mut s, FCR_OFFSET, FCR_ENABLE_FIFO | FCR_CLEAR_RX | 0x04);
        assert_eq!(s.sink().drained, 1);
    }

    #[test]
    fn fifo_enable_alone_keeps_rx() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        s.enqueue_raw_bytes(b"a").unwrap();
        wr(&mut s, FCR_OFFSET, FCR_ENABLE_FIFO);
        wr(&mut s, FCR_OFFSET, 0);
        assert_eq!(rd(&mut s, DATA_OFFSET), b'a');
    }

    #[test]
    fn msr_normal_mode_is_connected_null_modem() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, IER_OFFSET, IER_MSI);
        for mcr in [0, MCR_DTR | MCR_RTS, MCR_OUT1 | MCR_OUT2, 0x0f] {
            wr(&mut s, MCR_OFFSET, mcr);
            assert_eq!(rd(&mut s, MCR_OFFSET), mcr);
            assert_eq!(rd(&mut s, MSR_OFFSET), MSR_DCD | MSR_DSR | MSR_CTS);
        }
        assert_eq!(irq.count(), 0, "no modem status change");
        wr(&mut s, MSR_OFFSET, 0);
        assert_eq!(
            rd(&mut s, MSR_OFFSET),
            MSR_DCD | MSR_DSR | MSR_CTS,
            "MSR write ignored"
        );
    }

    #[test]
    fn msr_loopback_mirrors_mcr() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        // Linux's 8250 autoconfig loopback check.
        wr(&mut s, MCR_OFFSET, MCR_LOOP | 0x0a);
        assert_eq!(rd(&mut s, MSR_OFFSET) & 0xf0, 0x90);

        for (mcr, line) in [
            (MCR_RTS, MSR_CTS),
            (MCR_DTR, MSR_DSR),
            (MCR_OUT1, MSR_RI),
            (MCR_OUT2, MSR_DCD),
            (0, 0),
        ] {
            wr(&mut s, MCR_OFFSET, MCR_LOOP | mcr);
            assert_eq!(rd(&mut s, MSR_OFFSET) & 0xf0, line, "mcr {mcr:#x}");
        }
        wr(&mut s, MCR_OFFSET, MCR_LOOP | 0x0f);
        assert_eq!(rd(&mut s, MSR_OFFSET) & 0xf0, 0xf0);
        wr(&mut s, MCR_OFFSET, 0);
        assert_eq!(rd(&mut s, MSR_OFFSET) & 0xf0, MSR_DCD | MSR_DSR | MSR_CTS);
    }

    #[test]
    fn msr_deltas_and_modem_status_interrupt() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        // Entering loopback with only OUT2 set drops CTS and DSR.
        wr(&mut s, MCR_OFFSET, MCR_LOOP | MCR_OUT2);
        assert_eq!(rd(&mut s, MSR_OFFSET), MSR_DCD | MSR_DCTS | MSR_DDSR);
        assert_eq!(rd(&mut s, MSR_OFFSET), MSR_DCD, "MSR read clears deltas");

        wr(&mut s, IER_OFFSET, IER_MSI);
        assert_eq!(irq.count(), 0);
        wr(&mut s, MCR_OFFSET, MCR_LOOP | MCR_OUT2 | MCR_OUT1);
        assert_eq!(irq.count(), 0, "RI rising is no trailing edge");
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);
        wr(&mut s, MCR_OFFSET, MCR_LOOP | MCR_OUT2);
        assert_eq!(irq.count(), 1, "RI falling edge");
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_MSI);
        assert_eq!(rd(&mut s, MSR_OFFSET), MSR_DCD | MSR_TERI);
        assert_eq!(rd(&mut s, IIR_OFFSET), IIR_NO_INT);

        wr(&mut s, MCR_OFFSET, MCR_LOOP);
        assert_eq!(irq.count(), 2);
        assert_eq!(rd(&mut s, MSR_OFFSET), MSR_DDCD);

        // Enabling MSI with deltas already latched raises it.
        wr(&mut s, IER_OFFSET, 0);
        wr(&mut s, MCR_OFFSET, MCR_LOOP | MCR_RTS);
        assert_eq!(irq.count(), 2);
        wr(&mut s, IER_OFFSET, IER_MSI);
        assert_eq!(irq.count(), 3);
        assert_eq!(rd(&mut s, MSR_OFFSET), MSR_CTS | MSR_DCTS);
    }

    #[test]
    fn scr_lcr_mcr_round_trip() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        for v in [0x00, 0x55, 0xaa, 0xff] {
            wr(&mut s, SCR_OFFSET, v);
            assert_eq!(rd(&mut s, SCR_OFFSET), v);
        }
        wr(&mut s, LCR_OFFSET, 0x1b);
        assert_eq!(rd(&mut s, LCR_OFFSET), 0x1b);
        wr(&mut s, MCR_OFFSET, 0xff);
        assert_eq!(rd(&mut s, MCR_OFFSET), MCR_MASK, "reserved MCR bits read 0");
    }

    #[test]
    fn ier_keeps_low_nibble() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        // Linux's 8250 autoconfig IER check.
        wr(&mut s, IER_OFFSET, 0);
        assert_eq!(rd(&mut s, IER_OFFSET) & 0x0f, 0);
        wr(&mut s, IER_OFFSET, 0x0f);
        assert_eq!(rd(&mut s, IER_OFFSET) & 0x0f, 0x0f);
        wr(&mut s, IER_OFFSET, 0xf0);
        assert_eq!(rd(&mut s, IER_OFFSET), 0);
    }

    #[test]
    fn lsr_write_ignored() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, LSR_OFFSET, 0xff);
        assert_eq!(rd(&mut s, LSR_OFFSET), LSR_THRE | LSR_TEMT);
    }

    #[test]
    fn state_round_trip() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        wr(&mut s, LCR_OFFSET, LCR_DLAB);
        wr(&mut s, DLL_OFFSET, 3);
        wr(&mut s, DLM_OFFSET, 4);
        wr(&mut s, LCR_OFFSET, 0x1b);
        wr(&mut s, FCR_OFFSET, 0xc1);
        wr(&mut s, MCR_OFFSET, MCR_LOOP | MCR_RTS);
        wr(&mut s, IER_OFFSET, IER_RDI | IER_THRI | IER_MSI);
        wr(&mut s, SCR_OFFSET, 0x42);
        s.enqueue_raw_bytes(b"abc").unwrap();
        rd(&mut s, DATA_OFFSET);

        let state = s.state();
        assert_eq!(state.rx_fifo, b"bc");
        assert!(state.thr_interrupt_pending);
        assert_ne!(state.modem_status_delta, 0);

        let irq2 = CountingIrq::default();
        let mut restored = Serial::from_state(&state, &irq2, Sink::default());
        assert_eq!(restored.state(), state);
        assert_eq!(irq2.count(), 0);
        for offset in [IER_OFFSET, LCR_OFFSET, MCR_OFFSET, SCR_OFFSET] {
            assert_eq!(rd(&mut restored, offset), rd(&mut s, offset));
        }
        assert_eq!(rd(&mut restored, IIR_OFFSET), IIR_FIFO_BITS | IIR_RDI);
        assert_eq!(drain(&mut restored), b"bc");
        assert_eq!(rd(&mut restored, IIR_OFFSET), IIR_FIFO_BITS | IIR_THRI);
        wr(&mut restored, LCR_OFFSET, LCR_DLAB);
        assert_eq!(rd(&mut restored, DLL_OFFSET), 3);
        assert_eq!(rd(&mut restored, DLM_OFFSET), 4);
    }

    #[test]
    fn from_state_masks_reserved_bits() {
        let irq = CountingIrq::default();
        let state = SerialState {
            interrupt_enable: 0xf0,
            fifo_control: 0xff,
            modem_control: 0xe0,
            modem_status_delta: 0xf0,
            thr_interrupt_pending: true,
            ..SerialState::default()
        };
        let s = Serial::from_state(&state, &irq, Sink::default());
        let got = s.state();
        assert_eq!(got.interrupt_enable, 0);
        assert_eq!(got.fifo_control, FCR_KEPT);
        assert_eq!(got.modem_control, 0);
        assert_eq!(got.modem_status_delta, 0);
        assert!(!got.thr_interrupt_pending, "THRI is not enabled");
        assert_eq!(
            SerialState::default(),
            Serial::new(&irq, Sink::default()).state()
        );
    }

    #[test]
    fn bad_widths_and_offsets_ignored() {
        let irq = CountingIrq::default();
        let mut s = Serial::new(&irq, Sink::default());
        s.enqueue_raw_bytes(b"a").unwrap();
        wr(&mut s, SCR_OFFSET, 0x11);
        let before = s.state();

        s.write(SCR_OFFSET, &[0x22, 0x33]);
        s.write(DATA_OFFSET, b"xy");
        s.write(DATA_OFFSET, &[]);
        s.write(IER_OFFSET, &[0x0f, 0, 0, 0]);
        for offset in [8, 9, 0x100, u64::MAX] {
            s.write(offset, &[0xff]);
        }
        assert_eq!(s.state(), before);
        assert!(s.sink().out.is_empty());
        assert_eq!(irq.count(), 0);

        let mut wide = [0u8; 4];
        s.read(DATA_OFFSET, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        let mut empty = [0u8; 0];
        s.read(DATA_OFFSET, &mut empty);
        for offset in [8, 0x100, u64::MAX] {
            assert_eq!(rd(&mut s, offset), 0xff);
        }
        assert_eq!(s.state(), before, "ignored reads consume nothing");
        assert_eq!(rd(&mut s, SCR_OFFSET), 0x11);
    }

    #[test]
    fn sink_by_reference() {
        let irq = CountingIrq::default();
        let mut sink = Sink::default();
        {
            let mut s = Serial::new(&irq, &mut sink);
            s.write(DATA_OFFSET, b"q");
            s.enqueue_raw_bytes(b"r").unwrap();
            let mut data = [0];
            s.read(DATA_OFFSET, &mut data);
            assert_eq!(data, *b"r");
            assert!(core::ptr::eq(*s.irq(), &irq));
            s.sink_mut().out.push(b'!');
        }
        assert_eq!(sink.out, b"q!");
        assert_eq!(sink.drained, 1);
    }

    #[test]
    fn error_message() {
        use std::string::ToString;
        assert_eq!(
            SerialError::RxFifoFull.to_string(),
            "the serial receive FIFO is full"
        );
    }

    proptest! {
        /// Any guest access sequence, interleaved with host input, never
        /// panics and keeps the registers self-consistent.
        #[test]
        fn arbitrary_accesses_keep_invariants(
            ops in proptest::collection::vec(
                (0u8..4, 0u64..10, any::<u8>(), 0usize..3), 0..200),
        ) {
            let irq = CountingIrq::default();
            let mut s = Serial::new(&irq, Sink::default());
            for (kind, offset, value, len) in ops {
                match kind {
                    0 => { let mut d = vec![0u8; len]; s.read(offset, &mut d); }
                    1 => s.write(offset, &vec![value; len]),
                    2 => { let _ = s.enqueue_raw_bytes(&vec![value; usize::from(value % 80)]); }
                    _ => s = Serial::from_state(&s.state(), &irq, Sink::default()),
                }
                let state = s.state();
                prop_assert_eq!(state.rx_fifo.len() + s.fifo_capacity(), RX_FIFO_SIZE);
                prop_assert_eq!(state.interrupt_enable & !IER_MASK, 0);
                let iir = s.interrupt_id();
                prop_assert!(matches!(iir, IIR_NO_INT | IIR_MSI | IIR_THRI | IIR_RDI | IIR_RLSI));
                prop_assert_eq!(iir == IIR_NO_INT, {
                    let ier = state.interrupt_enable;
                    !((ier & IER_RDI != 0 && !state.rx_fifo.is_empty())
                        || (ier & IER_THRI != 0 && state.thr_interrupt_pending)
                        || (ier & IER_RLSI != 0 && state.overrun)
                        || (ier & IER_MSI != 0 && state.modem_status_delta != 0))
                });
            }
        }
    }

    mod state {
        use super::*;
        use crate::snapshot::{Persist, StateError};

        fn encode(state: &SerialState) -> StdVec<u8> {
            let mut out = vec![0u8; SerialState::MAX_LEN];
            let len = state.save(&mut out).unwrap();
            out.truncate(len);
            out
        }

        fn sample() -> SerialState {
            SerialState {
                divisor_low: 1,
                divisor_high: 2,
                interrupt_enable: IER_THRI | IER_RDI,
                fifo_control: 0xc1,
                line_control: 0x9b,
                modem_control: MCR_LOOP | MCR_DTR,
                overrun: true,
                modem_status_delta: MSR_DDSR,
                scratch: 0x5a,
                thr_interrupt_pending: true,
                rx_fifo: Vec::from_slice(b"xyz").unwrap(),
            }
        }

        #[test]
        fn encoding_is_fixed() {
            let bytes = encode(&sample());
            assert_eq!(
                bytes,
                [1, 2, 3, 0xc1, 0x9b, 0x11, 2, 0x5a, 3, 3, b'x', b'y', b'z']
            );
            assert_eq!(SerialState::load(&bytes), Ok(sample()));
            let full = SerialState {
                rx_fifo: Vec::from_slice(&[7; RX_FIFO_SIZE]).unwrap(),
                ..SerialState::default()
            };
            assert_eq!(encode(&full).len(), SerialState::MAX_LEN);
            assert_eq!(SerialState::load(&encode(&full)), Ok(full));
        }

        #[test]
        fn load_rejects_what_no_uart_saves() {
            let good = encode(&sample());
            let with = |i: usize, v: u8| {
                let mut b = good.clone();
                b[i] = v;
                SerialState::load(&b)
            };
            let invalid = |field, value| Err(StateError::InvalidValue { field, value });
            assert_eq!(with(2, 0x13), invalid("interrupt enable register", 0x13));
            assert_eq!(with(3, 0xc3), invalid("FIFO control register", 0xc3));
            assert_eq!(with(5, 0x20), invalid("modem control register", 0x20));
            assert_eq!(with(6, 0x12), invalid("modem status deltas", 0x12));
            assert_eq!(with(8, 4), invalid("serial flags", 4));
            assert_eq!(
                with(2, IER_RDI),
                invalid("interrupt enable register for a pending THR interrupt", 1)
            );
            assert_eq!(with(9, 65), invalid("receive FIFO length", 65));
            assert_eq!(
                with(9, 4),
                Err(StateError::TooShort {
                    needed: 4,
                    available: 3
                })
            );
            assert_eq!(with(9, 2), Err(StateError::TrailingBytes { extra: 1 }));
        }

        /// One guest or host action.
        #[derive(Clone, Debug)]
        enum Op {
            Read(u64),
            Write(u64, u8),
            Input(u8, usize),
        }

        fn any_op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0u64..8).prop_map(Op::Read),
                (0u64..8, any::<u8>()).prop_map(|(o, v)| Op::Write(o, v)),
                (any::<u8>(), 0usize..70).prop_map(|(b, n)| Op::Input(b, n)),
            ]
        }

        /// Applies `op`; returns what the guest read.
        fn apply(s: &mut TestSerial<'_>, op: &Op) -> Option<u8> {
            match *op {
                Op::Read(offset) => Some(rd(s, offset)),
                Op::Write(offset, value) => {
                    wr(s, offset, value);
                    None
                }
                Op::Input(byte, n) => {
                    let _ = s.enqueue_raw_bytes(&vec![byte; n]);
                    None
                }
            }
        }

        proptest! {
            /// A UART saved at any point, encoded, loaded and restored
            /// behaves like the original from then on.
            #[test]
            fn restored_uart_behaves_the_same(
                before in proptest::collection::vec(any_op(), 0..100),
                after in proptest::collection::vec(any_op(), 0..100),
            ) {
                let irq = CountingIrq::default();
                let mut s = Serial::new(&irq, Sink::default());
                for op in &before {
                    apply(&mut s, op);
                }
                let state = SerialState::load(&encode(&s.state())).unwrap();
                prop_assert_eq!(&state, &s.state());
                let irq2 = CountingIrq::default();
                let mut r = Serial::from_state(&state, &irq2, Sink::default());
                let (irqs, out) = (irq.count(), s.sink().out.len());
                for op in &after {
                    prop_assert_eq!(apply(&mut r, op), apply(&mut s, op));
                }
                prop_assert_eq!(irq2.count(), irq.count() - irqs);
                prop_assert_eq!(&r.sink().out[..], &s.sink().out[out..]);
                prop_assert_eq!(r.state(), s.state());
            }

            /// Loading arbitrary bytes never panics, and what loads
            /// re-encodes to the same bytes and restores unchanged.
            #[test]
            fn load_of_arbitrary_bytes(
                bytes in proptest::collection::vec(any::<u8>(), 0..80),
            ) {
                if let Ok(state) = SerialState::load(&bytes) {
                    prop_assert_eq!(encode(&state), bytes);
                    let irq = CountingIrq::default();
                    prop_assert_eq!(Serial::from_state(&state, &irq, Sink::default()).state(), state);
                }
            }
        }
    }
}
