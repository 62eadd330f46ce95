//! Seccomp filters, one per kind of VMM thread.
//!
//! Each VMM thread confines itself before it runs anything of the guest's:
//! a vCPU thread before its first `KVM_RUN`, each device thread before it
//! serves its first event, the jailed VMM's control thread once the VM
//! runs. The allow-lists are written out here (with `seccompiler`, no
//! libseccomp) and apply to the calling thread only (no TSYNC): every other
//! thread of the process keeps its own filter or none. A system call that
//! is not on the list kills the whole process with `SIGSYS`
//! ([`seccompiler::SeccompAction::KillProcess`]); the jailed VMM's parent
//! reports such a death as a seccomp denial.
//!
//! What each kind may call is what `strace` showed the threads doing while
//! the `vm_*` tests ran (tiny guests, vsock, Linux guests with disks), plus
//! the paths a guest can reach that those runs did not: a plain MMIO exit
//! serves a queue on the vCPU thread (disk I/O, vsock connects), and a
//! vCPU thread rotates the serial log. [`describe`] lists them for
//! `skiff check`.
//!
//! Inline (`vmm = "inline"`), the VMM threads share the shim's address
//! space, so a filter is a speed bump for an attacker who already runs
//! code in the process, not a boundary; in the jailed VMM process it is
//! one layer of several.

use std::collections::BTreeMap;
use std::sync::mpsc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// `KVM_RUN`: `_IO(KVMIO, 0x80)`, the same number on every architecture.
const KVM_RUN: u64 =
    vmm_sys_util::ioctl::ioctl_expr(vmm_sys_util::ioctl::_IOC_NONE, kvm_bindings::KVMIO, 0x80, 0)
        as u64;

/// An `_IOR`/`_IOWR` KVM ioctl number for a `T`-sized argument.
#[cfg(target_arch = "x86_64")]
const fn kvm_ior<T>(dir: u32, nr: u32) -> u64 {
    vmm_sys_util::ioctl::ioctl_expr(
        dir,
        kvm_bindings::KVMIO,
        nr,
        std::mem::size_of::<T>() as u32,
    ) as u64
}

#[cfg(target_arch = "x86_64")]
mod snapshot_ioctls {
    use super::kvm_ior;
    use kvm_bindings::*;
    use vmm_sys_util::ioctl::{_IOC_READ, _IOC_WRITE};
    const R: u32 = _IOC_READ;
    const RW: u32 = _IOC_READ | _IOC_WRITE;
    pub const KVM_GET_REGS: u64 = kvm_ior::<kvm_regs>(R, 0x81);
    pub const KVM_GET_SREGS: u64 = kvm_ior::<kvm_sregs>(R, 0x83);
    pub const KVM_GET_MSRS: u64 = kvm_ior::<kvm_msrs>(RW, 0x88);
    pub const KVM_GET_LAPIC: u64 = kvm_ior::<kvm_lapic_state>(R, 0x8e);
    pub const KVM_GET_CPUID2: u64 = kvm_ior::<kvm_cpuid2>(RW, 0x91);
    pub const KVM_GET_MP_STATE: u64 = kvm_ior::<kvm_mp_state>(R, 0x98);
    pub const KVM_GET_VCPU_EVENTS: u64 = kvm_ior::<kvm_vcpu_events>(R, 0x9f);
    pub const KVM_GET_DEBUGREGS: u64 = kvm_ior::<kvm_debugregs>(R, 0xa1);
    pub const KVM_GET_XSAVE: u64 = kvm_ior::<kvm_xsave>(R, 0xa4);
    pub const KVM_GET_XCRS: u64 = kvm_ior::<kvm_xcrs>(R, 0xa6);
    // The VM's: read by the control thread for a snapshot.
    pub const KVM_GET_IRQCHIP: u64 = kvm_ior::<kvm_irqchip>(RW, 0x62);
    pub const KVM_GET_CLOCK: u64 = kvm_ior::<kvm_clock_data>(R, 0x7c);
    pub const KVM_GET_PIT2: u64 = kvm_ior::<kvm_pit_state2>(R, 0x9f);
}
#[cfg(target_arch = "x86_64")]
use snapshot_ioctls::*;

