//! The shim's logger: lines to the bundle's `log` FIFO, which containerd
//! reads into its own log; stderr when the FIFO is not open.
//!
//! The FIFO is opened `O_WRONLY|O_NONBLOCK` (it fails with ENXIO while no
//! reader is attached, e.g. containerd restarting; the logger retries at
//! most once a second). A full FIFO drops the line rather than stalling the
//! shim.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use crate::sync::lock;

/// Logs to a FIFO (or stderr).
#[derive(Debug)]
pub struct FifoLogger {
    path: Option<PathBuf>,
    state: Mutex<(Option<File>, Option<Instant>)>,
}

impl FifoLogger {
    /// A logger for the FIFO at `path` (`None`: stderr only).
    pub fn new(path: Option<PathBuf>) -> Self {
        let logger = Self {
            path,
            state: Mutex::new((None, None)),
        };
        {
            let mut st = lock(&logger.state);
            logger.reopen(&mut st);
        }
        logger
    }

    fn reopen(&self, st: &mut (Option<File>, Option<Instant>)) {
        let Some(path) = &self.path else { return };
        if st.1.is_some_and(|t| t.elapsed().as_secs() < 1) {
            return;
        }
        st.1 = Some(Instant::now());
        st.0 = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .ok();
    }

    /// Installs `self` as the `log` logger with `level`.
    pub fn install(self, level: log::LevelFilter) {
        if log::set_boxed_logger(Box::new(self)).is_ok() {
            log::set_max_level(level);
        }
    }
}

impl log::Log for FifoLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        crate::task::log_enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let line = format!(
            "time=\"{}.{:06}\" level={} msg=\"{}\" runtime=skiff pid={}\n",
            now.as_secs(),
            now.subsec_micros(),
            record.level().as_str().to_lowercase(),
            record.args().to_string().replace('"', "'"),
            std::process::id()
        );
        let mut st = lock(&self.state);
        if st.0.is_none() {
            self.reopen(&mut st);
        }
        let failed = match st.0.as_mut() {
            Some(f) => match f.write_all(line.as_bytes()) {
                Ok(()) => false,
                // Full FIFO: drop the line, keep the FIFO.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                Err(_) => true,
            },
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
                false
            }
        };
        if failed {
            // The reader went away (containerd restarting): reopen later.
            st.0 = None;
        }
    }

    fn flush(&self) {}
}
