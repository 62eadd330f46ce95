//! OOM-kill detection: one thread polls each watched container's cgroup
//! OOM-kill counter (cgroup v1 `memory.oom_control`, v2 `memory.events`) and
//! queues the container id when it rises; `GetOOMEvent` long-polls the queue.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::reaper::lock;

/// How often the counters are read.
pub const OOM_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Errors of the OOM watcher.
#[derive(Debug, thiserror::Error)]
pub enum OomError {
    /// Could not start the polling thread.
    #[error("cannot start the OOM watcher thread")]
    Thread(#[source] std::io::Error),
}

#[derive(Debug, Default)]
struct OomState {
    watched: HashMap<String, (PathBuf, u64)>,
    events: VecDeque<String>,
}

/// Watches containers' cgroups for OOM kills.
#[derive(Debug, Default)]
pub struct OomWatcher {
    state: Mutex<OomState>,
    event: Condvar,
}

impl OomWatcher {
    /// Starts the polling thread.
    pub fn start() -> Result<Arc<Self>, OomError> {
        let watcher = Arc::new(Self::default());
        let thread_watcher = Arc::clone(&watcher);
        std::thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || loop {
                std::thread::sleep(OOM_POLL_INTERVAL);
                thread_watcher.poll();
            })
            .map_err(OomError::Thread)?;
        Ok(watcher)
    }

    /// Watches the container whose cgroup path is `cgroup_path`.
    pub fn watch(&self, id: &str, cgroup_path: &Path) {
        let count = oom_kill_count(cgroup_path).unwrap_or(0);
        lock(&self.state)
            .watched
            .insert(id.to_owned(), (cgroup_path.to_owned(), count));
    }

    /// Stops watching `id` (after one last look, so no OOM kill is missed).
    pub fn unwatch(&self, id: &str) {
        self.poll();
        lock(&self.state).watched.remove(id);
    }

    fn poll(&self) {
        let watched: Vec<(String, PathBuf)> = lock(&self.state)
            .watched
            .iter()
            .map(|(id, (path, _))| (id.clone(), path.clone()))
            .collect();
        let counts: Vec<(String, u64)> = watched
            .into_iter()
            .filter_map(|(id, path)| oom_kill_count(&path).map(|count| (id, count)))
            .collect();
        let mut state = lock(&self.state);
        let mut fired = false;
        for (id, count) in counts {
            let Some((_, last)) = state.watched.get_mut(&id) else {
                continue;
            };
            if count > *last {
                *last = count;
                state.events.push_back(id);
                fired = true;
            }
        }
        if fired {
            self.event.notify_all();
        }
    }

    /// The next OOM-killed container id; waits up to `timeout` (`None`: forever).
    pub fn next_event(&self, timeout: Option<Duration>) -> Option<String> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(&self.state);
        loop {
            if let Some(id) = state.events.pop_front() {
                return Some(id);
            }
            let wait = match deadline {
                None => Duration::from_secs(3600),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    deadline - now
                }
            };
            state = self
                .event
                .wait_timeout(state, wait)
                .unwrap_or_else(|poison| poison.into_inner())
                .0;
        }
    }
}

/// The number of OOM kills in the cgroup at `cgroup_path` (relative to the
/// hierarchy roots), or `None` if it cannot be read.
pub fn oom_kill_count(cgroup_path: &Path) -> Option<u64> {
    let relative = cgroup_path.strip_prefix("/").unwrap_or(cgroup_path);
    let unified = matches!(
        libcgroups::common::get_cgroup_setup(),
        Ok(libcgroups::common::CgroupSetup::Unified)
    );
    let (file, key) = if unified {
        (
            Path::new("/sys/fs/cgroup")
                .join(relative)
                .join("memory.events"),
            "oom_kill",
        )
    } else {
        (
            Path::new("/sys/fs/cgroup/memory")
                .join(relative)
                .join("memory.oom_control"),
            "oom_kill",
        )
    };
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        (parts.next() == Some(key))
            .then(|| parts.next()?.parse().ok())
            .flatten()
    })
}
