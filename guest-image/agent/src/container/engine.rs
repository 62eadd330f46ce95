//! The engine: turns a request into an OCI bundle, has the spawner create
//! the container's processes, and removes containers with everything they
//! left (processes, cgroup, state, bundle, rootfs mount).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libcontainer::container::{Container as LcContainer, ContainerStatus};
use oci_spec::runtime::{Process as OciProcess, Spec};
use skiff_agent_proto::error_chain;

use super::error::{runtime_error, ContainerError};
use super::handle::{Container, Process};
use super::medium::{is_block_device, wait_for_medium, DISK_READY_TIMEOUT, SYS_BLOCK};
use super::pty::{receive_pty_master, CONSOLE_TIMEOUT};
use super::rootfs::{mount_rootfs, release_rootfs};
use super::validate::{validate_id, validate_process};
use crate::reaper::{lock, ExitCell, Reaper};
use crate::spawner::{SpawnKind, SpawnReply, SpawnRequest, Spawner};
use crate::stdio::{self, OutputBuffer};

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
        validate_id(req.id).map_err(|reason| ContainerError::InvalidId {
            id: req.id.to_owned(),
            reason,
        })?;
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
        validate_id(exec_id).map_err(|reason| ContainerError::InvalidExecId {
            id: exec_id.to_owned(),
            reason,
        })?;
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