/// The kinds of VMM thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and the exits it serves in place (port and
    /// MMIO devices, the serial console, queues served without an
    /// ioeventfd).
    Vcpu,
    /// A device (event-loop) thread: ioeventfds, virtio-blk image I/O, the
    /// vsock muxer's unix sockets.
    Devices,
    /// The jailed VMM process's control thread: the control socket
    /// (`SOCK_SEQPACKET`, `SCM_RIGHTS`), waiting for and joining the other
    /// threads, taking received disk images in.
    Control,
    /// The virtio-fs device's thread: a device thread that is also the
    /// share's file server (`crate::vmm::fs::SYSCALLS`): `*at` calls on
    /// held descriptors, file I/O, xattrs, per-request fsuid/fsgid.
    FsServer,
}

impl ThreadKind {
    /// Every kind, in the order `skiff check` lists them.
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::FsServer,
        ThreadKind::Control,
    ];

    /// The kind's name in logs and in `skiff check`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::Control => "control",
            ThreadKind::FsServer => "fs",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The allow-list could not be turned into a BPF program.
    #[error("cannot compile the {kind} seccomp filter")]
    Compile {
        /// Whose filter.
        kind: ThreadKind,
        /// What seccompiler said.
        #[source]
        source: seccompiler::Error,
    },
    /// The kernel refused the filter (or `no_new_privs`).
    #[error("cannot install the {kind} seccomp filter")]
    Install {
        /// Whose filter.
        kind: ThreadKind,
        /// What seccompiler said.
        #[source]
        source: seccompiler::Error,
    },
    /// The thread ended before it said whether its filter is in place.
    #[error("the {kind} thread ended before installing its seccomp filter")]
    ThreadGone {
        /// Whose filter.
        kind: ThreadKind,
    },
}

/// A system call on an allow-list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedSyscall {
    /// Its name (`libc::SYS_<name>`).
    pub name: &'static str,
    /// `None`: any arguments; otherwise only these values of one argument.
    pub only: Option<ArgValues>,
}

/// The values one argument of an allowed system call may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgValues {
    /// Which argument (0-based).
    pub arg: u8,
    /// The values it may take, with their names (compared as 32 bits).
    pub values: Vec<(&'static str, u64)>,
}

/// One kind's filter, for people to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterDescription {
    /// Whose filter.
    pub kind: ThreadKind,
    /// What it allows, by name; everything else kills the process.
    pub syscalls: Vec<AllowedSyscall>,
}

