//! The container engine: turns a request into an OCI bundle and drives
//! youki's `libcontainer` to create, start, exec into, pause, resume, signal
//! and delete containers; keeps each process's stdio and exit status.
//!
//! Namespaces, pivot_root, mounts, /dev, capabilities, seccomp, rlimits and
//! cgroups are libcontainer's; this module owns the bundle layout, the stdio
//! plumbing, and the bookkeeping between pids and requests.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libcgroups::common::{CgroupConfig, CgroupManager, ControllerOpt};
use libcontainer::container::{Container as LcContainer, ContainerStatus};
use libcontainer::error::LibcontainerError;
use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use skiff_agent_proto::{disk_serial, error_chain, DISK_SERIAL_PREFIX};

use crate::mounts;
use crate::reaper::{lock, ExitCell, Reaper};
use crate::spawner::{SpawnKind, SpawnReply, SpawnRequest, Spawner};
use crate::stdio::{self, OutputBuffer, StdioError};

/// How long the agent waits for a pty master from the console socket.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the container engine.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The container id is empty or has characters other than `[A-Za-z0-9_+.-]`.
    #[error("container id {0:?} is invalid: use 1-64 characters from [A-Za-z0-9_+.-]")]
    InvalidId(String),
    /// The exec id is invalid.
    #[error("exec id {0:?} is invalid: use 1-64 characters from [A-Za-z0-9_+.-]")]
    InvalidExecId(String),
    /// A container with this id already exists.
    #[error("container {0:?} already exists; remove it first or pick another id")]
    AlreadyExists(String),
    /// An exec process with this id already exists in the container.
    #[error("exec {exec_id:?} already exists in container {container_id:?}")]
    ExecAlreadyExists {
        /// The container.
        container_id: String,
        /// The clashing exec id.
        exec_id: String,
    },
    /// No container has this id.
    #[error("container {0:?} does not exist")]
    NotFound(String),
    /// No exec process has this id in the container.
    #[error("exec {exec_id:?} does not exist in container {container_id:?}")]
    ExecNotFound {
        /// The container.
        container_id: String,
        /// The unknown exec id.
        exec_id: String,
    },
    /// The OCI spec is not valid JSON or does not match the runtime spec.
    #[error("the OCI spec is invalid: {0}")]
    InvalidSpec(String),
    /// The rootfs path does not exist or is neither a directory nor a block device.
    #[error("rootfs {0:?} does not exist or is neither a directory nor a block device")]
    RootfsMissing(PathBuf),
    /// A block device (rootfs or volume) still had no medium (size 0) when the bound
    /// ran out: the host's disk change did not reach the guest.
    #[error("the block device {device:?} got no medium within {timeout:?}")]
    DiskNotReady {
        /// The block device.
        device: PathBuf,
        /// The bound waited.
        timeout: std::time::Duration,
    },
    /// The block device's serial names another disk than the host meant.
    #[error("the block device {device:?} is disk {serial:?}, not the one the host attached")]
    DiskMismatch {
        /// The block device.
        device: PathBuf,
        /// Its serial (`/sys/block/<name>/serial`).
        serial: String,
    },
    /// The rootfs block device could not be mounted.
    #[error("cannot mount the rootfs block device {device:?} (ext4) on {target:?}")]
    MountRootfs {
        /// The block device.
        device: PathBuf,
        /// Where it was to be mounted.
        target: PathBuf,
        /// The mount error.
        #[source]
        source: std::io::Error,
    },
    /// The container is in a state that does not allow the operation.
    #[error("container {id:?} is {status}; cannot {operation} it")]
    WrongState {
        /// The container.
        id: String,
        /// Its current status.
        status: String,
        /// What was asked.
        operation: &'static str,
    },
    /// The process has no stdin pipe (it was created without `stdin`) or it is closed.
    #[error("the process has no open stdin; create it with stdin=true")]
    NoStdin,
    /// The process has no terminal.
    #[error("the process has no terminal; create it with terminal=true")]
    NoTerminal,
    /// The process has no separate stderr (a terminal merges it into stdout).
    #[error("the process runs on a terminal, so its stderr is merged into stdout")]
    NoStderr,
    /// libcontainer failed.
    #[error("cannot {operation} container {id:?}: {message}")]
    Runtime {
        /// The container.
        id: String,
        /// What was attempted.
        operation: &'static str,
        /// libcontainer's error chain.
        message: String,
    },
    /// A cgroup operation failed.
    #[error("cgroup operation on container {id:?} failed: {message}")]
    Cgroup {
        /// The container.
        id: String,
        /// The error chain.
        message: String,
    },
    /// Setting up the process's stdio failed.
    #[error("cannot set up stdio")]
    Stdio(#[from] StdioError),
    /// Reading or writing the agent's state directory failed.
    #[error("cannot access {path:?}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing to, signalling or resizing a process failed.
    #[error("process I/O failed")]
    ProcessIo(#[source] std::io::Error),
}

/// The ttrpc-facing class of an error; the service maps it to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad request.
    InvalidArgument,
    /// Unknown id or path.
    NotFound,
    /// Duplicate id.
    AlreadyExists,
    /// Wrong state for the operation.
    FailedPrecondition,
    /// Anything else.
    Internal,
}

