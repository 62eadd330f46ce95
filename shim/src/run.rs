//! `skiff run`: one container in a fresh sandbox, without containerd.
//!
//! The same path a shim takes, minus containerd: the configured sandbox
//! handler starts a sandbox with the rootfs (a directory, or an OCI image
//! unpacked into the run's state directory and removed with it), the agent
//! creates and starts the container, its stdout and stderr stream to the
//! caller's writers, and the sandbox is stopped once the container has
//! exited. The caller gets the container's exit status (128 + signal for a
//! signalled process).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::agent_client::{AgentCallError, AgentClient};
use crate::config::{Config, HandlerKind};
use crate::image::{self, ImageError, ImageProcess};
use crate::sandbox::{handler_for, PodSize, Sandbox, SandboxError, SandboxRequest};
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType};

/// Where `skiff run` keeps its sandboxes' state.
pub const RUN_STATE_ROOT: &str = "/run/skiff/run";
/// The container's id inside its sandbox.
const CONTAINER_ID: &str = "run";
/// Where an `--image` rootfs is unpacked, in the run's state directory.
const IMAGE_ROOTFS: &str = "image-rootfs";
/// The environment every container starts from.
const DEFAULT_ENV: [&str; 2] = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
];
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
    /// The state directory could not be made.
    #[error("cannot create {0}")]
    StateDir(PathBuf, #[source] io::Error),
    /// The image could not be unpacked.
    #[error("cannot unpack the image {0}")]
    Image(String, #[source] ImageError),
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

/// Where the container's root filesystem comes from.
#[derive(Debug, Clone, Copy)]
pub enum Root<'a> {
    /// A directory, used in place.
    Dir(&'a Path),
    /// An OCI image layout, `PATH[:TAG]` (see [`crate::image`]), unpacked
    /// into the run's state directory for the run.
    Image(&'a str),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunRequest<'a> {
    /// The configuration (its `handler` picks the sandbox kind).
    pub config: &'a Config,
    /// The container's root filesystem.
    pub root: Root<'a>,
    /// The command and its arguments; with an image, they replace its
    /// `Cmd` (after its `Entrypoint`), and may be empty to run its own.
    pub args: &'a [String],
    /// Extra `NAME=value` environment entries (over a default `PATH` and
    /// `HOME` and the image's `Env`).
    pub env: &'a [String],
    /// The container's hostname.
    pub hostname: &'a str,
    /// A network namespace for the container (`ip netns` style path): the
    /// `linux` handler's container joins it; the `vm` handler wires the
    /// VM's NIC to it and the container stays in the guest's network.
    /// `None`: a network namespace of its own, loopback only.
    pub netns: Option<&'a Path>,
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

/// Adds `NAME=value` entries to `env`, each replacing an entry of the
/// same name.
fn merge_env<'e>(env: &mut Vec<String>, entries: impl IntoIterator<Item = &'e String>) {
    for entry in entries {
        let name = entry.split('=').next();
        match env.iter_mut().find(|e| e.split('=').next() == name) {
            Some(slot) => slot.clone_from(entry),
            None => env.push(entry.clone()),
        }
    }
}

/// The OCI spec `skiff run` gives the container whose root is `rootfs`;
/// `image` is what its image's config says (the default for a directory).
pub fn spec_json(
    req: &RunRequest<'_>,
    rootfs: &Path,
    image: &ImageProcess,
) -> Result<Vec<u8>, RunError> {
    let args = image.args(req.args);
    if args.is_empty() {
        return Err(RunError::NoCommand);
    }
    let mut spec = oci_spec::runtime::Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(args));
    process.set_terminal(Some(false));
    let mut env = DEFAULT_ENV.map(str::to_owned).to_vec();
    merge_env(&mut env, &image.env);
    merge_env(&mut env, req.env);
    process.set_env(Some(env));
    if let Some(dir) = &image.working_dir {
        process.set_cwd(Path::new("/").join(dir));
    }
    if let Some((uid, gid)) = image.user {
        let mut user = process.user().clone();
        user.set_uid(uid);
        user.set_gid(gid);
        process.set_user(user);
    }
    spec.set_process(Some(process));
    if let Some(mut root) = spec.root().clone() {
        root.set_path(rootfs.to_owned());
        root.set_readonly(Some(false));
        spec.set_root(Some(root));
    }
    spec.set_hostname(Some(req.hostname.to_owned()));
    if let Some(netns) = req.netns {
        join_network(&mut spec, netns, req.config.handler == HandlerKind::Vm);
    }
    // The default spec is a valid value; serializing it cannot fail.
    Ok(serde_json::to_vec(&spec).unwrap_or_default())
}

/// Points the spec's network namespace at `netns`, or, in a VM (`in_guest`),
/// removes it: the container then stays in the guest's network, which the
/// sandbox wired to `netns`.
fn join_network(spec: &mut oci_spec::runtime::Spec, netns: &Path, in_guest: bool) {
    let Some(mut linux) = spec.linux().clone() else {
        return;
    };
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
    if !in_guest {
        let mut ns = LinuxNamespace::default();
        ns.set_typ(LinuxNamespaceType::Network);
        ns.set_path(Some(netns.to_owned()));
        namespaces.push(ns);
    }
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
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

/// An image rootfs in a run's state directory: removed on drop, with the
/// state directory if that leaves it empty (the sandbox's stop removes
/// both when it got that far).
struct UnpackedRootfs<'a> {
    state_dir: &'a Path,
    rootfs: PathBuf,
}

impl Drop for UnpackedRootfs<'_> {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.rootfs) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                log::warn!("cannot remove {}: {err}", self.rootfs.display());
            }
            _ => {}
        }
        let _ = std::fs::remove_dir(self.state_dir);
    }
}

