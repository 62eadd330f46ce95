//! A container's root filesystem: the mounts containerd's snapshotter hands
//! over in `CreateTaskRequest.rootfs` (overlay, bind), mounted at
//! `<bundle>/rootfs` and unmounted on delete.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A mount as containerd describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Filesystem type (`overlay`, `bind`, …).
    pub kind: String,
    /// Source (device, directory, or `overlay`).
    pub source: String,
    /// `mount -o` style options.
    pub options: Vec<String>,
}

/// Errors mounting or unmounting a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// mount(2) failed.
    #[error("cannot mount {kind} {source_path} at {target}")]
    Mount {
        /// Filesystem type.
        kind: String,
        /// Source.
        source_path: String,
        /// Mount point.
        target: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// umount(2) failed.
    #[error("cannot unmount {target}")]
    Unmount {
        /// Mount point.
        target: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// Only one mount (the snapshot) can be the rootfs here.
    #[error("unsupported rootfs: {0}")]
    Unsupported(String),
    /// The mount point could not be created.
    #[error("cannot create {path}")]
    Io {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Flags and filesystem data from mount options.
fn parse_options(options: &[String]) -> (MsFlags, Vec<String>, bool) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    let mut recursive_bind = false;
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => {
                recursive_bind = true;
                (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty())
            }
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" | "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            _ => {
                data.push(opt.clone());
                (MsFlags::empty(), MsFlags::empty())
            }
        };
        flags.insert(set);
        flags.remove(clear);
    }
    (flags, data, recursive_bind)
}

/// Mounts `mounts` at `target`. Returns whether anything was mounted (an
/// empty list means the bundle's own `rootfs` directory is used as is).
pub fn mount_rootfs(mounts: &[MountSpec], target: &Path) -> Result<bool, RootfsError> {
    let m = match mounts {
        [] => return Ok(false),
        [m] => m,
        _ => {
            return Err(RootfsError::Unsupported(format!(
                "{} mounts; skiff takes one (the snapshot's)",
                mounts.len()
            )))
        }
    };
    std::fs::create_dir_all(target).map_err(|source| RootfsError::Io {
        path: target.to_owned(),
        source,
    })?;
    let (mut flags, data, _) = parse_options(&m.options);
    let err = |source| RootfsError::Mount {
        kind: m.kind.clone(),
        source_path: m.source.clone(),
        target: target.to_owned(),
        source,
    };
    let is_bind = m.kind == "bind" || flags.contains(MsFlags::MS_BIND);
    if is_bind {
        let readonly = flags.contains(MsFlags::MS_RDONLY);
        flags.insert(MsFlags::MS_BIND);
        mount(
            Some(m.source.as_str()),
            target,
            None::<&str>,
            flags - MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(err)?;
        if readonly {
            // A bind mount takes MS_RDONLY only on a remount.
            if let Err(e) = mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            ) {
                let _ = umount2(target, MntFlags::MNT_DETACH);
                return Err(err(e));
            }
        }
    } else {
        let data = data.join(",");
        mount(
            Some(m.source.as_str()),
            target,
            Some(m.kind.as_str()),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(err)?;
    }
    Ok(true)
}

/// True if `path` is a mount point (per `/proc/self/mountinfo`).
pub fn is_mount_point(path: &Path) -> bool {
    crate::procfs::mount_points().iter().any(|p| p == path)
}

/// Unmounts everything stacked on `target` (a no-op if nothing is).
pub fn unmount_rootfs(target: &Path) -> Result<(), RootfsError> {
    for _ in 0..16 {
        if !is_mount_point(target) {
            return Ok(());
        }
        match umount2(target, MntFlags::empty()) {
            Ok(()) => {}
            Err(nix::Error::EBUSY) => {
                umount2(target, MntFlags::MNT_DETACH).map_err(|source| RootfsError::Unmount {
                    target: target.to_owned(),
                    source,
                })?
            }
            Err(nix::Error::EINVAL) => return Ok(()),
            Err(source) => {
                return Err(RootfsError::Unmount {
                    target: target.to_owned(),
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data, rec) = parse_options(&opts(&[
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/l1:/l2",
            "nosuid",
        ]));
        assert_eq!(flags, MsFlags::MS_NOSUID);
        assert_eq!(
            data,
            opts(&["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"])
        );
        assert!(!rec);
        let (flags, data, rec) = parse_options(&opts(&["ro", "rbind"]));
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC));
        assert!(data.is_empty());
        assert!(rec);
        let (flags, _, _) = parse_options(&opts(&["ro", "rw"]));
        assert!(!flags.contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(crate::procfs::unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(crate::procfs::unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn more_than_one_mount_is_refused() {
        let m = MountSpec {
            kind: "bind".into(),
            source: "/".into(),
            options: vec![],
        };
        let err = mount_rootfs(&[m.clone(), m], Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("2 mounts"), "{err}");
        assert!(!mount_rootfs(&[], Path::new("/nonexistent")).unwrap());
    }

    #[test]
    fn bind_mount_round_trip() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: not root");
            return;
        }
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("f"), b"x").unwrap();
        let dst = tempfile::tempdir().unwrap();
        let target = dst.path().join("rootfs");
        let m = MountSpec {
            kind: "bind".into(),
            source: src.path().display().to_string(),
            options: opts(&["ro", "rbind"]),
        };
        assert!(mount_rootfs(&[m], &target).unwrap());
        assert!(is_mount_point(&target));
        assert!(target.join("f").exists());
        assert!(std::fs::write(target.join("g"), b"y").is_err(), "read-only");
        unmount_rootfs(&target).unwrap();
        assert!(!is_mount_point(&target));
        assert!(!target.join("f").exists());
        unmount_rootfs(&target).unwrap();
    }
}