impl ContainerError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidId(_) | Self::InvalidExecId(_) | Self::InvalidSpec(_) => {
                ErrorKind::InvalidArgument
            }
            Self::AlreadyExists(_) | Self::ExecAlreadyExists { .. } => ErrorKind::AlreadyExists,
            Self::NotFound(_) | Self::ExecNotFound { .. } | Self::RootfsMissing(_) => {
                ErrorKind::NotFound
            }
            Self::WrongState { .. }
            | Self::NoStdin
            | Self::NoTerminal
            | Self::NoStderr
            | Self::DiskMismatch { .. } => ErrorKind::FailedPrecondition,
            Self::Runtime { .. }
            | Self::Cgroup { .. }
            | Self::Stdio(_)
            | Self::MountRootfs { .. }
            | Self::DiskNotReady { .. }
            | Self::Io { .. }
            | Self::ProcessIo(_) => ErrorKind::Internal,
        }
    }
}

/// Where the engine keeps its files.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Bundles go in `<state_dir>/bundles/<id>`, libcontainer's state in
    /// `<state_dir>/containers/<id>`.
    pub state_dir: PathBuf,
    /// The cgroup parent path for containers whose spec has no cgroupsPath.
    pub cgroup_parent: PathBuf,
    /// A rootfs given as a block device (e.g. `/dev/vda` in the micro-VM)
    /// is mounted (ext4) at `<rootfs_mount_dir>/<id>` while the container
    /// exists.
    pub rootfs_mount_dir: PathBuf,
}

/// Stdio requested for a new process.
#[derive(Debug, Clone, Copy)]
pub struct StdioRequest {
    /// Keep a stdin pipe for `write_stdin`.
    pub stdin: bool,
    /// Run on a pty.
    pub terminal: bool,
}

/// One process of a container: the init process or an exec.
#[derive(Debug)]
pub struct Process {
    /// Host pid.
    pub pid: i32,
    /// Delivered by the reaper.
    pub exit: Arc<ExitCell>,
    /// stdout (or the pty output).
    pub stdout: Arc<OutputBuffer>,
    /// stderr; `None` on a terminal.
    pub stderr: Option<Arc<OutputBuffer>>,
    stdin: Mutex<Option<File>>,
    pty_master: Option<OwnedFd>,
}

impl Process {
    /// Writes all of `data` to the process's stdin (blocking while the pipe is full).
    pub fn write_stdin(&self, data: &[u8]) -> Result<usize, ContainerError> {
        // Clone the handle so a blocked write does not hold the lock CloseStdin needs.
        let mut file = {
            let guard = lock(&self.stdin);
            let file = guard.as_ref().ok_or(ContainerError::NoStdin)?;
            file.try_clone().map_err(ContainerError::ProcessIo)?
        };
        file.write_all(data).map_err(ContainerError::ProcessIo)?;
        Ok(data.len())
    }

    /// Closes stdin; on a terminal, sends end-of-file (^D) instead.
    pub fn close_stdin(&self) -> Result<(), ContainerError> {
        let file = lock(&self.stdin).take();
        if let (Some(mut file), true) = (file, self.pty_master.is_some()) {
            file.write_all(&[4]).map_err(ContainerError::ProcessIo)?;
        }
        Ok(())
    }

