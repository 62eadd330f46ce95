//! The containerd Task service: one shim (one sandbox) serving any number of
//! containers, each request a direct call into the agent.
//!
//! Locking: `containers` is locked only to look up, insert or remove an
//! entry; each process's state has its own mutex, never held across an
//! agent call. Long polls (the agent's WaitProcess, Read*, GetOOMEvent) run
//! on per-process threads without any lock; the Task `Wait` request blocks
//! on its process's condition variable. Starting the sandbox (the first
//! Create) is serialized by its own lock, which nothing else takes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use containerd_shim_protos::api;
use containerd_shim_protos::cgroups::metrics;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{EnumOrUnknown, Message, MessageField};
use containerd_shim_protos::types::task::Status;
use containerd_shim_protos::Task;
use ttrpc::TtrpcContext;

use crate::agent_client::{AgentClient, ContainerStats};
use crate::config::{config_path_from_any, Config};
use crate::sandbox::{handler_for, PodSize, Sandbox, SandboxHandler, SandboxRequest};
use crate::sync::{lock, wait};
use crate::task::error::TaskError;
use crate::task::events::{timestamp, timestamp_ms, Event, Publisher};
use crate::task::rootfs::{self, MountSpec};
use crate::task::spec::{encode_spec, read_spec, rootfs_path};
use crate::task::stdio::{open_output, CopierSet, OutputLine, StdinBridge};

/// How long the agent gets to answer its first Health.
pub const SANDBOX_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long TaskExit waits for the output copiers after the process exited.
pub const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the sandbox watcher asks whether the sandbox has ended.
pub const SANDBOX_WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the sandbox watcher sends the agent a Health request.
pub const AGENT_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// The bound on one such Health answer.
pub const AGENT_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Health requests in a row without an answer after which the agent
/// counts as gone (with the interval and bound: about 25 s).
pub const AGENT_PROBE_MISSES: u32 = 2;
/// The exit status of a process whose sandbox ended under it: killed, as
/// containerd reports a task whose shim died.
pub const SANDBOX_ENDED_STATUS: u32 = 128 + libc::SIGKILL as u32;
/// At most one TaskOOM per container in this long (see [`OomFilter`]).
pub const OOM_EVENT_INTERVAL: Duration = Duration::from_secs(1);
/// How long Shutdown gives the sandbox to stop.
pub const SANDBOX_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The `type_url` containerd decodes Stats with.
pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v1.Metrics";

type TaskResult<T> = Result<T, TaskError>;

/// Who this shim is.
#[derive(Debug, Clone)]
pub struct ShimInfo {
    /// containerd namespace.
    pub namespace: String,
    /// The sandbox id (group id, or the first container's id).
    pub sandbox_id: String,
    /// The sandbox's private state directory.
    pub state_dir: PathBuf,
}

/// Lifecycle of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcStatus {
    Created,
    Running,
    Paused,
    Stopped,
}

impl ProcStatus {
    fn proto(self) -> Status {
        match self {
            Self::Created => Status::CREATED,
            Self::Running => Status::RUNNING,
            Self::Paused => Status::PAUSED,
            Self::Stopped => Status::STOPPED,
        }
    }
}

/// containerd's stdio paths of a process.
#[derive(Debug, Clone, Default)]
struct StdioPaths {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
}

#[derive(Debug)]
struct ProcState {
    status: ProcStatus,
    pid: u32,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    stdin: Option<StdinBridge>,
    /// Where its output goes, for [`TaskService::sandbox_ended`] to hang up.
    outputs: Vec<OutputLine>,
}

/// One process (init or exec) of a container.
#[derive(Debug)]
struct Proc {
    container_id: String,
    exec_id: String,
    stdio: StdioPaths,
    /// The OCI process JSON of an exec.
    process_json: Vec<u8>,
    state: Mutex<ProcState>,
    exited: Condvar,
}

impl Proc {
    fn new(container_id: &str, exec_id: &str, stdio: StdioPaths, process_json: Vec<u8>) -> Self {
        Self {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stdio,
            process_json,
            state: Mutex::new(ProcState {
                status: ProcStatus::Created,
                pid: 0,
                exit_status: 0,
                exited_at: None,
                stdin: None,
                outputs: Vec::new(),
            }),
            exited: Condvar::new(),
        }
    }

    fn status(&self) -> ProcStatus {
        lock(&self.state).status
    }

    /// Publishes TaskExit and records the exit, once: the first caller
    /// (its waiter, or the end of the sandbox) wins; returns whether this
    /// one did. The event goes out before `Wait` returns, as containerd
    /// expects.
    fn finish(&self, publisher: &Publisher, status: u32, exited_at: Timestamp) -> bool {
        let mut st = lock(&self.state);
        if st.status == ProcStatus::Stopped {
            return false;
        }
        publisher.publish(Event::Exit(ev::TaskExit {
            container_id: self.container_id.clone(),
            id: if self.exec_id.is_empty() {
                self.container_id.clone()
            } else {
                self.exec_id.clone()
            },
            pid: st.pid,
            exit_status: status,
            exited_at: MessageField::some(exited_at.clone()),
            ..Default::default()
        }));
        self.record_exit(&mut st, status, exited_at);
        true
    }

