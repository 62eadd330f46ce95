//! The spawner: a single-threaded helper process, forked when the agent
//! starts (before any thread exists), that makes the libcontainer calls which
//! fork — creating a container and exec'ing into one.
//!
//! Why: libcontainer clones its helper processes with raw `clone3` and runs
//! Rust code in them. In the multi-threaded agent a lock held by another
//! thread at that instant (a malloc arena, the dynamic loader) would be held
//! forever in the child. In the single-threaded spawner that cannot happen.
//! libcontainer also changes its calling process (oom_score_adj, dumpable,
//! the working directory while connecting the console socket); here those
//! changes stay in the spawner.
//!
//! The spawner calls libcontainer with `as_sibling(true)`: the intermediate
//! process is cloned with `CLONE_PARENT`, so it — and the container process it
//! clones as its own sibling — are children of the *agent*, whose reaper
//! collects their exit statuses.
//!
//! Protocol: one `SOCK_SEQPACKET` message per request (JSON, with the stdio
//! fds attached as `SCM_RIGHTS`), one JSON message per reply.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use skiff_agent_proto::error_chain;

use crate::reaper::lock;

/// Largest request or reply, bytes.
const MESSAGE_MAX: usize = 64 * 1024;

/// Errors of the spawner channel.
#[derive(Debug, thiserror::Error)]
pub enum SpawnerError {
    /// The spawner must be forked while the process has one thread.
    #[error("the spawner must be started before any thread (this process has {0} threads)")]
    NotSingleThreaded(usize),
    /// socketpair or fork failed.
    #[error("cannot start the spawner process")]
    Start(#[source] nix::Error),
    /// Talking to the spawner failed (it may have died).
    #[error("the spawner process is unreachable")]
    Channel(#[source] nix::Error),
    /// The spawner's reply was not understood.
    #[error("the spawner sent a malformed reply: {0}")]
    Malformed(String),
}

/// What to create.
#[derive(Debug, Serialize, Deserialize)]
pub enum SpawnKind {
    /// A new container from the bundle.
    Init {
        /// The bundle directory.
        bundle: PathBuf,
    },
    /// A process in a running container.
    Exec {
        /// The OCI process JSON file.
        process: PathBuf,
    },
}

/// A spawn request.
#[derive(Debug, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// The container id.
    pub id: String,
    /// libcontainer's state root.
    pub root: PathBuf,
    /// Init or exec.
    pub kind: SpawnKind,
    /// The console socket to hand a pty master to, for terminal processes.
    pub console_socket: Option<PathBuf>,
}

/// The spawner's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum SpawnReply {
    /// The new process's pid.
    Spawned(i32),
    /// The container's state forbids the operation.
    IncorrectStatus(String),
    /// libcontainer failed; its error chain.
    Failed(String),
}

/// The agent's handle on the spawner process.
#[derive(Debug)]
pub struct Spawner {
    pid: i32,
    channel: Mutex<OwnedFd>,
}

impl Spawner {
    /// Forks the spawner. Fails unless the calling process has exactly one
    /// thread, so call it first thing in `main`.
    pub fn start() -> Result<Self, SpawnerError> {
        let threads = std::fs::read_dir("/proc/self/task")
            .map(|d| d.count())
            .unwrap_or(0);
        if threads != 1 {
            return Err(SpawnerError::NotSingleThreaded(threads));
        }
        let (agent_end, spawner_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(SpawnerError::Start)?;
        // SAFETY: the process has one thread (checked above), so the child
        // starts with a consistent copy of every lock and allocator state.
        match unsafe { nix::unistd::fork() }.map_err(SpawnerError::Start)? {
            nix::unistd::ForkResult::Child => {
                drop(agent_end);
                // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory of ours.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
                // The Rust runtime ignores SIGPIPE, and an ignored signal stays
                // ignored across exec: without this, every container process
                // would start with SIGPIPE ignored (`yes | head` would never end).
                // SAFETY: restoring the default disposition installs no handler
                // and touches no memory of ours.
                unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
                serve(spawner_end);
                std::process::exit(0);
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(spawner_end);
                Ok(Self {
                    pid: child.as_raw(),
                    channel: Mutex::new(agent_end),
                })
            }
        }
    }

    /// The spawner's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Asks the spawner to create `request` with the given stdio fds (stdin,
    /// stdout, stderr; none for a terminal). Serialised: one spawn at a time.
    pub fn spawn(
        &self,
        request: &SpawnRequest,
        stdio: Option<[OwnedFd; 3]>,
    ) -> Result<SpawnReply, SpawnerError> {
        let body =
            serde_json::to_vec(request).map_err(|e| SpawnerError::Malformed(e.to_string()))?;
        let channel = lock(&self.channel);
        let fds: Vec<RawFd> = stdio
            .as_ref()
            .map(|fds| fds.iter().map(|fd| fd.as_raw_fd()).collect())
            .unwrap_or_default();
        let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&fds)]
        };
        sendmsg::<()>(
            channel.as_raw_fd(),
            &[IoSlice::new(&body)],
            &cmsgs,
            MsgFlags::empty(),
            None,
        )
        .map_err(SpawnerError::Channel)?;
        // Our copies of the child's stdio ends close now.
        drop(stdio);
        let mut buf = vec![0u8; MESSAGE_MAX];
        let len = loop {
            match nix::sys::socket::recv(channel.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) => return Err(SpawnerError::Channel(nix::Error::EPIPE)),
                Ok(len) => break len,
                Err(nix::Error::EINTR) => continue,
                Err(err) => return Err(SpawnerError::Channel(err)),
            }
        };
        serde_json::from_slice(&buf[..len]).map_err(|e| SpawnerError::Malformed(e.to_string()))
    }
}