    /// Resizes the process's terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ContainerError> {
        let master = self.pty_master.as_ref().ok_or(ContainerError::NoTerminal)?;
        stdio::resize_pty(master, rows, cols).map_err(ContainerError::ProcessIo)
    }

    /// Sends `signal` unless the process has already been reaped (checked
    /// under the exit cell's lock, so a reused pid is never signalled).
    pub fn signal(&self, signal: i32) -> Result<(), ContainerError> {
        let result = self.exit.if_running(|| {
            // SAFETY: kill(2) takes plain integers.
            let rc = unsafe { libc::kill(self.pid, signal) };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
        match result {
            None | Some(Ok(())) => Ok(()),
            Some(Err(err)) if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Some(Err(err)) => Err(ContainerError::ProcessIo(err)),
        }
    }
}

/// A container the engine created.
#[derive(Debug)]
pub struct Container {
    id: String,
    runtime: Mutex<LcContainer>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    bundle: PathBuf,
    cgroup_path: PathBuf,
    /// Where the agent mounted the container's block-device rootfs.
    rootfs_mount: Option<PathBuf>,
}

impl Container {
    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cgroup path (relative to each hierarchy's root).
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup_path
    }

    /// The init process (`exec_id` empty) or an exec process.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        if exec_id.is_empty() {
            return Ok(Arc::clone(&self.init));
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ExecNotFound {
                container_id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }

    fn runtime_error(&self, operation: &'static str, err: LibcontainerError) -> ContainerError {
        runtime_error(&self.id, operation, err)
    }

    /// The status as libcontainer sees it, plus the init pid.
    pub fn status(&self) -> Result<(ContainerStatus, i32), ContainerError> {
        let mut runtime = lock(&self.runtime);
        runtime
            .refresh_status()
            .map_err(|e| self.runtime_error("query", e))?;
        Ok((runtime.status(), self.init.pid))
    }

    /// Starts the init process.
    pub fn start(&self) -> Result<(), ContainerError> {
        let mut runtime = lock(&self.runtime);
        runtime
            .refresh_status()
            .map_err(|e| self.runtime_error("start", e))?;
        if runtime.status() != ContainerStatus::Created {
            return Err(self.wrong_state(runtime.status(), "start"));
        }
        runtime.start().map_err(|e| self.runtime_error("start", e))
    }

    /// Freezes every process of the container.
    pub fn pause(&self) -> Result<(), ContainerError> {
        let mut runtime = lock(&self.runtime);
        runtime
            .refresh_status()
            .map_err(|e| self.runtime_error("pause", e))?;
        if runtime.status() != ContainerStatus::Running {
            return Err(self.wrong_state(runtime.status(), "pause"));
        }
        runtime.pause().map_err(|e| self.runtime_error("pause", e))
    }

    /// Thaws the container.
    pub fn resume(&self) -> Result<(), ContainerError> {
        let mut runtime = lock(&self.runtime);
        runtime
            .refresh_status()
            .map_err(|e| self.runtime_error("resume", e))?;
        if runtime.status() != ContainerStatus::Paused {
            return Err(self.wrong_state(runtime.status(), "resume"));
        }
        runtime
            .resume()
            .map_err(|e| self.runtime_error("resume", e))
    }

    /// Signals every process of the container (libcontainer's `kill --all`).
    pub fn signal_all(&self, signal: i32) -> Result<(), ContainerError> {
        let signal = nix::sys::signal::Signal::try_from(signal).map_err(|_| {
            ContainerError::InvalidSpec(format!("signal {signal} is not a valid signal number"))
        })?;
        let mut runtime = lock(&self.runtime);
        runtime
            .refresh_status()
            .map_err(|e| self.runtime_error("signal", e))?;
        if runtime.status() == ContainerStatus::Stopped {
            return Ok(());
        }
        runtime
            .kill(signal, true)
            .map_err(|e| self.runtime_error("signal", e))
    }

    fn wrong_state(&self, status: ContainerStatus, operation: &'static str) -> ContainerError {
        ContainerError::WrongState {
            id: self.id.clone(),
            status: status.to_string(),
            operation,
        }
    }

    fn cgroup_manager(&self) -> Result<libcgroups::common::AnyCgroupManager, ContainerError> {
        libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: self.cgroup_path.clone(),
            systemd_cgroup: false,
            container_name: self.id.clone(),
        })
        .map_err(|e| self.cgroup_error(&e))
    }

    fn cgroup_error(&self, err: &dyn std::error::Error) -> ContainerError {
        ContainerError::Cgroup {
            id: self.id.clone(),
            message: error_chain(err),
        }
    }

    /// cgroup statistics.
    pub fn stats(&self) -> Result<libcgroups::stats::Stats, ContainerError> {
        let manager = self.cgroup_manager()?;
        manager.stats().map_err(|e| self.cgroup_error(&e))
    }

    /// Pids in the container's cgroup.
    pub fn pids(&self) -> Result<Vec<i32>, ContainerError> {
        let manager = self.cgroup_manager()?;
        let pids = manager.get_all_pids().map_err(|e| self.cgroup_error(&e))?;
        Ok(pids.into_iter().map(|p| p.as_raw()).collect())
    }

    /// Applies new resource limits.
    pub fn update(&self, resources_json: &[u8]) -> Result<(), ContainerError> {
        let resources: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| ContainerError::InvalidSpec(format!("resources: {e}")))?;
        let manager = self.cgroup_manager()?;
        manager
            .apply(&ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| self.cgroup_error(&e))
    }
}

