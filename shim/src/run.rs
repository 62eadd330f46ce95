//! `skiff run`: one container in a fresh sandbox, without containerd.
//!
//! The same path a shim takes, minus containerd: the configured sandbox
//! handler starts a sandbox with the rootfs, the agent creates and starts
//! the container, its stdout and stderr stream to the caller's writers, and
//! the sandbox is stopped once the container has exited. The caller gets the
//! container's exit status (128 + signal for a signalled process).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::agent_client::{AgentCallError, AgentClient};
use crate::task::config::Config;
use crate::task::sandbox::{handler_for, Sandbox, SandboxError, SandboxRequest};

/// Where `skiff run` keeps its sandboxes' state.
pub const RUN_STATE_ROOT: &str = "/run/skiff/run";
/// The container's id inside its sandbox.
const CONTAINER_ID: &str = "run";
/// Bound on a `linux` sandbox's agent start.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on stopping the sandbox (the VM's reset included).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of `skiff run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No command was given.
    #[error("no command to run")]
    NoCommand,
    /// The rootfs is not a directory.
    #[error("the rootfs {0} is not a directory")]
    Rootfs(PathBuf),
    /// The sandbox did not start.
    #[error("cannot start the sandbox")]
    Sandbox(#[source] SandboxError),
    /// An agent request failed.
    #[error("{what} failed")]
    Agent {
        /// The request.
        what: &'static str,
        /// The cause.
        #[source]
        source: AgentCallError,
    },
    /// Writing the container's output failed.
    #[error("cannot write the container's output")]
    Output(#[source] std::io::Error),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunRequest<'a> {
    /// The configuration (its `handler` picks the sandbox kind).
    pub config: &'a Config,
    /// The container's root filesystem (a directory).
    pub rootfs: &'a Path,
    /// The command and its arguments.
    pub args: &'a [String],
    /// Extra `NAME=value` environment entries (after a default `PATH`).
    pub env: &'a [String],
    /// The container's hostname.
    pub hostname: &'a str,
}

/// How the container ended, and how long the steps took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOutcome {
    /// The exit status: the code, or 128 + signal number.
    pub status: u32,
    /// Sandbox start (VM boot and agent answer for `vm`).
    pub sandbox_ready: Duration,
    /// Container create to exit.
    pub container: Duration,
}

/// The OCI spec `skiff run` gives the container.
pub fn spec_json(req: &RunRequest<'_>) -> Result<Vec<u8>, RunError> {
    if req.args.is_empty() {
        return Err(RunError::NoCommand);
    }
    let mut spec = oci_spec::runtime::Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(req.args.to_vec()));
    process.set_terminal(Some(false));
    let mut env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        "HOME=/root".to_owned(),
    ];
    env.extend(req.env.iter().cloned());
    process.set_env(Some(env));
    spec.set_process(Some(process));
    if let Some(mut root) = spec.root().clone() {
        root.set_path(req.rootfs.to_owned());
        root.set_readonly(Some(false));
        spec.set_root(Some(root));
    }
    spec.set_hostname(Some(req.hostname.to_owned()));
    // The default spec is a valid value; serializing it cannot fail.
    Ok(serde_json::to_vec(&spec).unwrap_or_default())
}

fn agent_err(what: &'static str) -> impl FnOnce(AgentCallError) -> RunError {
    move |source| RunError::Agent { what, source }
}

/// A fresh state directory name.
fn run_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{nanos:x}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Copies one output stream of the container to `out` until EOF.
fn pump(agent: &AgentClient, stderr: bool, out: &mut (dyn Write + Send)) -> Result<(), RunError> {
    loop {
        let chunk = match agent.read_stream(CONTAINER_ID, "", stderr) {
            Ok(chunk) => chunk,
            Err(err) if err.is_timeout() => continue,
            Err(err) => return Err(agent_err("reading the container's output")(err)),
        };
        if !chunk.data.is_empty() {
            out.write_all(&chunk.data).map_err(RunError::Output)?;
            out.flush().map_err(RunError::Output)?;
        }
        if chunk.eof {
            return Ok(());
        }
    }
}

