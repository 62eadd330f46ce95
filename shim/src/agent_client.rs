//! A typed client for the skiff agent (`skiff.agent.v1.Agent` over ttrpc).
//!
//! It wraps the generated [`skiff_agent_proto::agent_ttrpc::AgentClient`]
//! with per-call deadlines, and keeps the agent's status code in
//! [`AgentCallError`] so the TaskService can hand it on to containerd. The
//! client is cheap to clone and safe to share between threads: ttrpc
//! multiplexes concurrent requests (long polls included) over one socket.

use std::time::{Duration, Instant, SystemTime};

use skiff_agent_proto::agent as pb;
use skiff_agent_proto::{agent_ttrpc, ContainerStatus, UnknownStatusError};
use ttrpc::context;
use ttrpc::Code;

/// A container's cgroup statistics as the agent reports them (protocol
/// messages, handed on as they are: every field is already typed).
pub use pb::{CpuStats, IoStats, MemoryStats, PidsStats, StatsContainerResponse as ContainerStats};

/// Deadline of ordinary requests.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of one long poll (Wait, Read*, GetOOMEvent); callers loop.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline of container creation (image setup, namespaces, cgroups).
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed agent request.
#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    /// The agent answered with an error status.
    #[error("agent: {message}")]
    Status {
        /// The agent's status code.
        code: Code,
        /// The agent's message.
        message: String,
    },
    /// The request did not reach the agent, or the answer did not come back.
    #[error("agent connection")]
    Transport(#[source] ttrpc::Error),
    /// No answer within the request's deadline (a long poll that found
    /// nothing to report ends this way; call again).
    #[error("the agent did not answer within {0:?}")]
    DeadlineExceeded(Duration),
    /// The agent answered a container status the protocol does not name.
    #[error("the agent's answer is invalid")]
    InvalidStatus(#[from] UnknownStatusError),
}

impl AgentCallError {
    /// The ttrpc code to report to the caller.
    pub fn code(&self) -> Code {
        match self {
            Self::Status { code, .. } => *code,
            Self::Transport(_) => Code::UNAVAILABLE,
            Self::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            Self::InvalidStatus(_) => Code::INTERNAL,
        }
    }

    /// True when a long poll ran out its deadline, the client's or the
    /// agent's (call again).
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::Status { code, .. } => *code == Code::DEADLINE_EXCEEDED,
            Self::DeadlineExceeded(_) => true,
            Self::Transport(_) | Self::InvalidStatus(_) => false,
        }
    }
}

impl From<ttrpc::Error> for AgentCallError {
    fn from(err: ttrpc::Error) -> Self {
        match err {
            ttrpc::Error::RpcStatus(status) => Self::Status {
                code: status.code(),
                message: status.message().to_owned(),
            },
            other => Self::Transport(other),
        }
    }
}

type CallResult<T> = Result<T, AgentCallError>;

/// One chunk of a process's output stream.
#[derive(Debug, Default)]
pub struct Chunk {
    /// The bytes read (possibly empty).
    pub data: Vec<u8>,
    /// The stream is closed and fully read.
    pub eof: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or 128 + signal.
    pub status: u32,
    /// Unix time of exit, milliseconds.
    pub exited_at_ms: u64,
}

/// A connected agent client.
#[derive(Clone)]
pub struct AgentClient {
    inner: agent_ttrpc::AgentClient,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient").finish_non_exhaustive()
    }
}

/// Sends one request with deadline `timeout`. ttrpc's sync client reports
/// an answer that did not come in time only as a transport error with a
/// text, so a transport error once the deadline has passed is taken for
/// the deadline, and every other one stays a transport error.
fn call<T>(
    timeout: Duration,
    request: impl FnOnce(context::Context) -> ttrpc::Result<T>,
) -> CallResult<T> {
    let sent = Instant::now();
    request(context::with_duration(timeout)).map_err(|err| match err {
        ttrpc::Error::Others(_) if sent.elapsed() >= timeout => {
            AgentCallError::DeadlineExceeded(timeout)
        }
        other => other.into(),
    })
}