/// Creates containers and exec processes.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    reaper: Arc<Reaper>,
    spawner: Spawner,
}

/// What `create` needs besides the spec.
#[derive(Debug)]
pub struct CreateRequest<'a> {
    /// The container id.
    pub id: &'a str,
    /// The OCI spec, JSON.
    pub spec_json: &'a [u8],
    /// The rootfs: a directory, or a block device holding an ext4 file
    /// system whose root is the container's root.
    pub rootfs: &'a Path,
    /// Stdio of the init process.
    pub stdio: StdioRequest,
    /// Hostname to use when the spec sets none.
    pub default_hostname: Option<&'a str>,
}

impl Engine {
    /// An engine keeping its files under `config.state_dir`.
    pub fn new(
        config: EngineConfig,
        reaper: Arc<Reaper>,
        spawner: Spawner,
    ) -> Result<Self, ContainerError> {
        for dir in [config.bundles_dir(), config.containers_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| ContainerError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let engine = Self {
            config,
            reaper,
            spawner,
        };
        engine.clean_stale_state();
        Ok(engine)
    }

    /// Deletes containers a previous agent left in the state dir: their
    /// stdio and exit statuses cannot be recovered, so they are killed and
    /// their cgroups and bundles removed.
    fn clean_stale_state(&self) {
        let Ok(entries) = std::fs::read_dir(self.config.containers_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            log::warn!("removing container {id:?} left by a previous agent");
            match LcContainer::load(entry.path()) {
                Ok(mut stale) => {
                    if stale.status() == ContainerStatus::Paused {
                        let _ = stale.resume();
                    }
                    if let Err(err) = stale.delete(true) {
                        log::warn!(
                            "cannot delete stale container {id:?}: {}",
                            error_chain(&err)
                        );
                    }
                }
                Err(_) => {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
            let _ = std::fs::remove_dir_all(entry.path());
        }
        if let Ok(entries) = std::fs::read_dir(self.config.bundles_dir()) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.config.rootfs_mount_dir) {
            for entry in entries.flatten() {
                log::warn!(
                    "unmounting rootfs {:?} left by a previous agent",
                    entry.path()
                );
                release_rootfs(&entry.path());
            }
        }
    }

    /// Validates the request, writes the bundle and creates the container
    /// (its init process waits for [`Container::start`]).
    ///
    /// On error nothing is left behind: no bundle, no libcontainer state, no
    /// cgroup, no process.
    pub fn create(&self, req: &CreateRequest<'_>) -> Result<Container, ContainerError> {
        validate_id(req.id).map_err(|_| ContainerError::InvalidId(req.id.to_owned()))?;
        let mut spec: Spec = serde_json::from_slice(req.spec_json)
            .map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
        if !req.rootfs.is_absolute() {
            return Err(ContainerError::InvalidSpec(format!(
                "rootfs {:?} must be an absolute path",
                req.rootfs
            )));
        }
        let source = req
            .rootfs
            .canonicalize()
            .ok()
            .and_then(|p| Some((std::fs::metadata(&p).ok()?.file_type(), p)))
            .ok_or_else(|| ContainerError::RootfsMissing(req.rootfs.to_owned()))?;
        let (rootfs, device) = match source {
            (kind, dir) if kind.is_dir() => (dir, None),
            (kind, device) if kind.is_block_device() => {
                (self.config.rootfs_mount_dir.join(req.id), Some(device))
            }
            _ => return Err(ContainerError::RootfsMissing(req.rootfs.to_owned())),
        };
        let process = spec
            .process()
            .clone()
            .ok_or_else(|| ContainerError::InvalidSpec("process is missing".into()))?;
        validate_process(&process)?;
        let mut process = process;
        process.set_terminal(Some(req.stdio.terminal));
        spec.set_process(Some(process));
        let mut root = spec.root().clone().unwrap_or_default();
        root.set_path(rootfs.clone());
        spec.set_root(Some(root));
        if spec.hostname().is_none() {
            if let Some(hostname) = req.default_hostname {
                spec.set_hostname(Some(hostname.to_owned()));
            }
        }
        let mut linux = spec
            .linux()
            .clone()
            .ok_or_else(|| ContainerError::InvalidSpec("linux is missing".into()))?;
        let cgroup_path = match linux.cgroups_path() {
            Some(path) => path.clone(),
            None => {
                let path = self.config.cgroup_parent.join(req.id);
                linux.set_cgroups_path(Some(path.clone()));
                path
            }
        };
        spec.set_linux(Some(linux));

        let container_dir = self.config.containers_dir().join(req.id);
        let bundle = self.config.bundles_dir().join(req.id);
        if container_dir.exists() || bundle.exists() {
            return Err(ContainerError::AlreadyExists(req.id.to_owned()));
        }
        // Disks the host attached for the container's mounts (the `vm`
        // handler's read-only volumes) must have their medium first.
        for mount in spec.mounts().iter().flatten() {
            if let Some(source) = mount.source().as_deref().filter(|s| is_block_device(s)) {
                wait_for_medium(Path::new(SYS_BLOCK), source, DISK_READY_TIMEOUT)?;
            }
        }
        let rootfs_mount = match device {
            Some(device) => {
                wait_for_medium(Path::new(SYS_BLOCK), &device, DISK_READY_TIMEOUT)?;
                Some(mount_rootfs(&device, &rootfs)?)
            }
            None => None,
        };
        let result = self.create_in_bundle(req, &spec, &bundle, cgroup_path, rootfs_mount.clone());
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&bundle);
            if let Some(target) = &rootfs_mount {
                release_rootfs(target);
            }
        }
        result
    }

