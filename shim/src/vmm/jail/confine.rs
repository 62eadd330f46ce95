//! What the VMM process does to itself between building the VM (every
//! file open) and starting it: its own mount namespace pivoted into the
//! jail root, no capabilities (bounding set emptied, an unprivileged
//! user), `no_new_privs`, and rlimits. The namespaces themselves (mount,
//! PID, IPC, UTS, network) were made by the `clone` that started it.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{chdir, pivot_root, setgroups, setresgid, setresuid, Gid, Uid};

use super::wire::Confinement;

/// A confinement step failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot confine the VMM: {step}")]
pub struct ConfineError {
    /// What failed.
    pub step: String,
    /// The errno.
    #[source]
    pub source: nix::Error,
}

fn step(what: impl Into<String>) -> impl FnOnce(nix::Error) -> ConfineError {
    let step = what.into();
    move |source| ConfineError { step, source }
}

/// Highest capability number the loop below tries to drop (unknown ones
/// answer EINVAL and are skipped).
const CAP_LAST: libc::c_int = 63;

/// Confines the calling process (see the module docs).
pub fn confine(jail: &Confinement) -> Result<(), ConfineError> {
    pivot_into(&jail.root)?;
    for (resource, limit, name) in [
        (Resource::RLIMIT_NOFILE, jail.max_files, "RLIMIT_NOFILE"),
        (Resource::RLIMIT_CORE, 0, "RLIMIT_CORE"),
    ] {
        setrlimit(resource, limit, limit).map_err(step(format!("set {name}")))?;
    }
    for cap in 0..=CAP_LAST {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and touches no
        // memory.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 && nix::Error::last() != nix::Error::EINVAL {
            return Err(step("empty the capability bounding set")(nix::Error::last()));
        }
    }
    let (uid, gid) = (Uid::from_raw(jail.uid), Gid::from_raw(jail.gid));
    setgroups(&[gid]).map_err(step("set the supplementary groups"))?;
    setresgid(gid, gid, gid).map_err(step(format!("switch to group {gid}")))?;
    // From uid 0 to another, the kernel clears the permitted, effective
    // and ambient capability sets.
    setresuid(uid, uid, uid).map_err(step(format!("switch to user {uid}")))?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(step("set no_new_privs")(nix::Error::last()));
    }
    Ok(())
}

/// Makes `root` this mount namespace's `/`, with nothing of the host's
/// tree left under it.
fn pivot_into(root: &Path) -> Result<(), ConfineError> {
    let none: Option<&str> = None;
    // Nothing we do here may propagate back to the host.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(step("make the mount tree private"))?;
    mount(
        Some(root),
        root,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(step(format!("bind {} onto itself", root.display())))?;
    chdir(root).map_err(step(format!("enter {}", root.display())))?;
    // The old root ends up stacked under the new one at `.`; detach it.
    pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the host's tree"))?;
    chdir("/").map_err(step("enter the new root"))?;
    Ok(())
}
