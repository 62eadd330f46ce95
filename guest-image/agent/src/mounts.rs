//! Small mount helpers shared by the engine (block-device rootfs) and the
//! guest init (the guest's own file systems).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// True if `path` is the root of a mount: its device differs from its
/// parent's, or it is `/`. (A bind mount of a directory onto another
/// directory of the same file system is not detected; nothing here makes
/// such mounts.)
pub fn is_mountpoint(path: &Path) -> std::io::Result<bool> {
    let meta = std::fs::symlink_metadata(path)?;
    let parent = std::fs::symlink_metadata(path.join(".."))?;
    Ok(meta.dev() != parent.dev() || meta.ino() == parent.ino())
}

/// Mounts `source` (of type `fstype`) on `target` unless something is
/// mounted there already; creates `target`. Returns whether it mounted.
pub fn mount_once(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> std::io::Result<bool> {
    std::fs::create_dir_all(target)?;
    if is_mountpoint(target)? {
        return Ok(false);
    }
    mount(Some(source), target, Some(fstype), flags, data).map_err(std::io::Error::from)?;
    Ok(true)
}

/// Unmounts `target`; if it is busy, detaches it (lazy unmount) instead.
pub fn unmount(target: &Path) -> std::io::Result<()> {
    match umount2(target, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::EBUSY) => {
            log::warn!("{target:?} is busy; detaching it");
            umount2(target, MntFlags::MNT_DETACH).map_err(std::io::Error::from)
        }
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountpoints() {
        assert!(is_mountpoint(Path::new("/")).unwrap());
        assert!(is_mountpoint(Path::new("/proc")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(!is_mountpoint(&dir.path().join("sub")).unwrap());
        assert!(is_mountpoint(&dir.path().join("missing")).is_err());
    }
}
