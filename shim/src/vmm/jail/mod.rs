//! The jailed VMM: the VM runs in a child process of the shim, confined,
//! and the shim drives it over a typed control channel.
//!
//! [`JailedVm::start`] re-executes this binary (`/proc/self/exe`, so skiff
//! still ships one artifact with the VMM built in) as [`VMM_ARGV0`] through
//! `clone(2)` with new mount, PID, IPC, UTS and network namespaces, puts
//! it into its own cgroup ([`cgroup`]), and sends it `Start`. The child
//! ([`child`]) opens everything the VM needs while it is still root, then
//! pivots into the jail root (the sandbox's state directory, handed to
//! the VMM's user), drops every capability, sets `no_new_privs` and
//! rlimits ([`confine`]), and only then lets the guest run. Disks plugged
//! in later arrive as open files over the channel; the VMM opens nothing
//! by path after it starts.
//!
//! How the VM ended comes back as an `Exited` message; a VMM that dies
//! without one (killed, a seccomp filter's SIGSYS, a crash) is reported as
//! [`ExitReason::VmmDied`] with its wait status.

pub mod cgroup;
pub mod child;
mod confine;
pub mod wire;

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use self::cgroup::{CgroupError, CgroupLimits, VmmCgroup};
pub use self::child::{main_if_vmm, VMM_ARGV0};
use self::wire::{
    BootSpec, Confinement, DiskSpec, FsSpec, NetSpec, Reply, Request, VmSpec, WireError,
};
use super::config::{BootSource, DiskConfig, SerialOutput, VmConfig};
use super::devices::MAX_VIRTIO_DEVICES;
use super::platform::boot::BootProtocol;
use super::shared::ExitReason;
use super::VmReport;
use crate::sync::lock;

/// Memory the VMM process may use beyond guest RAM (its binary, thread
/// stacks, device buffers).
pub const VMM_MEMORY_OVERHEAD_BYTES: u64 = 128 << 20;
/// Files the VMM process may hold open (vsock connections, disks, KVM).
pub const VMM_MAX_FILES: u64 = 1024;
/// Files a VMM serving a virtio-fs share may hold open: one per file the
/// guest has looked up and per open file (at most the shim's own hard
/// limit).
pub const VMM_MAX_FILES_WITH_FS: u64 = 1 << 20;
/// How long the VMM may take to build and confine a VM.
const START_BOUND: Duration = Duration::from_secs(120);
/// How long a request may take.
const REQUEST_BOUND: Duration = Duration::from_secs(30);
/// How long a snapshot may take (guest memory is written out and synced).
const SNAPSHOT_BOUND: Duration = Duration::from_secs(120);
/// How long [`JailedVm::wait`] waits for a stopped VMM before killing it.
const EXIT_BOUND: Duration = Duration::from_secs(10);
/// Longest log line taken from the VMM.
const MAX_LOG_LINE: u64 = 4096;

/// How to jail a VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    /// The binary to re-execute (this one: `/proc/self/exe`; tests name
    /// the `skiff` binary).
    pub exe: PathBuf,
    /// The jail's root: the sandbox's state directory (serial log and
    /// vsock socket live there). It is handed to `uid`:`gid`.
    pub root: PathBuf,
    /// Names the cgroup (`skiff/<name>`): unique per sandbox on the host.
    pub name: String,
    /// The sandbox's id: shows in `ps` (`skiff-vmm <id>`).
    pub id: String,
    /// The VMM's user.
    pub uid: u32,
    /// The VMM's group.
    pub gid: u32,
    /// Per-thread seccomp filters.
    pub seccomp: bool,
    /// Whether the VMM gets its own cgroup.
    pub cgroup: bool,
    /// The cgroup's parent (the pod's, [`cgroup::pod_parent`]); `None`:
    /// the shim's cgroup.
    pub cgroup_parent: Option<String>,
    /// Where to record the cgroup's directories, for the cleanup after a
    /// dead shim ([`VmmCgroup::remove_leftover`]).
    pub cgroup_record: Option<PathBuf>,
    /// The VMM's log level.
    pub log_level: log::LevelFilter,
}