    fn create_in_bundle(
        &self,
        req: &CreateRequest<'_>,
        spec: &Spec,
        bundle: &Path,
        cgroup_path: PathBuf,
        rootfs_mount: Option<PathBuf>,
    ) -> Result<Container, ContainerError> {
        std::fs::create_dir_all(bundle).map_err(|source| ContainerError::Io {
            path: bundle.to_owned(),
            source,
        })?;
        let config_path = bundle.join("config.json");
        let json =
            serde_json::to_vec(spec).map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
        std::fs::write(&config_path, json).map_err(|source| ContainerError::Io {
            path: config_path,
            source,
        })?;

        let id = req.id.to_owned();
        let kind = SpawnKind::Init {
            bundle: bundle.to_owned(),
        };
        let process = self.spawn(&id, "", bundle, kind, req.stdio)?;
        let loaded = LcContainer::load(self.config.containers_dir().join(&id))
            .and_then(|mut runtime| runtime.refresh_status().map(|()| runtime));
        let runtime = match loaded {
            Ok(runtime) => runtime,
            Err(err) => {
                // Not expected (the spawner just wrote that state); do not
                // leave a waiting init process behind.
                let _ = process.signal(libc::SIGKILL);
                return Err(runtime_error(&id, "create", err));
            }
        };
        Ok(Container {
            id,
            runtime: Mutex::new(runtime),
            init: Arc::new(process),
            execs: Mutex::new(HashMap::new()),
            bundle: bundle.to_owned(),
            cgroup_path,
            rootfs_mount,
        })
    }

