//! `skiff-agent`: serves the agent protocol.
//!
//! ```text
//! skiff-agent --listen unix:///run/skiff/agent.sock|vsock://<port>
//!             [--state-dir /run/skiff-agent] [--cgroup-parent /skiff]
//!             [--rootfs-mount-dir /run/skiff/rootfs] [--log-level info]
//! skiff-agent --init [--listen vsock://1024] [--hostname NAME] [...]
//! ```
//!
//! `--init` (implied when the agent is PID 1, i.e. the micro-VM's `/init`)
//! first sets the guest up (see `skiff_agent::init`), listens on
//! `vsock://1024` unless told otherwise, resets the VM after DestroySandbox
//! and never exits. As PID 1 it also reads `skiff.hostname=` and
//! `skiff.log=` from the kernel command line, and ignores (with a warning)
//! arguments it does not know, which the kernel may pass to init.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use skiff_agent::container::EngineConfig;
use skiff_agent::init::{self, KernelParams};
use skiff_agent::server::{AgentServer, ListenAddr, ServerOptions};

const USAGE: &str = "usage: skiff-agent [--init] --listen unix:///path.sock|vsock://<port> \
[--state-dir DIR] [--cgroup-parent PATH] [--rootfs-mount-dir DIR] [--hostname NAME] \
[--log-level error|warn|info|debug|trace]";

/// Where the guest agent listens by default (the shim connects to this port).
const INIT_LISTEN: ListenAddr = ListenAddr::Vsock(skiff_agent_proto::AGENT_VSOCK_PORT);
/// Time DestroySandbox's reply gets to reach the host before the VM resets.
const RESET_DELAY: Duration = Duration::from_millis(200);

/// Logs to stderr, one `write` per line; as init, each line starts with the
/// seconds since boot (like the kernel's own console lines).
struct StderrLogger {
    uptime: std::sync::atomic::AtomicBool,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = String::new();
        if self.uptime.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(now) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
                line = format!("[{:5}.{:06}] ", now.tv_sec(), now.tv_nsec() / 1000);
            }
        }
        line.push_str(&format!(
            "skiff-agent {} {}: {}\n",
            record.level(),
            record.target(),
            record.args()
        ));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger {
    uptime: std::sync::atomic::AtomicBool::new(false),
};

/// The command line.
#[derive(Debug)]
struct Options {
    init: bool,
    listen: Option<ListenAddr>,
    state_dir: PathBuf,
    cgroup_parent: PathBuf,
    rootfs_mount_dir: PathBuf,
    hostname: Option<String>,
    level: Option<log::LevelFilter>,
    /// Arguments ignored in lenient mode.
    ignored: Vec<String>,
    help: bool,
}

impl Options {
    /// Parses the arguments (without argv\[0\]); `lenient` skips unknown ones.
    fn parse(args: impl IntoIterator<Item = String>, lenient: bool) -> Result<Self> {
        let mut options = Self {
            init: false,
            listen: None,
            state_dir: PathBuf::from("/run/skiff-agent"),
            cgroup_parent: PathBuf::from("/skiff"),
            rootfs_mount_dir: PathBuf::from("/run/skiff/rootfs"),
            hostname: None,
            level: None,
            ignored: Vec::new(),
            help: false,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("{arg} needs a value\n{USAGE}"))
            };
            match arg.as_str() {
                "--init" => options.init = true,
                "--listen" => options.listen = Some(value()?.parse::<ListenAddr>()?),
                "--state-dir" => options.state_dir = PathBuf::from(value()?),
                "--cgroup-parent" => options.cgroup_parent = PathBuf::from(value()?),
                "--rootfs-mount-dir" => options.rootfs_mount_dir = PathBuf::from(value()?),
                "--hostname" => options.hostname = Some(value()?),
                "--log-level" => options.level = Some(value()?.parse().context("bad --log-level")?),
                "-h" | "--help" => options.help = true,
                other if lenient => options.ignored.push(other.to_owned()),
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        Ok(options)
    }

    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            state_dir: self.state_dir.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
            rootfs_mount_dir: self.rootfs_mount_dir.clone(),
        }
    }
}

