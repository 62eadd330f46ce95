//! The micro-VM's shared file system: the virtio-fs device the shim serves
//! a directory through (container rootfs and volumes), mounted where
//! `CreateSandbox` says.
//!
//! [`SharedFsMount::try_from_request`] checks the request (parse), then
//! [`SharedFsMount::apply`] mounts (execute). Only the guest init mounts:
//! on the host (the `linux` sandbox handler) a `virtiofs` mount of a tag
//! would at best fail, so a request there is refused
//! ([`SharedFsError::NotGuestInit`]) before anything else.

use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;
use skiff_agent_proto::agent as pb;
use skiff_agent_proto::{SHARED_FS_MOUNT_PARENT, SHARED_FS_TAG_MAX_LEN};

use crate::mounts::mount_once;

/// Errors of mounting the shared file system.
#[derive(Debug, thiserror::Error)]
pub enum SharedFsError {
    /// The agent is not the micro-VM's init.
    #[error(
        "a shared file system is for the guest init only: this agent is not the micro-VM's PID 1"
    )]
    NotGuestInit,
    /// The tag is empty, too long, or holds a NUL.
    #[error("shared file system tag {0:?} must be 1 to {SHARED_FS_TAG_MAX_LEN} bytes without NUL")]
    BadTag(String),
    /// The mount point is not a plain absolute path under `/run/skiff`.
    #[error("shared file system mount point {0:?} must be a normal absolute path under {SHARED_FS_MOUNT_PARENT}")]
    BadMountPoint(String),
    /// The mount failed (no such tag, no virtiofs in the kernel, ...).
    #[error("cannot mount shared file system {tag:?} at {mount_point}")]
    Mount {
        /// The tag.
        tag: String,
        /// Where.
        mount_point: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl SharedFsError {
    /// Whether the request itself was wrong (INVALID_ARGUMENT) rather than
    /// the guest.
    pub fn is_invalid_request(&self) -> bool {
        matches!(self, Self::BadTag(_) | Self::BadMountPoint(_))
    }
}

/// A checked shared file system mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFsMount {
    tag: String,
    mount_point: PathBuf,
}

impl SharedFsMount {
    /// Checks `req`: a tag of 1 to 36 bytes without NUL, a mount point
    /// under `/run/skiff` made only of normal components.
    pub fn try_from_request(req: &pb::SharedFs) -> Result<Self, SharedFsError> {
        if req.tag.is_empty() || req.tag.len() > SHARED_FS_TAG_MAX_LEN || req.tag.contains('\0') {
            return Err(SharedFsError::BadTag(req.tag.clone()));
        }
        let bad = || SharedFsError::BadMountPoint(req.mount_point.clone());
        let path = Path::new(&req.mount_point);
        let rest = path
            .strip_prefix(SHARED_FS_MOUNT_PARENT)
            .map_err(|_| bad())?;
        if rest.as_os_str().is_empty()
            || req.mount_point.contains('\0')
            || !rest.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(bad());
        }
        Ok(SharedFsMount {
            tag: req.tag.clone(),
            mount_point: path.to_owned(),
        })
    }

    /// Mounts the share (`virtiofs`, no flags: containers bind their
    /// rootfs from it, and it must behave as runc's rootfs does, set-user-ID
    /// files included) unless something is mounted there already.
    pub fn apply(&self) -> Result<(), SharedFsError> {
        let mounted = mount_once(
            &self.tag,
            &self.mount_point,
            "virtiofs",
            MsFlags::empty(),
            None,
        )
        .map_err(|source| SharedFsError::Mount {
            tag: self.tag.clone(),
            mount_point: self.mount_point.clone(),
            source,
        })?;
        if mounted {
            log::info!(
                "shared file system {:?} mounted at {}",
                self.tag,
                self.mount_point.display()
            );
        }
        Ok(())
    }
}

/// Serves a `CreateSandbox`'s `shared_fs`: refused unless `guest_init`,
/// then checked, then mounted.
pub fn mount_shared_fs(guest_init: bool, req: &pb::SharedFs) -> Result<(), SharedFsError> {
    if !guest_init {
        return Err(SharedFsError::NotGuestInit);
    }
    SharedFsMount::try_from_request(req)?.apply()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(tag: &str, mount_point: &str) -> pb::SharedFs {
        pb::SharedFs {
            tag: tag.into(),
            mount_point: mount_point.into(),
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_checked() {
        let ok = SharedFsMount::try_from_request(&req("skiff", "/run/skiff/shared")).unwrap();
        assert_eq!(ok.mount_point, Path::new("/run/skiff/shared"));
        for tag in ["", &"x".repeat(37), "a\0b"] {
            let err = SharedFsMount::try_from_request(&req(tag, "/run/skiff/s")).unwrap_err();
            assert!(matches!(err, SharedFsError::BadTag(_)), "{tag:?}: {err}");
            assert!(err.is_invalid_request());
        }
        assert!(SharedFsMount::try_from_request(&req(&"x".repeat(36), "/run/skiff/s")).is_ok());
        for mp in [
            "",
            "/",
            "/run/skiff",
            "/run/skiff/",
            "/etc",
            "run/skiff/x",
            "/run/skiff/../etc",
            "/run/skiffy",
        ] {
            let err = SharedFsMount::try_from_request(&req("skiff", mp)).unwrap_err();
            assert!(
                matches!(err, SharedFsError::BadMountPoint(_)),
                "{mp:?}: {err}"
            );
        }
    }

    #[test]
    fn only_the_guest_init_mounts() {
        // On the host nothing is checked or mounted, whatever the request.
        let err = mount_shared_fs(false, &req("skiff", "/run/skiff/shared")).unwrap_err();
        assert!(matches!(err, SharedFsError::NotGuestInit), "{err}");
        assert!(!err.is_invalid_request());
    }
}
