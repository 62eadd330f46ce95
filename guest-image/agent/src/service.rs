//! The `Agent` ttrpc service: decodes requests, finds the container and
//! process, calls the engine, and maps every error to a ttrpc status in one
//! place (`From<AgentError> for ttrpc::Error`).
//!
//! Locking: the container table's lock is held only to look up, insert or
//! remove an entry, never across a libcontainer call or a long poll; each
//! long poll (WaitProcess, ReadStdout/ReadStderr, GetOOMEvent) blocks only on
//! its own process's or the OOM queue's condition variable.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libcontainer::container::ContainerStatus as LcStatus;
use skiff_agent_proto::agent as pb;
use skiff_agent_proto::agent_ttrpc::Agent;
use skiff_agent_proto::{error_chain, ContainerStatus};
use ttrpc::{Code, TtrpcContext};

use crate::container::{
    Container, ContainerError, CreateRequest, Engine, ErrorKind, Process, StdioRequest,
};
use crate::network::{self, NetworkError};
use crate::oom::{oom_kill_count, OomWatcher};
use crate::reaper::lock;
use crate::refresh::{self, RefreshError};
use crate::shared_fs::{mount_shared_fs, SharedFsError};
use crate::stdio::{OutputBuffer, ReadOutcome};

pub use skiff_agent_proto::PROTOCOL_VERSION;
/// Bytes returned by one `ReadStdout`/`ReadStderr` when the request says 0.
pub const DEFAULT_READ_LEN: usize = 1 << 20;
/// The most bytes one read returns (ttrpc messages are capped at 4 MiB).
pub const MAX_READ_LEN: usize = 2 << 20;

/// Errors of the service layer.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The engine refused or failed.
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// A long poll reached the request's deadline.
    #[error("nothing happened before the request's timeout; call again to keep waiting")]
    Timeout,
    /// A request field is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// RefreshGuest was refused, malformed, or failed.
    #[error(transparent)]
    Refresh(#[from] RefreshError),
    /// ConfigureNetwork was refused, malformed, or failed.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// CreateSandbox's shared file system was refused, malformed, or
    /// could not be mounted.
    #[error(transparent)]
    SharedFs(#[from] SharedFsError),
}

impl AgentError {
    fn code(&self) -> Code {
        let of_kind = |kind| match kind {
            ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
            ErrorKind::NotFound => Code::NOT_FOUND,
            ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
            ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
            ErrorKind::Internal => Code::INTERNAL,
        };
        match self {
            Self::Container(err) => of_kind(err.kind()),
            Self::Timeout => Code::DEADLINE_EXCEEDED,
            Self::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Self::Refresh(RefreshError::NotGuestInit) => Code::FAILED_PRECONDITION,
            Self::Refresh(err) if err.is_invalid_request() => Code::INVALID_ARGUMENT,
            Self::Refresh(_) => Code::INTERNAL,
            Self::Network(err) => of_kind(err.kind()),
            Self::SharedFs(SharedFsError::NotGuestInit) => Code::FAILED_PRECONDITION,
            Self::SharedFs(err) if err.is_invalid_request() => Code::INVALID_ARGUMENT,
            Self::SharedFs(_) => Code::INTERNAL,
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(err: AgentError) -> Self {
        let code = err.code();
        let message = error_chain(&err);
        log::debug!("request failed: {code:?}: {message}");
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
    }
}

type AgentResult<T> = Result<T, AgentError>;

#[derive(Debug, Default, Clone)]
struct Sandbox {
    hostname: String,
}

/// Called after DestroySandbox removed every container.
pub type SandboxDestroyedHook = Box<dyn Fn() + Send + Sync>;

/// The agent's state behind the ttrpc service.
pub struct AgentService {
    engine: Engine,
    oom: Arc<OomWatcher>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids being created or removed: reserved so concurrent requests for the
    /// same id cannot race in libcontainer.
    busy: Mutex<HashSet<String>>,
    sandbox: Mutex<Option<Sandbox>>,
    on_sandbox_destroyed: Option<SandboxDestroyedHook>,
    /// The agent is the micro-VM's PID 1: RefreshGuest and
    /// ConfigureNetwork may change the system it runs on. False unless set
    /// (the host's `linux` handler).
    guest_init: bool,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService")
            .field("engine", &self.engine)
            .field("containers", &self.containers)
            .field("sandbox", &self.sandbox)
            .field("guest_init", &self.guest_init)
            .finish_non_exhaustive()
    }
}

/// Releases a reserved id when dropped.
struct Reservation<'a> {
    busy: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(self.busy).remove(&self.id);
    }
}

