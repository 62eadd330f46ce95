//! The agent as a child subreaper: one thread reaps every exited child and
//! routes the exit status to the process entry that owns the pid.
//!
//! libcontainer forks (and reaps) its own helper processes, so the reaper must
//! not steal those. It therefore peeks at exited children with
//! `waitid(WNOWAIT)`: a pid that is registered is reaped and routed at once;
//! a pid that is not is only reaped once the *spawn lock* is free — every
//! spawn holds that lock from fork until the new pid is registered and
//! libcontainer has reaped its helpers, so by then the pid is either
//! registered (an early exit: routed normally) or a true orphan.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Errors of the reaper.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// Could not make the agent a child subreaper (prctl PR_SET_CHILD_SUBREAPER).
    #[error("cannot make the agent a child subreaper")]
    Subreaper(#[source] std::io::Error),
    /// Could not start the reaper thread.
    #[error("cannot start the reaper thread")]
    Thread(#[source] std::io::Error),
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or 128 + signal number for a process killed by a signal.
    pub code: i32,
    /// Unix time of the exit as seen by the reaper, in milliseconds.
    pub exited_at_ms: u64,
}

/// Where a process's exit status is delivered; waiters block on it.
#[derive(Debug, Default)]
pub struct ExitCell {
    status: Mutex<Option<ExitStatus>>,
    exited: Condvar,
}

impl ExitCell {
    /// Records the exit and wakes every waiter.
    pub fn set(&self, status: ExitStatus) {
        let mut guard = lock(&self.status);
        if guard.is_none() {
            *guard = Some(status);
        }
        self.exited.notify_all();
    }

    /// Runs `f` (which waits for the process) under the cell's lock and
    /// records its result, so [`ExitCell::if_running`] never sees a reaped
    /// process as running (its pid may already be reused).
    fn settle(&self, f: impl FnOnce() -> ExitStatus) {
        let mut guard = lock(&self.status);
        if guard.is_none() {
            *guard = Some(f());
        }
        self.exited.notify_all();
    }

    /// Runs `f` if the process has not been reaped yet; the pid stays valid
    /// for the duration of `f`. Returns `None` if it had exited.
    pub fn if_running<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let guard = lock(&self.status);
        if guard.is_some() {
            return None;
        }
        let result = f();
        drop(guard);
        Some(result)
    }

    /// The exit status, if the process has exited.
    pub fn get(&self) -> Option<ExitStatus> {
        *lock(&self.status)
    }

    /// Blocks until the process exits or `timeout` passes (`None`: forever).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitStatus> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut guard = lock(&self.status);
        loop {
            if let Some(status) = *guard {
                return Some(status);
            }
            match deadline {
                None => {
                    guard = self
                        .exited
                        .wait(guard)
                        .unwrap_or_else(|poison| poison.into_inner())
                }
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    guard = self
                        .exited
                        .wait_timeout(guard, deadline - now)
                        .unwrap_or_else(|poison| poison.into_inner())
                        .0;
                }
            }
        }
    }
}

/// The process-wide reaper. Create one with [`Reaper::start`].
#[derive(Debug)]
pub struct Reaper {
    owners: Mutex<HashMap<i32, Arc<ExitCell>>>,
    spawn_lock: Mutex<()>,
    /// Counts registrations; the idle reaper sleeps on `kick` until it moves.
    registrations: Mutex<u64>,
    kick: Condvar,
}

/// Held across a spawn: from before the fork until the pid is registered.
pub type SpawnGuard<'a> = MutexGuard<'a, ()>;

