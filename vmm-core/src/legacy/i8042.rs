//! A minimal i8042 keyboard controller, there so the guest can reboot.
//!
//! The controller has two ports: data at 0x60 and status/command at 0x64.
//! The caller maps them to offsets from 0x60: register the five-port range
//! `0x60..=0x64` with base [`DATA_PORT`] (port 0x60 is [`DATA_OFFSET`], port
//! 0x64 is [`COMMAND_OFFSET`]; ports 0x61 to 0x63 belong to other devices
//! and read as `0xff` here), or register each port alone and pass the
//! matching offset constant.
//!
//! The point of the device is the reset line: Linux booted with `reboot=k`
//! waits for the status register's input-buffer-full bit to clear, then
//! writes 0xFE ("pulse the reset line") to port 0x64. That, and any other
//! pulse or output-port write that drives the reset line low, calls
//! [`ResetSink::reset`].
//!
//! No keyboard or mouse is attached and the controller raises no
//! interrupts: bytes sent to either device are dropped. The controller's own
//! commands, which Linux's i8042 driver polls for, are answered: read/write
//! the command byte (0x20/0x60), self-tests (0xAA, 0xAB, 0xA9), enable and
//! disable of either port, output-port read/write (0xD0/0xD1), and the
//! output-buffer loopbacks (0xD2/0xD3). 0xD4 swallows the next data byte.
//! Other commands are ignored. Guests that don't need the driver can boot
//! with `i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd` (or without
//! `CONFIG_SERIO_I8042`); `reboot=k` does not need it.
//!
//! Accesses other than one-byte ones at offset 0 or 4 are ignored; such
//! reads fill the buffer with `0xff`, as an undriven ISA bus reads.

use crate::snapshot::{DeviceState, Persist, Reader, SectionKind, StateError, Writer};

/// I/O port of the data register on a PC.
pub const DATA_PORT: u16 = 0x60;
/// I/O port of the status (read) and command (write) register on a PC.
pub const COMMAND_PORT: u16 = 0x64;
/// Offset of the data register from [`DATA_PORT`].
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status register (read) from [`DATA_PORT`].
pub const STATUS_OFFSET: u64 = 4;
/// Offset of the command register (write) from [`DATA_PORT`].
pub const COMMAND_OFFSET: u64 = 4;
/// Size of the port range starting at [`DATA_PORT`] that covers both ports.
pub const I8042_PORT_SPAN: u64 = 5;

// Status register.
const STATUS_OUTPUT_FULL: u8 = 0x01;
// Bit 1, input buffer full, is never set: commands take effect at once.
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_NOT_INHIBITED: u8 = 0x10;
const STATUS_AUX_DATA: u8 = 0x20;

// Command byte (controller configuration).
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;
const DEFAULT_COMMAND_BYTE: u8 = CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_XLATE;

// Output port.
const OUTPUT_PORT_RESET_HIGH: u8 = 0x01;
const OUTPUT_PORT_A20: u8 = 0x02;
const DEFAULT_OUTPUT_PORT: u8 = OUTPUT_PORT_RESET_HIGH | OUTPUT_PORT_A20;

// Commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_FIRST: u8 = 0xf0;

// Responses.
const SELF_TEST_PASSED: u8 = 0x55;
const PORT_TEST_PASSED: u8 = 0x00;

// What an access that hits no register reads as.
const UNDRIVEN: u8 = 0xff;

/// Receives the guest's request to reset the machine.
pub trait ResetSink {
    /// The guest pulsed the CPU reset line. The VMM should stop the vCPUs
    /// and tear the VM down (or restart it).
    fn reset(&mut self);
}

impl<T: ResetSink + ?Sized> ResetSink for &mut T {
    fn reset(&mut self) {
        (**self).reset()
    }
}