    /// Runs a new process in a running container.
    pub fn exec(
        &self,
        container: &Container,
        exec_id: &str,
        process_json: &[u8],
        stdio: StdioRequest,
    ) -> Result<Arc<Process>, ContainerError> {
        validate_id(exec_id).map_err(|_| ContainerError::InvalidExecId(exec_id.to_owned()))?;
        let mut process: OciProcess = serde_json::from_slice(process_json)
            .map_err(|e| ContainerError::InvalidSpec(format!("process: {e}")))?;
        validate_process(&process)?;
        process.set_terminal(Some(stdio.terminal));
        {
            let execs = lock(&container.execs);
            if execs.contains_key(exec_id) {
                return Err(ContainerError::ExecAlreadyExists {
                    container_id: container.id.clone(),
                    exec_id: exec_id.to_owned(),
                });
            }
        }
        let (status, _) = container.status()?;
        if status != ContainerStatus::Running {
            return Err(container.wrong_state(status, "exec into"));
        }
        let process_path = container.bundle.join(format!("exec-{exec_id}.json"));
        let json =
            serde_json::to_vec(&process).map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
        std::fs::write(&process_path, json).map_err(|source| ContainerError::Io {
            path: process_path.clone(),
            source,
        })?;
        let kind = SpawnKind::Exec {
            process: process_path.clone(),
        };
        let result = self.spawn(&container.id, exec_id, &container.bundle, kind, stdio);
        let _ = std::fs::remove_file(&process_path);
        let process = result?;
        let process = Arc::new(process);
        let mut execs = lock(&container.execs);
        if execs.contains_key(exec_id) {
            // Lost a race with a concurrent exec of the same id: keep the first.
            drop(execs);
            let _ = process.signal(libc::SIGKILL);
            return Err(ContainerError::ExecAlreadyExists {
                container_id: container.id.clone(),
                exec_id: exec_id.to_owned(),
            });
        }
        execs.insert(exec_id.to_owned(), Arc::clone(&process));
        Ok(process)
    }

    /// Sets up stdio, has the spawner create the process under the spawn
    /// lock, registers its pid with the reaper and starts the output drains.
    fn spawn(
        &self,
        id: &str,
        exec_id: &str,
        bundle: &Path,
        kind: SpawnKind,
        stdio: StdioRequest,
    ) -> Result<Process, ContainerError> {
        let mut console = None;
        let mut child_stdio = None;
        let mut stdin_writer = None;
        let mut stdout_reader = None;
        let mut stderr_reader = None;
        if stdio.terminal {
            let path = bundle.join(format!("console-{exec_id}.sock"));
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).map_err(|source| ContainerError::Io {
                path: path.clone(),
                source,
            })?;
            console = Some((listener, path));
        } else {
            let stdin_fd = if stdio.stdin {
                let (read, write) = stdio::pipe()?;
                stdin_writer = Some(File::from(write));
                read
            } else {
                let null = File::open("/dev/null").map_err(|source| ContainerError::Io {
                    path: "/dev/null".into(),
                    source,
                })?;
                OwnedFd::from(null)
            };
            let (out_read, out_write) = stdio::pipe()?;
            let (err_read, err_write) = stdio::pipe()?;
            stdout_reader = Some(out_read);
            stderr_reader = Some(err_read);
            child_stdio = Some([stdin_fd, out_write, err_write]);
        }
        let request = SpawnRequest {
            id: id.to_owned(),
            root: self.config.containers_dir(),
            kind,
            console_socket: console.as_ref().map(|(_, path)| path.clone()),
        };
        let operation = if exec_id.is_empty() {
            "create"
        } else {
            "exec into"
        };

        let exit = Arc::new(ExitCell::default());
        let pid = {
            let guard = self.reaper.spawn_lock();
            // `spawn` closes our copies of the child's stdio ends.
            let reply =
                self.spawner
                    .spawn(&request, child_stdio)
                    .map_err(|e| ContainerError::Runtime {
                        id: id.to_owned(),
                        operation,
                        message: error_chain(&e),
                    })?;
            let pid = match reply {
                SpawnReply::Spawned(pid) => pid,
                SpawnReply::IncorrectStatus(status) => {
                    return Err(ContainerError::WrongState {
                        id: id.to_owned(),
                        status,
                        operation,
                    })
                }
                SpawnReply::Failed(message) => {
                    return Err(ContainerError::Runtime {
                        id: id.to_owned(),
                        operation,
                        message,
                    })
                }
            };
            self.reaper.register(&guard, pid, Arc::clone(&exit));
            pid
        };