impl std::fmt::Display for AllowedSyscall {
    /// `read`, or `ioctl(arg 1: KVM_RUN)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)?;
        if let Some(only) = &self.only {
            write!(f, "(arg {}: ", only.arg)?;
            for (i, (name, _)) in only.values.iter().enumerate() {
                if i > 0 {
                    f.write_str(" or ")?;
                }
                f.write_str(name)?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for FilterDescription {
    /// `vcpu: 40 syscalls: brk, ..., write`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} syscalls: ", self.kind, self.syscalls.len())?;
        for (i, s) in self.syscalls.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

/// One allow-list entry: a syscall number, and optionally the values one
/// of its arguments may take.
struct Rule {
    name: &'static str,
    nr: libc::c_long,
    only: Option<(u8, Vec<(&'static str, u64)>)>,
}

/// `sys!(SYS_read)`: `read` with any arguments;
/// `sys!(SYS_ioctl, 1 => [KVM_RUN])`: only with argument 1 one of these.
macro_rules! sys {
    ($nr:ident) => {
        Rule {
            name: stringify!($nr),
            nr: libc::$nr,
            only: None,
        }
    };
    ($nr:ident, $arg:literal => [$($value:expr),+ $(,)?]) => {
        Rule {
            name: stringify!($nr),
            nr: libc::$nr,
            only: Some(($arg, vec![$((stringify!($value), $value as u64)),+])),
        }
    };
}

/// Every VMM thread: the allocator, locks, signals (the vCPU kick), time,
/// logging, closing fds, and thread exit.
fn base() -> Vec<Rule> {
    use libc::*;
    let mut rules = vec![
        // The allocator (glibc malloc: arenas, trimming, large blocks).
        sys!(SYS_brk),
        sys!(SYS_mmap),
        sys!(SYS_mprotect),
        sys!(SYS_munmap),
        sys!(SYS_madvise),
        sys!(SYS_mremap),
        // glibc sizes a new thread's malloc arena from the CPUs it may use.
        sys!(SYS_sched_getaffinity),
        // Locks, condition variables, joins.
        sys!(SYS_futex),
        sys!(SYS_sched_yield),
        // The vCPU kick signal's handler returns; glibc blocks signals at
        // thread exit; std's stack-overflow handler frees its stack.
        sys!(SYS_rt_sigreturn),
        sys!(SYS_rt_sigprocmask),
        sys!(SYS_sigaltstack),
        // Time (the vDSO falls back to the syscall on some clocks/hosts).
        sys!(SYS_clock_gettime),
        // Logging: a line to stderr, the log pipe or containerd's FIFO.
        sys!(SYS_write),
        sys!(SYS_getpid),
        sys!(SYS_gettid),
        // std seeds a thread's HashMaps once per thread.
        sys!(SYS_getrandom),
        // Dropping fds; std's debug builds check an fd before closing it.
        sys!(SYS_close),
        sys!(SYS_fcntl, 1 => [F_GETFD, F_GETFL, F_SETFL]),
        // Thread exit.
        sys!(SYS_exit),
    ];
    rules.sort_by_key(|r| r.name);
    rules
}

/// Serving virtio queues and the vsock muxer's sockets: reachable from a
/// device thread, and from a vCPU thread when the guest notifies a queue
/// with an MMIO write KVM does not match to an ioeventfd.
fn device_io() -> Vec<Rule> {
    use libc::*;
    vec![
        // Eventfds (ioeventfds, irqfds, the wake fd), unix streams.
        sys!(SYS_read),
        sys!(SYS_readv),
        sys!(SYS_recvfrom),
        sys!(SYS_writev),
        sys!(SYS_sendto),
        // virtio-blk over an image file.
        sys!(SYS_pread64),
        sys!(SYS_pwrite64),
        sys!(SYS_preadv),
        sys!(SYS_pwritev),
        sys!(SYS_fdatasync),
        sys!(SYS_fsync),
        // virtio-rng's entropy source (`rng.rs` `GetRandom`): flags 0, so
        // the kernel's CRNG, never blocking once the host's pool is
        // initialized. base() allows it too (std's HashMap seeds); listed
        // here so that the device keeps it if base() ever drops it.
        sys!(SYS_getrandom),
        // Guest connections to `<uds>_<port>`: unix sockets only.
        sys!(SYS_socket, 0 => [AF_UNIX]),
        sys!(SYS_connect),
        sys!(SYS_shutdown),
        sys!(SYS_epoll_ctl),
        // A FIFO logger reopening containerd's log FIFO (inline VMM): an
        // existing file, write-only, never created or truncated.
        sys!(SYS_openat, 2 => [O_WRONLY | O_NONBLOCK | O_CLOEXEC]),
    ]
}

/// The allow-list of `kind` on this architecture, sorted by name, each
/// syscall once.
fn rules(kind: ThreadKind) -> Vec<Rule> {
    use libc::*;
    let mut rules = base();
    match kind {
        ThreadKind::Vcpu => {
            rules.extend(device_io());
            // The serial log's rotation (a vCPU writes the console): a
            // fresh file, write-only; the FIFO logger's reopen.
            rules.retain(|r| r.nr != SYS_openat);
            rules.push(sys!(SYS_openat, 2 => [
                O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                O_WRONLY | O_NONBLOCK | O_CLOEXEC,
            ]));
            rules.push(sys!(SYS_renameat));
            rules.push(sys!(SYS_renameat2));
            #[cfg(target_arch = "x86_64")]
            rules.push(sys!(SYS_rename));
            rules.push(sys!(SYS_fchmod));
            // KVM_RUN, and reading the vCPU's state for a snapshot
            // (paused, on its own thread: platform::snapshot::save_vcpu);
            // a NIC's activation (a status write) sets its tap's offloads.
            #[cfg(target_arch = "x86_64")]
            rules.push(sys!(SYS_ioctl, 1 => [
                KVM_RUN,
                KVM_GET_MP_STATE,
                KVM_GET_CPUID2,
                KVM_GET_REGS,
                KVM_GET_SREGS,
                KVM_GET_XSAVE,
                KVM_GET_XCRS,
                KVM_GET_DEBUGREGS,
                KVM_GET_LAPIC,
                KVM_GET_MSRS,
                KVM_GET_VCPU_EVENTS,
                TUNSETOFFLOAD,
            ]));
            #[cfg(not(target_arch = "x86_64"))]
            rules.push(sys!(SYS_ioctl, 1 => [KVM_RUN, TUNSETOFFLOAD]));
        }
        ThreadKind::Devices => {
            rules.extend(device_io());
            // The event loop, and host connections to the vsock socket.
            rules.push(sys!(SYS_epoll_pwait));
            #[cfg(target_arch = "x86_64")]
            rules.push(sys!(SYS_epoll_wait));
            rules.push(sys!(SYS_accept4));
            // std's set_nonblocking on an accepted socket.
            rules.push(sys!(SYS_ioctl, 1 => [FIONBIO]));
        }
        ThreadKind::FsServer => {
            rules.extend(device_io());
            rules.push(sys!(SYS_epoll_pwait));
            #[cfg(target_arch = "x86_64")]
            rules.push(sys!(SYS_epoll_wait));
            // The passthrough file server (`vmm::fs::passthrough`): any
            // open flags (O_PATH nodes, re-opens through /proc/self/fd),
            // the `*at` family on held descriptors, file I/O and xattrs
            // on descriptors, per-request fsuid/fsgid.
            rules.retain(|r| r.nr != SYS_openat && r.nr != SYS_fcntl);
            rules.extend([
                sys!(SYS_openat),
                sys!(SYS_fcntl, 1 => [F_GETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC]),
                sys!(SYS_newfstatat),
                sys!(SYS_fstatfs),
                sys!(SYS_readlinkat),
                sys!(SYS_symlinkat),
                sys!(SYS_mknodat),
                sys!(SYS_mkdirat),
                sys!(SYS_unlinkat),
                sys!(SYS_renameat2),
                sys!(SYS_linkat),
                sys!(SYS_fchmod),
                sys!(SYS_fchmodat),
                sys!(SYS_fchownat),
                sys!(SYS_ftruncate),
                sys!(SYS_utimensat),
                sys!(SYS_lseek),
                sys!(SYS_getdents64),
                sys!(SYS_fallocate),
                sys!(SYS_fgetxattr),
                sys!(SYS_fsetxattr),
                sys!(SYS_flistxattr),
                sys!(SYS_fremovexattr),
                sys!(SYS_setfsuid),
                sys!(SYS_setfsgid),
            ]);
        }
        ThreadKind::Control => {
            rules.extend([
                // The control socket: requests, replies, disk image fds.
                sys!(SYS_recvmsg),
                sys!(SYS_sendmsg),
                sys!(SYS_read),
                sys!(SYS_writev),
                // Waiting for the socket and the VM's exit eventfd.
                sys!(SYS_ppoll),
                // Received disk images: their size and position.
                sys!(SYS_fstat),
                sys!(SYS_newfstatat),
                sys!(SYS_statx),
                sys!(SYS_lseek),
                // Kicking vCPUs out of KVM_RUN, and waiting between kicks.
                sys!(SYS_tgkill),
                sys!(SYS_nanosleep),
                sys!(SYS_clock_nanosleep),
                // The VM's end: the last reference to the devices goes
                // here, and the vsock muxer removes its socket file.
                sys!(SYS_unlinkat),
                // The process's end.
                sys!(SYS_exit_group),
            ]);
            #[cfg(target_arch = "x86_64")]
            rules.extend([sys!(SYS_poll), sys!(SYS_unlink)]);
            // A snapshot into the files the shim passed: guest memory and
            // the state written and synced, and the VM's irqchip, PIT and
            // clock read (the vCPUs read their own).
            rules.extend([
                sys!(SYS_pwrite64),
                sys!(SYS_ftruncate),
                sys!(SYS_fsync),
                sys!(SYS_fdatasync),
            ]);
            #[cfg(target_arch = "x86_64")]
            rules.push(sys!(SYS_ioctl, 1 => [KVM_GET_IRQCHIP, KVM_GET_PIT2, KVM_GET_CLOCK]));
        }
    }
    for r in &mut rules {
        r.name = r.name.trim_start_matches("SYS_");
    }
    rules.sort_by_key(|r| r.name);
    rules.dedup_by_key(|r| r.nr);
    rules
}

#[cfg(target_arch = "x86_64")]
const TARGET_ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const TARGET_ARCH: TargetArch = TargetArch::aarch64;

/// The BPF program of `kind`'s filter.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Compile { kind, source };
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for rule in rules(kind) {
        let conditions = match rule.only {
            None => Vec::new(),
            Some((arg, values)) => values
                .into_iter()
                .map(|(_, value)| {
                    let cond = SeccompCondition::new(
                        arg,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        value,
                    )
                    .map_err(|e| err(e.into()))?;
                    SeccompRule::new(vec![cond]).map_err(|e| err(e.into()))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        map.insert(rule.nr, conditions);
    }
    let filter = SeccompFilter::new(
        map,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TARGET_ARCH,
    )
    .map_err(|e| err(e.into()))?;
    BpfProgram::try_from(filter).map_err(|e| err(e.into()))
}

/// Installs `kind`'s filter on the calling thread (and on the threads it
/// starts from then on). It cannot be taken off again.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let program = compile(kind)?;
    install_panic_hook();
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install { kind, source })?;
    FILTERED.with(|f| f.set(true));
    Ok(())
}

std::thread_local! {
    /// Whether the current thread runs under one of these filters.
    static FILTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes a panic in a filtered thread only log its message. std's default
/// hook may open `/proc/self/maps` and read the working directory to print
/// a backtrace (`RUST_BACKTRACE`), which no filter allows: the panic would
/// kill the process with `SIGSYS` before the thread could report its end.
/// Every other thread keeps the hook the process had (installed once,
/// chaining to it).
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if FILTERED.with(|f| f.get()) {
                let thread = std::thread::current();
                log::error!(
                    "VMM thread {} panicked (no backtrace under its seccomp filter): {info}",
                    thread.name().unwrap_or("?")
                );
            } else {
                previous(info);
            }
        }));
    });
}

/// What each kind's filter allows.
pub fn describe() -> Vec<FilterDescription> {
    ThreadKind::ALL
        .into_iter()
        .map(|kind| FilterDescription {
            kind,
            syscalls: rules(kind)
                .into_iter()
                .map(|r| AllowedSyscall {
                    name: r.name,
                    only: r.only.map(|(arg, values)| ArgValues { arg, values }),
                })
                .collect(),
        })
        .collect()
}

/// The new thread's end of a [`handoff`]: installs the filter first thing.
pub struct Installer {
    kind: ThreadKind,
    enabled: bool,
    report: mpsc::SyncSender<Result<(), SeccompError>>,
}

/// The spawner's end of a [`handoff`]: waits until the thread's filter is
/// in place.
pub struct Installed {
    kind: ThreadKind,
    report: mpsc::Receiver<Result<(), SeccompError>>,
}

/// A thread of `kind` about to start: it installs its filter (if
/// `enabled`) with the [`Installer`] and says how that went; its spawner
/// waits on the [`Installed`], so a VM never runs with a thread that failed
/// to confine itself.
pub fn handoff(kind: ThreadKind, enabled: bool) -> (Installer, Installed) {
    let (tx, rx) = mpsc::sync_channel(1);
    (
        Installer {
            kind,
            enabled,
            report: tx,
        },
        Installed { kind, report: rx },
    )
}

impl Installer {
    /// Installs the filter on the calling thread (unless filters are off)
    /// and reports. `false`: it could not, and the thread must end now.
    pub fn install(self) -> bool {
        let result = if self.enabled {
            install(self.kind)
        } else {
            Ok(())
        };
        let ok = result.is_ok();
        let _ = self.report.send(result);
        ok
    }
}

impl Installed {
    /// Waits for the thread's report.
    pub fn wait(self) -> Result<(), SeccompError> {
        self.report
            .recv()
            .unwrap_or(Err(SeccompError::ThreadGone { kind: self.kind }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(kind: ThreadKind) -> Vec<&'static str> {
        rules(kind).iter().map(|r| r.name).collect()
    }

    /// Forks; the child applies `program`, runs `body` and exits with what
    /// it returns (with the raw `exit` syscall, which every filter allows).
    /// Returns the child's wait status.
    fn in_child(program: &BpfProgram, body: fn() -> i32) -> libc::c_int {
        // SAFETY: the child only makes raw system calls (no allocation, no
        // locks another thread could hold) and leaves with `exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = match seccompiler::apply_filter(program) {
                Ok(()) => body(),
                Err(_) => 100,
            };
            // SAFETY: ends the (only) thread of the child, so the child.
            unsafe { libc::syscall(libc::SYS_exit, code) };
            unreachable!();
        }
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; `pid` is our child.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        status
    }

