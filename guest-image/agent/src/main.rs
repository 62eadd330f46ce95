//! `skiff-agent`: serves the agent protocol.
//!
//! ```text
//! skiff-agent --listen unix:///run/skiff/agent.sock [--state-dir /run/skiff-agent]
//!             [--cgroup-parent /skiff] [--log-level info]
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use skiff_agent::container::EngineConfig;
use skiff_agent::server::{AgentServer, ListenAddr};

const USAGE: &str = "usage: skiff-agent --listen unix:///path.sock|vsock://<port> \
[--state-dir DIR] [--cgroup-parent PATH] [--log-level error|warn|info|debug|trace]";

/// Logs to stderr; the binary picks the logger, the library uses `log`.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "skiff-agent {} {}: {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn main() -> Result<()> {
    let mut listen = None;
    let mut state_dir = PathBuf::from("/run/skiff-agent");
    let mut cgroup_parent = PathBuf::from("/skiff");
    let mut level = log::LevelFilter::Info;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--listen" => listen = Some(value()?.parse::<ListenAddr>()?),
            "--state-dir" => state_dir = PathBuf::from(value()?),
            "--cgroup-parent" => cgroup_parent = PathBuf::from(value()?),
            "--log-level" => level = value()?.parse().context("bad --log-level")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let listen = listen.with_context(|| format!("--listen is required\n{USAGE}"))?;
    log::set_logger(&LOGGER).context("cannot install the logger")?;
    log::set_max_level(level);

    let _server = AgentServer::start(
        &listen,
        EngineConfig {
            state_dir,
            cgroup_parent,
        },
    )
    .with_context(|| format!("cannot serve on {listen:?}"))?;
    log::info!("serving on {listen:?}");
    loop {
        std::thread::park();
    }
}