        let mut pty_master = None;
        if let Some((listener, path)) = console {
            let master = receive_pty_master(&listener, CONSOLE_TIMEOUT);
            let _ = std::fs::remove_file(&path);
            match master {
                Ok(master) => {
                    stdin_writer = Some(File::from(stdio::dup(&master)?));
                    stdout_reader = Some(stdio::dup(&master)?);
                    pty_master = Some(master);
                }
                Err(source) => {
                    // SAFETY: kill(2) takes plain integers.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return Err(ContainerError::Io { path, source });
                }
            }
        }
        let label = if exec_id.is_empty() { "init" } else { exec_id };
        let stdout = match stdout_reader {
            Some(fd) => stdio::drain(&format!("out-{label}"), fd)?,
            None => {
                let buffer = Arc::new(OutputBuffer::new());
                buffer.close();
                buffer
            }
        };
        let stderr = match stderr_reader {
            Some(fd) => Some(stdio::drain(&format!("err-{label}"), fd)?),
            None => None,
        };
        Ok(Process {
            pid,
            exit,
            stdout,
            stderr,
            stdin: Mutex::new(stdin_writer),
            pty_master,
        })
    }

    /// Kills and deletes the container: processes, cgroup, state and bundle.
    pub fn remove(&self, container: &Container) -> Result<(), ContainerError> {
        {
            let mut runtime = lock(&container.runtime);
            runtime
                .refresh_status()
                .map_err(|e| container.runtime_error("remove", e))?;
            if runtime.status() == ContainerStatus::Paused {
                // A frozen cgroup cannot die; thaw it first.
                let _ = runtime.resume();
            }
            let _ = runtime.refresh_status();
            runtime
                .delete(true)
                .map_err(|e| container.runtime_error("remove", e))?;
        }
        // Give the reaper a moment so exit statuses are delivered.
        let deadline = Instant::now() + Duration::from_secs(5);
        let processes: Vec<_> = std::iter::once(Arc::clone(&container.init))
            .chain(lock(&container.execs).values().cloned())
            .collect();
        for process in processes {
            let left = deadline.saturating_duration_since(Instant::now());
            process.exit.wait(Some(left));
        }
        if let Some(target) = &container.rootfs_mount {
            release_rootfs(target);
        }
        std::fs::remove_dir_all(&container.bundle).map_err(|source| ContainerError::Io {
            path: container.bundle.clone(),
            source,
        })
    }
}

impl EngineConfig {
    fn bundles_dir(&self) -> PathBuf {
        self.state_dir.join("bundles")
    }

    fn containers_dir(&self) -> PathBuf {
        self.state_dir.join("containers")
    }
}

fn validate_id(id: &str) -> Result<(), ()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(())
    }
}

fn validate_process(process: &OciProcess) -> Result<(), ContainerError> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(ContainerError::InvalidSpec(
            "process.args is empty; give the program to run".into(),
        ));
    }
    let user = process.user();
    if user.uid() == u32::MAX {
        return Err(ContainerError::InvalidSpec(format!(
            "process.user.uid {} is not a valid uid",
            user.uid()
        )));
    }
    if user.gid() == u32::MAX {
        return Err(ContainerError::InvalidSpec(format!(
            "process.user.gid {} is not a valid gid",
            user.gid()
        )));
    }
    if let Some(gids) = user.additional_gids() {
        if let Some(bad) = gids.iter().find(|g| **g == u32::MAX) {
            return Err(ContainerError::InvalidSpec(format!(
                "process.user.additionalGids contains {bad}, which is not a valid gid"
            )));
        }
    }
    if !process.cwd().is_absolute() {
        return Err(ContainerError::InvalidSpec(format!(
            "process.cwd {:?} must be an absolute path",
            process.cwd()
        )));
    }
    Ok(())
}