    fn killed_by_sigsys(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    fn exit_code(status: libc::c_int) -> Option<i32> {
        libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
    }

    /// `errno` of a call that returned -1, or 0.
    fn errno_of(ret: libc::c_long) -> i32 {
        if ret == -1 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }

    fn open_for_reading() -> i32 {
        // SAFETY: a valid NUL-terminated path; the fd, if any, is leaked
        // in a child that exits right after.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/proc/self/status".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if ret >= 0 {
            1
        } else {
            2
        }
    }

    fn inet_socket() -> i32 {
        // SAFETY: plain integer arguments.
        let ret = unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
        if ret >= 0 {
            1
        } else {
            2
        }
    }

    #[test]
    fn every_filter_compiles_and_lists_its_syscalls() {
        let described = describe();
        assert_eq!(
            described.iter().map(|d| d.kind).collect::<Vec<_>>(),
            ThreadKind::ALL
        );
        for d in &described {
            let program = compile(d.kind).unwrap();
            assert!(!program.is_empty());
            let mut sorted: Vec<_> = d.syscalls.iter().map(|s| s.name).collect();
            sorted.dedup();
            assert_eq!(sorted.len(), d.syscalls.len(), "{}: duplicates", d.kind);
            for must in ["futex", "mmap", "munmap", "exit", "rt_sigreturn", "write"] {
                assert!(sorted.contains(&must), "{}: no {must}", d.kind);
            }
        }
        // The vCPU's ioctls are KVM_RUN and the snapshot's reads of its
        // state; the device thread's FIONBIO.
        let ioctl = |kind| {
            rules(kind)
                .into_iter()
                .find(|r| r.name == "ioctl")
                .and_then(|r| r.only)
        };
        let (arg, vcpu_ioctls) = ioctl(ThreadKind::Vcpu).unwrap();
        assert_eq!(arg, 1);
        assert_eq!(vcpu_ioctls[0], ("KVM_RUN", 0xae80));
        // The numbers the kernel headers give (x86_64).
        #[cfg(target_arch = "x86_64")]
        for (name, nr) in [
            ("KVM_GET_REGS", 0x8090_ae81),
            ("KVM_GET_SREGS", 0x8138_ae83),
            ("KVM_GET_MSRS", 0xc008_ae88),
            ("KVM_GET_LAPIC", 0x8400_ae8e),
            ("KVM_GET_CPUID2", 0xc008_ae91),
            ("KVM_GET_MP_STATE", 0x8004_ae98),
            ("KVM_GET_VCPU_EVENTS", 0x8040_ae9f),
            ("KVM_GET_DEBUGREGS", 0x8080_aea1),
            ("KVM_GET_XSAVE", 0x9000_aea4),
            ("KVM_GET_XCRS", 0x8188_aea6),
        ] {
            assert!(
                vcpu_ioctls.contains(&(name, nr)),
                "{name} {nr:#x}: {vcpu_ioctls:?}"
            );
        }
        // Nothing that changes the vCPU or the VM; a NIC's activation sets
        // its tap's offloads.
        assert!(vcpu_ioctls.contains(&("TUNSETOFFLOAD", 0x4004_54d0)));
        assert!(vcpu_ioctls
            .iter()
            .all(|(n, _)| n == &"KVM_RUN" || n == &"TUNSETOFFLOAD" || n.starts_with("KVM_GET_")));
        assert_eq!(
            ioctl(ThreadKind::Devices),
            Some((1, vec![("FIONBIO", libc::FIONBIO)]))
        );
        // The control thread reads the VM's state for a snapshot, and
        // changes nothing.
        #[cfg(target_arch = "x86_64")]
        {
            let control = ioctl(ThreadKind::Control).expect("snapshot ioctls");
            assert_eq!(control.0, 1);
            assert_eq!(
                control.1,
                [
                    ("KVM_GET_IRQCHIP", 0xc208_ae62),
                    ("KVM_GET_PIT2", 0x8070_ae9f),
                    ("KVM_GET_CLOCK", 0x8030_ae7c)
                ]
            );
        }
        let vcpu = described[0].to_string();
        assert!(
            vcpu.starts_with(&format!("vcpu: {} syscalls: ", described[0].syscalls.len())),
            "{vcpu}"
        );
        assert!(
            vcpu.contains(", ioctl(arg 1: KVM_RUN or KVM_GET_MP_STATE or "),
            "{vcpu}"
        );
        assert!(
            vcpu.contains("openat(arg 2: O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC or "),
            "{vcpu}"
        );
        // The control thread opens nothing and makes no sockets; only it
        // passes fds.
        for absent in ["openat", "socket", "connect", "accept4", "rename"] {
            assert!(!names(ThreadKind::Control).contains(&absent), "{absent}");
        }
        // The entropy device fills guest buffers with getrandom, on its
        // thread or on a vCPU that writes QueueNotify.
        for kind in [ThreadKind::Vcpu, ThreadKind::Devices] {
            assert!(names(kind).contains(&"getrandom"), "{kind}");
        }
        for kind in [ThreadKind::Vcpu, ThreadKind::Devices] {
            for absent in ["recvmsg", "sendmsg", "execve", "clone", "clone3", "ptrace"] {
                assert!(!names(kind).contains(&absent), "{kind}: {absent}");
            }
        }
    }