fn process(container_id: &str, exec_id: &str) -> pb::ProcessRequest {
    pb::ProcessRequest {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
        ..Default::default()
    }
}

fn container(container_id: &str) -> pb::ContainerRequest {
    pb::ContainerRequest {
        container_id: container_id.to_owned(),
        ..Default::default()
    }
}

impl AgentClient {
    /// Connects to `address` (`unix:///…`) and waits until the agent
    /// answers Health, retrying until `timeout` has passed.
    pub fn connect(address: &str, timeout: Duration) -> CallResult<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = ttrpc::Client::connect(address)
                .map_err(AgentCallError::from)
                .and_then(|client| {
                    let agent = Self {
                        inner: agent_ttrpc::AgentClient::new(client),
                    };
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(100));
                    agent.health(left.min(Duration::from_secs(2)))?;
                    Ok(agent)
                });
            match attempt {
                Ok(agent) => return Ok(agent),
                Err(err) if Instant::now() >= deadline => return Err(err),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Wraps an already connected stream (e.g. a hybrid vsock connection
    /// after its `CONNECT`/`OK` handshake) and checks that the agent
    /// answers Health within `timeout`. The client owns the stream.
    pub fn from_stream(
        stream: std::os::unix::net::UnixStream,
        timeout: Duration,
    ) -> CallResult<Self> {
        use std::os::fd::IntoRawFd;
        let client = ttrpc::Client::new(stream.into_raw_fd())?;
        let agent = Self {
            inner: agent_ttrpc::AgentClient::new(client),
        };
        agent.health(timeout)?;
        Ok(agent)
    }

    /// Health check.
    pub fn health(&self, timeout: Duration) -> CallResult<()> {
        call(timeout, |c| self.inner.health(c, &pb::Empty::new()))?;
        Ok(())
    }

    /// Prepares the sandbox (hostname); in a micro-VM, mounts the
    /// virtio-fs share `shared_fs` (tag, guest mount point) first.
    pub fn create_sandbox(
        &self,
        hostname: &str,
        shared_fs: Option<(&str, &str)>,
    ) -> CallResult<()> {
        let req = pb::CreateSandboxRequest {
            hostname: hostname.to_owned(),
            shared_fs: shared_fs
                .map(|(tag, mount_point)| pb::SharedFs {
                    tag: tag.to_owned(),
                    mount_point: mount_point.to_owned(),
                    ..Default::default()
                })
                .into(),
            ..Default::default()
        };
        call(CALL_TIMEOUT, |c| self.inner.create_sandbox(c, &req))?;
        Ok(())
    }

    /// Removes every container of the sandbox.
    pub fn destroy_sandbox(&self) -> CallResult<()> {
        call(CREATE_TIMEOUT, |c| {
            self.inner.destroy_sandbox(c, &pb::Empty::new())
        })?;
        Ok(())
    }

    /// Creates a container from an OCI spec (JSON) on `rootfs`; returns its
    /// init pid.
    pub fn create_container(
        &self,
        id: &str,
        spec_json: Vec<u8>,
        rootfs: &str,
        stdin: bool,
        terminal: bool,
    ) -> CallResult<u32> {
        let req = pb::CreateContainerRequest {
            container_id: id.to_owned(),
            spec_json,
            rootfs: rootfs.to_owned(),
            stdin,
            terminal,
            ..Default::default()
        };
        let resp = call(CREATE_TIMEOUT, |c| self.inner.create_container(c, &req))?;
        Ok(resp.pid.max(0) as u32)
    }

    /// Starts a created container's init process.
    pub fn start_container(&self, id: &str) -> CallResult<()> {
        call(CALL_TIMEOUT, |c| {
            self.inner.start_container(c, &container(id))
        })?;
        Ok(())
    }

    /// Creates and starts an exec process (OCI process JSON).
    pub fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdin: bool,
        terminal: bool,
    ) -> CallResult<u32> {
        let req = pb::ExecProcessRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            process_json,
            stdin,
            terminal,
            ..Default::default()
        };
        let resp = call(CREATE_TIMEOUT, |c| self.inner.exec_process(c, &req))?;
        Ok(u32::try_from(resp.pid).unwrap_or(0))
    }

    /// Waits (one long poll) for a process to exit.
    pub fn wait_process(&self, id: &str, exec_id: &str) -> CallResult<ExitStatus> {
        let resp = call(POLL_TIMEOUT, |c| {
            self.inner.wait_process(c, &process(id, exec_id))
        })?;
        Ok(ExitStatus {
            status: resp.exit_status as u32,
            exited_at_ms: resp.exited_at_ms,
        })
    }

    /// Sends `signal` to a process, or to every process of the container.
    pub fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> CallResult<()> {
        let req = pb::SignalProcessRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        call(CALL_TIMEOUT, |c| self.inner.signal_process(c, &req))?;
        Ok(())
    }

    /// Reads (one long poll) from a process's stdout or stderr.
    pub fn read_stream(&self, id: &str, exec_id: &str, stderr: bool) -> CallResult<Chunk> {
        let req = pb::ReadStreamRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            max_len: 0,
            ..Default::default()
        };
        let resp = if stderr {
            call(POLL_TIMEOUT, |c| self.inner.read_stderr(c, &req))?
        } else {
            call(POLL_TIMEOUT, |c| self.inner.read_stdout(c, &req))?
        };
        Ok(Chunk {
            data: resp.data,
            eof: resp.eof,
        })
    }

    /// Writes to a process's stdin; returns how many bytes were taken.
    pub fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> CallResult<usize> {
        let req = pb::WriteStdinRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            data: data.to_vec(),
            ..Default::default()
        };
        Ok(call(CALL_TIMEOUT, |c| self.inner.write_stdin(c, &req))?.len as usize)
    }

    /// Closes a process's stdin.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> CallResult<()> {
        call(CALL_TIMEOUT, |c| {
            self.inner.close_stdin(c, &process(id, exec_id))
        })?;
        Ok(())
    }

    /// Resizes a process's terminal.
    pub fn tty_win_resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> CallResult<()> {
        let req = pb::TtyWinResizeRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            rows,
            cols,
            ..Default::default()
        };
        call(CALL_TIMEOUT, |c| self.inner.tty_win_resize(c, &req))?;
        Ok(())
    }

    /// cgroup statistics of a container.
    pub fn stats_container(&self, id: &str) -> CallResult<ContainerStats> {
        call(CALL_TIMEOUT, |c| {
            self.inner.stats_container(c, &container(id))
        })
    }

    /// Status and init pid.
    pub fn state_container(&self, id: &str) -> CallResult<(ContainerStatus, u32)> {
        let resp = call(CALL_TIMEOUT, |c| {
            self.inner.state_container(c, &container(id))
        })?;
        let status = resp.status.parse()?;
        Ok((status, resp.pid.max(0) as u32))
    }

    /// Freezes a container.
    pub fn pause_container(&self, id: &str) -> CallResult<()> {
        call(CALL_TIMEOUT, |c| {
            self.inner.pause_container(c, &container(id))
        })?;
        Ok(())
    }

    /// Thaws a container.
    pub fn resume_container(&self, id: &str) -> CallResult<()> {
        call(CALL_TIMEOUT, |c| {
            self.inner.resume_container(c, &container(id))
        })?;
        Ok(())
    }

    /// Applies new resources (OCI LinuxResources JSON).
    pub fn update_container(&self, id: &str, resources_json: Vec<u8>) -> CallResult<()> {
        let req = pb::UpdateContainerRequest {
            container_id: id.to_owned(),
            resources_json,
            ..Default::default()
        };
        call(CALL_TIMEOUT, |c| self.inner.update_container(c, &req))?;
        Ok(())
    }

    /// Pids of the container's processes.
    pub fn list_processes(&self, id: &str) -> CallResult<Vec<i32>> {
        Ok(call(CALL_TIMEOUT, |c| {
            self.inner.list_processes(c, &container(id))
        })?
        .pids)
    }

    /// Removes a container (killing what still runs in it).
    pub fn remove_container(&self, id: &str) -> CallResult<()> {
        call(CREATE_TIMEOUT, |c| {
            self.inner.remove_container(c, &container(id))
        })?;
        Ok(())
    }

    /// Gives a guest restored from a snapshot its own entropy, wall clock
    /// and machine id (RefreshGuest; call right after reconnecting to a
    /// restored guest, and on the template after the snapshot). `entropy`
    /// is fresh host randomness, [`skiff_agent_proto::REFRESH_ENTROPY_LEN`]
    /// bytes ([`crate::fixups::host_entropy`]); `now` the host's wall clock,
    /// taken just before the call (`SystemTime::now()`); `machine_id` 32
    /// lowercase hex chars ([`crate::fixups::new_machine_id`]) or "" to
    /// keep the guest's. The agent checks all three (INVALID_ARGUMENT) and
    /// answers FAILED_PRECONDITION unless it is the micro-VM's PID 1 (the
    /// `linux` handler's agent never refreshes its host). An error may
    /// leave the guest partly refreshed: do not hand it out.
    pub fn refresh_guest(
        &self,
        entropy: &[u8],
        now: SystemTime,
        machine_id: &str,
    ) -> CallResult<()> {
        // A time before 1970 or after 2262 is sent as 0, which the agent
        // refuses: better than a wrapped clock.
        let unix_time_ns = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_nanos()).ok())
            .unwrap_or(0);
        let req = pb::RefreshGuestRequest {
            entropy: entropy.to_vec(),
            unix_time_ns,
            machine_id: machine_id.to_owned(),
            ..Default::default()
        };
        call(CALL_TIMEOUT, |c| self.inner.refresh_guest(c, &req))?;
        Ok(())
    }

    /// Configures the guest's side of the pod network (`ConfigureNetwork`):
    /// the guest's one NIC takes `req`'s interface name, MAC, MTU and
    /// addresses; `lo` is brought up; the routes are added (on-link ones
    /// first); `/etc/hosts` and `/etc/resolv.conf` are replaced when given.
    /// The agent checks the whole request before it changes anything
    /// (INVALID_ARGUMENT: today exactly one interface, see the bounds
    /// `skiff_agent_proto::NET_*`), answers FAILED_PRECONDITION unless it
    /// is the micro-VM's PID 1 or when the guest has no NIC (or several),
    /// and INTERNAL when the kernel refuses a change, which may leave the
    /// guest partly configured. Sending the same request again succeeds.
    pub fn configure_network(&self, req: &pb::ConfigureNetworkRequest) -> CallResult<()> {
        call(CALL_TIMEOUT, |c| self.inner.configure_network(c, req))?;
        Ok(())
    }

    /// Waits (one long poll) for an OOM kill; returns the container id.
    pub fn get_oom_event(&self) -> CallResult<String> {
        Ok(call(POLL_TIMEOUT, |c| {
            self.inner.get_oom_event(c, &pb::Empty::new())
        })?
        .container_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_passed_deadline_is_a_timeout() {
        let late = call(Duration::from_millis(5), |_| -> ttrpc::Result<()> {
            std::thread::sleep(Duration::from_millis(10));
            Err(ttrpc::Error::Others("no answer".into()))
        })
        .unwrap_err();
        assert!(
            matches!(late, AgentCallError::DeadlineExceeded(d) if d == Duration::from_millis(5))
        );
        assert!(late.is_timeout());
        assert_eq!(late.code(), Code::DEADLINE_EXCEEDED);
        // The text says "timeout", the clock says otherwise: a dead channel.
        let gone = call(Duration::from_secs(30), |_| -> ttrpc::Result<()> {
            Err(ttrpc::Error::Others(
                "Receive packet from Receiver timeout: channel disconnected".into(),
            ))
        })
        .unwrap_err();
        assert!(matches!(gone, AgentCallError::Transport(_)), "{gone:?}");
        assert!(!gone.is_timeout());
        let agent = AgentCallError::from(ttrpc::Error::RpcStatus(ttrpc::get_status(
            Code::DEADLINE_EXCEEDED,
            "nothing yet",
        )));
        assert!(agent.is_timeout());
        let ok = call(Duration::from_secs(1), |_| Ok(7)).unwrap();
        assert_eq!(ok, 7);
    }
}