/// How long a long poll may block: a little less than the client's deadline,
/// so the client gets a DEADLINE_EXCEEDED status rather than its own timeout.
fn timeout_of(ctx: &TtrpcContext) -> Option<Duration> {
    (ctx.timeout_nano > 0).then(|| {
        let timeout = Duration::from_nanos(ctx.timeout_nano as u64);
        timeout - (timeout / 5).min(Duration::from_millis(200))
    })
}

impl AgentService {
    /// A service over `engine`, reporting OOM kills from `oom`.
    pub fn new(engine: Engine, oom: Arc<OomWatcher>) -> Self {
        Self {
            engine,
            oom,
            containers: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
            sandbox: Mutex::new(None),
            on_sandbox_destroyed: None,
            guest_init: false,
        }
    }

    /// Marks the agent as the micro-VM's init (PID 1), the only agent that
    /// serves RefreshGuest (it sets the system's clock, machine id and feeds
    /// its RNG) and ConfigureNetwork (it renames and addresses the system's
    /// NIC). Never set it in an agent that runs on a host.
    pub fn set_guest_init(&mut self, guest_init: bool) {
        self.guest_init = guest_init;
    }

    /// Runs `hook` once DestroySandbox has removed every container (before
    /// the reply goes out). The guest init schedules the VM's reset here.
    pub fn set_on_sandbox_destroyed(&mut self, hook: SandboxDestroyedHook) {
        self.on_sandbox_destroyed = Some(hook);
    }

    fn container(&self, id: &str) -> AgentResult<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_owned()).into())
    }

    fn process(&self, id: &str, exec_id: &str) -> AgentResult<Arc<Process>> {
        Ok(self.container(id)?.process(exec_id)?)
    }

    fn reserve(&self, id: &str) -> AgentResult<Reservation<'_>> {
        let containers = lock(&self.containers);
        let mut busy = lock(&self.busy);
        if containers.contains_key(id) || !busy.insert(id.to_owned()) {
            return Err(ContainerError::AlreadyExists(id.to_owned()).into());
        }
        Ok(Reservation {
            busy: &self.busy,
            id: id.to_owned(),
        })
    }

    /// Creates a container (see `CreateContainer`) and returns its init pid.
    pub fn create_container(&self, req: &pb::CreateContainerRequest) -> AgentResult<i32> {
        let _reservation = self.reserve(&req.container_id)?;
        let hostname = lock(&self.sandbox)
            .as_ref()
            .map(|s| s.hostname.clone())
            .filter(|h| !h.is_empty());
        let container = self.engine.create(&CreateRequest {
            id: &req.container_id,
            spec_json: &req.spec_json,
            rootfs: Path::new(&req.rootfs),
            stdio: StdioRequest {
                stdin: req.stdin,
                terminal: req.terminal,
            },
            default_hostname: hostname.as_deref(),
        })?;
        self.oom.watch(container.id(), container.cgroup_path());
        let pid = container.process("")?.pid;
        lock(&self.containers).insert(req.container_id.clone(), Arc::new(container));
        Ok(pid)
    }

    /// Removes a container (see `RemoveContainer`).
    pub fn remove_container(&self, id: &str) -> AgentResult<()> {
        let container = self.container(id)?;
        self.engine.remove(&container)?;
        self.oom.unwatch(id);
        lock(&self.containers).remove(id);
        Ok(())
    }

    fn read(
        &self,
        ctx: &TtrpcContext,
        req: &pb::ReadStreamRequest,
        stderr: bool,
    ) -> AgentResult<pb::ReadStreamResponse> {
        let process = self.process(&req.container_id, &req.exec_id)?;
        let buffer: Arc<OutputBuffer> = if stderr {
            process
                .stderr
                .clone()
                .ok_or(AgentError::Container(ContainerError::NoStderr))?
        } else {
            Arc::clone(&process.stdout)
        };
        let max_len = match req.max_len as usize {
            0 => DEFAULT_READ_LEN,
            n => n.min(MAX_READ_LEN),
        };
        let mut resp = pb::ReadStreamResponse::new();
        match buffer.read(max_len, timeout_of(ctx)) {
            ReadOutcome::Data(data) => resp.data = data,
            ReadOutcome::Eof => resp.eof = true,
            ReadOutcome::TimedOut => return Err(AgentError::Timeout),
        }
        Ok(resp)
    }
}

