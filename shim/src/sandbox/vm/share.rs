//! The pod's virtio-fs share on the host: one directory, `shared` in the
//! sandbox's state dir, that the VM's virtio-fs device serves and the
//! guest mounts at [`GUEST_MOUNT_POINT`]. Each container rootfs and each
//! bind-mount source is bind-mounted under it (`e<n>`, a directory or a
//! file), so the guest reads and writes the host's files live: a
//! container's writes land in its snapshot's upper directory, a volume's
//! in the volume.
//!
//! The share directory is a mount of its own with shared propagation, so
//! what is bound under it after the VM started also appears in a jailed
//! VMM's mount namespace (which receives, as a slave, and sends nothing
//! back). A read-only source is bound read-only on the host, so the
//! device's writes to it fail whatever the guest mounts.
//!
//! Entries are counted per (source, read-only): a second container of the
//! pod sharing a volume gets the same entry, and so sees the first one's
//! writes at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::error::VmSandboxError;

/// The share's directory in the state dir.
pub(super) const SHARE_DIR: &str = "shared";
/// The virtio-fs tag the VM's device has.
pub(super) const SHARE_TAG: &str = "skiff";
/// Where the guest mounts the share.
pub(super) const GUEST_MOUNT_POINT: &str = "/run/skiff/shared";

/// One bound source.
#[derive(Debug)]
struct Bound {
    name: String,
    users: usize,
}

/// The host side of the share (see the module docs).
#[derive(Debug)]
pub(super) struct Share {
    dir: PathBuf,
    bound: HashMap<(PathBuf, bool), Bound>,
    next: u64,
}

fn fail(what: String) -> impl FnOnce(nix::Error) -> VmSandboxError {
    move |e| VmSandboxError::Share {
        what,
        source: std::io::Error::from(e),
    }
}

impl Share {
    /// Makes `<state_dir>/shared` a mount point with shared propagation.
    pub(super) fn create(state_dir: &Path) -> Result<Share, VmSandboxError> {
        let dir = state_dir.join(SHARE_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| VmSandboxError::Share {
            what: format!("create {}", dir.display()),
            source,
        })?;
        let none: Option<&str> = None;
        mount(Some(&dir), &dir, none, MsFlags::MS_BIND, none)
            .map_err(fail(format!("bind {} onto itself", dir.display())))?;
        if let Err(e) = mount(none, &dir, none, MsFlags::MS_SHARED, none) {
            let _ = umount2(&dir, MntFlags::MNT_DETACH);
            return Err(fail(format!("make {} a shared mount", dir.display()))(e));
        }
        Ok(Share {
            dir,
            bound: HashMap::new(),
            next: 0,
        })
    }

    /// The host directory the device serves.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Binds `source` (a directory or a file, followed if a symlink, as a
    /// bind mount would) under the share, read-only if `read_only`;
    /// returns its path in the guest. A source already bound the same way
    /// is counted, not bound again.
    pub(super) fn add(&mut self, source: &Path, read_only: bool) -> Result<String, VmSandboxError> {
        let key = (source.to_owned(), read_only);
        if let Some(bound) = self.bound.get_mut(&key) {
            bound.users += 1;
            return Ok(guest_path(&bound.name));
        }
        let meta = std::fs::metadata(source).map_err(|source_err| VmSandboxError::Share {
            what: format!("look at {}", source.display()),
            source: source_err,
        })?;
        let name = format!("e{}", self.next);
        let target = self.dir.join(&name);
        let made = if meta.is_dir() {
            std::fs::create_dir(&target)
        } else {
            std::fs::File::create(&target).map(drop)
        };
        made.map_err(|e| VmSandboxError::Share {
            what: format!("create {}", target.display()),
            source: e,
        })?;
        if let Err(err) = bind(source, &target, read_only) {
            let _ = remove_target(&target);
            return Err(err);
        }
        self.next += 1;
        log::debug!(
            "{} bound at {} ({})",
            source.display(),
            target.display(),
            if read_only { "read-only" } else { "read-write" }
        );
        self.bound.insert(
            key,
            Bound {
                name: name.clone(),
                users: 1,
            },
        );
        Ok(guest_path(&name))
    }

    /// Drops one use of `source` bound as `read_only`; the last unbinds
    /// it. A source not bound is no error.
    pub(super) fn remove(&mut self, source: &Path, read_only: bool) -> Result<(), VmSandboxError> {
        let key = (source.to_owned(), read_only);
        match self.bound.get(&key) {
            Some(bound) => {
                let name = bound.name.clone();
                self.release(&name)
            }
            None => Ok(()),
        }
    }

    /// The host path of the entry a guest path from [`Share::add`] names
    /// (what a caller that must later [`Share::release`] it keeps).
    pub(super) fn host_path(&self, guest: &str) -> Option<PathBuf> {
        let name = guest.strip_prefix(GUEST_MOUNT_POINT)?.strip_prefix('/')?;
        Some(self.dir.join(name))
    }