/// A snapshot of an [`I8042`]'s guest-visible state, from [`I8042::state`].
///
/// Every combination of field values is accepted by [`I8042::from_state`]; a
/// `pending_command` that takes no data byte is dropped there.
///
/// Encoding (5 bytes): `command_byte`, `output_port`, `output`; a flags
/// byte (bit 0 `output_full`, bit 1 `output_from_aux`, bit 2
/// `last_write_was_command`); `pending_command`, 0 for none. Loading
/// rejects a pending command that takes no data byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct I8042State {
    /// The command byte (controller configuration, read with 0x20).
    pub command_byte: u8,
    /// The output port (bit 0: reset line, bit 1: A20 gate).
    pub output_port: u8,
    /// The output buffer: the byte the next data-port read returns.
    pub output: u8,
    /// Whether the output buffer holds an unread byte.
    pub output_full: bool,
    /// Whether the unread byte came from the auxiliary (mouse) port.
    pub output_from_aux: bool,
    /// A command waiting for its data byte on the data port.
    pub pending_command: Option<u8>,
    /// Whether the last write went to the command port (status bit 3).
    pub last_write_was_command: bool,
}

impl Default for I8042State {
    /// The power-on state.
    fn default() -> Self {
        I8042State {
            command_byte: DEFAULT_COMMAND_BYTE,
            output_port: DEFAULT_OUTPUT_PORT,
            output: 0,
            output_full: false,
            output_from_aux: false,
            pending_command: None,
            last_write_was_command: false,
        }
    }
}

const STATE_OUTPUT_FULL: u8 = 1 << 0;
const STATE_OUTPUT_FROM_AUX: u8 = 1 << 1;
const STATE_LAST_WAS_COMMAND: u8 = 1 << 2;

impl Persist for I8042State {
    const MAX_LEN: usize = 5;

    fn write_to(&self, w: &mut Writer<'_>) -> Result<(), StateError> {
        let mut flags = 0;
        for (set, bit) in [
            (self.output_full, STATE_OUTPUT_FULL),
            (self.output_from_aux, STATE_OUTPUT_FROM_AUX),
            (self.last_write_was_command, STATE_LAST_WAS_COMMAND),
        ] {
            if set {
                flags |= bit;
            }
        }
        // Every command that takes data is non-zero, so 0 means none.
        w.bytes(&[
            self.command_byte,
            self.output_port,
            self.output,
            flags,
            self.pending_command.unwrap_or(0),
        ])
    }

    fn read_from(r: &mut Reader<'_>) -> Result<Self, StateError> {
        let [command_byte, output_port, output] = r.array()?;
        let flags = r.flags(
            "i8042 flags",
            STATE_OUTPUT_FULL | STATE_OUTPUT_FROM_AUX | STATE_LAST_WAS_COMMAND,
        )?;
        let pending_command = match r.u8()? {
            0 => None,
            c if takes_data(c) => Some(c),
            c => {
                return Err(StateError::InvalidValue {
                    field: "pending i8042 command",
                    value: u64::from(c),
                })
            }
        };
        Ok(I8042State {
            command_byte,
            output_port,
            output,
            output_full: flags & STATE_OUTPUT_FULL != 0,
            output_from_aux: flags & STATE_OUTPUT_FROM_AUX != 0,
            pending_command,
            last_write_was_command: flags & STATE_LAST_WAS_COMMAND != 0,
        })
    }
}

impl DeviceState for I8042State {
    const KIND: SectionKind = SectionKind::I8042;
}

/// An i8042 whose reset line is wired to `R`.
#[derive(Debug)]
pub struct I8042<R: ResetSink> {
    reset: R,
    state: I8042State,
}

impl<R: ResetSink> I8042<R> {
    /// A controller in its power-on state.
    pub fn new(reset: R) -> Self {
        Self::from_state(&I8042State::default(), reset)
    }

    /// A controller restored from `state`.
    pub fn from_state(state: &I8042State, reset: R) -> Self {
        let mut state = *state;
        state.pending_command = state.pending_command.filter(|&c| takes_data(c));
        I8042 { reset, state }
    }

    /// Puts the guest-visible state back to `state`, keeping the reset
    /// sink.
    pub fn restore(&mut self, state: &I8042State) {
        let mut state = *state;
        state.pending_command = state.pending_command.filter(|&c| takes_data(c));
        self.state = state;
    }