/// libcontainer's status as the protocol names it.
fn protocol_status(status: LcStatus) -> ContainerStatus {
    match status {
        LcStatus::Creating | LcStatus::Created => ContainerStatus::Created,
        LcStatus::Running => ContainerStatus::Running,
        LcStatus::Paused => ContainerStatus::Paused,
        LcStatus::Stopped => ContainerStatus::Stopped,
    }
}

fn to_u16(value: u32, what: &str) -> AgentResult<u16> {
    u16::try_from(value)
        .map_err(|_| AgentError::InvalidArgument(format!("{what} {value} is larger than 65535")))
}

impl Agent for AgentService {
    fn health(&self, _ctx: &TtrpcContext, _: pb::Empty) -> ttrpc::Result<pb::HealthResponse> {
        let mut resp = pb::HealthResponse::new();
        resp.status = "SERVING".into();
        Ok(resp)
    }

    fn version(&self, _ctx: &TtrpcContext, _: pb::Empty) -> ttrpc::Result<pb::VersionResponse> {
        let mut resp = pb::VersionResponse::new();
        resp.agent_version = env!("CARGO_PKG_VERSION").into();
        resp.protocol_version = PROTOCOL_VERSION;
        Ok(resp)
    }

    fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateSandboxRequest,
    ) -> ttrpc::Result<pb::Empty> {
        if let Some(shared) = req.shared_fs.as_ref() {
            mount_shared_fs(self.guest_init, shared).map_err(AgentError::from)?;
        }
        *lock(&self.sandbox) = Some(Sandbox {
            hostname: req.hostname,
        });
        Ok(pb::Empty::new())
    }

    fn destroy_sandbox(&self, _ctx: &TtrpcContext, _: pb::Empty) -> ttrpc::Result<pb::Empty> {
        let ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
        // Try every container; report the first failure after the rest.
        let mut first_error = None;
        for id in ids {
            if let Err(err) = self.remove_container(&id) {
                log::warn!(
                    "DestroySandbox: cannot remove {id:?}: {}",
                    error_chain(&err)
                );
                first_error.get_or_insert(err);
            }
        }
        *lock(&self.sandbox) = None;
        if let Some(hook) = &self.on_sandbox_destroyed {
            hook();
        }
        match first_error {
            Some(err) => Err(err.into()),
            None => Ok(pb::Empty::new()),
        }
    }

    fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> ttrpc::Result<pb::CreateContainerResponse> {
        let pid = AgentService::create_container(self, &req)?;
        Ok(pb::CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.container(&req.container_id)?
            .start()
            .map_err(AgentError::from)?;
        Ok(pb::Empty::new())
    }

    fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ExecProcessRequest,
    ) -> ttrpc::Result<pb::ExecProcessResponse> {
        let container = self.container(&req.container_id)?;
        let process = self
            .engine
            .exec(
                &container,
                &req.exec_id,
                &req.process_json,
                StdioRequest {
                    stdin: req.stdin,
                    terminal: req.terminal,
                },
            )
            .map_err(AgentError::from)?;
        Ok(pb::ExecProcessResponse {
            pid: process.pid,
            ..Default::default()
        })
    }

    fn wait_process(
        &self,
        ctx: &TtrpcContext,
        req: pb::ProcessRequest,
    ) -> ttrpc::Result<pb::WaitProcessResponse> {
        let process = self.process(&req.container_id, &req.exec_id)?;
        let status = process
            .exit
            .wait(timeout_of(ctx))
            .ok_or(AgentError::Timeout)?;
        let mut resp = pb::WaitProcessResponse::new();
        resp.exit_status = status.code;
        resp.exited_at_ms = status.exited_at_ms;
        Ok(resp)
    }

    fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!("signal {} is not in 1..=64", req.signal))
            })?;
        let container = self.container(&req.container_id)?;
        if req.all {
            container.signal_all(signal).map_err(AgentError::from)?;
        } else {
            container
                .process(&req.exec_id)
                .and_then(|p| p.signal(signal))
                .map_err(AgentError::from)?;
        }
        Ok(pb::Empty::new())
    }

    fn read_stdout(
        &self,
        ctx: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        Ok(self.read(ctx, &req, false)?)
    }

    fn read_stderr(
        &self,
        ctx: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        Ok(self.read(ctx, &req, true)?)
    }

    fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WriteStdinRequest,
    ) -> ttrpc::Result<pb::WriteStdinResponse> {
        let process = self.process(&req.container_id, &req.exec_id)?;
        let len = process.write_stdin(&req.data).map_err(AgentError::from)?;
        let mut resp = pb::WriteStdinResponse::new();
        resp.len = len as u32;
        Ok(resp)
    }

    fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.process(&req.container_id, &req.exec_id)?
            .close_stdin()
            .map_err(AgentError::from)?;
        Ok(pb::Empty::new())
    }

    fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: pb::TtyWinResizeRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let rows = to_u16(req.rows, "rows")?;
        let cols = to_u16(req.cols, "cols")?;
        self.process(&req.container_id, &req.exec_id)?
            .resize(rows, cols)
            .map_err(AgentError::from)?;
        Ok(pb::Empty::new())
    }

    fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::StatsContainerResponse> {
        let container = self.container(&req.container_id)?;
        let stats = container.stats().map_err(AgentError::from)?;
        let mut resp = pb::StatsContainerResponse::new();
        let cpu = resp.cpu.mut_or_insert_default();
        cpu.usage_total_ns = stats.cpu.usage.usage_total;
        cpu.usage_user_ns = stats.cpu.usage.usage_user;
        cpu.usage_kernel_ns = stats.cpu.usage.usage_kernel;
        cpu.throttled_periods = stats.cpu.throttling.throttled_periods;
        cpu.throttled_time_ns = stats.cpu.throttling.throttled_time;
        let memory = resp.memory.mut_or_insert_default();
        memory.usage_bytes = stats.memory.memory.usage;
        memory.max_usage_bytes = stats.memory.memory.max_usage;
        memory.limit_bytes = stats.memory.memory.limit;
        memory.fail_count = stats.memory.memory.fail_count;
        memory.oom_kill_count = oom_kill_count(container.cgroup_path()).unwrap_or(0);
        let pids = resp.pids.mut_or_insert_default();
        pids.current = stats.pids.current;
        pids.limit = stats.pids.limit;
        let io = resp.io.mut_or_insert_default();
        for stat in &stats.blkio.service_bytes {
            match stat
                .op_type
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                Some("read") => io.read_bytes += stat.value,
                Some("write") => io.write_bytes += stat.value,
                _ => {}
            }
        }
        Ok(resp)
    }

    fn state_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::ContainerStateResponse> {
        let container = self.container(&req.container_id)?;
        let (status, pid) = container.status().map_err(AgentError::from)?;
        let mut resp = pb::ContainerStateResponse::new();
        resp.status = protocol_status(status).as_str().into();
        resp.pid = pid;
        Ok(resp)
    }

    fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.container(&req.container_id)?
            .pause()
            .map_err(AgentError::from)?;
        Ok(pb::Empty::new())
    }

    fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.container(&req.container_id)?
            .resume()
            .map_err(AgentError::from)?;
        Ok(pb::Empty::new())
    }

    fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.container(&req.container_id)?
            .update(&req.resources_json)
            .map_err(AgentError::from)?;
        Ok(pb::Empty::new())
    }

    fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::ListProcessesResponse> {
        let pids = self
            .container(&req.container_id)?
            .pids()
            .map_err(AgentError::from)?;
        let mut resp = pb::ListProcessesResponse::new();
        resp.pids = pids;
        Ok(resp)
    }

    fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        AgentService::remove_container(self, &req.container_id)?;
        Ok(pb::Empty::new())
    }

    fn get_oom_event(
        &self,
        ctx: &TtrpcContext,
        _: pb::Empty,
    ) -> ttrpc::Result<pb::OomEventResponse> {
        let id = self
            .oom
            .next_event(timeout_of(ctx))
            .ok_or(AgentError::Timeout)?;
        let mut resp = pb::OomEventResponse::new();
        resp.container_id = id;
        Ok(resp)
    }

    fn refresh_guest(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RefreshGuestRequest,
    ) -> ttrpc::Result<pb::Empty> {
        refresh::refresh_guest(self.guest_init, &req).map_err(AgentError::from)?;
        Ok(pb::Empty::new())
    }

    fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ConfigureNetworkRequest,
    ) -> ttrpc::Result<pb::Empty> {
        network::configure_network(self.guest_init, &req).map_err(AgentError::from)?;
        Ok(pb::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(err: AgentError) -> ttrpc::proto::Status {
        match ttrpc::Error::from(err) {
            ttrpc::Error::RpcStatus(status) => status,
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn errors_map_to_codes_with_actionable_messages() {
        let status = status_of(ContainerError::NotFound("web".into()).into());
        assert_eq!(status.code(), Code::NOT_FOUND);
        assert_eq!(status.message(), "container \"web\" does not exist");

        let status = status_of(ContainerError::InvalidSpec("process is missing".into()).into());
        assert_eq!(status.code(), Code::INVALID_ARGUMENT);

        let status = status_of(ContainerError::AlreadyExists("web".into()).into());
        assert_eq!(status.code(), Code::ALREADY_EXISTS);

        let status = status_of(ContainerError::NoStdin.into());
        assert_eq!(status.code(), Code::FAILED_PRECONDITION);

        let status = status_of(AgentError::Timeout);
        assert_eq!(status.code(), Code::DEADLINE_EXCEEDED);

        let status = status_of(RefreshError::EntropyLength(8).into());
        assert_eq!(status.code(), Code::INVALID_ARGUMENT);
        let status =
            status_of(RefreshError::Reseed(std::io::Error::from_raw_os_error(libc::EPERM)).into());
        assert_eq!(status.code(), Code::INTERNAL);
        assert!(
            status.message().contains("RNDRESEEDCRNG"),
            "{}",
            status.message()
        );

        let status = status_of(NetworkError::Mtu(9).into());
        assert_eq!(status.code(), Code::INVALID_ARGUMENT);
        assert!(
            status.message().contains("68..=65535"),
            "{}",
            status.message()
        );
        let status = status_of(NetworkError::NoNic(vec!["lo".into()]).into());
        assert_eq!(status.code(), Code::FAILED_PRECONDITION);
        assert!(
            status.message().contains("no Ethernet link"),
            "{}",
            status.message()
        );
        let status = status_of(
            NetworkError::OpenNetlink(std::io::Error::from_raw_os_error(libc::EACCES)).into(),
        );
        assert_eq!(status.code(), Code::INTERNAL);
        assert!(
            status.message().contains("rtnetlink") && status.message().contains("denied"),
            "{}",
            status.message()
        );

        let io = ContainerError::Io {
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let status = status_of(io.into());
        assert_eq!(status.code(), Code::INTERNAL);
        assert!(
            status.message().contains("No space left"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn refresh_guest_is_refused_outside_the_guest_init() {
        // What `Agent::refresh_guest` answers when `guest_init` is false (the
        // service itself needs a spawner and a reaper, which a unit test
        // cannot start): nothing is applied (this host may run the tests as
        // root), the code is FAILED_PRECONDITION and the message says why.
        let req = pb::RefreshGuestRequest {
            entropy: vec![7; 64],
            unix_time_ns: 1,
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            ..Default::default()
        };
        let err = refresh::refresh_guest(false, &req).unwrap_err();
        let status = status_of(err.into());
        assert_eq!(status.code(), Code::FAILED_PRECONDITION);
        assert!(
            status.message().contains("guest init only"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn configure_network_is_refused_outside_the_guest_init() {
        // What `Agent::configure_network` answers when `guest_init` is false:
        // nothing is applied (a bug here would rename the test host's NIC),
        // the code is FAILED_PRECONDITION and the message says why.
        let req = pb::ConfigureNetworkRequest {
            interfaces: vec![pb::NetInterface {
                name: "eth0".into(),
                mac: vec![2, 0, 0, 0, 0, 1],
                mtu: 1500,
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = network::configure_network(false, &req).unwrap_err();
        let status = status_of(err.into());
        assert_eq!(status.code(), Code::FAILED_PRECONDITION);
        assert!(
            status.message().contains("guest init only"),
            "{}",
            status.message()
        );
    }
}