    /// If `host` is an entry's host path ([`Share::host_path`]), its name.
    pub(super) fn entry_name<'p>(&self, host: &'p Path) -> Option<&'p str> {
        host.strip_prefix(&self.dir).ok()?.to_str()
    }

    /// Drops one use of entry `name`; the last unbinds it. An unknown
    /// name is no error.
    pub(super) fn release(&mut self, name: &str) -> Result<(), VmSandboxError> {
        let Some(key) = self
            .bound
            .iter()
            .find(|(_, b)| b.name == name)
            .map(|(k, _)| k.clone())
        else {
            return Ok(());
        };
        let Some(bound) = self.bound.get_mut(&key) else {
            return Ok(());
        };
        bound.users -= 1;
        if bound.users > 0 {
            return Ok(());
        }
        self.bound.remove(&key);
        let target = self.dir.join(name);
        // Lazily: the guest may still hold files open through it.
        umount2(&target, MntFlags::MNT_DETACH)
            .map_err(fail(format!("unbind {}", target.display())))?;
        remove_target(&target).map_err(|e| VmSandboxError::Share {
            what: format!("remove {}", target.display()),
            source: e,
        })
    }

    /// Whether `source` is bound (either way).
    #[cfg(test)]
    fn is_bound(&self, source: &Path) -> bool {
        self.bound.keys().any(|(s, _)| s == source)
    }

    /// Unbinds everything and the share itself (detached: an ended VM's
    /// device may still hold descriptors).
    pub(super) fn close(&mut self) {
        for bound in std::mem::take(&mut self.bound).into_values() {
            let target = self.dir.join(&bound.name);
            if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
                log::warn!("cannot unbind {}: {e}", target.display());
            }
            let _ = remove_target(&target);
        }
        if let Err(e) = umount2(&self.dir, MntFlags::MNT_DETACH) {
            log::warn!("cannot unmount {}: {e}", self.dir.display());
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.close();
    }
}

/// The guest's path of the entry `name`.
fn guest_path(name: &str) -> String {
    format!("{GUEST_MOUNT_POINT}/{name}")
}

/// Removes an entry's (unmounted) directory or file.
fn remove_target(target: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir(target) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => std::fs::remove_file(target),
        other => other,
    }
}

/// Bind-mounts `source` (recursively: a rootfs may carry mounts) on
/// `target`, then makes it read-only if asked.
fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), VmSandboxError> {
    let none: Option<&str> = None;
    mount(
        Some(source),
        target,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(fail(format!(
        "bind {} at {}",
        source.display(),
        target.display()
    )))?;
    if read_only {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(none, target, none, flags, none) {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            return Err(fail(format!("make {} read-only", target.display()))(e));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("skipped: bind mounts need root");
        }
        root
    }

    #[test]
    fn sources_are_bound_counted_and_unbound() {
        if !root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (rootfs, vol, file) = (
            tmp.path().join("rootfs"),
            tmp.path().join("vol"),
            tmp.path().join("termination-log"),
        );
        std::fs::create_dir(&rootfs).unwrap();
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(rootfs.join("bin"), b"elf").unwrap();
        std::fs::write(&file, b"").unwrap();
        let state = tmp.path().join("state");
        let mut share = Share::create(&state).unwrap();
        assert!(crate::task::rootfs::is_mount_point(share.dir()));

        let g = share.add(&rootfs, false).unwrap();
        assert_eq!(g, "/run/skiff/shared/e0");
        assert_eq!(std::fs::read(share.dir().join("e0/bin")).unwrap(), b"elf");
        // Writes through the share land in the source.
        std::fs::write(share.dir().join("e0/new"), b"w").unwrap();
        assert_eq!(std::fs::read(rootfs.join("new")).unwrap(), b"w");

        // A read-only bind refuses writes on the host side too.
        assert_eq!(share.add(&vol, true).unwrap(), "/run/skiff/shared/e1");
        let err = std::fs::write(share.dir().join("e1/x"), b"w").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        // The same source read-write is another entry; the same way, counted.
        assert_eq!(share.add(&vol, false).unwrap(), "/run/skiff/shared/e2");
        assert_eq!(share.add(&vol, true).unwrap(), "/run/skiff/shared/e1");

        // A file source is bound on a file.
        assert_eq!(share.add(&file, false).unwrap(), "/run/skiff/shared/e3");
        std::fs::write(share.dir().join("e3"), b"done").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"done");

        // Entries are named by their host path, too.
        let e1 = share.host_path("/run/skiff/shared/e1").unwrap();
        assert_eq!(e1, share.dir().join("e1"));
        assert_eq!(share.entry_name(&e1), Some("e1"));
        assert_eq!(share.entry_name(&vol), None);
        assert_eq!(share.host_path("/elsewhere/e1"), None);
        share.release("e1").unwrap();
        assert!(share.dir().join("e1").exists(), "one user left");
        share.remove(&vol, true).unwrap();
        assert!(!share.dir().join("e1").exists());
        share.remove(&file, false).unwrap();
        assert!(!share.dir().join("e3").exists());
        assert_eq!(std::fs::read(&file).unwrap(), b"done");
        share.remove(&file, false).unwrap();
        assert!(share.is_bound(&rootfs));

        let missing = share.add(&tmp.path().join("missing"), false).unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");

        drop(share);
        assert!(crate::procfs::mount_points_under(&state).is_empty());
        // Nothing of the sources went.
        assert!(rootfs.join("bin").exists() && rootfs.join("new").exists());
        crate::sandbox::state_dir::remove(&state).unwrap();
        assert!(rootfs.join("bin").exists());
    }
}
