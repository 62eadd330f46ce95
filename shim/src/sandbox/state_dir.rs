//! A sandbox's private state directory, and reading its log files.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::error::SandboxError;

/// Creates the sandbox's state directory (and its parents).
pub fn create(state_dir: &Path) -> Result<(), SandboxError> {
    std::fs::create_dir_all(state_dir).map_err(|e| {
        SandboxError::io(
            format!(
                "cannot create the sandbox state dir {}",
                state_dir.display()
            ),
            e,
        )
    })
}

/// Removes the sandbox's state directory; one already gone is no error.
pub fn remove(state_dir: &Path) -> Result<(), SandboxError> {
    match std::fs::remove_dir_all(state_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(SandboxError::io(
            format!("cannot remove {}", state_dir.display()),
            e,
        )),
        _ => Ok(()),
    }
}

/// The last `max` bytes of a log file, on one line (`" | "` between
/// lines); empty if it cannot be read.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim().replace('\n', " | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, "first\nsecond\nthird\n").unwrap();
        assert_eq!(tail(&log, 13), "second | third");
        assert_eq!(tail(&dir.path().join("none"), 10), "");
    }

    #[test]
    fn create_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/b");
        create(&state).unwrap();
        assert!(state.is_dir());
        remove(&state).unwrap();
        assert!(!state.exists());
        remove(&state).unwrap();
    }
}