    #[test]
    fn a_vcpu_may_run_but_not_open_files_or_other_ioctls() {
        let program = compile(ThreadKind::Vcpu).unwrap();
        // KVM_RUN on a bad fd is allowed (EBADF), so are time and writes.
        let allowed = in_child(&program, || {
            // SAFETY: plain integer arguments; fd -1 is invalid.
            let run = unsafe { libc::syscall(libc::SYS_ioctl, -1, KVM_RUN, 0) };
            // SAFETY: as above.
            let write = unsafe { libc::syscall(libc::SYS_write, -1, 0, 0) };
            if errno_of(run) != libc::EBADF || errno_of(write) != libc::EBADF {
                return 1;
            }
            0
        });
        assert_eq!(exit_code(allowed), Some(0), "status {allowed:#x}");
        let opened = in_child(&program, open_for_reading);
        assert!(killed_by_sigsys(opened), "status {opened:#x}");
        let other_ioctl = in_child(&program, || {
            // SAFETY: plain integer arguments; fd -1 is invalid.
            unsafe { libc::syscall(libc::SYS_ioctl, -1, libc::FIONBIO, 0) };
            1
        });
        assert!(killed_by_sigsys(other_ioctl), "status {other_ioctl:#x}");
    }

    #[test]
    fn the_device_thread_may_use_unix_sockets_and_getrandom_but_not_inet() {
        let program = compile(ThreadKind::Devices).unwrap();
        let unix = in_child(&program, || {
            // SAFETY: plain integer arguments.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_socket,
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                    0,
                )
            };
            if fd < 0 {
                return 1;
            }
            // SAFETY: `fd` is ours.
            unsafe { libc::syscall(libc::SYS_close, fd) };
            0
        });
        assert_eq!(exit_code(unix), Some(0), "status {unix:#x}");
        let inet = in_child(&program, inet_socket);
        assert!(killed_by_sigsys(inet), "status {inet:#x}");
        let random = in_child(&program, || {
            let mut buf = [0u8; 64];
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::syscall(libc::SYS_getrandom, buf.as_mut_ptr(), buf.len(), 0) };
            if n == buf.len() as libc::c_long {
                0
            } else {
                1
            }
        });
        assert_eq!(exit_code(random), Some(0), "status {random:#x}");
        let opened = in_child(&program, open_for_reading);
        assert!(killed_by_sigsys(opened), "status {opened:#x}");
    }

    #[test]
    fn the_control_thread_may_talk_on_its_socket_but_not_open_anything() {
        let program = compile(ThreadKind::Control).unwrap();
        let talk = in_child(&program, || {
            // SAFETY: fd -1 is invalid: the call fails with EBADF before
            // it reads the (null) message header.
            let recv = unsafe { libc::syscall(libc::SYS_recvmsg, -1, 0, 0) };
            // SAFETY: as above.
            let seek = unsafe { libc::syscall(libc::SYS_lseek, -1, 0, libc::SEEK_SET) };
            if errno_of(recv) != libc::EBADF || errno_of(seek) != libc::EBADF {
                return 1;
            }
            0
        });
        assert_eq!(exit_code(talk), Some(0), "status {talk:#x}");
        let opened = in_child(&program, open_for_reading);
        assert!(killed_by_sigsys(opened), "status {opened:#x}");
        let unix = in_child(&program, inet_socket);
        assert!(killed_by_sigsys(unix), "status {unix:#x}");
    }

    #[test]
    fn a_filter_applies_to_its_thread_only_and_failures_are_reported() {
        let (installer, installed) = handoff(ThreadKind::Vcpu, true);
        let (tid_tx, tid_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        // The filtered thread only makes allowed calls: gettid, futex
        // (the channels), and its exit.
        let t = std::thread::spawn(move || {
            if installer.install() {
                // SAFETY: no arguments.
                let _ = tid_tx.send(unsafe { libc::syscall(libc::SYS_gettid) });
                let _ = done_rx.recv();
            }
        });
        installed.wait().unwrap();
        let tid = tid_rx.recv().unwrap();
        let theirs = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        assert!(theirs.contains("Seccomp:\t2\n"), "{theirs}");
        let ours = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(ours.contains("Seccomp:\t0\n"), "{ours}");
        done_tx.send(()).unwrap();
        t.join().unwrap();
        // Filters off: nothing is installed, and the thread may go on.
        let (installer, installed) = handoff(ThreadKind::Vcpu, false);
        let free = std::thread::spawn(move || {
            installer.install() && std::fs::read_to_string("/proc/thread-self/status").is_ok()
        });
        installed.wait().unwrap();
        assert!(free.join().unwrap());
        // A thread that never reports is a typed error, not a hang.
        let (installer, installed) = handoff(ThreadKind::Devices, true);
        drop(installer);
        assert!(matches!(
            installed.wait(),
            Err(SeccompError::ThreadGone {
                kind: ThreadKind::Devices
            })
        ));
    }
}
