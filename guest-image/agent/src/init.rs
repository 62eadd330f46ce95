//! The agent as the micro-VM's PID 1: leaves the initramfs for a tmpfs root
//! (so containers can `pivot_root`), mounts what the guest needs, sets the
//! hostname, brings up `lo`, and ends the VM by resetting it.
//!
//! The VM boots with `reboot=k`: `reboot(RB_AUTOBOOT)` resets through the
//! i8042, which skiff's VMM treats as the guest's clean exit. PID 1 must never
//! exit (the kernel panics), so every fatal path here ends in [`reset_vm`].
//!
//! Settings come from the agent's flags and from the kernel command line
//! (dotted parameters, which the kernel does not pass to init):
//! `skiff.hostname=NAME`, `skiff.log=LEVEL`.

use std::ffi::OsStr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::MsFlags;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::sys::stat::{Mode, SFlag};

use crate::mounts::{is_mountpoint, mount_once};

/// Where the tmpfs that becomes `/` is mounted while the initramfs is copied.
const NEW_ROOT: &str = "/.skiff-root";

/// Errors of the guest init.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A file system could not be mounted.
    #[error("cannot mount {fstype} on {target:?}")]
    Mount {
        /// The file system type.
        fstype: &'static str,
        /// The mount point.
        target: PathBuf,
        /// The mount error.
        #[source]
        source: std::io::Error,
    },
    /// Moving from the initramfs to a tmpfs root failed.
    #[error("cannot leave the initramfs for a tmpfs root ({step})")]
    SwitchRoot {
        /// What failed.
        step: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The hostname could not be set.
    #[error("cannot set the hostname to {0:?}")]
    Hostname(String, #[source] std::io::Error),
    /// The loopback interface could not be brought up.
    #[error("cannot bring up the loopback interface")]
    Loopback(#[source] std::io::Error),
}

/// Agent settings found on the kernel command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelParams {
    /// `skiff.hostname=NAME`.
    pub hostname: Option<String>,
    /// `skiff.log=error|warn|info|debug|trace`.
    pub log_level: Option<String>,
}

impl KernelParams {
    /// Parses a kernel command line (`/proc/cmdline`); unknown words are
    /// ignored, the last occurrence of a parameter wins.
    pub fn parse(cmdline: &str) -> Self {
        let mut params = Self::default();
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let value = value.trim_matches('"');
            let slot = match key {
                "skiff.hostname" => &mut params.hostname,
                "skiff.log" => &mut params.log_level,
                _ => continue,
            };
            *slot = (!value.is_empty()).then(|| value.to_owned());
        }
        params
    }

    /// Reads `/proc/cmdline` (mounted by [`setup`] or [`switch_root`]).
    pub fn from_proc() -> Self {
        std::fs::read_to_string("/proc/cmdline")
            .map(|cmdline| Self::parse(&cmdline))
            .unwrap_or_default()
    }
}

/// True when this process is the system's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Keeps every heap page the agent ever touches: one malloc arena, no
/// trimming, no mmap'd chunks below 32 MiB. Call before any thread starts.
///
/// Under the PVM hypervisor a page the agent gives back to the guest kernel
/// can stay reachable through a stale translation: the kernel hands it to a
/// container process, and the agent's later writes land in that process's
/// memory (seen as `general protection fault … in busybox` in containers).
/// A heap that never shrinks gives back nothing. On a VM the agent is the
/// only long-lived process, so the cost is its peak heap size.
///
/// glibc only: musl's malloc (mallocng) has no tunables, so in a musl build
/// (the guest's) this does nothing, and musl does give pages back: it
/// unmaps blocks of 128 KiB and more and emptied slot groups when they are
/// freed, and `MADV_FREE`s whole pages inside freed slots.
pub fn pin_heap() {
    #[cfg(target_env = "gnu")]
    for (param, value) in [
        (libc::M_ARENA_MAX, 1),
        (libc::M_TRIM_THRESHOLD, libc::c_int::MAX),
        (libc::M_MMAP_THRESHOLD, 32 << 20),
    ] {
        // SAFETY: mallopt(3) only sets a malloc tunable; no other thread
        // runs yet.
        unsafe { libc::mallopt(param, value) };
    }
}

/// Makes sure fds 0-2 are open (on `/dev/console`), so no socket or file
/// the agent opens later lands on them and receives log lines. The kernel
/// opens the console for init when the initramfs has `/dev/console`.
pub fn ensure_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        let path = c"/dev/console";
        // SAFETY: `path` is a valid C string; the result is checked.
        let console = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        if console < 0 {
            return;
        }
        if console != fd {
            // SAFETY: both are plain descriptor numbers; `console` is ours.
            unsafe { libc::dup2(console, fd) };
            // SAFETY: `console` is ours and no longer needed.
            unsafe { libc::close(console) };
        }
    }
}

