//! What the VMM process does to itself between building the VM (every
//! file open) and starting it: its own mount namespace pivoted into the
//! jail root, no capabilities (bounding set emptied, an unprivileged
//! user), `no_new_privs`, and rlimits. The namespaces themselves (mount,
//! PID, IPC, UTS, network) were made by the `clone` that started it.
//!
//! A VMM serving a virtio-fs share is a file server for the guest, which
//! must create files of any owner, read files of any mode, and make device
//! nodes in a container's rootfs, as virtiofsd does. It keeps uid 0 and
//! exactly [`FS_CAPS`] (bounding, permitted and effective sets), nothing
//! else; its mount namespace holds only the state dir, so those
//! capabilities reach only the share (and the VM's own files).
//!
//! The mount tree is made a slave of the host's, not private: what the
//! shim binds under the share after the VMM started (a container's
//! rootfs, its volumes) must appear here, and nothing mounted here
//! propagates back.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
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

/// The capabilities a VMM serving a virtio-fs share keeps: `CHOWN`,
/// `DAC_OVERRIDE`, `DAC_READ_SEARCH`, `FOWNER`, `FSETID`, `SETGID`,
/// `SETUID` (per-request fsuid/fsgid) and `MKNOD`.
pub const FS_CAPS: [libc::c_int; 8] = [0, 1, 2, 3, 4, 6, 7, 27];

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets in two 32-bit halves.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets this thread's effective and permitted capabilities to `caps` and
/// its inheritable set to none.
fn set_caps(caps: &[libc::c_int]) -> Result<(), ConfineError> {
    let mut data = [CapData::default(); 2];
    for &cap in caps {
        let (word, bit) = ((cap / 32) as usize, cap % 32);
        if let Some(d) = data.get_mut(word) {
            d.effective |= 1 << bit;
            d.permitted |= 1 << bit;
        }
    }
    let header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads one header and two data structs, both valid
    // for the call, of the layout version 3 defines.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if r != 0 {
        return Err(step("set the capabilities")(nix::Error::last()));
    }
    Ok(())
}

/// Confines the calling process (see the module docs).
pub fn confine(jail: &Confinement) -> Result<(), ConfineError> {
    pivot_into(&jail.root)?;
    // Not above the hard limit this process has (raising it would need
    // CAP_SYS_RESOURCE, which not every host gives the shim).
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(step("read RLIMIT_NOFILE"))?;
    for (resource, limit, name) in [
        (
            Resource::RLIMIT_NOFILE,
            jail.max_files.min(hard),
            "RLIMIT_NOFILE",
        ),
        (Resource::RLIMIT_CORE, 0, "RLIMIT_CORE"),
    ] {
        setrlimit(resource, limit, limit).map_err(step(format!("set {name}")))?;
    }
    for cap in 0..=CAP_LAST {
        if jail.fs_caps && FS_CAPS.contains(&cap) {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP takes a capability number and touches no
        // memory.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 && nix::Error::last() != nix::Error::EINVAL {
            return Err(step("empty the capability bounding set")(nix::Error::last()));
        }
    }
    if jail.fs_caps {
        setgroups(&[]).map_err(step("clear the supplementary groups"))?;
        set_caps(&FS_CAPS)?;
    } else {
        drop_to_user(jail)?;
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(step("set no_new_privs")(nix::Error::last()));
    }
    Ok(())
}

/// Switches to the jail's unprivileged user and group, which drops every
/// capability.
fn drop_to_user(jail: &Confinement) -> Result<(), ConfineError> {
    let (uid, gid) = (Uid::from_raw(jail.uid), Gid::from_raw(jail.gid));
    setgroups(&[gid]).map_err(step("set the supplementary groups"))?;
    setresgid(gid, gid, gid).map_err(step(format!("switch to group {gid}")))?;
    // From uid 0 to another, the kernel clears the permitted, effective
    // and ambient capability sets.
    setresuid(uid, uid, uid).map_err(step(format!("switch to user {uid}")))?;
    Ok(())
}

/// Makes `root` this mount namespace's `/`, with nothing of the host's
/// tree left under it.
fn pivot_into(root: &Path) -> Result<(), ConfineError> {
    let none: Option<&str> = None;
    // Nothing we do here may propagate back to the host; what the host
    // binds under a virtio-fs share still propagates in.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none)
        .map_err(step("make the mount tree a slave of the host's"))?;
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
