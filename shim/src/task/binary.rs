//! The shim v2 binary protocol of `containerd-shim-skiff-v2`:
//!
//! - `start`: containerd runs it in the bundle with `-namespace -id
//!   -address -publish-binary` and `TTRPC_ADDRESS`. It checks the config,
//!   binds the shim socket, spawns the daemon (`serve`, the socket as fd 3,
//!   its own session, stdio on /dev/null), writes `address` and `shim.pid`
//!   into the bundle and prints only the address. A container whose spec
//!   names a group (`io.kubernetes.cri.sandbox-id` or
//!   `io.containerd.runc.v2.group`) whose shim is up gets that shim's
//!   address instead.
//! - `delete -bundle <dir>`: run after the shim went away; cleans up what a
//!   dead shim left (sandbox, mounts, socket, state) and prints a protobuf
//!   `DeleteResponse` (137, now).
//! - `serve` (internal): the daemon; serves the Task service under both
//!   `containerd.task.v2.Task` and `containerd.task.v3.Task` until Shutdown.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::{Message, MessageField};
use sha2::{Digest, Sha256};

use crate::config::{config_path_from_options, Config, ConfigError};
use crate::procfs;
use crate::sandbox::linux::find_agent;
use crate::sandbox::{handler_for, SandboxError};
use crate::task::error::error_chain;
use crate::task::events::{timestamp, Publisher};
use crate::task::logger::FifoLogger;
use crate::task::rootfs;
use crate::task::service::{ShimInfo, TaskService};
use crate::task::spec::{read_spec, sandbox_id, SpecError};

/// This binary's name (to recognize a live shim by its pid).
const SHIM_BINARY: &str = "containerd-shim-skiff-v2";
/// How long `delete` waits for an exiting shim.
const SHIM_EXIT_WAIT: Duration = Duration::from_secs(2);
/// Where containerd 1.6 keeps shim sockets.
pub const SOCKET_DIR: &str = "/run/containerd/s";
/// Where skiff keeps per-sandbox state (agent socket, agent state).
pub const STATE_ROOT: &str = "/run/skiff";
/// The bundle file naming the sandbox state dir (for `delete`).
pub const STATE_FILE: &str = "skiff-state";
/// The state-dir file recording which config file the shim uses.
const CONFIG_FILE: &str = "config-path";
/// Environment carrying the resolved config path to the daemon.
const DAEMON_CONFIG_ENV: &str = "SKIFF_SHIM_CONFIG";
/// Environment carrying the sandbox id to the daemon.
const DAEMON_SANDBOX_ENV: &str = "SKIFF_SHIM_SANDBOX";
/// The listening socket's fd in the daemon.
const LISTENER_FD: i32 = 3;
/// Idle ttrpc handler threads per connection: fewer than `MIN` idle starts
/// more, up to `DEFAULT`; more than `MAX` idle ones exit.
const TTRPC_IDLE_MIN: usize = 1;
const TTRPC_IDLE_DEFAULT: usize = 2;
const TTRPC_IDLE_MAX: usize = 3;
/// Errors of the shim's command line actions.
#[derive(Debug, thiserror::Error)]
pub enum ShimCommandError {
    /// A flag containerd does not pass.
    #[error("unknown flag -{0}")]
    UnknownFlag(String),
    /// A flag without its value.
    #[error("flag -{0} needs a value")]
    MissingValue(String),
    /// A second positional argument.
    #[error("unexpected argument {0:?}")]
    UnexpectedArgument(String),
    /// No action given.
    #[error("no action; expected start, delete (containerd runs these)")]
    NoAction,
    /// An action this binary does not have.
    #[error("unknown action {0:?}")]
    UnknownAction(String),
    /// `start` without `-namespace` or `-id`.
    #[error("-namespace and -id are required")]
    MissingIds,
    /// The skiff config (or containerd's options naming it) is bad.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The sandbox cannot run here (e.g. no agent binary).
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The bundle's spec is unreadable or malformed.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Another shim serves the container.
    #[error("a shim for {id:?} already listens on {address}")]
    AlreadyServing {
        /// The container.
        id: String,
        /// The live shim's address.
        address: String,
    },
    /// The ttrpc server failed.
    #[error("cannot serve")]
    Serve(#[source] ttrpc::Error),
    /// The DeleteResponse could not be encoded.
    #[error("cannot encode the response")]
    Encode(#[source] protobuf::Error),
    /// Host I/O failed.
    #[error("{context}")]
    Io {
        /// What the shim was doing.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Wraps an I/O error with what the shim was doing.
fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimCommandError {
    let context = context.into();
    move |source| ShimCommandError::Io { context, source }
}

type CommandResult<T> = Result<T, ShimCommandError>;

/// The command line containerd uses (Go `flag` style: `-name value`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Args {
    /// `-namespace`.
    pub namespace: String,
    /// `-id`.
    pub id: String,
    /// `-address` (containerd's gRPC socket).
    pub address: String,
    /// `-publish-binary`.
    pub publish_binary: String,
    /// `-bundle` (delete).
    pub bundle: Option<PathBuf>,
    /// `-debug`.
    pub debug: bool,
    /// `-v`: print the version.
    pub version: bool,
    /// The action: `start`, `delete`, `serve`.
    pub action: String,
}

/// Parses Go-style flags (`-flag value`, `-flag=value`, `--flag`).
pub fn parse_args(args: &[String]) -> CommandResult<Args> {
    let mut out = Args::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if !arg.starts_with('-') {
            if !out.action.is_empty() {
                return Err(ShimCommandError::UnexpectedArgument(arg.clone()));
            }
            out.action = arg.clone();
            continue;
        }
        let flag = arg.trim_start_matches('-');
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (flag, None),
        };
        match name {
            "debug" => out.debug = inline.as_deref() != Some("false"),
            "v" | "version" => out.version = true,
            "namespace" | "id" | "address" | "publish-binary" | "bundle" | "socket" => {
                let value = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| ShimCommandError::MissingValue(name.to_owned()))?,
                };
                match name {
                    "namespace" => out.namespace = value,
                    "id" => out.id = value,
                    "address" => out.address = value,
                    "publish-binary" => out.publish_binary = value,
                    "bundle" => out.bundle = Some(PathBuf::from(value)),
                    _ => {}
                }
            }
            other => return Err(ShimCommandError::UnknownFlag(other.to_owned())),
        }
    }
    Ok(out)
}