    fn record_exit(&self, st: &mut ProcState, status: u32, exited_at: Timestamp) {
        st.status = ProcStatus::Stopped;
        st.exit_status = status;
        st.exited_at = Some(exited_at);
        if let Some(stdin) = st.stdin.take() {
            stdin.poke();
        }
        self.exited.notify_all();
    }

    /// Blocks until the process has exited.
    fn wait(&self) -> (u32, Timestamp) {
        let mut st = lock(&self.state);
        while st.status != ProcStatus::Stopped {
            st = wait(&self.exited, st);
        }
        (st.exit_status, st.exited_at.clone().unwrap_or_default())
    }
}

/// One container.
#[derive(Debug)]
struct Container {
    id: String,
    bundle: PathBuf,
    rootfs: PathBuf,
    rootfs_mounted: bool,
    /// Host paths shared into the sandbox for the container's bind mounts.
    volumes: Vec<PathBuf>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TaskResult<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(Arc::clone(&self.init));
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| TaskError::ExecNotFound {
                id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }
}

/// The configuration containers are created with and the sandbox handler
/// it names: a Create's runtime options may replace it until the sandbox
/// runs.
#[derive(Debug)]
struct Setup {
    config: Config,
    handler: Box<dyn SandboxHandler>,
}

impl Setup {
    fn new(config: Config) -> Arc<Self> {
        Arc::new(Self {
            handler: handler_for(&config),
            config,
        })
    }
}

/// Which OOM events from the agent become TaskOOM events: only those for
/// containers this shim knows, and at most one per container each
/// [`OOM_EVENT_INTERVAL`]. The guest reports as often as it likes;
/// containerd gets a bounded stream, and the shim keeps a bounded table.
#[derive(Debug, Default)]
struct OomFilter {
    /// When each container's last event went out (only the last
    /// interval's are kept).
    last: HashMap<String, Instant>,
}

impl OomFilter {
    /// Whether an event for `id` (`known` to the shim) goes out at `now`.
    fn accept(&mut self, id: &str, known: bool, now: Instant) -> bool {
        if !known {
            return false;
        }
        self.last
            .retain(|_, at| now.saturating_duration_since(*at) < OOM_EVENT_INTERVAL);
        if self.last.contains_key(id) {
            return false;
        }
        self.last.insert(id.to_owned(), now);
        true
    }
}

/// What a failing Create undoes, in the reverse order of doing it: the
/// agent's container, the sandbox shares, the rootfs mount. A Create that
/// succeeds disarms it.
#[derive(Default)]
struct CreateUndo {
    agent_container: Option<(AgentClient, String)>,
    sandbox: Option<Arc<dyn Sandbox>>,
    shared: Vec<PathBuf>,
    mounted: Option<PathBuf>,
}

impl CreateUndo {
    fn disarm(mut self) {
        self.agent_container = None;
        self.shared.clear();
        self.mounted = None;
    }
}

impl Drop for CreateUndo {
    fn drop(&mut self) {
        if let Some((agent, id)) = self.agent_container.take() {
            if let Err(err) = agent.remove_container(&id) {
                log::warn!("undoing the create of {id}: {err}");
            }
        }
        if let Some(sandbox) = &self.sandbox {
            for path in self.shared.iter().rev() {
                if let Err(err) = sandbox.unshare_path(path) {
                    log::warn!("{err}");
                }
            }
        }
        if let Some(rootfs) = self.mounted.take() {
            if let Err(err) = rootfs::unmount_rootfs(&rootfs) {
                log::warn!("{err}");
            }
        }
    }
}

/// The Task service of one shim.
#[derive(Debug)]
pub struct TaskService {
    info: ShimInfo,
    setup: Mutex<Arc<Setup>>,
    publisher: Publisher,
    sandbox: Mutex<Option<Arc<dyn Sandbox>>>,
    /// Serializes sandbox start-up (first Create) only.
    sandbox_start: Mutex<()>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    shutdown_tx: Mutex<Option<mpsc::Sender<()>>>,
    /// How the sandbox ended on its own, once it has.
    ended: Mutex<Option<String>>,
    /// This service, for the threads it starts.
    me: Weak<TaskService>,
}