    /// A snapshot of the guest-visible state.
    pub fn state(&self) -> I8042State {
        self.state
    }

    /// The reset sink.
    pub fn reset_sink(&self) -> &R {
        &self.reset
    }

    /// The reset sink, mutably.
    pub fn reset_sink_mut(&mut self) -> &mut R {
        &mut self.reset
    }

    /// Handles a guest read of `data.len()` bytes at `offset` from
    /// [`DATA_PORT`]. Anything but a one-byte read at [`DATA_OFFSET`] or
    /// [`STATUS_OFFSET`] fills `data` with `0xff` and has no effect.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data) {
            (DATA_OFFSET, [byte]) => *byte = self.read_data(),
            (STATUS_OFFSET, [byte]) => *byte = self.status(),
            (_, data) => data.fill(UNDRIVEN),
        }
    }

    /// Handles a guest write of `data` at `offset` from [`DATA_PORT`].
    /// Anything but a one-byte write at [`DATA_OFFSET`] or
    /// [`COMMAND_OFFSET`] is ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA_OFFSET, [value]) => self.write_data(*value),
            (COMMAND_OFFSET, [value]) => self.write_command(*value),
            _ => {}
        }
    }

    fn status(&self) -> u8 {
        let s = &self.state;
        let mut status = STATUS_NOT_INHIBITED;
        if s.output_full {
            status |= STATUS_OUTPUT_FULL;
            if s.output_from_aux {
                status |= STATUS_AUX_DATA;
            }
        }
        if s.command_byte & CTR_SYSTEM_FLAG != 0 {
            status |= STATUS_SYSTEM_FLAG;
        }
        if s.last_write_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        // Like the real part, a read of an empty buffer repeats the last byte.
        self.state.output_full = false;
        self.state.output
    }

    /// Puts a response in the one-byte output buffer, replacing any unread
    /// one.
    fn respond(&mut self, byte: u8, from_aux: bool) {
        self.state.output = byte;
        self.state.output_full = true;
        self.state.output_from_aux = from_aux;
    }

    fn write_command(&mut self, command: u8) {
        self.state.last_write_was_command = true;
        // A new command abandons one still waiting for its data byte.
        self.state.pending_command = None;
        let ctr = self.state.command_byte;
        match command {
            CMD_READ_CTR => self.respond(ctr, false),
            CMD_AUX_DISABLE => self.state.command_byte = ctr | CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.state.command_byte = ctr & !CTR_AUX_DISABLE,
            CMD_AUX_TEST | CMD_KBD_TEST => self.respond(PORT_TEST_PASSED, false),
            CMD_SELF_TEST => {
                self.state.command_byte = ctr | CTR_SYSTEM_FLAG;
                self.respond(SELF_TEST_PASSED, false);
            }
            CMD_KBD_DISABLE => self.state.command_byte = ctr | CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.state.command_byte = ctr & !CTR_KBD_DISABLE,
            CMD_READ_OUTPUT_PORT => self.respond(self.state.output_port, false),
            // 0xF0-0xFF pulse the output-port lines whose bits (0-3) are
            // clear; bit 0 is the CPU reset line, and 0xFE pulses just it.
            // Pulsing other lines does nothing.
            CMD_PULSE_FIRST..=u8::MAX if command & OUTPUT_PORT_RESET_HIGH == 0 => {
                self.reset.reset()
            }
            c if takes_data(c) => self.state.pending_command = Some(c),
            // Unknown or unsupported (RAM reads, password, mux): ignored.
            _ => {}
        }
    }

    fn write_data(&mut self, value: u8) {
        self.state.last_write_was_command = false;
        match self.state.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.state.command_byte = value,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                if value & OUTPUT_PORT_RESET_HIGH == 0 {
                    self.reset.reset();
                }
                // The host performs the reset; the line does not stay low.
                self.state.output_port = value | OUTPUT_PORT_RESET_HIGH;
            }
            Some(CMD_WRITE_KBD_OUTPUT) => self.respond(value, false),
            Some(CMD_WRITE_AUX_OUTPUT) => self.respond(value, true),
            // 0xD4 (send to the mouse) or no command (send to the keyboard):
            // no device is attached, so the byte goes nowhere.
            _ => {}
        }
    }
}

