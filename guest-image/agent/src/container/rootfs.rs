//! A rootfs given as a block device: mounting its ext4 file system for the
//! container and releasing it afterwards.

use std::path::{Path, PathBuf};

use super::error::ContainerError;
use crate::mounts;

/// Mounts the ext4 file system on `device` at `target` (created) and
/// returns `target`.
pub(super) fn mount_rootfs(device: &Path, target: &Path) -> Result<PathBuf, ContainerError> {
    let error = |source| ContainerError::MountRootfs {
        device: device.to_owned(),
        target: target.to_owned(),
        source,
    };
    std::fs::create_dir_all(target).map_err(error)?;
    if mounts::is_mountpoint(target).map_err(error)? {
        // Left by a removal whose unmount failed: start afresh.
        mounts::unmount(target).map_err(error)?;
    }
    nix::mount::mount(
        Some(device),
        target,
        Some("ext4"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        let _ = std::fs::remove_dir(target);
        error(e.into())
    })?;
    log::debug!("mounted rootfs {device:?} on {target:?}");
    Ok(target.to_owned())
}

/// Unmounts a block-device rootfs and removes its mount point; failures
/// are logged (the container is gone either way).
pub(super) fn release_rootfs(target: &Path) {
    if mounts::is_mountpoint(target).unwrap_or(false) {
        if let Err(err) = mounts::unmount(target) {
            log::warn!("cannot unmount rootfs {target:?}: {err}");
            return;
        }
    }
    if let Err(err) = std::fs::remove_dir(target) {
        if err.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove rootfs mount point {target:?}: {err}");
        }
    }
}