/// Installs a panic hook that, in PID 1, logs the panic to the console and
/// resets the VM (a panicking PID 1 would otherwise end in a kernel panic
/// without the message). Other processes (the spawner, a forked child) keep
/// the default behaviour.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_pid1() {
            default(info);
            return;
        }
        let thread = std::thread::current();
        eprintln!(
            "skiff-agent: PID 1 panicked in thread {:?}: {info}; resetting the VM",
            thread.name().unwrap_or("?")
        );
        reset_vm();
    }));
}

/// Syncs and resets the VM (`reboot(RB_AUTOBOOT)`; with `reboot=k` the VMM
/// sees an i8042 reset, its clean exit). Never returns. Outside PID 1 (an
/// agent started with `--init` by hand) it exits with status 1 instead: a
/// root process on a host must not reboot it. If the reboot call fails, the
/// calling thread sleeps forever (PID 1 must not exit).
pub fn reset_vm() -> ! {
    nix::unistd::sync();
    if !is_pid1() {
        eprintln!("skiff-agent: not PID 1, exiting instead of resetting the VM");
        std::process::exit(1);
    }
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT).unwrap_err();
    eprintln!("skiff-agent: reboot(RB_AUTOBOOT) failed: {err}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Resets the VM after `delay` from a new thread, so a reply being sent
/// (DestroySandbox's) has time to reach the host.
pub fn reset_vm_after(delay: Duration) {
    log::info!("resetting the VM in {delay:?}");
    let spawned = std::thread::Builder::new()
        .name("reset-vm".into())
        .spawn(move || {
            std::thread::sleep(delay);
            reset_vm()
        });
    if spawned.is_err() {
        reset_vm();
    }
}

/// If `/` is the initramfs (`rootfs`, which `pivot_root` cannot leave:
/// containers could not start), moves to a tmpfs root, like `switch_root`:
/// copies the initramfs to a new tmpfs, frees the initramfs, moves the tmpfs
/// onto `/` and chroots into it. Does nothing when `/` is not the initramfs.
///
/// The running agent binary itself is neither copied nor re-executed: under
/// PVM every freshly touched page is expensive (the kernel's own unpacking
/// of the ~9 MiB initramfs takes ~17 s there), and copying it measured
/// another ~18 s. The process keeps running from its mapping of the
/// unlinked file, so `/proc/self/exe` is unreachable afterwards (nothing
/// here or in libcontainer re-executes it).
///
/// Call first in PID 1, before any thread starts; it leaves no mounts behind
/// but the new root.
pub fn switch_root() -> Result<(), InitError> {
    let step = |step: &str| {
        let step = step.to_owned();
        move |source| InitError::SwitchRoot { step, source }
    };
    mount_proc()?;
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(step("read mountinfo"))?;
    if !root_is_rootfs(&mountinfo) {
        return Ok(());
    }
    let exe = std::fs::read_link("/proc/self/exe").map_err(step("read /proc/self/exe"))?;
    nix::mount::umount("/proc").map_err(|e| step("unmount /proc")(e.into()))?;

    let new_root = Path::new(NEW_ROOT);
    mount_once(
        "tmpfs",
        new_root,
        "tmpfs",
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(step("mount the tmpfs"))?;
    copy_tree(Path::new("/"), new_root, &[new_root, &exe]).map_err(step("copy the initramfs"))?;
    // Free the initramfs: its pages are not reclaimable while files remain.
    for entry in std::fs::read_dir("/").map_err(step("list /"))?.flatten() {
        let path = entry.path();
        if path == new_root {
            continue;
        }
        let _ = match entry.file_type() {
            Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
    }
    nix::unistd::chdir(new_root).map_err(|e| step("chdir")(e.into()))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| step("move the tmpfs to /")(e.into()))?;
    nix::unistd::chroot(".").map_err(|e| step("chroot")(e.into()))?;
    nix::unistd::chdir("/").map_err(|e| step("chdir /")(e.into()))?;
    log::debug!("left the initramfs for a tmpfs root");
    Ok(())
}

/// True if the mount at `/` in `mountinfo` is the initramfs.
fn root_is_rootfs(mountinfo: &str) -> bool {
    mountinfo.lines().any(|line| {
        let mut halves = line.split(" - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            return false;
        };
        left.split(' ').nth(4) == Some("/") && right.split(' ').next() == Some("rootfs")
    })
}

/// Copies the tree at `src` into the existing directory `dst`: directories,
/// regular files, symlinks, device nodes and fifos, with modes and owners.
/// Paths in `skip` (e.g. `dst` itself inside `src`) are not copied; mount
/// points below `src` are created empty.
pub fn copy_tree(src: &Path, dst: &Path, skip: &[&Path]) -> std::io::Result<()> {
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        if skip.contains(&from.as_path()) {
            continue;
        }
        let to = dst.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&from)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            std::fs::create_dir(&to)?;
            if !is_mountpoint(&from)? {
                copy_tree(&from, &to, skip)?;
            }
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(meta.mode()))?;
        } else if kind.is_file() {
            std::fs::copy(&from, &to)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if kind.is_char_device() || kind.is_block_device() || kind.is_fifo() {
            let sflag = if kind.is_char_device() {
                SFlag::S_IFCHR
            } else if kind.is_block_device() {
                SFlag::S_IFBLK
            } else {
                SFlag::S_IFIFO
            };
            let perm = Mode::from_bits_truncate(meta.mode() & 0o7777);
            nix::sys::stat::mknod(&to, sflag, perm, meta.rdev())?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(meta.mode()))?;
        } else {
            continue; // sockets
        }
        std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))?;
    }
    Ok(())
}