impl JailConfig {
    /// A jail in `root` for sandbox `id`, its cgroup named `name`,
    /// re-executing this binary as `nobody`, with filters and a cgroup.
    pub fn new(root: &Path, name: &str, id: &str) -> Self {
        JailConfig {
            exe: PathBuf::from("/proc/self/exe"),
            root: root.to_owned(),
            name: name.to_owned(),
            id: id.to_owned(),
            uid: 65534,
            gid: 65534,
            seccomp: true,
            cgroup: true,
            cgroup_parent: None,
            cgroup_record: None,
            log_level: log::max_level(),
        }
    }
}

/// Errors starting or driving a jailed VMM.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The VM config has something a separate process cannot be given.
    #[error("a jailed VMM cannot take {0}")]
    Unsupported(String),
    /// The jail root could not be handed to the VMM's user.
    #[error("cannot prepare the jail root {}", path.display())]
    Root {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// The process could not be started.
    #[error("cannot start the VMM process (new namespaces need root)")]
    Spawn(#[source] nix::Error),
    /// The cgroup could not be set up.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The control channel failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The VMM refused or failed a request; its error chain.
    #[error("the VMM process failed: {0}")]
    Failed(String),
    /// The VMM process is gone.
    #[error("the VMM process ended ({0:?})")]
    Ended(ExitReason),
    /// A disk image could not be opened.
    #[error("cannot open disk {}", path.display())]
    Disk {
        /// The image.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A VM running in a jailed VMM process.
pub struct JailedVm {
    pid: Pid,
    control: Mutex<OwnedFd>,
    state: Mutex<State>,
    cgroup: Option<VmmCgroup>,
    logs: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    /// How the VM ended, once known.
    report: Option<VmReport>,
    /// Whether the process has been reaped.
    reaped: bool,
}

impl std::fmt::Debug for JailedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JailedVm").field("pid", &self.pid).finish()
    }
}

/// What a VM config becomes on the wire; serial log and vsock socket must
/// be in `root`.
fn vm_spec(config: &VmConfig, root: &Path) -> Result<VmSpec, JailError> {
    let in_root = |path: &Path, what: &str| {
        path.strip_prefix(root).map(Path::to_owned).map_err(|_| {
            JailError::Unsupported(format!(
                "{what} {} outside the jail root {}",
                path.display(),
                root.display()
            ))
        })
    };
    let boot = match &config.boot {
        BootSource::Kernel(spec) => BootSpec::Kernel {
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            cmdline: spec.cmdline.clone(),
        },
        BootSource::Raw {
            image,
            load_addr,
            protocol,
        } => BootSpec::Raw {
            image: image.clone(),
            load_addr: *load_addr,
            mode: match protocol {
                BootProtocol::RealMode => "real",
                BootProtocol::Pvh => "pvh",
                BootProtocol::Linux64 => "linux64",
            }
            .into(),
        },
    };
    let serial = match &config.serial {
        SerialOutput::File(path) => Some(in_root(path, "a serial log")?),
        SerialOutput::Discard => None,
        SerialOutput::Stdout | SerialOutput::Buffer(_) => {
            return Err(JailError::Unsupported(
                "a serial console other than a file".into(),
            ))
        }
    };
    let vsock = match &config.vsock {
        Some(v) => Some((v.guest_cid, in_root(&v.uds_path, "a vsock socket")?)),
        None => None,
    };
    Ok(VmSpec {
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
        boot,
        disks: config
            .disks
            .iter()
            .map(|d| DiskSpec {
                path: d.path.clone(),
                read_only: d.read_only,
            })
            .collect(),
        vsock,
        cpu_template: config.cpu_template.to_string(),
        serial,
        rng: config.rng,
        net: config.net.as_ref().map(|n| NetSpec {
            mac: n.mac,
            mtu: n.mtu,
        }),
        fs: match &config.fs {
            Some(fs) => Some(FsSpec {
                dir: in_root(&fs.dir, "a virtio-fs share")?,
                tag: fs.tag.clone(),
                cache: fs.cache,
            }),
            None => None,
        },
    })
}

/// `fd` duplicated to 10 or above (close-on-exec), so the child's `dup2`s
/// onto 0..=3 never clobber a source.
fn high(fd: RawFd) -> Result<OwnedFd, JailError> {
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd` and returns a new fd we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(JailError::Spawn(nix::Error::last()));
    }
    // SAFETY: `new` was just created for us and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Starts `exe` as the VMM process in new namespaces with `control` as
/// fd 3, `log` as stderr, and /dev/null as stdin and stdout.
fn spawn(exe: &Path, name: &str, control: &OwnedFd, log: &OwnedFd) -> Result<Pid, JailError> {
    let path = CString::new(exe.as_os_str().as_bytes())
        .map_err(|_| JailError::Unsupported("a binary path with a NUL byte".into()))?;
    let argv0 = CString::new(VMM_ARGV0).expect("no NUL");
    let arg1 = CString::new(name.replace('\0', "")).expect("NULs removed");
    let argv = [argv0.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let null = std::fs::File::open("/dev/null").map_err(|e| {
        JailError::Spawn(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    })?;
    let (control, log, null) = (
        high(control.as_raw_fd())?,
        high(log.as_raw_fd())?,
        high(null.as_raw_fd())?,
    );
    let (c, l, n) = (control.as_raw_fd(), log.as_raw_fd(), null.as_raw_fd());
    let mut stack = vec![0u8; 64 << 10];
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET;
    // Only async-signal-safe calls below: the child is a copy of a
    // multi-threaded process until it execs.
    let child = Box::new(|| {
        let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set it is given.
        unsafe { libc::sigemptyset(none.as_mut_ptr()) };
        // SAFETY: the set was initialised above; the old mask is not asked for.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut()) };
        for (from, to) in [(n, 0), (n, 1), (l, 2), (c, child::CONTROL_FD)] {
            // SAFETY: both are fd numbers; `from` is open in this process.
            if unsafe { libc::dup2(from, to) } < 0 {
                // SAFETY: _exit ends this process without running anything
                // of the parent's copied state.
                unsafe { libc::_exit(126) };
            }
        }
        // SAFETY: `path`, `argv` and `envp` are NUL-terminated C strings
        // and NULL-terminated arrays of them that outlive the call.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        // SAFETY: as above; execve failed.
        unsafe { libc::_exit(127) }
    });
    // SAFETY: the callback runs in a new process (no CLONE_VM) on its own
    // copy of `stack`, and only makes the async-signal-safe calls above.
    unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
        .map_err(JailError::Spawn)
}

/// Re-logs the VMM's `LEVEL message` lines as `vmm <name>: message`,
/// control characters escaped, lines capped at [`MAX_LOG_LINE`].
fn forward_logs(pipe: OwnedFd, name: String) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vmm-log".into())
        .spawn(move || {
            let mut reader = BufReader::new(std::fs::File::from(pipe));
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader
                    .by_ref()
                    .take(MAX_LOG_LINE)
                    .read_until(b'\n', &mut line)
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let text: String = String::from_utf8_lossy(&line)
                    .trim_end()
                    .chars()
                    .flat_map(|c| {
                        let escaped: Vec<char> = if c.is_control() {
                            c.escape_default().collect()
                        } else {
                            vec![c]
                        };
                        escaped
                    })
                    .collect();
                let (level, message) = match text.split_once(' ') {
                    Some((l, m)) => match l.parse::<log::Level>() {
                        Ok(level) => (level, m),
                        Err(_) => (log::Level::Info, text.as_str()),
                    },
                    None => (log::Level::Info, text.as_str()),
                };
                log::log!(level, "vmm {name}: {message}");
            }
        })
}

/// How a VMM that sent no `Exited` ended.
fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => {
            format!("the VMM process exited with status {code} without reporting")
        }
        WaitStatus::Signaled(_, Signal::SIGSYS, _) => {
            "the VMM process was killed by SIGSYS: a seccomp filter denied a system call".into()
        }
        WaitStatus::Signaled(_, signal, _) => {
            format!("the VMM process was killed by {signal}")
        }
        other => format!("the VMM process ended: {other:?}"),
    }
}

impl JailedVm {
    /// Starts a VMM process for `config` in `jail` and waits until its VM
    /// runs (confined).
    pub fn start(config: &VmConfig, jail: &JailConfig) -> Result<Self, JailError> {
        Self::start_or_restore(config, jail, None)
    }

    /// Like [`JailedVm::start`], but the VM is restored from snapshot
    /// `dir` (opened here: the VMM is passed the files).
    pub fn restore(config: &VmConfig, jail: &JailConfig, dir: &Path) -> Result<Self, JailError> {
        let (state, memory, _) =
            super::snapshot::open(dir).map_err(|e| JailError::Failed(super::error_chain(&e)))?;
        Self::start_or_restore(config, jail, Some((&state, &memory)))
    }

    fn start_or_restore(
        config: &VmConfig,
        jail: &JailConfig,
        snapshot: Option<(&std::fs::File, &std::fs::File)>,
    ) -> Result<Self, JailError> {
        let spec = vm_spec(config, &jail.root)?;
        nix::unistd::chown(
            &jail.root,
            Some(nix::unistd::Uid::from_raw(jail.uid)),
            Some(nix::unistd::Gid::from_raw(jail.gid)),
        )
        .map_err(|source| JailError::Root {
            path: jail.root.clone(),
            source,
        })?;
        let (ours, theirs) = wire::pair()?;
        let (log_r, log_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(JailError::Spawn)?;
        let pid = spawn(&jail.exe, &jail.id, &theirs, &log_w)?;
        drop((theirs, log_w));
        let mut vm = JailedVm {
            pid,
            control: Mutex::new(ours),
            state: Mutex::new(State::default()),
            cgroup: None,
            logs: forward_logs(log_r, jail.id.clone()).ok(),
        };
        if jail.cgroup {
            let limits = CgroupLimits {
                memory_bytes: (config.mem_mib << 20) + VMM_MEMORY_OVERHEAD_BYTES,
                cpus: u32::from(config.vcpus) + 1,
                pids: u32::from(config.vcpus) + MAX_VIRTIO_DEVICES as u32 + 8,
            };
            let cgroup = VmmCgroup::create(&jail.name, jail.cgroup_parent.as_deref(), limits)?;
            if let Some(record) = &jail.cgroup_record {
                if let Err(e) = cgroup.record(record) {
                    log::warn!("cannot record the VMM cgroup in {}: {e}", record.display());
                }
            }
            cgroup.add(pid.as_raw())?;
            vm.cgroup = Some(cgroup);
        }
        let start = Request::Start {
            vm: Box::new(spec),
            jail: Confinement {
                root: jail.root.clone(),
                uid: jail.uid,
                gid: jail.gid,
                seccomp: jail.seccomp && config.seccomp,
                max_files: if config.fs.is_some() {
                    VMM_MAX_FILES_WITH_FS
                } else {
                    VMM_MAX_FILES
                },
                fs_caps: config.fs.is_some(),
            },
            log_level: jail.log_level.to_string(),
            restore: snapshot.is_some(),
        };
        let mut files: Vec<RawFd> = snapshot
            .map(|(state, memory)| vec![state.as_raw_fd(), memory.as_raw_fd()])
            .unwrap_or_default();
        files.extend(config.net.as_ref().map(|n| n.tap.as_raw_fd()));
        vm.request(&start, &files, START_BOUND)?;
        let user = if config.fs.is_some() {
            "uid 0 with the file-server capabilities only (virtio-fs)".to_owned()
        } else {
            format!("uid {}", jail.uid)
        };
        log::info!(
            "VMM process {} runs the VM (jail {}, {user}, cgroup {})",
            pid,
            jail.root.display(),
            if jail.cgroup { "own" } else { "the shim's" }
        );
        Ok(vm)
    }

    /// The VMM process's pid (in the shim's PID namespace).
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Sends `request` and waits up to `bound` for its answer.
    fn request(
        &self,
        request: &Request,
        files: &[RawFd],
        bound: Duration,
    ) -> Result<(), JailError> {
        let control = lock(&self.control);
        if let Some(report) = &lock(&self.state).report {
            return Err(JailError::Ended(report.exit.clone()));
        }
        let deadline = Instant::now() + bound;
        match wire::send(&control, request, files) {
            Err(WireError::Closed) => {
                drop(control);
                self.reap_within(EXIT_BOUND);
                return Err(self.ended_error());
            }
            sent => sent?,
        }
        loop {
            if !wire::readable(&control, Some(Duration::from_millis(100)))? {
                if self.reap(false) {
                    drop(control);
                    return Err(self.ended_error());
                }
                if Instant::now() >= deadline {
                    return Err(WireError::Timeout(bound).into());
                }
                continue;
            }
            match wire::recv::<Reply>(&control) {
                Ok((Reply::Done, _)) => return Ok(()),
                Ok((Reply::Failed(message), _)) => return Err(JailError::Failed(message)),
                Ok((Reply::Exited(report), _)) => {
                    lock(&self.state).report = Some(report);
                    drop(control);
                    return Err(self.ended_error());
                }
                Err(WireError::Closed) => {
                    drop(control);
                    self.reap_within(EXIT_BOUND);
                    return Err(self.ended_error());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn ended_error(&self) -> JailError {
        let state = lock(&self.state);
        JailError::Ended(
            state
                .report
                .as_ref()
                .map_or(ExitReason::Stopped, |r| r.exit.clone()),
        )
    }

    /// Reaps the process if it has ended (`block`: waits for it); records
    /// how it ended unless it reported that itself. Whether it is reaped.
    fn reap(&self, block: bool) -> bool {
        let mut state = lock(&self.state);
        if state.reaped {
            return true;
        }
        let flags = (!block).then_some(WaitPidFlag::WNOHANG);
        let status = loop {
            match waitpid(self.pid, flags) {
                Err(nix::Error::EINTR) => continue,
                other => break other,
            }
        };
        let status = match status {
            Ok(WaitStatus::StillAlive) => return false,
            Ok(status) => describe(status),
            // ECHILD: someone else reaped it; nothing more to learn.
            Err(e) => format!("the VMM process is gone ({e})"),
        };
        state.reaped = true;
        if state.report.is_none() {
            log::warn!("{status}");
            state.report = Some(VmReport {
                exit: ExitReason::VmmDied(status),
                boot_timer: None,
                first_entry: None,
            });
        }
        true
    }

    /// Reaps within `bound`, killing the process if it takes longer.
    fn reap_within(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        while !self.reap(false) {
            if Instant::now() >= deadline {
                log::warn!("the VMM process {} did not end; killing it", self.pid);
                let _ = kill(self.pid, Signal::SIGKILL);
                self.reap(true);
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asks the VM to stop.
    pub fn stop(&self) {
        let control = lock(&self.control);
        if wire::send(&control, &Request::Stop, &[]).is_err() {
            drop(control);
            self.reap_within(EXIT_BOUND);
        }
    }

    /// Why the VM ended, once it has (without waiting).
    pub fn exit_reason(&self) -> Option<ExitReason> {
        if let Some(report) = &lock(&self.state).report {
            return Some(report.exit.clone());
        }
        // A request in flight reads the channel itself.
        let control = self.control.try_lock().ok()?;
        match wire::readable(&control, Some(Duration::ZERO)) {
            Ok(true) => match wire::recv::<Reply>(&control) {
                Ok((Reply::Exited(report), _)) => {
                    lock(&self.state).report = Some(report);
                }
                Err(WireError::Closed) => {
                    drop(control);
                    self.reap_within(EXIT_BOUND);
                }
                // A late answer to a request that gave up waiting.
                Ok(_) | Err(_) => {}
            },
            Ok(false) | Err(_) => {
                drop(control);
                self.reap(false);
            }
        }
        lock(&self.state).report.as_ref().map(|r| r.exit.clone())
    }

    /// Puts `disk` into slot `index` (an open file crosses the channel),
    /// or takes the slot's medium out.
    pub fn set_disk(&self, index: usize, disk: Option<&DiskConfig>) -> Result<(), JailError> {
        let file = match disk.and_then(|d| d.path.as_ref().map(|p| (p, d.read_only))) {
            Some((path, read_only)) => Some((
                path.clone(),
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(!read_only)
                    .open(path)
                    .map_err(|source| JailError::Disk {
                        path: path.clone(),
                        source,
                    })?,
            )),
            None => None,
        };
        let request = Request::SetDisk {
            index,
            path: file.as_ref().map(|(p, _)| p.clone()),
        };
        let fds: Vec<RawFd> = file.iter().map(|(_, f)| f.as_raw_fd()).collect();
        self.request(&request, &fds, REQUEST_BOUND)
    }

    /// Has the VMM write a snapshot of its VM into the open, empty files
    /// `state` and `memory` (it opens nothing itself).
    pub fn snapshot(&self, state: &std::fs::File, memory: &std::fs::File) -> Result<(), JailError> {
        self.request(
            &Request::Snapshot,
            &[state.as_raw_fd(), memory.as_raw_fd()],
            SNAPSHOT_BOUND,
        )
    }

    /// Waits until the VM ends (killing a VMM that does not end within a
    /// bound of [`JailedVm::stop`]), reaps the process, removes its cgroup.
    pub fn wait(mut self) -> VmReport {
        let mut since = Instant::now();
        while self.exit_reason().is_none() {
            if since.elapsed() >= EXIT_BOUND {
                self.stop();
                since = Instant::now();
            }
            let control = lock(&self.control);
            let _ = wire::readable(&control, Some(Duration::from_millis(100)));
        }
        self.reap_within(EXIT_BOUND);
        self.finish();
        let state = std::mem::take(&mut *lock(&self.state));
        state.report.unwrap_or(VmReport {
            exit: ExitReason::Stopped,
            boot_timer: None,
            first_entry: None,
        })
    }

    fn finish(&mut self) {
        drop(self.cgroup.take());
        if let Some(logs) = self.logs.take() {
            let _ = logs.join();
        }
    }
}

impl Drop for JailedVm {
    fn drop(&mut self) {
        if !self.reap(false) {
            let _ = kill(self.pid, Signal::SIGKILL);
            self.reap(true);
        }
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{CpuTemplate, KernelSpec, VsockConfig};

    fn config(root: &Path) -> VmConfig {
        VmConfig {
            vcpus: 2,
            mem_mib: 64,
            boot: BootSource::Kernel(KernelSpec {
                kernel: "/k/vmlinux".into(),
                initrd: Some("/k/initrd".into()),
                cmdline: "console=ttyS0".into(),
            }),
            disks: vec![DiskConfig::file("/s/image-0.ext4"), DiskConfig::empty()],
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: root.join("vsock.sock"),
            }),
            cpu_template: CpuTemplate::Default,
            serial: SerialOutput::File(root.join("serial.log")),
            epoch: Instant::now(),
            rng: false,
            net: None,
            fs: None,
            seccomp: true,
        }
    }

    #[test]
    fn the_spec_names_jail_files_relative_to_the_root() {
        let root = Path::new("/run/skiff/sb");
        let spec = vm_spec(&config(root), root).unwrap();
        assert_eq!(spec.vsock, Some((3, PathBuf::from("vsock.sock"))));
        assert_eq!(spec.serial, Some(PathBuf::from("serial.log")));
        assert_eq!(spec.disks[0].path, Some(PathBuf::from("/s/image-0.ext4")));
        assert_eq!(spec.disks[1].path, None);
        assert_eq!(spec.cpu_template, "default");
        // Files outside the root, and consoles a process cannot share, are
        // refused.
        let err = vm_spec(&config(root), Path::new("/elsewhere")).unwrap_err();
        assert!(err.to_string().contains("outside the jail root"), "{err}");
        let mut buffered = config(root);
        buffered.serial = SerialOutput::Buffer(Default::default());
        assert!(matches!(
            vm_spec(&buffered, root),
            Err(JailError::Unsupported(_))
        ));
    }

    #[test]
    fn deaths_are_described() {
        let pid = Pid::from_raw(1);
        let sys = describe(WaitStatus::Signaled(pid, Signal::SIGSYS, true));
        assert!(sys.contains("seccomp"), "{sys}");
        let killed = describe(WaitStatus::Signaled(pid, Signal::SIGKILL, false));
        assert!(killed.contains("SIGKILL"), "{killed}");
        let exited = describe(WaitStatus::Exited(pid, 3));
        assert!(exited.contains("status 3"), "{exited}");
    }
}