fn main() -> Result<()> {
    let pid1 = init::is_pid1();
    if pid1 {
        init::pin_heap();
        init::ensure_stdio();
    }
    let options = match Options::parse(std::env::args().skip(1), pid1) {
        Ok(options) => options,
        // PID 1 parses leniently, so only a bad value gets here.
        Err(err) if pid1 => run_init_failed(err),
        Err(err) => return Err(err),
    };
    if options.help {
        println!("{USAGE}");
        return Ok(());
    }
    if pid1 || options.init {
        LOGGER
            .uptime
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    log::set_logger(&LOGGER).context("cannot install the logger")?;
    log::set_max_level(options.level.unwrap_or(log::LevelFilter::Info));
    if pid1 || options.init {
        init::install_panic_hook();
        match run_init(options) {
            Ok(never) => match never {},
            Err(err) => run_init_failed(err),
        }
    }

    let listen = options
        .listen
        .clone()
        .with_context(|| format!("--listen is required\n{USAGE}"))?;
    let _server = AgentServer::start(&listen, options.engine_config())
        .with_context(|| format!("cannot serve on {listen}"))?;
    log::info!("serving on {listen}");
    loop {
        std::thread::park();
    }
}

/// The guest init: set the guest up, then serve until DestroySandbox.
fn run_init(options: Options) -> Result<std::convert::Infallible> {
    for arg in &options.ignored {
        log::debug!(
            "ignoring unknown argument {arg:?} (the kernel passes unknown parameters to init)"
        );
    }
    if init::is_pid1() {
        // Leaves the initramfs, so that containers can pivot_root.
        init::switch_root().context("cannot switch to a tmpfs root")?;
    }
    init::setup().context("cannot set the guest up")?;
    let params = KernelParams::from_proc();
    if options.level.is_none() {
        if let Some(level) = &params.log_level {
            match level.parse() {
                Ok(level) => log::set_max_level(level),
                Err(_) => log::warn!("ignoring skiff.log={level:?}"),
            }
        }
    }
    if let Some(hostname) = options.hostname.as_ref().or(params.hostname.as_ref()) {
        init::set_hostname(hostname)?;
    }
    let listen = options.listen.clone().unwrap_or(INIT_LISTEN);
    let server_options = ServerOptions {
        on_sandbox_destroyed: Some(Box::new(|| init::reset_vm_after(RESET_DELAY))),
        // Only PID 1 is the guest's init; `--init` by hand on a host is not,
        // and must not set the host's clock, machine id or RNG.
        guest_init: init::is_pid1(),
    };
    let _server = AgentServer::start_with(&listen, options.engine_config(), server_options)
        .with_context(|| format!("cannot serve on {listen}"))?;
    log::info!(
        "serving on {listen} (pid {}, {})",
        std::process::id(),
        env!("CARGO_PKG_VERSION")
    );
    loop {
        std::thread::park();
    }
}

/// Logs a fatal error of the guest init and resets the VM (exits outside PID 1).
fn run_init_failed(err: anyhow::Error) -> ! {
    let line = format!("skiff-agent: fatal: {err:#}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    init::reset_vm()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn strict_and_lenient_parsing() {
        let options = Options::parse(
            args(&["--init", "--listen", "vsock://1025", "--hostname", "pod"]),
            false,
        )
        .unwrap();
        assert!(options.init);
        assert_eq!(options.listen, Some(ListenAddr::Vsock(1025)));
        assert_eq!(options.hostname.as_deref(), Some("pod"));
        assert_eq!(options.rootfs_mount_dir, PathBuf::from("/run/skiff/rootfs"));

        assert!(Options::parse(args(&["nopcid"]), false).is_err());
        let options = Options::parse(args(&["nopcid", "--log-level", "debug"]), true).unwrap();
        assert_eq!(options.ignored, ["nopcid"]);
        assert_eq!(options.level, Some(log::LevelFilter::Debug));
        // A bad value is an error even when lenient.
        assert!(Options::parse(args(&["--listen", "tcp://x"]), true).is_err());
    }
}
