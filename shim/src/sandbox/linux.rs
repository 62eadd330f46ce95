//! The `linux` sandbox handler: `skiff-agent` as a host process.
//!
//! The agent gets a unix socket and a state directory inside the sandbox's
//! state dir; it makes the containers' namespaces and cgroups itself. The
//! handler only spawns it (in its own session, so signals to the shim's
//! process group miss it), waits for Health, and stops it.
//!
//! The agent deliberately outlives a shim killed with SIGKILL: containerd
//! then runs `containerd-shim-skiff-v2 delete`, which calls
//! [`SandboxHandler::cleanup`]. That asks the surviving agent to destroy the
//! sandbox — or, if the agent died too, starts a fresh agent on the same
//! state dir, which force-removes what the old one left — and kills it.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::error::SandboxError;
use super::handler::{Sandbox, SandboxHandler, SandboxRequest};
use super::state_dir::{self, tail};
use crate::agent_client::AgentClient;
use crate::config::Config;
use crate::procfs;
use crate::sync::lock;

/// The agent binary's name.
pub const AGENT_BINARY: &str = "skiff-agent";
const SOCKET_NAME: &str = "agent.sock";
const PID_NAME: &str = "agent.pid";
const LOG_NAME: &str = "agent.log";
const STATE_NAME: &str = "agent";
/// Bound on reaching a surviving agent during cleanup.
const CLEANUP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on a fresh agent's start during cleanup.
const CLEANUP_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `skiff-agent` processes.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxHandler;

/// Finds the agent: `agent_path`, else next to this binary, else on `PATH`.
pub fn find_agent(config: &Config) -> Result<PathBuf, SandboxError> {
    if let Some(path) = &config.agent_path {
        if path.is_file() {
            return Ok(path.clone());
        }
        return Err(SandboxError::AgentNotFound {
            looked: format!("agent_path {}", path.display()),
        });
    }
    let mut looked = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned))
    {
        let candidate = dir.join(AGENT_BINARY);
        if candidate.is_file() {
            return Ok(candidate);
        }
        looked.push(candidate.display().to_string());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(AGENT_BINARY);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        looked.push("$PATH".into());
    }
    Err(SandboxError::AgentNotFound {
        looked: looked.join(", "),
    })
}

/// A running agent process.
#[derive(Debug)]
struct AgentProcess {
    child: Child,
    client: AgentClient,
}

/// Opens (or creates) the agent's log for appending, mode 0600 whatever
/// the umask.
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(state_dir::STATE_FILE_MODE)
        .open(path)?;
    state_dir::make_private(&log)?;
    Ok(log)
}