impl Reaper {
    /// Makes this process a child subreaper and starts the reaper thread.
    ///
    /// Call once per process: the thread reaps *every* child, so nothing else
    /// in the process may wait for children except under [`Reaper::spawn_lock`].
    pub fn start() -> Result<Arc<Self>, ReaperError> {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no
        // memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if rc != 0 {
            return Err(ReaperError::Subreaper(std::io::Error::last_os_error()));
        }
        let reaper = Arc::new(Self {
            owners: Mutex::new(HashMap::new()),
            spawn_lock: Mutex::new(()),
            registrations: Mutex::new(0),
            kick: Condvar::new(),
        });
        let thread_reaper = Arc::clone(&reaper);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || thread_reaper.run())
            .map_err(ReaperError::Thread)?;
        Ok(reaper)
    }

    /// Takes the spawn lock; hold it from before forking until [`Reaper::register`].
    pub fn spawn_lock(&self) -> SpawnGuard<'_> {
        lock(&self.spawn_lock)
    }

    /// Routes `pid`'s exit status to `cell`. Call under the spawn lock.
    pub fn register(&self, _guard: &SpawnGuard<'_>, pid: i32, cell: Arc<ExitCell>) {
        lock(&self.owners).insert(pid, cell);
        *lock(&self.registrations) += 1;
        self.kick.notify_all();
    }

    /// Reaps `pid` quietly when it exits (a helper the agent started itself).
    pub fn adopt(&self, pid: i32) {
        let guard = self.spawn_lock();
        self.register(&guard, pid, Arc::new(ExitCell::default()));
    }

    fn run(&self) {
        let mut seen = 0;
        loop {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
            let pid = match waitid(Id::All, flags) {
                Ok(status) => match status.pid() {
                    Some(pid) => pid,
                    None => continue,
                },
                Err(Errno::ECHILD) => {
                    // No children: sleep until a spawn registers one (or a
                    // while, for children forked by others).
                    let count = lock(&self.registrations);
                    if *count == seen {
                        let (count, _) = self
                            .kick
                            .wait_timeout(count, Duration::from_millis(200))
                            .unwrap_or_else(|poison| poison.into_inner());
                        seen = *count;
                    } else {
                        seen = *count;
                    }
                    continue;
                }
                Err(Errno::EINTR) => continue,
                Err(err) => {
                    log::error!("reaper: waitid failed: {err}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if self.reap_owned(pid) {
                continue;
            }
            // Not ours (yet): wait for any spawn in flight to finish.
            let _guard = self.spawn_lock();
            if self.reap_owned(pid) {
                continue;
            }
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(status) => log::debug!("reaper: reaped orphan {pid}: {status:?}"),
                Err(Errno::ECHILD) => {} // libcontainer reaped its helper.
                Err(err) => log::warn!("reaper: waitpid({pid}) failed: {err}"),
            }
        }
    }

    /// Reaps `pid` if a process entry owns it; returns whether it did.
    fn reap_owned(&self, pid: Pid) -> bool {
        let cell = match lock(&self.owners).remove(&pid.as_raw()) {
            Some(cell) => cell,
            None => return false,
        };
        cell.settle(|| {
            let code = match waitpid(pid, None) {
                Ok(WaitStatus::Exited(_, code)) => code,
                Ok(WaitStatus::Signaled(_, signal, _)) => 128 + signal as i32,
                Ok(other) => {
                    log::warn!("reaper: unexpected wait status for {pid}: {other:?}");
                    255
                }
                Err(err) => {
                    log::warn!("reaper: waitpid({pid}) failed: {err}");
                    255
                }
            };
            let exited_at_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            ExitStatus { code, exited_at_ms }
        });
        true
    }
}

/// Locks a mutex, ignoring poisoning (a panicked holder leaves plain data).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_cell_wakes_waiters() {
        let cell = Arc::new(ExitCell::default());
        assert_eq!(cell.wait(Some(Duration::from_millis(5))), None);
        let waiter = {
            let cell = Arc::clone(&cell);
            std::thread::spawn(move || cell.wait(None))
        };
        let status = ExitStatus {
            code: 137,
            exited_at_ms: 1,
        };
        cell.set(status);
        assert_eq!(waiter.join().unwrap(), Some(status));
        // The first status wins.
        cell.set(ExitStatus {
            code: 0,
            exited_at_ms: 2,
        });
        assert_eq!(cell.get(), Some(status));
    }
}