/// Runs the container described by `req` in a new sandbox, streaming its
/// stdout and stderr to `stdout` and `stderr`.
pub fn run(
    req: &RunRequest<'_>,
    stdout: &mut (dyn Write + Send),
    stderr: &mut (dyn Write + Send),
) -> Result<RunOutcome, RunError> {
    let id = run_id();
    let state_dir = Path::new(RUN_STATE_ROOT).join(&id);
    let (rootfs, spec, _unpacked) = match req.root {
        Root::Dir(dir) => {
            let spec = spec_json(req, dir, &ImageProcess::default())?;
            if !dir.is_dir() {
                return Err(RunError::Rootfs(dir.to_owned()));
            }
            (dir.to_owned(), spec, None)
        }
        Root::Image(reference) => {
            std::fs::create_dir_all(&state_dir)
                .map_err(|e| RunError::StateDir(state_dir.clone(), e))?;
            let unpacked = UnpackedRootfs {
                state_dir: &state_dir,
                rootfs: state_dir.join(IMAGE_ROOTFS),
            };
            let t = Instant::now();
            let process = image::unpack(reference, &unpacked.rootfs)
                .map_err(|e| RunError::Image(reference.to_owned(), e))?;
            log::info!("image {reference} unpacked in {:?}", t.elapsed());
            let spec = spec_json(req, &unpacked.rootfs, &process)?;
            (unpacked.rootfs.clone(), spec, Some(unpacked))
        }
    };
    let started = Instant::now();
    let sandbox = handler_for(req.config)
        .start(&SandboxRequest {
            id: &id,
            state_dir: &state_dir,
            hostname: req.hostname,
            rootfs: &rootfs,
            // `skiff run` is no pod: its VMM's cgroup goes under the CLI's.
            cgroups_path: None,
            netns: req.netns,
            // `skiff run` sizes its VM from the config alone.
            size: PodSize::default(),
            config: req.config,
            ready_timeout: READY_TIMEOUT,
        })
        .map_err(RunError::Sandbox)?;
    let sandbox_ready = started.elapsed();
    log::info!("sandbox ready after {sandbox_ready:?}");
    let result = run_in(sandbox.as_ref(), &rootfs, spec, stdout, stderr);
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
    rootfs: &Path,
    spec: Vec<u8>,
    stdout: &mut (dyn Write + Send),
    stderr: &mut (dyn Write + Send),
) -> Result<(u32, Duration), RunError> {
    let agent = sandbox.agent();
    let rootfs = sandbox.share_path(rootfs).map_err(RunError::Sandbox)?;
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
            root: Root::Dir(Path::new("/r")),
            args: &args,
            env: &env,
            hostname: "h",
            netns: None,
        };
        let dir = ImageProcess::default();
        let spec = spec_json(&req, Path::new("/r"), &dir).unwrap();
        let spec: serde_json::Value = serde_json::from_slice(&spec).unwrap();
        assert_eq!(spec["process"]["args"], serde_json::json!(["echo", "hi"]));
        assert_eq!(spec["process"]["env"][2], "A=b");
        assert_eq!(spec["process"]["cwd"], "/");
        assert_eq!(spec["process"]["user"]["uid"], 0);
        assert_eq!(spec["root"]["path"], "/r");
        assert_eq!(spec["hostname"], "h");
        let none = RunRequest { args: &[], ..req };
        assert!(matches!(
            spec_json(&none, Path::new("/r"), &dir),
            Err(RunError::NoCommand)
        ));
    }

    #[test]
    fn a_netns_is_joined_on_the_host_and_left_to_the_sandbox_in_a_vm() {
        let network = |config: &Config, netns: Option<&Path>| {
            let args = vec!["true".to_owned()];
            let req = RunRequest {
                config,
                root: Root::Dir(Path::new("/r")),
                args: &args,
                env: &[],
                hostname: "h",
                netns,
            };
            let spec = spec_json(&req, Path::new("/r"), &ImageProcess::default()).unwrap();
            let spec: serde_json::Value = serde_json::from_slice(&spec).unwrap();
            let namespaces = spec["linux"]["namespaces"].as_array().unwrap().clone();
            let network: Vec<_> = namespaces
                .into_iter()
                .filter(|ns| ns["type"] == "network")
                .collect();
            network
        };
        let linux = Config::default();
        let vm = Config {
            handler: HandlerKind::Vm,
            ..Config::default()
        };
        let ns = Path::new("/var/run/netns/pod");
        // No netns: a namespace of its own, either way.
        assert_eq!(
            network(&linux, None),
            [serde_json::json!({"type": "network"})]
        );
        assert_eq!(network(&vm, None), [serde_json::json!({"type": "network"})]);
        assert_eq!(
            network(&linux, Some(ns)),
            [serde_json::json!({"type": "network", "path": "/var/run/netns/pod"})]
        );
        assert!(network(&vm, Some(ns)).is_empty());
    }

    #[test]
    fn an_images_config_shapes_the_spec() {
        let config = Config::default();
        let strings = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let image = ImageProcess {
            entrypoint: strings(&["/bin/app"]),
            cmd: strings(&["serve"]),
            env: strings(&["PATH=/app/bin", "MODE=image", "KEEP=1"]),
            working_dir: Some("srv".to_owned()),
            user: Some((1000, 50)),
        };
        let env = strings(&["MODE=cli"]);
        let req = RunRequest {
            config: &config,
            root: Root::Image("unused"),
            args: &[],
            env: &env,
            hostname: "h",
            netns: None,
        };
        let spec = spec_json(&req, Path::new("/u"), &image).unwrap();
        let spec: serde_json::Value = serde_json::from_slice(&spec).unwrap();
        let process = &spec["process"];
        assert_eq!(process["args"], serde_json::json!(["/bin/app", "serve"]));
        assert_eq!(
            process["env"],
            serde_json::json!(["PATH=/app/bin", "HOME=/root", "MODE=cli", "KEEP=1"])
        );
        assert_eq!(process["cwd"], "/srv");
        assert_eq!(process["user"]["uid"], 1000);
        assert_eq!(process["user"]["gid"], 50);
        assert_eq!(spec["root"]["path"], "/u");

        let args = strings(&["debug", "-v"]);
        let req = RunRequest { args: &args, ..req };
        let spec = spec_json(&req, Path::new("/u"), &image).unwrap();
        let spec: serde_json::Value = serde_json::from_slice(&spec).unwrap();
        assert_eq!(
            spec["process"]["args"],
            serde_json::json!(["/bin/app", "debug", "-v"])
        );
        let bare = ImageProcess::default();
        let req = RunRequest { args: &[], ..req };
        assert!(matches!(
            spec_json(&req, Path::new("/u"), &bare),
            Err(RunError::NoCommand)
        ));
    }

    #[test]
    fn an_unpacked_rootfs_goes_with_its_state_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let state_dir = tmp.path().join("id");
        let rootfs = state_dir.join(IMAGE_ROOTFS);
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::write(rootfs.join("bin/sh"), "x").unwrap();
        drop(UnpackedRootfs {
            state_dir: &state_dir,
            rootfs: rootfs.clone(),
        });
        assert!(!state_dir.exists());

        // A state dir with other content stays (the sandbox removes it).
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::write(state_dir.join("agent.log"), "x").unwrap();
        drop(UnpackedRootfs {
            state_dir: &state_dir,
            rootfs: rootfs.clone(),
        });
        assert!(!rootfs.exists());
        assert!(state_dir.join("agent.log").exists());
    }

    #[test]
    fn missing_rootfs_is_an_error_before_any_sandbox() {
        let config = Config::default();
        let args = vec!["true".to_owned()];
        let req = RunRequest {
            config: &config,
            root: Root::Dir(Path::new("/nonexistent/rootfs")),
            args: &args,
            env: &[],
            hostname: "h",
            netns: None,
        };
        let err = run(&req, &mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, RunError::Rootfs(_)), "{err}");
        assert!(err.to_string().contains("/nonexistent/rootfs"));
    }
}