/// Runs the container described by `req` in a new sandbox, streaming its
/// stdout and stderr to `stdout` and `stderr`.
pub fn run(
    req: &RunRequest<'_>,
    stdout: &mut (dyn Write + Send),
    stderr: &mut (dyn Write + Send),
) -> Result<RunOutcome, RunError> {
    let spec = spec_json(req)?;
    if !req.rootfs.is_dir() {
        return Err(RunError::Rootfs(req.rootfs.to_owned()));
    }
    let id = run_id();
    let state_dir = Path::new(RUN_STATE_ROOT).join(&id);
    let started = Instant::now();
    let sandbox = handler_for(req.config.handler)
        .start(&SandboxRequest {
            id: &id,
            state_dir: &state_dir,
            hostname: req.hostname,
            rootfs: req.rootfs,
            config: req.config,
            ready_timeout: READY_TIMEOUT,
        })
        .map_err(RunError::Sandbox)?;
    let sandbox_ready = started.elapsed();
    log::info!("sandbox ready after {sandbox_ready:?}");
    let result = run_in(sandbox.as_ref(), req, spec, stdout, stderr);
    if let Err(err) = sandbox.stop(STOP_TIMEOUT) {
        log::warn!("stopping the sandbox: {err}");
    }
    result.map(|(status, container)| RunOutcome {
        status,
        sandbox_ready,
        container,
    })
}

fn run_in(
    sandbox: &dyn Sandbox,
    req: &RunRequest<'_>,
    spec: Vec<u8>,
    stdout: &mut (dyn Write + Send),
    stderr: &mut (dyn Write + Send),
) -> Result<(u32, Duration), RunError> {
    let agent = sandbox.agent();
    let rootfs = sandbox.share_path(req.rootfs).map_err(RunError::Sandbox)?;
    let t = Instant::now();
    agent
        .create_container(CONTAINER_ID, spec, &rootfs, false, false)
        .map_err(agent_err("CreateContainer"))?;
    let ran = agent
        .start_container(CONTAINER_ID)
        .map_err(agent_err("StartContainer"))
        .and_then(|()| {
            std::thread::scope(|s| {
                let err_pump = s.spawn(|| pump(agent, true, stderr));
                let out = pump(agent, false, stdout);
                let err = err_pump
                    .join()
                    .unwrap_or_else(|_| Err(RunError::Output(std::io::Error::other("panicked"))));
                out.and(err)
            })
        })
        .and_then(|()| loop {
            match agent.wait_process(CONTAINER_ID, "") {
                Ok(status) => return Ok(status.status),
                Err(err) if err.is_timeout() => continue,
                Err(err) => return Err(agent_err("WaitProcess")(err)),
            }
        });
    let elapsed = t.elapsed();
    if let Err(err) = agent.remove_container(CONTAINER_ID) {
        log::warn!("RemoveContainer: {err}");
    }
    ran.map(|status| (status, elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_has_the_command_env_and_root() {
        let config = Config::default();
        let args = vec!["echo".to_owned(), "hi".to_owned()];
        let env = vec!["A=b".to_owned()];
        let req = RunRequest {
            config: &config,
            rootfs: Path::new("/r"),
            args: &args,
            env: &env,
            hostname: "h",
        };
        let spec: serde_json::Value = serde_json::from_slice(&spec_json(&req).unwrap()).unwrap();
        assert_eq!(spec["process"]["args"], serde_json::json!(["echo", "hi"]));
        assert_eq!(spec["process"]["env"][2], "A=b");
        assert_eq!(spec["root"]["path"], "/r");
        assert_eq!(spec["hostname"], "h");
        let none = RunRequest { args: &[], ..req };
        assert!(matches!(spec_json(&none), Err(RunError::NoCommand)));
    }

    #[test]
    fn missing_rootfs_is_an_error_before_any_sandbox() {
        let config = Config::default();
        let args = vec!["true".to_owned()];
        let req = RunRequest {
            config: &config,
            rootfs: Path::new("/nonexistent/rootfs"),
            args: &args,
            env: &[],
            hostname: "h",
        };
        let err = run(&req, &mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, RunError::Rootfs(_)), "{err}");
        assert!(err.to_string().contains("/nonexistent/rootfs"));
    }
}