/// Whether `command` takes a data byte on the data port.
fn takes_data(command: u8) -> bool {
    matches!(
        command,
        CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUTPUT
            | CMD_WRITE_AUX_OUTPUT
            | CMD_WRITE_AUX
    )
}

#[cfg(test)]
mod tests {
    use std::vec;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Default)]
    struct Resets(u32);

    impl ResetSink for Resets {
        fn reset(&mut self) {
            self.0 += 1;
        }
    }

    fn rd(d: &mut I8042<Resets>, offset: u64) -> u8 {
        let mut data = [0x5a];
        d.read(offset, &mut data);
        data[0]
    }

    fn cmd(d: &mut I8042<Resets>, command: u8) {
        d.write(COMMAND_OFFSET, &[command]);
    }

    fn data(d: &mut I8042<Resets>, value: u8) {
        d.write(DATA_OFFSET, &[value]);
    }

    #[test]
    fn port_mapping() {
        assert_eq!(u64::from(DATA_PORT - DATA_PORT), DATA_OFFSET);
        assert_eq!(u64::from(COMMAND_PORT - DATA_PORT), COMMAND_OFFSET);
        assert_eq!(STATUS_OFFSET, COMMAND_OFFSET);
        assert_eq!(I8042_PORT_SPAN, COMMAND_OFFSET + 1);
    }

    #[test]
    fn power_on_status() {
        let mut d = I8042::new(Resets::default());
        let status = rd(&mut d, STATUS_OFFSET);
        assert_eq!(status, STATUS_NOT_INHIBITED | STATUS_SYSTEM_FLAG);
        assert_eq!(status & 0x02, 0, "input buffer never full");
        assert_eq!(d.state(), I8042State::default());
    }

    #[test]
    fn reset_pulse_calls_sink() {
        let mut d = I8042::new(Resets::default());
        // Linux reboot=k: kb_wait() for IBF clear, then 0xFE to port 0x64.
        assert_eq!(rd(&mut d, STATUS_OFFSET) & 0x02, 0);
        cmd(&mut d, 0xfe);
        assert_eq!(d.reset_sink().0, 1);
        cmd(&mut d, 0xfe);
        assert_eq!(d.reset_sink().0, 2);
    }

    #[test]
    fn pulse_without_reset_line_does_not_reset() {
        let mut d = I8042::new(Resets::default());
        cmd(&mut d, 0xff);
        cmd(&mut d, 0xfd);
        assert_eq!(d.reset_sink().0, 0);
        cmd(&mut d, 0xf0);
        assert_eq!(d.reset_sink().0, 1, "0xF0 pulses all four lines");
    }

    #[test]
    fn output_port_write_resets_when_bit_0_clear() {
        let mut d = I8042::new(Resets::default());
        cmd(&mut d, CMD_WRITE_OUTPUT_PORT);
        data(&mut d, 0xdf); // A20 on, reset high: the classic A20 enable.
        assert_eq!(d.reset_sink().0, 0);
        cmd(&mut d, CMD_READ_OUTPUT_PORT);
        assert_eq!(rd(&mut d, DATA_OFFSET), 0xdf);
        cmd(&mut d, CMD_WRITE_OUTPUT_PORT);
        data(&mut d, 0xfe);
        assert_eq!(d.reset_sink().0, 1);
        cmd(&mut d, CMD_READ_OUTPUT_PORT);
        assert_eq!(rd(&mut d, DATA_OFFSET), 0xff);
    }

    #[test]
    fn command_byte_round_trip() {
        let mut d = I8042::new(Resets::default());
        cmd(&mut d, CMD_READ_CTR);
        assert_eq!(rd(&mut d, STATUS_OFFSET) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(rd(&mut d, DATA_OFFSET), DEFAULT_COMMAND_BYTE);
        assert_eq!(rd(&mut d, STATUS_OFFSET) & STATUS_OUTPUT_FULL, 0);

        cmd(&mut d, CMD_WRITE_CTR);
        assert_eq!(d.state().pending_command, Some(CMD_WRITE_CTR));
        assert_ne!(rd(&mut d, STATUS_OFFSET) & STATUS_LAST_WAS_COMMAND, 0);
        data(&mut d, 0x30);
        assert_eq!(rd(&mut d, STATUS_OFFSET) & STATUS_LAST_WAS_COMMAND, 0);
        assert_eq!(rd(&mut d, STATUS_OFFSET) & STATUS_SYSTEM_FLAG, 0);
        cmd(&mut d, CMD_READ_CTR);
        assert_eq!(rd(&mut d, DATA_OFFSET), 0x30);
        assert_eq!(d.state().pending_command, None);
    }

    #[test]
    fn self_tests_answer() {
        let mut d = I8042::new(Resets::default());
        cmd(&mut d, CMD_WRITE_CTR);
        data(&mut d, 0);
        cmd(&mut d, CMD_SELF_TEST);
        assert_eq!(rd(&mut d, DATA_OFFSET), SELF_TEST_PASSED);
        assert_ne!(rd(&mut d, STATUS_OFFSET) & STATUS_SYSTEM_FLAG, 0);
        cmd(&mut d, CMD_KBD_TEST);
        assert_eq!(rd(&mut d, DATA_OFFSET), PORT_TEST_PASSED);
        cmd(&mut d, CMD_AUX_TEST);
        assert_eq!(rd(&mut d, DATA_OFFSET), PORT_TEST_PASSED);
        assert_eq!(
            rd(&mut d, DATA_OFFSET),
            PORT_TEST_PASSED,
            "stale byte repeats"
        );
        assert_eq!(rd(&mut d, STATUS_OFFSET) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn port_enable_disable_bits() {
        let mut d = I8042::new(Resets::default());
        cmd(&mut d, CMD_AUX_DISABLE);
        cmd(&mut d, CMD_KBD_DISABLE);
        assert_eq!(
            d.state().command_byte,
            DEFAULT_COMMAND_BYTE | CTR_AUX_DISABLE | CTR_KBD_DISABLE
        );
        cmd(&mut d, CMD_AUX_ENABLE);
        cmd(&mut d, CMD_KBD_ENABLE);
        assert_eq!(d.state().command_byte, DEFAULT_COMMAND_BYTE);
    }

    #[test]
    fn output_buffer_loopbacks() {
        let mut d = I8042::new(Resets::default());
        cmd(&mut d, CMD_WRITE_AUX_OUTPUT);
        data(&mut d, 0x5a);
        let status = rd(&mut d, STATUS_OFFSET);
        assert_eq!(status & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA), 0x21);
        assert_eq!(rd(&mut d, DATA_OFFSET), 0x5a);
        assert_eq!(rd(&mut d, STATUS_OFFSET) & STATUS_AUX_DATA, 0);

        cmd(&mut d, CMD_WRITE_KBD_OUTPUT);
        data(&mut d, 0xa5);
        assert_eq!(
            rd(&mut d, STATUS_OFFSET) & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA),
            0x01
        );
        assert_eq!(rd(&mut d, DATA_OFFSET), 0xa5);
    }

    #[test]
    fn device_writes_are_dropped() {
        let mut d = I8042::new(Resets::default());
        cmd(&mut d, CMD_WRITE_AUX);
        data(&mut d, 0xff); // Mouse reset: no mouse.
        data(&mut d, 0xf2); // Keyboard "get ID": no keyboard.
        data(&mut d, 0xfe);
        let state = d.state();
        assert!(!state.output_full);
        assert_eq!(state.pending_command, None);
        assert_eq!(state.command_byte, DEFAULT_COMMAND_BYTE);
        assert_eq!(d.reset_sink().0, 0, "0xFE on the data port is no reset");
    }

    #[test]
    fn new_command_abandons_pending_one() {
        let mut d = I8042::new(Resets::default());
        cmd(&mut d, CMD_WRITE_CTR);
        cmd(&mut d, CMD_READ_CTR);
        assert_eq!(rd(&mut d, DATA_OFFSET), DEFAULT_COMMAND_BYTE);
        data(&mut d, 0x00);
        assert_eq!(d.state().command_byte, DEFAULT_COMMAND_BYTE);
    }

    #[test]
    fn unknown_commands_ignored() {
        let mut d = I8042::new(Resets::default());
        let before = d.state();
        for command in [0x00, 0x21, 0x3f, 0x61, 0x7f, 0xa4, 0xc0, 0xd5, 0xe0, 0xef] {
            cmd(&mut d, command);
            let after = d.state();
            assert_eq!(
                after,
                I8042State {
                    last_write_was_command: true,
                    ..before
                },
                "command {command:#x}"
            );
        }
        assert_eq!(d.reset_sink().0, 0);
    }

    #[test]
    fn bad_widths_and_offsets_ignored() {
        let mut d = I8042::new(Resets::default());
        cmd(&mut d, CMD_READ_CTR);
        let before = d.state();

        d.write(COMMAND_OFFSET, &[0xfe, 0xfe]);
        d.write(COMMAND_OFFSET, &[]);
        d.write(DATA_OFFSET, &[0, 0, 0, 0]);
        for offset in [1, 2, 3, 5, 0x100, u64::MAX] {
            d.write(offset, &[0xfe]);
        }
        assert_eq!(d.reset_sink().0, 0);
        assert_eq!(d.state(), before);

        let mut wide = [0u8; 2];
        d.read(DATA_OFFSET, &mut wide);
        assert_eq!(wide, [0xff; 2]);
        d.read(STATUS_OFFSET, &mut []);
        for offset in [1, 2, 3, 5, u64::MAX] {
            assert_eq!(rd(&mut d, offset), 0xff);
        }
        assert_eq!(d.state(), before, "ignored reads consume nothing");
    }

    #[test]
    fn state_round_trip() {
        let mut d = I8042::new(Resets::default());
        cmd(&mut d, CMD_WRITE_AUX_OUTPUT);
        data(&mut d, 0x42);
        cmd(&mut d, CMD_WRITE_CTR);
        let state = d.state();
        let mut restored = I8042::from_state(&state, Resets::default());
        assert_eq!(restored.state(), state);
        assert_eq!(rd(&mut restored, STATUS_OFFSET), rd(&mut d, STATUS_OFFSET));
        data(&mut restored, 0x11);
        cmd(&mut restored, CMD_READ_CTR);
        assert_eq!(rd(&mut restored, DATA_OFFSET), 0x11);
    }

    #[test]
    fn from_state_drops_bogus_pending_command() {
        let state = I8042State {
            pending_command: Some(0xfe),
            ..I8042State::default()
        };
        let mut d = I8042::from_state(&state, Resets::default());
        assert_eq!(d.state().pending_command, None);
        data(&mut d, 0x00);
        assert_eq!(d.reset_sink().0, 0);
    }

    #[test]
    fn reset_sink_by_reference() {
        let mut resets = Resets::default();
        {
            let mut d = I8042::new(&mut resets);
            d.write(COMMAND_OFFSET, &[0xfe]);
            d.reset_sink_mut().0 += 10;
        }
        assert_eq!(resets.0, 11);
    }

    proptest! {
        /// Any guest access sequence never panics, never sets IBF, and
        /// resets only through a command-port write.
        #[test]
        fn arbitrary_accesses(
            ops in proptest::collection::vec((any::<bool>(), 0u64..8, any::<u8>(), 0usize..3), 0..200),
        ) {
            let mut d = I8042::new(Resets::default());
            for (is_read, offset, value, len) in ops {
                let resets = d.reset_sink().0;
                let pending = d.state().pending_command;
                if is_read {
                    d.read(offset, &mut vec![0u8; len]);
                } else {
                    d.write(offset, &vec![value; len]);
                }
                prop_assert_eq!(rd(&mut d, STATUS_OFFSET) & 0x02, 0);
                if d.reset_sink().0 != resets {
                    let pulse = offset == COMMAND_OFFSET && value >= CMD_PULSE_FIRST;
                    let port = offset == DATA_OFFSET && pending == Some(CMD_WRITE_OUTPUT_PORT);
                    prop_assert!(!is_read && len == 1 && value & 1 == 0 && (pulse || port));
                }
            }
        }
    }

    mod state {
        use std::vec::Vec;

        use super::*;
        use crate::snapshot::{Persist, StateError};

        fn encode(state: &I8042State) -> Vec<u8> {
            let mut out = vec![0u8; I8042State::MAX_LEN];
            let len = state.save(&mut out).unwrap();
            out.truncate(len);
            out
        }

        #[test]
        fn encoding_is_fixed() {
            let state = I8042State {
                command_byte: 0x47,
                output_port: 0x03,
                output: 0x55,
                output_full: true,
                output_from_aux: false,
                pending_command: Some(CMD_WRITE_OUTPUT_PORT),
                last_write_was_command: true,
            };
            assert_eq!(encode(&state), [0x47, 0x03, 0x55, 0b101, 0xd1]);
            assert_eq!(I8042State::load(&encode(&state)), Ok(state));
            let idle = I8042State::default();
            assert_eq!(encode(&idle), [0x45, 0x03, 0, 0, 0]);
            assert_eq!(I8042State::load(&encode(&idle)), Ok(idle));
        }

        #[test]
        fn load_rejects_unknown_flags_and_commands() {
            assert_eq!(
                I8042State::load(&[0, 0, 0, 8, 0]),
                Err(StateError::InvalidValue {
                    field: "i8042 flags",
                    value: 8
                })
            );
            for c in [CMD_READ_CTR, CMD_SELF_TEST, 0xfe, 0xff] {
                assert_eq!(
                    I8042State::load(&[0, 0, 0, 0, c]),
                    Err(StateError::InvalidValue {
                        field: "pending i8042 command",
                        value: u64::from(c)
                    })
                );
            }
            assert!(matches!(
                I8042State::load(&[0, 0, 0, 0]),
                Err(StateError::TooShort { .. })
            ));
        }

        proptest! {
            /// A controller saved at any point, encoded, loaded and
            /// restored behaves like the original from then on.
            #[test]
            fn restored_controller_behaves_the_same(
                before in proptest::collection::vec((any::<bool>(), prop_oneof![Just(0u64), Just(4)], any::<u8>()), 0..50),
                after in proptest::collection::vec((any::<bool>(), prop_oneof![Just(0u64), Just(4)], any::<u8>()), 0..50),
            ) {
                let mut d = I8042::new(Resets::default());
                let step = |d: &mut I8042<Resets>, &(is_read, offset, value): &(bool, u64, u8)| {
                    if is_read {
                        Some(rd(d, offset))
                    } else {
                        d.write(offset, &[value]);
                        None
                    }
                };
                for op in &before {
                    step(&mut d, op);
                }
                let state = I8042State::load(&encode(&d.state())).unwrap();
                prop_assert_eq!(state, d.state());
                let mut r = I8042::from_state(&state, Resets::default());
                let resets = d.reset_sink().0;
                for op in &after {
                    prop_assert_eq!(step(&mut r, op), step(&mut d, op));
                }
                prop_assert_eq!(r.reset_sink().0, d.reset_sink().0 - resets);
                prop_assert_eq!(r.state(), d.state());
            }

            /// Loading arbitrary bytes never panics, and what loads
            /// re-encodes to the same bytes and restores unchanged.
            #[test]
            fn load_of_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..8)) {
                if let Ok(state) = I8042State::load(&bytes) {
                    prop_assert_eq!(encode(&state), bytes);
                    prop_assert_eq!(I8042::from_state(&state, Resets::default()).state(), state);
                }
            }
        }
    }
}
