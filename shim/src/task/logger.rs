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

/// `since_epoch` as RFC 3339 UTC with nanoseconds, the form containerd
/// and its Go shims write in their logs (`2026-12-04T23:06:41.929110152Z`).
fn rfc3339(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (the proleptic Gregorian
    // calendar, in 400-year eras of 146 097 days).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_nanos()
    )
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
            "time=\"{}\" level={} msg=\"{}\" runtime=skiff pid={}\n",
            rfc3339(now),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn log_times_are_rfc3339_utc() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000000000Z");
        // `date -u -d @1796425601` and a leap day.
        assert_eq!(
            rfc3339(Duration::new(1_796_425_601, 929_110_152)),
            "2026-12-04T23:06:41.929110152Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000000Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(4_107_542_399)),
            "2100-02-28T23:59:59.000000000Z"
        );
    }
}