/// Spawns the agent on `state_dir` and waits until it answers.
fn spawn_agent(
    agent_path: &Path,
    state_dir: &Path,
    log_level: &str,
    timeout: Duration,
) -> Result<AgentProcess, SandboxError> {
    let socket = state_dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&socket);
    let log = open_log(&state_dir.join(LOG_NAME))
        .map_err(|e| SandboxError::io("cannot create the agent log", e))?;
    let mut cmd = Command::new(agent_path);
    cmd.arg("--listen")
        .arg(format!("unix://{}", socket.display()))
        .arg("--state-dir")
        .arg(state_dir.join(STATE_NAME))
        .arg("--log-level")
        .arg(log_level)
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| SandboxError::io("cannot dup the agent log", e))?,
        )
        .stderr(log);
    // SAFETY: the closure only calls setsid(2), which is async-signal-safe,
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(|source| SandboxError::Spawn {
        path: agent_path.to_owned(),
        source,
    })?;
    let _ = std::fs::write(state_dir.join(PID_NAME), child.id().to_string());
    let deadline = Instant::now() + timeout;
    let not_ready = |child: &mut Child, what: String| {
        let _ = child.kill();
        let _ = child.wait();
        SandboxError::NotReady {
            timeout,
            detail: format!(
                "{what}; agent log: {}",
                tail(&state_dir.join(LOG_NAME), 2048)
            ),
        }
    };
    // The agent renames its socket into place once it listens.
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(SandboxError::NotReady {
                timeout,
                detail: format!(
                    "the agent exited with {status}; agent log: {}",
                    tail(&state_dir.join(LOG_NAME), 2048)
                ),
            });
        }
        if Instant::now() >= deadline {
            return Err(not_ready(&mut child, "no socket".into()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let left = deadline.saturating_duration_since(Instant::now());
    match AgentClient::connect(&format!("unix://{}", socket.display()), left) {
        Ok(client) => Ok(AgentProcess { child, client }),
        Err(err) => Err(not_ready(&mut child, format!("Health failed: {err}"))),
    }
}

/// The pid in `state_dir/agent.pid` if that process still runs the agent.
fn live_agent_pid(state_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(state_dir.join(PID_NAME))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    procfs::runs(pid, AGENT_BINARY).then_some(pid)
}

fn kill_and_wait(pid: i32, timeout: Duration) {
    // SAFETY: kill(2) on a pid we just checked runs the agent.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + timeout;
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        // Not our child (its shim died), so init reaps it; or our child,
        // reaped by the caller's `Child::wait`.
        if procfs::has_exited(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl SandboxHandler for LinuxHandler {
    fn start(&self, req: &SandboxRequest<'_>) -> Result<Box<dyn Sandbox>, SandboxError> {
        let agent_path = find_agent(req.config)?;
        state_dir::create(req.state_dir)?;
        let agent = spawn_agent(
            &agent_path,
            req.state_dir,
            req.config.log_level.name(),
            req.ready_timeout,
        )?;
        let sandbox = LinuxSandbox {
            state_dir: req.state_dir.to_owned(),
            agent_path: agent_path.clone(),
            log_level: req.config.log_level.name(),
            client: agent.client.clone(),
            child: Mutex::new(Some(agent.child)),
        };
        if let Err(err) = sandbox.client.create_sandbox(req.hostname, None) {
            let _ = sandbox.stop(Duration::from_secs(5));
            return Err(SandboxError::Agent(err));
        }
        log::info!(
            "sandbox {} started: agent {} pid {}",
            req.id,
            agent_path.display(),
            sandbox.pid().unwrap_or(0)
        );
        Ok(Box::new(sandbox))
    }

    fn cleanup(&self, state_dir: &Path, config: &Config) -> Result<(), SandboxError> {
        if !state_dir.exists() {
            return Ok(());
        }
        let socket = format!("unix://{}", state_dir.join(SOCKET_NAME).display());
        let mut destroyed = false;
        if let Some(pid) = live_agent_pid(state_dir) {
            if let Ok(client) = AgentClient::connect(&socket, CLEANUP_CONNECT_TIMEOUT) {
                destroyed = client.destroy_sandbox().is_ok();
            }
            kill_and_wait(pid, Duration::from_secs(5));
        }
        if !destroyed && has_leftovers(state_dir) {
            remove_leftovers(&find_agent(config)?, state_dir, config.log_level.name())?;
        }
        state_dir::remove(state_dir)
    }
}

/// Whether a dead agent left container state on `state_dir`.
fn has_leftovers(state_dir: &Path) -> bool {
    state_dir.join(STATE_NAME).exists()
}

/// Removes the containers a dead agent left on `state_dir` (they are not
/// its threads, so they outlive it): a fresh agent on the old state
/// force-removes them, processes and cgroups, and is killed.
fn remove_leftovers(
    agent_path: &Path,
    state_dir: &Path,
    log_level: &str,
) -> Result<(), SandboxError> {
    if !has_leftovers(state_dir) {
        return Ok(());
    }
    let mut agent = spawn_agent(agent_path, state_dir, log_level, CLEANUP_START_TIMEOUT)?;
    let _ = agent.client.destroy_sandbox();
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    Ok(())
}

/// A running agent process and its client.
#[derive(Debug)]
pub struct LinuxSandbox {
    state_dir: PathBuf,
    agent_path: PathBuf,
    log_level: &'static str,
    client: AgentClient,
    child: Mutex<Option<Child>>,
}

impl LinuxSandbox {
    fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }
}

impl Sandbox for LinuxSandbox {
    fn agent(&self) -> &AgentClient {
        &self.client
    }

    fn share_path(&self, host: &Path) -> Result<String, SandboxError> {
        // Same host, same mount namespace: the agent sees the path as is.
        Ok(host.display().to_string())
    }

    fn ended(&self) -> Option<String> {
        let status = {
            let mut child = lock(&self.child);
            let status = child.as_mut()?.try_wait().ok()??;
            // Reaped: the sandbox is over, and `stop` has no agent to stop.
            *child = None;
            status
        };
        if let Err(err) = remove_leftovers(&self.agent_path, &self.state_dir, self.log_level) {
            log::warn!("cannot remove the containers the dead agent left: {err}");
        }
        Some(format!("the agent exited ({status})"))
    }

    fn stop(&self, timeout: Duration) -> Result<(), SandboxError> {
        let child = lock(&self.child).take();
        let Some(mut child) = child else {
            return Ok(());
        };
        if !timeout.is_zero() {
            if let Err(err) = self.client.destroy_sandbox() {
                log::warn!("agent DestroySandbox failed: {err}");
            }
        }
        // Our own child: SIGKILL and a blocking waitpid, no /proc polling.
        // SIGKILL cannot be caught, so the wait ends unless the agent is
        // stuck in the kernel, which no timeout here would fix (the old
        // poll-then-wait blocked in that case too).
        let _ = child.kill();
        let _ = child.wait();
        state_dir::remove(&self.state_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_agent_is_a_clear_error() {
        let config = Config {
            agent_path: Some("/nonexistent/skiff-agent".into()),
            ..Config::default()
        };
        let err = find_agent(&config).unwrap_err().to_string();
        assert!(err.contains("skiff-agent binary was not found"), "{err}");
        assert!(err.contains("/nonexistent/skiff-agent"), "{err}");
    }

    #[test]
    fn the_agent_log_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let fresh = dir.path().join("fresh.log");
        drop(open_log(&fresh).unwrap());
        assert_eq!(mode(&fresh), 0o600);
        // One left world-readable by an older shim is narrowed, and kept.
        let old = dir.path().join("old.log");
        std::fs::write(&old, "before\n").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(open_log(&old).unwrap());
        assert_eq!(mode(&old), 0o600);
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "before\n");
    }

    #[test]
    fn cleanup_of_nothing_is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        LinuxHandler.cleanup(&gone, &Config::default()).unwrap();
        // A state dir without agent state is just removed.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        LinuxHandler.cleanup(&empty, &Config::default()).unwrap();
        assert!(!empty.exists());
    }
}
