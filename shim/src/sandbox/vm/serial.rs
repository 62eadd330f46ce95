//! The guest's serial log: its tail for errors, and the guest kernel's
//! fault reports for the shim's log.
//!
//! Everything in the serial log is the guest's to choose: what the shim
//! quotes of it goes through [`sanitize`] (control characters escaped,
//! length capped), and only a bounded tail of the file is read.

use std::fmt::Write as _;
use std::path::Path;

use crate::sandbox::state_dir::tail_bytes;

/// The serial log's file name in the sandbox's state dir.
pub(super) const SERIAL_NAME: &str = "serial.log";
/// How much of the serial log an error quotes.
const TAIL_BYTES: u64 = 2048;
/// How much of the end of the serial log is searched for fault reports
/// when the VM stops.
const FAULT_SCAN_BYTES: u64 = 64 << 10;
/// Most characters of one guest line the shim quotes (after escaping); the
/// rest is replaced by a marker saying how many were cut.
pub(super) const QUOTED_LINE_MAX_CHARS: usize = 300;

/// The end of the serial log, on one line (`" | "` between lines), each
/// line [`sanitize`]d, for an error message.
pub(super) fn serial_tail(serial: &Path) -> String {
    let bytes = tail_bytes(serial, TAIL_BYTES);
    String::from_utf8_lossy(&bytes)
        .trim()
        .lines()
        .map(sanitize)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Lines near the end of the guest's serial log where its kernel reports a
/// process killed by a fault (so a container that died of one is explained
/// in the shim's log), [`sanitize`]d. Only the last [`FAULT_SCAN_BYTES`]
/// are read.
pub(super) fn guest_faults(serial: &Path) -> Vec<String> {
    let bytes = tail_bytes(serial, FAULT_SCAN_BYTES);
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter(|l| {
            l.contains("traps:")
                || l.contains("segfault at")
                || l.contains("unexpected fatal signal")
        })
        .map(|l| sanitize(l.trim()))
        .collect()
}

/// A guest-supplied line made safe to log: control characters (ANSI
/// escapes, `\r`, NUL, ...) and invisible reordering characters escaped as
/// Rust escapes (`\u{1b}`, `\r`), a backslash doubled, and the result cut
/// to [`QUOTED_LINE_MAX_CHARS`] characters with a `…[N chars cut]` marker.
pub(super) fn sanitize(line: &str) -> String {
    let mut out = String::with_capacity(line.len().min(QUOTED_LINE_MAX_CHARS));
    let mut used = 0;
    for (i, c) in line.chars().enumerate() {
        let escaped = needs_escape(c);
        let width = if escaped {
            c.escape_default().count()
        } else {
            1
        };
        if used + width > QUOTED_LINE_MAX_CHARS {
            let _ = write!(out, "…[{} chars cut]", line.chars().count() - i);
            break;
        }
        if escaped {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        used += width;
    }
    out
}

/// Whether `c` is escaped when quoted: control characters, bidirectional
/// and zero-width formatting characters (which reorder or hide text), and
/// the backslash (so an escape the guest wrote cannot pass for ours).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_fault_lines_are_picked_out() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(
            &log,
            "[ 1.0] Run /init as init process\n\
             [ 75.1] traps: sh[50] general protection fault ip:4a4d02 sp:7ffe error:0 in busybox\n\
             [ 75.2] ok\n\
             [ 76.0] exe[33]: segfault at 0 ip 00007fa1 sp 00007ffe error 4 in init\n",
        )
        .unwrap();
        let faults = guest_faults(&log);
        assert_eq!(faults.len(), 2, "{faults:?}");
        assert!(faults[0].contains("general protection fault"));
        assert!(guest_faults(&dir.path().join("none")).is_empty());
    }

    #[test]
    fn only_the_end_of_a_large_log_is_scanned() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut text = String::from("[ 1.0] a[1]: segfault at 0 early\n");
        text.push_str(&"filler line\n".repeat(2 * FAULT_SCAN_BYTES as usize / 12));
        text.push_str("[ 9.0] b[2]: segfault at 0 late\n");
        std::fs::write(&log, text).unwrap();
        let faults = guest_faults(&log);
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert!(faults[0].contains("late"));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(sanitize("plain text: ok"), "plain text: ok");
        assert_eq!(
            sanitize("\u{1b}[2J\u{1b}[31mred\rover\0nul\ttab"),
            "\\u{1b}[2J\\u{1b}[31mred\\rover\\u{0}nul\\ttab"
        );
        assert_eq!(sanitize("a\u{202e}b"), "a\\u{202e}b");
        assert_eq!(sanitize("not \\r ours"), "not \\\\r ours");
        assert_eq!(sanitize("émoji ✓"), "émoji ✓");
        let out = sanitize("\u{7f}\u{9b}");
        assert!(!out.chars().any(char::is_control), "{out:?}");
    }

    #[test]
    fn long_lines_are_cut_with_a_marker() {
        let long = "x".repeat(10 << 10);
        let out = sanitize(&long);
        let kept = "x".repeat(QUOTED_LINE_MAX_CHARS);
        assert_eq!(
            out,
            format!("{kept}…[{} chars cut]", (10 << 10) - QUOTED_LINE_MAX_CHARS)
        );
        // Escapes count toward the cap and are never split.
        let out = sanitize(&"\0".repeat(10 << 10));
        let body = out.split('…').next().unwrap();
        assert!(body.len() <= QUOTED_LINE_MAX_CHARS, "{}", body.len());
        assert!(body.ends_with("\\u{0}"), "{body}");
        assert!(out.ends_with(" chars cut]"));
        // Exactly at the cap: no marker.
        assert_eq!(sanitize(&kept), kept);
    }

    #[test]
    fn the_tail_is_sanitized_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let long = "y".repeat(1000);
        std::fs::write(&log, format!("boot\r\n\u{1b}[1mbold\rover\r\n{long}\n")).unwrap();
        let tail = serial_tail(&log);
        assert!(
            tail.starts_with("boot | \\u{1b}[1mbold\\rover | yyy"),
            "{tail}"
        );
        assert!(tail.ends_with(&format!("…[{} chars cut]", 1000 - QUOTED_LINE_MAX_CHARS)));
        assert!(!tail.chars().any(char::is_control));
        assert_eq!(serial_tail(&dir.path().join("none")), "");
    }
}