fn mount_proc() -> Result<(), InitError> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "proc", "/proc", nosuid_nodev_noexec, None)
}

fn mount_fs(
    fstype: &'static str,
    source: &str,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    match mount_once(source, Path::new(target), fstype, flags, data) {
        Ok(true) => {
            log::debug!("mounted {fstype} on {target}");
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(source) => Err(InitError::Mount {
            fstype,
            target: target.into(),
            source,
        }),
    }
}

/// Mounts the guest's file systems (each only if nothing is mounted there
/// yet) and brings up `lo`.
pub fn setup() -> Result<(), InitError> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_proc()?;
    mount_fs("sysfs", "sysfs", "/sys", nosuid_nodev_noexec, None)?;
    mount_fs(
        "devtmpfs",
        "devtmpfs",
        "/dev",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666,gid=5"),
    )?;
    mount_fs(
        "tmpfs",
        "shm",
        "/dev/shm",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "tmpfs",
        "/run",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "cgroup2",
        "cgroup2",
        "/sys/fs/cgroup",
        nosuid_nodev_noexec,
        None,
    )?;
    loopback_up().map_err(InitError::Loopback)?;
    Ok(())
}

/// Sets the (guest's) hostname.
pub fn set_hostname(name: &str) -> Result<(), InitError> {
    nix::unistd::sethostname(OsStr::new(name))
        .map_err(|e| InitError::Hostname(name.to_owned(), e.into()))
}

/// `ip link set lo up` (the kernel then adds 127.0.0.1/8 and ::1).
fn loopback_up() -> std::io::Result<()> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // ioctl(2)'s request is an unsigned long in glibc and an int in musl.
    let (get_flags, set_flags) = (
        libc::SIOCGIFFLAGS as libc::Ioctl,
        libc::SIOCSIFFLAGS as libc::Ioctl,
    );
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `req`,
    // which lives for the call.
    if unsafe { libc::ioctl(fd, get_flags, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads `req`, which lives for the call.
    if unsafe { libc::ioctl(fd, set_flags, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_params() {
        let params = KernelParams::parse(
            "console=ttyS0 reboot=k skiff.hostname=pod-1 skiff.shell skiff.log=debug \
             panic=-1 skiff.log=\"trace\"\n",
        );
        assert_eq!(params.hostname.as_deref(), Some("pod-1"));
        assert_eq!(params.log_level.as_deref(), Some("trace"));
        assert_eq!(
            KernelParams::parse("console=ttyS0 skiff.hostname="),
            KernelParams::default()
        );
    }

    #[test]
    fn detects_the_initramfs_root() {
        let initramfs = "1 1 0:2 / / rw - rootfs rootfs rw,size=115068k,nr_inodes=28767\n\
                         14 1 0:21 / /proc rw,relatime - proc proc rw\n";
        assert!(root_is_rootfs(initramfs));
        let switched = "17 1 0:23 / / rw - tmpfs tmpfs rw,mode=755\n\
                        18 17 0:21 / /proc rw,relatime - proc proc rw\n";
        assert!(!root_is_rootfs(switched));
        // A rootfs mounted elsewhere is not `/`.
        assert!(!root_is_rootfs("1 1 0:2 / /x rw - rootfs rootfs rw\n"));
    }

    #[test]
    fn copy_tree_keeps_kinds_modes_and_links() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let s = src.path();
        std::fs::create_dir_all(s.join("bin")).unwrap();
        std::fs::write(s.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(s.join("bin/tool"), PermissionsExt::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink("tool", s.join("bin/alias")).unwrap();
        std::fs::create_dir(s.join("skipped")).unwrap();
        std::fs::write(s.join("bin/big"), b"not copied").unwrap();
        std::fs::create_dir(s.join("empty")).unwrap();
        std::fs::set_permissions(s.join("empty"), PermissionsExt::from_mode(0o1777)).unwrap();
        nix::unistd::mkfifo(&s.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();

        copy_tree(s, dst.path(), &[&s.join("skipped"), &s.join("bin/big")]).unwrap();
        let d = dst.path();
        assert_eq!(std::fs::read(d.join("bin/tool")).unwrap(), b"#!/bin/sh\n");
        let mode = |p: &str| std::fs::symlink_metadata(d.join(p)).unwrap().mode();
        assert_eq!(mode("bin/tool") & 0o7777, 0o750);
        assert_eq!(mode("empty") & 0o7777, 0o1777);
        assert_eq!(
            std::fs::read_link(d.join("bin/alias")).unwrap(),
            Path::new("tool")
        );
        assert!(std::fs::symlink_metadata(d.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(!d.join("skipped").exists());
        assert!(!d.join("bin/big").exists());
    }
}