/// The hash naming a sandbox's socket and state dir: distinct per
/// containerd (two containerds share `/run/containerd/s`), namespace and
/// sandbox.
pub fn sandbox_hash(address: &str, namespace: &str, sandbox: &str) -> String {
    let mut h = Sha256::new();
    h.update(address.as_bytes());
    h.update(b"\0skiff\0");
    h.update(namespace.as_bytes());
    h.update(b"\0");
    h.update(sandbox.as_bytes());
    h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs the binary with `argv` (without argv[0]).
pub fn main(argv: Vec<OsString>) -> ExitCode {
    let argv: Vec<String> = argv
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("containerd-shim-skiff-v2: {e}");
            return ExitCode::from(2);
        }
    };
    if args.version {
        println!("containerd-shim-skiff-v2 {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let result = match args.action.as_str() {
        "start" => start(&args),
        "delete" => delete(&args),
        "serve" => serve(&args),
        "" => Err(ShimCommandError::NoAction),
        other => Err(ShimCommandError::UnknownAction(other.to_owned())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "containerd-shim-skiff-v2 {}: {}",
                args.action,
                error_chain(&e)
            );
            ExitCode::FAILURE
        }
    }
}

fn socket_is_live(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

fn start(args: &Args) -> CommandResult<()> {
    if args.namespace.is_empty() || args.id.is_empty() {
        return Err(ShimCommandError::MissingIds);
    }
    let bundle = std::env::current_dir().map_err(io("no working directory"))?;
    // Runtime options arrive on stdin as an `Any` (none: empty stdin).
    let mut options = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut options);
    let options_path = config_path_from_options(&options)?;
    let (config, config_path) = Config::resolve(options_path.as_deref())?;
    find_agent(&config)?;

    let spec = read_spec(&bundle)?;
    let sandbox = sandbox_id(&spec, &args.id);
    let hash = sandbox_hash(&args.address, &args.namespace, &sandbox);
    let socket = Path::new(SOCKET_DIR).join(&hash);
    let address = format!("unix://{}", socket.display());
    let state_dir = Path::new(STATE_ROOT).join(&hash);
    let write_bundle = |pid: Option<u32>| -> CommandResult<()> {
        std::fs::write(bundle.join("address"), &address)
            .map_err(io("cannot write the address file"))?;
        std::fs::write(bundle.join(STATE_FILE), state_dir.display().to_string())
            .map_err(io(format!("cannot write {STATE_FILE}")))?;
        if let Some(pid) = pid {
            std::fs::write(bundle.join("shim.pid"), pid.to_string())
                .map_err(io("cannot write shim.pid"))?;
        }
        Ok(())
    };

    std::fs::create_dir_all(SOCKET_DIR).map_err(io(format!("cannot create {SOCKET_DIR}")))?;
    let listener = match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if sandbox != args.id && socket_is_live(&socket) {
                // Another container of the group: share its shim.
                let pid = std::fs::read_to_string(state_dir.join("shim.pid"))
                    .ok()
                    .and_then(|p| p.trim().parse().ok());
                write_bundle(pid)?;
                print!("{address}");
                return Ok(());
            }
            if socket_is_live(&socket) {
                return Err(ShimCommandError::AlreadyServing {
                    id: args.id.clone(),
                    address,
                });
            }
            let _ = std::fs::remove_file(&socket);
            UnixListener::bind(&socket).map_err(io(format!("cannot bind {address}")))?
        }
        Err(e) => return Err(io(format!("cannot bind {address}"))(e)),
    };

    let exe = std::env::current_exe().map_err(io("cannot find own binary"))?;
    let listener_fd: OwnedFd = listener.into();
    let raw = listener_fd.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args([
        "-namespace",
        &args.namespace,
        "-id",
        &args.id,
        "-address",
        &args.address,
        "-publish-binary",
        &args.publish_binary,
    ]);
    if args.debug {
        cmd.arg("-debug");
    }
    cmd.arg("serve")
        .current_dir(&bundle)
        .env(DAEMON_SANDBOX_ENV, &sandbox)
        .env(
            DAEMON_CONFIG_ENV,
            config_path
                .as_deref()
                .map(Path::as_os_str)
                .unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec the closure only calls setsid(2),
    // fcntl(2) and dup2(2), which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || daemon_fds(raw));
    }
    let child = cmd.spawn().map_err(|e| {
        let _ = std::fs::remove_file(&socket);
        io("cannot spawn the shim daemon")(e)
    })?;
    drop(listener_fd);
    let _ = crate::sandbox::state_dir::create(&state_dir);
    let _ = std::fs::write(state_dir.join("shim.pid"), child.id().to_string());
    let _ = std::fs::write(
        state_dir.join(CONFIG_FILE),
        config_path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    );
    write_bundle(Some(child.id()))?;
    print!("{address}");
    let _ = std::io::stdout().flush();
    Ok(())
}

