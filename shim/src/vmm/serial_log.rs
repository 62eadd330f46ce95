//! The serial console's file: bounded, rotated, private.
//!
//! What the guest prints is the guest's to choose, so the file it goes to
//! must not grow without bound (it usually lives in RAM-backed `/run`). When
//! a write would take the file past its cap, the file is renamed to
//! `<path>.1` (replacing an older one) and a fresh one is started: at most
//! twice the cap is on disk. Both files are mode 0600 whatever the umask.

use std::ffi::OsString;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Most bytes in the current serial log file before it is rotated to
/// `<path>.1`; with the rotated file, at most twice this is on disk.
pub const SERIAL_LOG_CAP_BYTES: u64 = 1 << 20;
/// The mode of the serial log files: the owner's only.
const SERIAL_LOG_MODE: u32 = 0o600;

/// `<path>.1`: where the serial log goes when it is rotated.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".1");
    PathBuf::from(name)
}

/// A log file capped at `cap` bytes, rotated to `<path>.1` when full.
pub struct SerialLog {
    path: PathBuf,
    /// `None` after a rotation could not open a fresh file: output is
    /// then dropped rather than grown anywhere.
    file: Option<File>,
    written: u64,
    cap: u64,
}

impl SerialLog {
    /// Creates (or truncates) `path`, removes a stale `<path>.1`, and caps
    /// the file at `cap` bytes (at least 1).
    pub fn create(path: &Path, cap: u64) -> io::Result<Self> {
        let file = open_fresh(path)?;
        match std::fs::remove_file(rotated_path(path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(SerialLog {
            path: path.to_owned(),
            file: Some(file),
            written: 0,
            cap: cap.max(1),
        })
    }

    /// Moves the current file to `<path>.1` and starts a fresh one. If the
    /// rename fails, the fresh file truncates the current one instead, so
    /// the bound holds either way.
    fn rotate(&mut self) -> io::Result<()> {
        let _ = std::fs::rename(&self.path, rotated_path(&self.path));
        self.file = None;
        self.written = 0;
        self.file = Some(open_fresh(&self.path)?);
        Ok(())
    }
}

/// Opens `path` for writing, created or truncated, mode 0600.
fn open_fresh(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(SERIAL_LOG_MODE)
        .open(path)?;
    // The umask may have narrowed the mode, and a file that existed keeps
    // its own: set it explicitly.
    file.set_permissions(Permissions::from_mode(SERIAL_LOG_MODE))?;
    Ok(file)
}

impl Write for SerialLog {
    /// Writes as much of `buf` as fits under the cap, rotating first when
    /// the file is not empty and `buf` would not fit whole (so lines written
    /// in one call are not split across the two files).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let len = buf.len() as u64;
        if self.written > 0 && self.written.saturating_add(len) > self.cap {
            self.rotate()?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("the serial log could not be reopened"));
        };
        let room = usize::try_from(self.cap - self.written).unwrap_or(usize::MAX);
        let n = file.write(&buf[..buf.len().min(room)])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn rotates_at_the_cap_and_keeps_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let old = rotated_path(&path);
        assert_eq!(old, dir.path().join("serial.log.1"));
        let mut log = SerialLog::create(&path, 100).unwrap();
        // 30-byte lines: three fit (90), the fourth rotates.
        let line = [b'x'; 29].iter().chain(b"\n").copied().collect::<Vec<_>>();
        for _ in 0..3 {
            log.write_all(&line).unwrap();
        }
        assert_eq!((size(&path), old.exists()), (90, false));
        log.write_all(&line).unwrap();
        assert_eq!((size(&path), size(&old)), (30, 90));
        // Many more lines: never more than the cap in either file, and the
        // older file is replaced, not kept.
        for i in 0..100u8 {
            let mut l = line.clone();
            l[0] = i;
            log.write_all(&l).unwrap();
            assert!(size(&path) <= 100 && size(&old) <= 100);
        }
        let names = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(names, 2);
        // Rotation happens at line boundaries: each file starts a line.
        let current = std::fs::read(&path).unwrap();
        assert_eq!(current.len() % 30, 0);
        assert_eq!(*current.last().unwrap(), b'\n');
    }

    #[test]
    fn one_write_larger_than_the_cap_is_split() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut log = SerialLog::create(&path, 10).unwrap();
        log.write_all(&[b'a'; 25]).unwrap();
        assert_eq!(size(&path), 5);
        assert_eq!(size(&rotated_path(&path)), 10);
    }

    #[test]
    fn files_are_private_and_a_stale_rotation_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        // A world-readable file from before, and a stale rotated one.
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        std::fs::write(rotated_path(&path), b"older").unwrap();
        let mut log = SerialLog::create(&path, 4).unwrap();
        assert_eq!((mode(&path), size(&path)), (0o600, 0));
        assert!(!rotated_path(&path).exists());
        log.write_all(b"abcd").unwrap();
        log.write_all(b"efgh").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&rotated_path(&path)), 0o600);
    }

    #[test]
    fn a_failed_reopen_drops_output_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("gone");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("serial.log");
        let mut log = SerialLog::create(&path, 4).unwrap();
        log.write_all(b"abcd").unwrap();
        std::fs::remove_dir_all(&sub).unwrap();
        assert!(log.write_all(b"efgh").is_err());
        assert!(log.write_all(b"ijkl").is_err());
        log.flush().unwrap();
    }
}