impl TaskService {
    /// A service for `info`; `shutdown_tx` is signalled when containerd
    /// asks the shim to exit and no container is left.
    pub fn new(
        info: ShimInfo,
        config: Config,
        publisher: Publisher,
        shutdown_tx: mpsc::Sender<()>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            info,
            setup: Mutex::new(Setup::new(config)),
            publisher,
            sandbox: Mutex::new(None),
            sandbox_start: Mutex::new(()),
            containers: Mutex::new(HashMap::new()),
            shutdown_tx: Mutex::new(Some(shutdown_tx)),
            ended: Mutex::new(None),
            me: me.clone(),
        })
    }

    fn container(&self, id: &str) -> TaskResult<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::ContainerNotFound(id.to_owned()))
    }

    fn process(&self, id: &str, exec_id: &str) -> TaskResult<Arc<Proc>> {
        self.container(id)?.process(exec_id)
    }

    /// The error for a request that needs a sandbox that has ended.
    fn sandbox_gone(&self) -> TaskResult<()> {
        match lock(&self.ended).as_ref() {
            Some(how) => Err(TaskError::FailedPrecondition(format!(
                "the sandbox has ended: {how}"
            ))),
            None => Ok(()),
        }
    }

    fn agent(&self) -> TaskResult<AgentClient> {
        self.sandbox_gone()?;
        lock(&self.sandbox)
            .as_ref()
            .map(|s| s.agent().clone())
            .ok_or_else(|| TaskError::FailedPrecondition("the sandbox is not running".into()))
    }

    /// The running sandbox, started on first use by `setup`'s handler with
    /// `rootfs`, the first container's root, and sized from its
    /// `annotations` (CRI's sandbox annotations size a VM; only the
    /// starting container's are read).
    fn ensure_sandbox(
        &self,
        setup: &Setup,
        hostname: &str,
        cgroups_path: Option<&str>,
        netns: Option<&Path>,
        annotations: Option<&HashMap<String, String>>,
        rootfs: &Path,
    ) -> TaskResult<Arc<dyn Sandbox>> {
        self.sandbox_gone()?;
        if let Some(s) = lock(&self.sandbox).as_ref() {
            return Ok(Arc::clone(s));
        }
        let _starting = lock(&self.sandbox_start);
        if let Some(s) = lock(&self.sandbox).as_ref() {
            return Ok(Arc::clone(s));
        }
        let size = PodSize::from_annotations(annotations)
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let sandbox: Arc<dyn Sandbox> = Arc::from(setup.handler.start(&SandboxRequest {
            id: &self.info.sandbox_id,
            state_dir: &self.info.state_dir,
            hostname,
            rootfs,
            cgroups_path,
            netns,
            size,
            config: &setup.config,
            ready_timeout: SANDBOX_READY_TIMEOUT,
        })?);
        self.spawn_oom_watcher(sandbox.agent().clone());
        *lock(&self.sandbox) = Some(Arc::clone(&sandbox));
        self.spawn_sandbox_watcher(Arc::clone(&sandbox));
        Ok(sandbox)
    }

    /// Watches `sandbox` until it is stopped or ends on its own: each
    /// [`SANDBOX_WATCH_INTERVAL`] it asks [`Sandbox::ended`], and each
    /// [`AGENT_PROBE_INTERVAL`] it sends the agent a Health request; an
    /// end, or [`AGENT_PROBE_MISSES`] unanswered requests in a row, ends
    /// every task ([`TaskService::sandbox_ended`]).
    fn spawn_sandbox_watcher(&self, sandbox: Arc<dyn Sandbox>) {
        let service = self.me.clone();
        let spawned = std::thread::Builder::new()
            .name("sandbox-watch".into())
            .stack_size(crate::task::THREAD_STACK_SIZE)
            .spawn(move || {
                let mut last_probe = Instant::now();
                let mut misses = 0;
                loop {
                    std::thread::sleep(SANDBOX_WATCH_INTERVAL);
                    let Some(service) = service.upgrade() else {
                        return;
                    };
                    let current = lock(&service.sandbox)
                        .as_ref()
                        .is_some_and(|s| Arc::ptr_eq(s, &sandbox));
                    if !current {
                        return; // stopped by Shutdown
                    }
                    let mut end = sandbox.ended();
                    if end.is_none() && last_probe.elapsed() >= AGENT_PROBE_INTERVAL {
                        last_probe = Instant::now();
                        match sandbox.agent().health(AGENT_PROBE_TIMEOUT) {
                            Ok(()) => misses = 0,
                            Err(err) => {
                                misses += 1;
                                log::warn!("the agent did not answer Health ({misses}): {err}");
                                if misses >= AGENT_PROBE_MISSES {
                                    end = Some(format!(
                                        "the agent did not answer {misses} Health requests in a row: {err}"
                                    ));
                                }
                            }
                        }
                    }
                    if let Some(how) = end {
                        service.sandbox_ended(&how);
                        return;
                    }
                }
            });
        if let Err(err) = spawned {
            log::error!("cannot start the sandbox watcher: {err}");
        }
    }

    /// The sandbox ended on its own (`how`): every task of it that has not
    /// exited is stopped with [`SANDBOX_ENDED_STATUS`] and its TaskExit
    /// published, and its output closed, so `Wait` (and a reader waiting
    /// for EOF) returns and containerd can delete it; later
    /// requests that need the sandbox fail with what happened.
    fn sandbox_ended(&self, how: &str) {
        log::error!(
            "sandbox {} ended: {how}; stopping its tasks",
            self.info.sandbox_id
        );
        *lock(&self.ended) = Some(how.to_owned());
        let containers: Vec<Arc<Container>> = lock(&self.containers).values().cloned().collect();
        let now = timestamp(SystemTime::now());
        for container in containers {
            let execs: Vec<Arc<Proc>> = lock(&container.execs).values().cloned().collect();
            for proc in execs.iter().chain([&container.init]) {
                proc.finish(&self.publisher, SANDBOX_ENDED_STATUS, now.clone());
                // No more output comes: the readers get EOF now, not when
                // a silent agent's stream calls give up (never).
                for line in &lock(&proc.state).outputs {
                    line.hang_up();
                }
            }
        }
    }

    fn spawn_oom_watcher(&self, agent: AgentClient) {
        let publisher = self.publisher.clone();
        let service = self.me.clone();
        let _ = std::thread::Builder::new()
            .name("oom".into())
            .stack_size(crate::task::THREAD_STACK_SIZE)
            .spawn(move || {
                let mut failures = 0;
                let mut filter = OomFilter::default();
                while failures < 10 {
                    match agent.get_oom_event() {
                        Ok(id) => {
                            failures = 0;
                            let known = service
                                .upgrade()
                                .is_some_and(|s| lock(&s.containers).contains_key(&id));
                            if !filter.accept(&id, known, Instant::now()) {
                                // The guest chose the id: debug only, cut.
                                log::debug!(
                                    "OOM event dropped (unknown container, or too soon): {:?}",
                                    id.chars().take(64).collect::<String>()
                                );
                                continue;
                            }
                            log::info!("container {id} was OOM-killed");
                            publisher.publish(Event::Oom(ev::TaskOOM {
                                container_id: id,
                                ..Default::default()
                            }));
                        }
                        Err(err) if err.is_timeout() => {}
                        Err(_) => {
                            failures += 1;
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            });
    }

    /// Stops the sandbox (on shutdown); one that ended on its own at once,
    /// without asking its agent (which may be the silent one).
    pub fn stop_sandbox(&self) {
        let sandbox = lock(&self.sandbox).take();
        let timeout = if lock(&self.ended).is_some() {
            Duration::ZERO
        } else {
            SANDBOX_STOP_TIMEOUT
        };
        if let Some(sandbox) = sandbox {
            if let Err(err) = sandbox.stop(timeout) {
                log::warn!("stopping the sandbox: {err}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.info.state_dir);
    }

    /// Starts the output/stdin bridges of a process that exists in the agent.
    fn start_stdio(&self, agent: &AgentClient, proc: &Proc) -> TaskResult<CopierSet> {
        let mut copiers = CopierSet::default();
        let out = open_output(&proc.stdio.stdout)?;
        copiers.spawn_output(agent.clone(), &proc.container_id, &proc.exec_id, false, out)?;
        if !proc.stdio.terminal {
            let err = open_output(&proc.stdio.stderr)?;
            copiers.spawn_output(agent.clone(), &proc.container_id, &proc.exec_id, true, err)?;
        }
        if !proc.stdio.stdin.is_empty() {
            let bridge = StdinBridge::spawn(
                agent.clone(),
                &proc.container_id,
                &proc.exec_id,
                &proc.stdio.stdin,
            )?;
            lock(&proc.state).stdin = Some(bridge);
        }
        lock(&proc.state).outputs = copiers.lines();
        Ok(copiers)
    }

    /// Waits for the process in the agent, then for its output, then
    /// records the exit and publishes TaskExit.
    fn spawn_waiter(&self, agent: AgentClient, proc: Arc<Proc>, mut copiers: CopierSet) {
        let publisher = self.publisher.clone();
        let spawned = std::thread::Builder::new()
            .name("waiter".into())
            .stack_size(crate::task::THREAD_STACK_SIZE)
            .spawn(move || {
                let (status, exited_at) = wait_in_agent(&agent, &proc);
                if proc.exec_id.is_empty() && status == SIGKILL_STATUS {
                    oom_before_exit(&agent, &publisher, &proc.container_id);
                }
                if !copiers.wait(OUTPUT_DRAIN_TIMEOUT) {
                    log::warn!(
                        "{}/{}: output still open {OUTPUT_DRAIN_TIMEOUT:?} after exit",
                        proc.container_id,
                        proc.exec_id
                    );
                }
                proc.finish(&publisher, status, exited_at);
            });
        if let Err(err) = spawned {
            log::error!("cannot start a waiter thread: {err}");
        }
    }

    /// Takes the config named by a Create's runtime options, unless the
    /// sandbox already runs (its config is fixed then).
    fn apply_options(&self, options: Option<&Any>) -> TaskResult<()> {
        let Some(options) = options else {
            return Ok(());
        };
        let path =
            config_path_from_any(options).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        if let Some(path) = path {
            if lock(&self.sandbox).is_none() {
                let config =
                    Config::load(&path).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
                log::set_max_level(config.log_level.filter());
                *lock(&self.setup) = Setup::new(config);
            }
        }
        Ok(())
    }

    fn create_impl(&self, req: api::CreateTaskRequest) -> TaskResult<api::CreateTaskResponse> {
        if lock(&self.containers).contains_key(&req.id) {
            return Err(TaskError::AlreadyExists(format!("container {:?}", req.id)));
        }
        if !req.checkpoint.is_empty() {
            return Err(TaskError::NotImplemented("restoring from a checkpoint"));
        }
        let bundle = PathBuf::from(&req.bundle);
        let mut spec = read_spec(&bundle)?;
        self.apply_options(req.options.as_ref())?;
        let setup = Arc::clone(&lock(&self.setup));
        // A spec the sandbox cannot serve fails before a VM boots for it.
        let volumes = setup.handler.volumes(spec.mounts())?;
        let hostname = spec.hostname.clone().unwrap_or_default();

        // The root filesystem: the snapshot's mount, or the bundle's dir.
        let mounts: Vec<MountSpec> = req
            .rootfs
            .iter()
            .map(|m| MountSpec {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let rootfs = rootfs_path(&bundle, &spec, !mounts.is_empty());
        let mut undo = CreateUndo::default();
        let rootfs_mounted = rootfs::mount_rootfs(&mounts, &rootfs)?;
        if rootfs_mounted {
            undo.mounted = Some(rootfs.clone());
        }
        let netns = spec.network_namespace_path().map(PathBuf::from);
        let sandbox = self.ensure_sandbox(
            &setup,
            &hostname,
            spec.cgroups_path(),
            netns.as_deref(),
            spec.annotations.as_ref(),
            &rootfs,
        )?;
        undo.sandbox = Some(Arc::clone(&sandbox));
        if sandbox.pod_network_in_sandbox() && spec.join_sandbox_network() {
            log::debug!(
                "container {}: stays in the sandbox's network (the pod's namespace {})",
                req.id,
                netns.as_deref().unwrap_or(Path::new("")).display()
            );
        }
        let agent_rootfs = sandbox.share_path(&rootfs)?;
        undo.shared.push(rootfs.clone());
        let volumes = sandbox.share_volumes(spec.mounts_mut(), &volumes)?;
        undo.shared.extend(volumes.iter().cloned());

        let agent = sandbox.agent().clone();
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let pid = agent.create_container(
            &req.id,
            encode_spec(&spec)?,
            &agent_rootfs,
            !stdio.stdin.is_empty(),
            stdio.terminal,
        )?;
        undo.agent_container = Some((agent.clone(), req.id.clone()));
        let init = Arc::new(Proc::new(&req.id, "", stdio, Vec::new()));
        lock(&init.state).pid = pid;
        let copiers = self.start_stdio(&agent, &init)?;
        undo.disarm();
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle: bundle.clone(),
            rootfs,
            rootfs_mounted,
            volumes,
            init: Arc::clone(&init),
            execs: Mutex::new(HashMap::new()),
        });
        lock(&self.containers).insert(req.id.clone(), container);
        // The waiter starts now: a container killed before Start still ends.
        self.spawn_waiter(agent, init, copiers);
        self.publisher.publish(Event::Create(ev::TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(ev::TaskIO {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        }));
        log::info!("created container {} (pid {pid})", req.id);
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start_impl(&self, req: api::StartRequest) -> TaskResult<api::StartResponse> {
        let container = self.container(&req.id)?;
        let proc = container.process(&req.exec_id)?;
        if proc.status() != ProcStatus::Created {
            return Err(TaskError::FailedPrecondition(format!(
                "process {:?} of {:?} is already started",
                req.exec_id, req.id
            )));
        }
        let agent = self.agent()?;
        if req.exec_id.is_empty() {
            agent.start_container(&req.id)?;
            let pid = {
                let mut st = lock(&proc.state);
                if st.status == ProcStatus::Created {
                    st.status = ProcStatus::Running;
                }
                st.pid
            };
            self.publisher.publish(Event::Start(ev::TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            }));
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        let pid = agent.exec_process(
            &req.id,
            &req.exec_id,
            proc.process_json.clone(),
            !proc.stdio.stdin.is_empty(),
            proc.stdio.terminal,
        )?;
        {
            let mut st = lock(&proc.state);
            st.status = ProcStatus::Running;
            st.pid = pid;
        }
        let copiers = match self.start_stdio(&agent, &proc) {
            Ok(c) => c,
            Err(err) => {
                let _ = agent.signal_process(&req.id, &req.exec_id, libc::SIGKILL as u32, false);
                self.spawn_waiter(agent, proc, CopierSet::default());
                return Err(err);
            }
        };
        self.spawn_waiter(agent, Arc::clone(&proc), copiers);
        self.publisher
            .publish(Event::ExecStarted(ev::TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            }));
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete_impl(&self, req: api::DeleteRequest) -> TaskResult<api::DeleteResponse> {
        let container = self.container(&req.id)?;
        if !req.exec_id.is_empty() {
            let proc = container.process(&req.exec_id)?;
            let st = lock(&proc.state);
            if !matches!(st.status, ProcStatus::Stopped | ProcStatus::Created) {
                return Err(TaskError::FailedPrecondition(format!(
                    "exec {:?} of {:?} is still running",
                    req.exec_id, req.id
                )));
            }
            let resp = api::DeleteResponse {
                pid: st.pid,
                exit_status: st.exit_status,
                exited_at: MessageField::from_option(st.exited_at.clone()),
                ..Default::default()
            };
            drop(st);
            lock(&container.execs).remove(&req.exec_id);
            return Ok(resp);
        }
        let status = container.init.status();
        if matches!(status, ProcStatus::Running | ProcStatus::Paused) {
            return Err(TaskError::FailedPrecondition(format!(
                "container {:?} is still running; kill it first",
                req.id
            )));
        }
        // A sandbox that ended took the container with it.
        if lock(&self.ended).is_none() {
            let agent = self.agent()?;
            if let Err(err) = agent.remove_container(&req.id) {
                if err.code() != ttrpc::Code::NOT_FOUND {
                    return Err(err.into());
                }
            }
        }
        if status == ProcStatus::Created {
            // Removal killed it; its waiter records the exit.
            let _ = container.init.wait();
        }
        let sandbox = lock(&self.sandbox).as_ref().map(Arc::clone);
        if let Some(sandbox) = sandbox {
            for path in container.volumes.iter().chain([&container.rootfs]) {
                sandbox.unshare_path(path)?;
            }
        }
        if container.rootfs_mounted {
            rootfs::unmount_rootfs(&container.rootfs)?;
        }
        lock(&self.containers).remove(&req.id);
        let st = lock(&container.init.state);
        let exited_at = st
            .exited_at
            .clone()
            .unwrap_or_else(|| timestamp(SystemTime::now()));
        let resp = api::DeleteResponse {
            pid: st.pid,
            exit_status: st.exit_status,
            exited_at: MessageField::some(exited_at.clone()),
            ..Default::default()
        };
        drop(st);
        self.publisher.publish(Event::Delete(ev::TaskDelete {
            container_id: req.id.clone(),
            pid: resp.pid,
            exit_status: resp.exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        }));
        log::info!(
            "deleted container {} ({})",
            req.id,
            container.bundle.display()
        );
        Ok(resp)
    }

    fn state_impl(&self, req: api::StateRequest) -> TaskResult<api::StateResponse> {
        let container = self.container(&req.id)?;
        let proc = container.process(&req.exec_id)?;
        let st = lock(&proc.state);
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: container.bundle.display().to_string(),
            pid: st.pid,
            status: EnumOrUnknown::new(st.status.proto()),
            stdin: proc.stdio.stdin.clone(),
            stdout: proc.stdio.stdout.clone(),
            stderr: proc.stdio.stderr.clone(),
            terminal: proc.stdio.terminal,
            exit_status: st.exit_status,
            exited_at: MessageField::from_option(st.exited_at.clone()),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn kill_impl(&self, req: api::KillRequest) -> TaskResult<()> {
        let proc = self.process(&req.id, &req.exec_id)?;
        if proc.status() == ProcStatus::Stopped {
            return Err(TaskError::ProcessFinished {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
            });
        }
        let agent = self.agent()?;
        agent.signal_process(&req.id, &req.exec_id, req.signal, req.all)?;
        Ok(())
    }

    fn exec_impl(&self, req: api::ExecProcessRequest) -> TaskResult<()> {
        let container = self.container(&req.id)?;
        if container.init.status() == ProcStatus::Stopped {
            return Err(TaskError::FailedPrecondition(format!(
                "container {:?} is stopped",
                req.id
            )));
        }
        if req.exec_id.is_empty() {
            return Err(TaskError::InvalidArgument(
                "exec id must not be empty".into(),
            ));
        }
        let process_json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| TaskError::InvalidArgument("exec without a process spec".into()))?;
        // Only checked to be JSON: the agent reads it as an OCI process
        // (decoding it here too would link oci-spec's validators, regex
        // among them, into the shim for nothing).
        serde_json::from_slice::<serde_json::Value>(&process_json)
            .map_err(|e| TaskError::InvalidArgument(format!("exec process spec: {e}")))?;
        let stdio = StdioPaths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        {
            let mut execs = lock(&container.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(TaskError::AlreadyExists(format!(
                    "exec {:?} in container {:?}",
                    req.exec_id, req.id
                )));
            }
            execs.insert(
                req.exec_id.clone(),
                Arc::new(Proc::new(&req.id, &req.exec_id, stdio, process_json)),
            );
        }
        self.publisher.publish(Event::ExecAdded(ev::TaskExecAdded {
            container_id: req.id,
            exec_id: req.exec_id,
            ..Default::default()
        }));
        Ok(())
    }

    fn pause_impl(&self, id: &str, pause: bool) -> TaskResult<()> {
        let container = self.container(id)?;
        let agent = self.agent()?;
        if pause {
            agent.pause_container(id)?;
        } else {
            agent.resume_container(id)?;
        }
        {
            let mut st = lock(&container.init.state);
            if st.status != ProcStatus::Stopped {
                st.status = if pause {
                    ProcStatus::Paused
                } else {
                    ProcStatus::Running
                };
            }
        }
        let container_id = id.to_owned();
        self.publisher.publish(if pause {
            Event::Paused(ev::TaskPaused {
                container_id,
                ..Default::default()
            })
        } else {
            Event::Resumed(ev::TaskResumed {
                container_id,
                ..Default::default()
            })
        });
        Ok(())
    }

    fn pids_impl(&self, req: api::PidsRequest) -> TaskResult<api::PidsResponse> {
        self.container(&req.id)?;
        let pids = self.agent()?.list_processes(&req.id)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| api::ProcessInfo {
                    pid: pid.max(0) as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn stats_impl(&self, req: api::StatsRequest) -> TaskResult<api::StatsResponse> {
        self.container(&req.id)?;
        let stats = self.agent()?.stats_container(&req.id)?;
        let metrics = to_metrics(&stats);
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: METRICS_TYPE_URL.into(),
                value: metrics.write_to_bytes().unwrap_or_default(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn shutdown_impl(&self) {
        if !lock(&self.containers).is_empty() {
            log::debug!("shutdown requested with containers left; staying up");
            return;
        }
        if let Some(tx) = lock(&self.shutdown_tx).take() {
            let _ = tx.send(());
        }
    }
}

/// The exit status of a process killed by SIGKILL (as an OOM kill is).
const SIGKILL_STATUS: u32 = 128 + 9;

/// Publishes TaskOOM for a container whose init was killed by SIGKILL if
/// its cgroup counted an OOM kill, so that the event comes before the
/// TaskExit: the agent's OOM watcher may report it only after the exit
/// (it polls on cgroup v1), and the CRI plugin shows the reason a
/// container's status had when the kubelet looked. A second TaskOOM from
/// the watcher later changes nothing for containerd.
fn oom_before_exit(agent: &AgentClient, publisher: &Publisher, id: &str) {
    match agent.stats_container(id) {
        Ok(stats) if stats.memory.as_ref().is_some_and(|m| m.oom_kill_count > 0) => {
            log::info!("container {id} was OOM-killed");
            publisher.publish(Event::Oom(ev::TaskOOM {
                container_id: id.to_owned(),
                ..Default::default()
            }));
        }
        Ok(_) => {}
        Err(err) => log::debug!("container {id}: no OOM count after its SIGKILL: {err}"),
    }
}

/// WaitProcess until the agent reports an exit (or loses the process).
fn wait_in_agent(agent: &AgentClient, proc: &Proc) -> (u32, Timestamp) {
    let mut failures = 0;
    loop {
        {
            // Ended meanwhile with its sandbox: nothing to wait for.
            let st = lock(&proc.state);
            if st.status == ProcStatus::Stopped {
                return (st.exit_status, st.exited_at.clone().unwrap_or_default());
            }
        }
        match agent.wait_process(&proc.container_id, &proc.exec_id) {
            Ok(exit) => return (exit.status, timestamp_ms(exit.exited_at_ms)),
            Err(err) if err.is_timeout() => {}
            Err(err) => {
                failures += 1;
                if err.code() == ttrpc::Code::NOT_FOUND || failures > 50 {
                    log::warn!(
                        "{}/{}: lost the process in the agent: {err}",
                        proc.container_id,
                        proc.exec_id
                    );
                    return (137, timestamp(SystemTime::now()));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The agent's cgroup statistics as containerd's cgroups v1 metrics.
fn to_metrics(stats: &ContainerStats) -> metrics::Metrics {
    let mut m = metrics::Metrics::default();
    if let Some(cpu) = stats.cpu.as_ref() {
        m.cpu = MessageField::some(metrics::CPUStat {
            usage: MessageField::some(metrics::CPUUsage {
                total: cpu.usage_total_ns,
                user: cpu.usage_user_ns,
                kernel: cpu.usage_kernel_ns,
                ..Default::default()
            }),
            throttling: MessageField::some(metrics::Throttle {
                throttled_periods: cpu.throttled_periods,
                throttled_time: cpu.throttled_time_ns,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(mem) = stats.memory.as_ref() {
        m.memory = MessageField::some(metrics::MemoryStat {
            usage: MessageField::some(metrics::MemoryEntry {
                usage: mem.usage_bytes,
                max: mem.max_usage_bytes,
                limit: mem.limit_bytes,
                failcnt: mem.fail_count,
                ..Default::default()
            }),
            ..Default::default()
        });
        m.memory_oom_control = MessageField::some(metrics::MemoryOomControl {
            oom_kill: mem.oom_kill_count,
            ..Default::default()
        });
    }
    if let Some(pids) = stats.pids.as_ref() {
        m.pids = MessageField::some(metrics::PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        });
    }
    if let Some(io) = stats.io.as_ref() {
        let entry = |op: &str, value| metrics::BlkIOEntry {
            op: op.into(),
            value,
            ..Default::default()
        };
        m.blkio = MessageField::some(metrics::BlkIOStat {
            io_service_bytes_recursive: vec![
                entry("Read", io.read_bytes),
                entry("Write", io.write_bytes),
            ],
            ..Default::default()
        });
    }
    m
}

impl Task for TaskService {
    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        Ok(self.state_impl(req)?)
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        Ok(self.create_impl(req)?)
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        Ok(self.start_impl(req)?)
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        Ok(self.delete_impl(req)?)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> ttrpc::Result<api::PidsResponse> {
        Ok(self.pids_impl(req)?)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> ttrpc::Result<Empty> {
        self.pause_impl(&req.id, true)?;
        Ok(Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> ttrpc::Result<Empty> {
        self.pause_impl(&req.id, false)?;
        Ok(Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(TaskError::NotImplemented("checkpoint").into())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        self.kill_impl(req)?;
        Ok(Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> ttrpc::Result<Empty> {
        self.exec_impl(req)?;
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> ttrpc::Result<Empty> {
        let proc = self.process(&req.id, &req.exec_id)?;
        if !proc.stdio.terminal {
            return Err(TaskError::FailedPrecondition(format!(
                "process {:?} of {:?} has no terminal",
                req.exec_id, req.id
            ))
            .into());
        }
        let agent = self.agent()?;
        agent
            .tty_win_resize(&req.id, &req.exec_id, req.height, req.width)
            .map_err(TaskError::from)?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> ttrpc::Result<Empty> {
        let proc = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            let st = lock(&proc.state);
            match st.stdin.as_ref() {
                // The bridge closes the agent's stdin once it reads EOF.
                Some(bridge) => bridge.poke(),
                None => {
                    drop(st);
                    if let Ok(agent) = self.agent() {
                        let _ = agent.close_stdin(&req.id, &req.exec_id);
                    }
                }
            }
        }
        Ok(Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> ttrpc::Result<Empty> {
        self.container(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| TaskError::InvalidArgument("update without resources".into()))?;
        self.agent()?
            .update_container(&req.id, resources)
            .map_err(TaskError::from)?;
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> ttrpc::Result<api::WaitResponse> {
        let proc = self.process(&req.id, &req.exec_id)?;
        let (exit_status, exited_at) = proc.wait();
        Ok(api::WaitResponse {
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        Ok(self.stats_impl(req)?)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        let task_pid = self
            .container(&req.id)
            .map(|c| lock(&c.init.state).pid)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: format!("skiff {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> ttrpc::Result<Empty> {
        self.shutdown_impl();
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_client as pb;

    #[test]
    fn metrics_conversion() {
        let stats = pb::ContainerStats {
            cpu: MessageField::some(pb::CpuStats {
                usage_total_ns: 10,
                ..Default::default()
            }),
            memory: MessageField::some(pb::MemoryStats {
                usage_bytes: 4096,
                limit_bytes: 1 << 20,
                oom_kill_count: 2,
                ..Default::default()
            }),
            pids: MessageField::some(pb::PidsStats {
                current: 3,
                limit: 10,
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = to_metrics(&stats);
        assert_eq!(m.cpu.usage.total, 10);
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.usage.limit, 1 << 20);
        assert_eq!(m.memory_oom_control.oom_kill, 2);
        assert_eq!(m.pids.current, 3);
        let bytes = m.write_to_bytes().unwrap();
        assert_eq!(metrics::Metrics::parse_from_bytes(&bytes).unwrap(), m);
    }

    #[test]
    fn wait_blocks_until_exit() {
        let proc = Arc::new(Proc::new("c", "", StdioPaths::default(), Vec::new()));
        let p = Arc::clone(&proc);
        let t = std::thread::spawn(move || p.wait());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished());
        let publisher = Publisher::discard();
        assert!(proc.finish(&publisher, 3, timestamp_ms(1000)));
        // Recorded once: a second finisher (the sandbox's end) changes nothing.
        assert!(!proc.finish(&publisher, 137, timestamp_ms(2000)));
        let (status, at) = t.join().unwrap();
        assert_eq!(status, 3);
        assert_eq!(at.seconds, 1);
        assert_eq!(proc.status(), ProcStatus::Stopped);
    }

    #[test]
    fn a_sandbox_that_ends_stops_every_task_once() {
        let (publisher, events) = Publisher::capture();
        let (tx, _rx) = mpsc::channel();
        let service = TaskService::new(
            ShimInfo {
                namespace: "ns".into(),
                sandbox_id: "pod".into(),
                state_dir: "/nonexistent".into(),
            },
            Config::default(),
            publisher,
            tx,
        );
        let proc = |exec_id: &str, pid: u32| {
            let p = Arc::new(Proc::new("c1", exec_id, StdioPaths::default(), Vec::new()));
            lock(&p.state).pid = pid;
            p
        };
        let init = proc("", 42);
        let running = proc("e1", 43);
        let done = proc("e2", 44);
        assert!(done.finish(&Publisher::discard(), 0, timestamp_ms(1000)));
        let execs = HashMap::from([
            ("e1".to_owned(), Arc::clone(&running)),
            ("e2".to_owned(), done),
        ]);
        lock(&service.containers).insert(
            "c1".into(),
            Arc::new(Container {
                id: "c1".into(),
                bundle: "/nonexistent/c1".into(),
                rootfs: "/nonexistent/c1/rootfs".into(),
                rootfs_mounted: false,
                volumes: Vec::new(),
                init: Arc::clone(&init),
                execs: Mutex::new(execs),
            }),
        );
        let waiting = Arc::clone(&init);
        let wait = std::thread::spawn(move || waiting.wait());

        service.sandbox_ended("the VM ended (Reset)");
        assert_eq!(wait.join().unwrap().0, SANDBOX_ENDED_STATUS);
        assert_eq!(running.status(), ProcStatus::Stopped);
        let mut exits: Vec<(String, u32, u32)> = events
            .try_iter()
            .filter_map(|(_, event)| match event {
                Event::Exit(e) => Some((e.id, e.pid, e.exit_status)),
                _ => None,
            })
            .collect();
        exits.sort();
        // The exec that had already exited is not reported again.
        assert_eq!(
            exits,
            [("c1".to_owned(), 42, 137), ("e1".to_owned(), 43, 137)]
        );
        // What needs the sandbox says what happened; Delete needs none.
        let err = service.agent().unwrap_err().to_string();
        assert!(
            err.contains("the sandbox has ended: the VM ended (Reset)"),
            "{err}"
        );
        let resp = service
            .delete_impl(api::DeleteRequest {
                id: "c1".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!((resp.pid, resp.exit_status), (42, 137));
        assert!(lock(&service.containers).is_empty());
    }

    #[test]
    fn oom_events_only_for_known_containers_and_bounded() {
        let mut filter = OomFilter::default();
        let t0 = Instant::now();
        assert!(!filter.accept("stranger", false, t0), "unknown id");
        assert!(filter.accept("c1", true, t0));
        assert!(
            !filter.accept("c1", true, t0 + Duration::from_millis(10)),
            "too soon"
        );
        assert!(filter.accept("c2", true, t0 + Duration::from_millis(10)));
        assert!(filter.accept("c1", true, t0 + OOM_EVENT_INTERVAL));
        // A flood leaves one entry per container of the last interval.
        for i in 0..10_000u32 {
            filter.accept(
                "c1",
                true,
                t0 + OOM_EVENT_INTERVAL + Duration::from_micros(u64::from(i)),
            );
            filter.accept(&format!("x{i}"), false, t0);
        }
        assert!(filter.last.len() <= 2, "{}", filter.last.len());
    }
}