/// In the daemon child: a new session, the listener at fd 3 (inheritable).
fn daemon_fds(listener: i32) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    nix::unistd::setsid()?;
    if listener == LISTENER_FD {
        fcntl(listener, FcntlArg::F_SETFD(FdFlag::empty()))?;
    } else {
        nix::unistd::dup2(listener, LISTENER_FD)?;
    }
    Ok(())
}

fn serve(args: &Args) -> CommandResult<()> {
    // One malloc arena instead of one per thread (up to 8 per CPU): the
    // shim's threads mostly sleep in long polls, and each extra arena keeps
    // its own touched pages (about 0.25 MB less Rss per shim, measured).
    // SAFETY: mallopt(3) only sets a malloc tunable; no thread runs yet.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let bundle = std::env::current_dir().map_err(io("no working directory"))?;
    let config_path = std::env::var_os(DAEMON_CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let config = match &config_path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let level = if args.debug {
        log::LevelFilter::Debug.max(config.log_level.filter())
    } else {
        config.log_level.filter()
    };
    FifoLogger::new(Some(bundle.join("log"))).install(level);

    let sandbox = std::env::var(DAEMON_SANDBOX_ENV).unwrap_or_else(|_| args.id.clone());
    let hash = sandbox_hash(&args.address, &args.namespace, &sandbox);
    let socket = Path::new(SOCKET_DIR).join(&hash);
    let info = ShimInfo {
        namespace: args.namespace.clone(),
        sandbox_id: sandbox.clone(),
        state_dir: Path::new(STATE_ROOT).join(&hash),
    };
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
    let publisher = Publisher::start(&ttrpc_address, &args.namespace);
    let (shutdown_tx, shutdown_rx) = mpsc::channel();
    let service = TaskService::new(info, config.clone(), publisher, shutdown_tx);

    // Per connection ttrpc runs a reader, a writer, a connection thread and
    // `default` idle handlers, and starts more whenever fewer than `min` are
    // idle (a Task `Wait` holds one until its process exits, and is not
    // starved: the next request starts more). One sandbox's requests rarely
    // overlap, so 2 idle handlers (ttrpc's default is 3) are enough.
    // The listener came across exec without FD_CLOEXEC; set it again so the
    // agent (and its spawner) do not inherit it: they would keep a dead
    // shim's socket accepting connections, and `delete` would leave it.
    {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        fcntl(LISTENER_FD, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .map_err(|e| io("cannot set FD_CLOEXEC on the listening socket")(e.into()))?;
    }
    let mut server = ttrpc::Server::new()
        .set_thread_count_min(TTRPC_IDLE_MIN)
        .set_thread_count_default(TTRPC_IDLE_DEFAULT)
        .set_thread_count_max(TTRPC_IDLE_MAX)
        .add_listener(LISTENER_FD)
        .map_err(ShimCommandError::Serve)?
        .register_service(task_methods(Arc::clone(&service)));
    server.start().map_err(ShimCommandError::Serve)?;
    log::info!(
        "serving sandbox {sandbox} on unix://{} (namespace {})",
        socket.display(),
        args.namespace
    );

    let _ = shutdown_rx.recv();
    log::info!("shutting down");
    service.stop_sandbox();
    let _ = std::fs::remove_file(&socket);
    // No grace sleep: the Shutdown response left while the sandbox stopped
    // (agent round trips), and containerd 1.6 takes a connection closed
    // during Shutdown as success (its Go shim exits inside the handler).
    // containerd waits for this exit before `ctr run --rm` returns.
    std::process::exit(0);
}

/// The Task service's methods under `containerd.task.v3.Task` (generated)
/// and `containerd.task.v2.Task` (what containerd 1.6 and 1.7 call); the
/// messages are identical.
pub fn task_methods(
    service: Arc<TaskService>,
) -> HashMap<String, Box<dyn ttrpc::MethodHandler + Send + Sync>> {
    let v3 = containerd_shim_protos::create_task(Arc::clone(&service) as _);
    let v2 = containerd_shim_protos::create_task(service as _);
    let mut methods = v3;
    for (path, handler) in v2 {
        let v2_path = path.replacen("/containerd.task.v3.Task/", "/containerd.task.v2.Task/", 1);
        methods.insert(v2_path, handler);
    }
    methods
}

/// Waits until `pid` (running `name`) has exited, at most `timeout`;
/// returns whether it did. Sleeps on a pidfd (readable once the process
/// exited), else polls /proc.
fn wait_for_exit(pid: i32, name: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    // SAFETY: pidfd_open(2) only reads its two integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        // SAFETY: pidfd_open just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Rounded up: poll must not return before the deadline.
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd that lives across the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n >= 0 {
                return n > 0;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        }
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return true;
    }
    while procfs::runs(pid, name) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

fn delete(args: &Args) -> CommandResult<()> {
    let bundle = match &args.bundle {
        Some(b) => b.clone(),
        None => std::env::current_dir().map_err(io("no working directory"))?,
    };
    let shim_pid: Option<i32> = std::fs::read_to_string(bundle.join("shim.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok());
    // A shim that just got Shutdown may still be exiting (containerd runs
    // `delete` once the connection closed, which can be a moment before the
    // process is a zombie): give it a moment.
    let shim_alive = match shim_pid {
        Some(pid) if procfs::runs(pid, SHIM_BINARY) => {
            !wait_for_exit(pid, SHIM_BINARY, SHIM_EXIT_WAIT)
        }
        _ => false,
    };
    let rootfs_dir = bundle.join("rootfs");
    if let Err(e) = rootfs::unmount_rootfs(&rootfs_dir) {
        eprintln!("warning: {e}");
    }
    if !shim_alive {
        // The shim is gone: whatever it left is ours to clean.
        if let Ok(state) = std::fs::read_to_string(bundle.join(STATE_FILE)) {
            let state_dir = PathBuf::from(state.trim());
            if state_dir.starts_with(STATE_ROOT) && state_dir.exists() {
                // The daemon's config (runtime options are not given to
                // `delete`): the one `start` resolved, recorded in the state.
                let config = std::fs::read_to_string(state_dir.join(CONFIG_FILE))
                    .ok()
                    .filter(|p| !p.trim().is_empty())
                    .and_then(|p| Config::load(Path::new(p.trim())).ok())
                    .or_else(|| Config::resolve(None).ok().map(|(c, _)| c))
                    .unwrap_or_default();
                if let Err(e) = handler_for(&config).cleanup(&state_dir, &config) {
                    eprintln!("warning: sandbox cleanup: {e}");
                }
            }
        }
        if let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
            if let Some(path) = address.trim().strip_prefix("unix://") {
                let path = Path::new(path);
                if path.starts_with(SOCKET_DIR) && !socket_is_live(path) {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
    let resp = DeleteResponse {
        pid: 0,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: MessageField::some(timestamp(SystemTime::now())),
        ..Default::default()
    };
    let bytes = resp.write_to_bytes().map_err(ShimCommandError::Encode)?;
    std::io::stdout()
        .write_all(&bytes)
        .map_err(io("cannot write the response"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn containerd_style_flags() {
        let a = parse_args(&s(&[
            "-namespace",
            "default",
            "-address",
            "/run/c.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "web",
            "-debug",
            "start",
        ]))
        .unwrap();
        assert_eq!(a.namespace, "default");
        assert_eq!(a.id, "web");
        assert_eq!(a.address, "/run/c.sock");
        assert_eq!(a.publish_binary, "/usr/bin/containerd");
        assert!(a.debug);
        assert_eq!(a.action, "start");
        let a = parse_args(&s(&["-id=x", "--bundle", "/b", "delete"])).unwrap();
        assert_eq!(a.bundle.as_deref(), Some(Path::new("/b")));
        assert_eq!(a.action, "delete");
        assert!(parse_args(&s(&["-bogus", "start"]))
            .unwrap_err()
            .to_string()
            .contains("-bogus"));
        assert!(parse_args(&s(&["-id"]))
            .unwrap_err()
            .to_string()
            .contains("needs a value"));
        assert!(parse_args(&s(&["start", "delete"])).is_err());
    }

    #[test]
    fn wait_for_exit_sees_exit_and_times_out() {
        let mut quick = Command::new("sleep").arg("0.05").spawn().unwrap();
        assert!(wait_for_exit(
            quick.id() as i32,
            "sleep",
            Duration::from_secs(5)
        ));
        // Exited, not yet reaped: a zombie counts as gone.
        assert!(!procfs::runs(quick.id() as i32, "sleep"));
        quick.wait().unwrap();
        let mut slow = Command::new("sleep").arg("10").spawn().unwrap();
        let t0 = Instant::now();
        assert!(!wait_for_exit(
            slow.id() as i32,
            "sleep",
            Duration::from_millis(50)
        ));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        slow.kill().unwrap();
        slow.wait().unwrap();
    }

    #[test]
    fn sandbox_hashes() {
        let a = sandbox_hash("/a.sock", "ns", "pod1");
        assert_eq!(a.len(), 32);
        assert_eq!(a, sandbox_hash("/a.sock", "ns", "pod1"));
        assert_ne!(a, sandbox_hash("/b.sock", "ns", "pod1"));
        assert_ne!(a, sandbox_hash("/a.sock", "ns2", "pod1"));
    }

    #[test]
    fn both_task_service_versions_are_registered() {
        let (tx, _rx) = mpsc::channel();
        let service = TaskService::new(
            ShimInfo {
                namespace: "ns".into(),
                sandbox_id: "s".into(),
                state_dir: "/nonexistent".into(),
            },
            Config::default(),
            Publisher::discard(),
            tx,
        );
        let methods = task_methods(service);
        for version in ["v2", "v3"] {
            for method in ["Create", "Start", "Wait", "Delete", "Shutdown", "Stats"] {
                let path = format!("/containerd.task.{version}.Task/{method}");
                assert!(methods.contains_key(&path), "{path}");
            }
        }
        assert_eq!(methods.len(), 34);
    }
}
