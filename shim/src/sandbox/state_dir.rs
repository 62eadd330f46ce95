//! A sandbox's private state directory, and reading its log files.

use std::fs::{DirBuilder, File, Permissions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use super::error::SandboxError;

/// The mode of a sandbox's state directory: the owner's only.
pub const STATE_DIR_MODE: u32 = 0o700;
/// The mode of files the shim creates in a state directory.
pub const STATE_FILE_MODE: u32 = 0o600;

/// Creates the sandbox's state directory (and its parents), mode 0700
/// whatever the umask (parents this creates get 0700 less the umask).
pub fn create(state_dir: &Path) -> Result<(), SandboxError> {
    let fail = |e| {
        SandboxError::io(
            format!(
                "cannot create the sandbox state dir {}",
                state_dir.display()
            ),
            e,
        )
    };
    DirBuilder::new()
        .recursive(true)
        .mode(STATE_DIR_MODE)
        .create(state_dir)
        .map_err(fail)?;
    // The umask may have narrowed the mode, and a directory that existed
    // keeps its own: set it explicitly.
    std::fs::set_permissions(state_dir, Permissions::from_mode(STATE_DIR_MODE)).map_err(fail)
}

/// Gives `file` mode 0600 whatever the umask or its mode before.
pub fn make_private(file: &File) -> std::io::Result<()> {
    file.set_permissions(Permissions::from_mode(STATE_FILE_MODE))
}

/// Removes the sandbox's state directory; one already gone is no error.
///
/// Whatever is still mounted under it (a `vm` sandbox's shared container
/// rootfs and volumes, after a dead shim) is detached first, and if
/// anything stays mounted nothing is removed: a recursive removal must
/// never reach through a bind mount into a container's files.
pub fn remove(state_dir: &Path) -> Result<(), SandboxError> {
    for mount in crate::procfs::mount_points_under(state_dir) {
        if let Err(e) = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH) {
            log::warn!("cannot detach {}: {e}", mount.display());
        }
    }
    if let Some(left) = crate::procfs::mount_points_under(state_dir).first() {
        return Err(SandboxError::io(
            format!(
                "not removing {}: {} is still mounted there",
                state_dir.display(),
                left.display()
            ),
            std::io::Error::from(std::io::ErrorKind::ResourceBusy),
        ));
    }
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
    String::from_utf8_lossy(&tail_bytes(path, max))
        .trim()
        .replace('\n', " | ")
}

/// The last `max` bytes of a file (at most `max` are read, however long
/// the file); empty if it cannot be read.
pub fn tail_bytes(path: &Path, max: u64) -> Vec<u8> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut file = file.take(max);
    if file
        .get_mut()
        .seek(SeekFrom::Start(len.saturating_sub(max)))
        .is_err()
    {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn tail_keeps_the_end_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, "first\nsecond\nthird\n").unwrap();
        assert_eq!(tail(&log, 13), "second | third");
        assert_eq!(tail(&dir.path().join("none"), 10), "");
    }

    #[test]
    fn tail_bytes_reads_at_most_max() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, b"0123456789").unwrap();
        assert_eq!(tail_bytes(&log, 4), b"6789");
        assert_eq!(tail_bytes(&log, 100), b"0123456789");
        assert!(tail_bytes(&dir.path().join("none"), 4).is_empty());
    }

    #[test]
    fn create_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/b");
        create(&state).unwrap();
        assert!(state.is_dir());
        assert_eq!(mode(&state), 0o700);
        // One that exists with a wider mode is narrowed.
        std::fs::set_permissions(&state, Permissions::from_mode(0o755)).unwrap();
        create(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        remove(&state).unwrap();
        assert!(!state.exists());
        remove(&state).unwrap();
    }

    /// A bind mount left in a state dir (a dead shim's shared rootfs) is
    /// detached, never deleted through.
    #[test]
    fn remove_detaches_mounts_and_keeps_their_files() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: bind mounts need root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let precious = dir.path().join("rootfs");
        std::fs::create_dir(&precious).unwrap();
        std::fs::write(precious.join("keep"), b"x").unwrap();
        let state = dir.path().join("state");
        let target = state.join("shared/c1");
        std::fs::create_dir_all(&target).unwrap();
        let none: Option<&str> = None;
        nix::mount::mount(
            Some(&precious),
            &target,
            none,
            nix::mount::MsFlags::MS_BIND,
            none,
        )
        .unwrap();
        remove(&state).unwrap();
        assert!(!state.exists());
        assert_eq!(std::fs::read(precious.join("keep")).unwrap(), b"x");
    }

    #[test]
    fn make_private_sets_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        file.set_permissions(Permissions::from_mode(0o666)).unwrap();
        make_private(&file).unwrap();
        assert_eq!(mode(&path), 0o600);
    }
}