/// Where the kernel lists block devices.
const SYS_BLOCK: &str = "/sys/class/block";
/// Bound on a hot-attached disk's medium showing up in the guest.
const DISK_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits until the block device `device` has a medium: the host attaches
/// a container's disk to a running VM by filling an empty virtio-blk slot,
/// and the guest driver learns the new size from a configuration change
/// it handles asynchronously. A skiff disk also reports its name as its
/// serial (`skiff-vdb` for `vdb`); another serial means the guest named
/// the disks differently from the host, and the wrong disk would be
/// mounted. Devices `sys_block` does not list are not waited for.
fn wait_for_medium(
    sys_block: &Path,
    device: &Path,
    timeout: std::time::Duration,
) -> Result<(), ContainerError> {
    let Some(name) = device.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    let dir = sys_block.join(name);
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(serial) = std::fs::read_to_string(dir.join("serial")) {
        let serial = serial.trim_end_matches(['\n', '\0']);
        if serial.starts_with(DISK_SERIAL_PREFIX) && serial != disk_serial(name) {
            return Err(ContainerError::DiskMismatch {
                device: device.to_owned(),
                serial: serial.to_owned(),
            });
        }
    }
    let start = std::time::Instant::now();
    loop {
        let sectors = std::fs::read_to_string(dir.join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if sectors > 0 {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(ContainerError::DiskNotReady {
                device: device.to_owned(),
                timeout,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Mounts the ext4 file system on `device` at `target` (created) and
/// returns `target`.
fn mount_rootfs(device: &Path, target: &Path) -> Result<PathBuf, ContainerError> {
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
fn release_rootfs(target: &Path) {
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

/// Accepts one connection on the console socket and receives the pty master.
fn receive_pty_master(listener: &UnixListener, timeout: Duration) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no pty master arrived on the console socket",
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(err) => return Err(err),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut name = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut name)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for message in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = message {
            if let Some(&fd) = fds.first() {
                // SAFETY: SCM_RIGHTS just installed `fd` in our table; we own it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "the console socket message carried no file descriptor",
    ))
}

/// Classifies a libcontainer error: a state conflict (e.g. exec into a
/// container that stopped meanwhile) is the caller's precondition, anything
/// else is the runtime's failure.
fn runtime_error(id: &str, operation: &'static str, err: LibcontainerError) -> ContainerError {
    match err {
        LibcontainerError::IncorrectStatus(status) => ContainerError::WrongState {
            id: id.to_owned(),
            status: status.to_string(),
            operation,
        },
        err => ContainerError::Runtime {
            id: id.to_owned(),
            operation,
            message: error_chain(&err),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fake_disk(sys: &Path, name: &str, serial: Option<&str>, size: &str) {
        let dir = sys.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("size"), size).unwrap();
        if let Some(serial) = serial {
            std::fs::write(dir.join("serial"), serial).unwrap();
        }
    }

    #[test]
    fn medium_wait_checks_size_and_serial() {
        let sys = tempfile::tempdir().unwrap();
        let sys = sys.path();
        fake_disk(sys, "vdb", Some("skiff-vdb\n"), "2048\n");
        wait_for_medium(sys, Path::new("/dev/vdb"), Duration::ZERO).unwrap();

        // Unknown to sysfs (a host directory's device, say): no wait.
        wait_for_medium(sys, Path::new("/dev/sdz"), Duration::ZERO).unwrap();

        // Another skiff disk than the name says: refused.
        fake_disk(sys, "vdc", Some("skiff-vdd"), "2048\n");
        let err = wait_for_medium(sys, Path::new("/dev/vdc"), Duration::ZERO).unwrap_err();
        assert!(
            matches!(err, ContainerError::DiskMismatch { ref serial, .. } if serial == "skiff-vdd"),
            "{err}"
        );

        // Empty slot: waits for the bound, then says so.
        fake_disk(sys, "vde", Some("skiff-vde"), "0\n");
        let t = std::time::Instant::now();
        let err =
            wait_for_medium(sys, Path::new("/dev/vde"), Duration::from_millis(100)).unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(
            err.to_string().contains("got no medium within 100ms"),
            "{err}"
        );

        // The medium arrives while waiting.
        let size = sys.join("vde/size");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(size, "4096\n").unwrap();
        });
        wait_for_medium(sys, Path::new("/dev/vde"), Duration::from_secs(10)).unwrap();
        writer.join().unwrap();
    }
}
