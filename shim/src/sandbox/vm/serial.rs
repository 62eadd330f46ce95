//! The guest's serial log: its tail for errors, and the guest kernel's
//! fault reports for the shim's log.

use std::path::Path;

use crate::sandbox::state_dir::tail;

/// The serial log's file name in the sandbox's state dir.
pub(super) const SERIAL_NAME: &str = "serial.log";
/// How much of the serial log an error quotes.
const TAIL_BYTES: u64 = 2048;

/// The end of the serial log, on one line, for an error message.
pub(super) fn serial_tail(serial: &Path) -> String {
    tail(serial, TAIL_BYTES)
}

/// Lines of the guest's serial log where its kernel reports a process
/// killed by a fault (so a container that died of one is explained in the
/// shim's log).
pub(super) fn guest_faults(serial: &Path) -> Vec<String> {
    std::fs::read(serial)
        .map(|bytes| {
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|l| {
                    l.contains("traps:")
                        || l.contains("segfault at")
                        || l.contains("unexpected fatal signal")
                })
                .map(|l| l.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
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
}