/// The spawner's loop: one request at a time until the agent goes away.
fn serve(channel: OwnedFd) {
    let mut buf = vec![0u8; MESSAGE_MAX];
    loop {
        let (len, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!([RawFd; 3]);
            let msg = match recvmsg::<()>(
                channel.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => msg,
                Err(nix::Error::EINTR) => continue,
                Err(_) => return,
            };
            if msg.bytes == 0 {
                return;
            }
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for message in cmsgs {
                    if let ControlMessageOwned::ScmRights(received) = message {
                        // SAFETY: SCM_RIGHTS just installed these fds in our
                        // table; nothing else owns them.
                        fds.extend(
                            received
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
            }
            (msg.bytes, fds)
        };
        let reply = match serde_json::from_slice::<SpawnRequest>(&buf[..len]) {
            Ok(request) => spawn_here(&request, fds),
            Err(err) => SpawnReply::Failed(format!("malformed spawn request: {err}")),
        };
        let body = serde_json::to_vec(&reply).unwrap_or_default();
        if nix::sys::socket::send(channel.as_raw_fd(), &body, MsgFlags::empty()).is_err() {
            return;
        }
    }
}

fn spawn_here(request: &SpawnRequest, fds: Vec<OwnedFd>) -> SpawnReply {
    match try_spawn_here(request, fds) {
        Ok(pid) => SpawnReply::Spawned(pid),
        Err(LibcontainerError::IncorrectStatus(status)) => {
            SpawnReply::IncorrectStatus(status.to_string())
        }
        Err(err) => SpawnReply::Failed(error_chain(&err)),
    }
}

fn try_spawn_here(request: &SpawnRequest, fds: Vec<OwnedFd>) -> Result<i32, LibcontainerError> {
    let mut builder = ContainerBuilder::new(request.id.clone(), SyscallType::default())
        .with_root_path(&request.root)?
        .with_console_socket(request.console_socket.as_ref());
    let mut fds = fds.into_iter();
    if let (Some(stdin), Some(stdout), Some(stderr)) = (fds.next(), fds.next(), fds.next()) {
        builder = builder
            .with_stdin(stdin)
            .with_stdout(stdout)
            .with_stderr(stderr);
    }
    match &request.kind {
        SpawnKind::Init { bundle } => {
            let container = builder
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .as_sibling(true)
                .build()?;
            Ok(container.pid().map(|p| p.as_raw()).unwrap_or(0))
        }
        SpawnKind::Exec { process } => {
            let pid = builder
                .as_tenant()
                .with_detach(true)
                .as_sibling(true)
                .with_process(Some(process))
                .build()?;
            Ok(pid.as_raw())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_multi_threaded_parent() {
        // The test harness runs this on a worker thread: more than one thread.
        let err = Spawner::start().unwrap_err();
        assert!(
            matches!(err, SpawnerError::NotSingleThreaded(n) if n > 1),
            "{err}"
        );
    }

    #[test]
    fn requests_round_trip_as_json() {
        let request = SpawnRequest {
            id: "c1".into(),
            root: "/run/skiff/containers".into(),
            kind: SpawnKind::Exec {
                process: "/b/exec-e.json".into(),
            },
            console_socket: None,
        };
        let json = serde_json::to_vec(&request).unwrap();
        let back: SpawnRequest = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.id, "c1");
        assert!(matches!(back.kind, SpawnKind::Exec { .. }));
    }
}
