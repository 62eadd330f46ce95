//! OOM-kill detection: one thread watches each container's cgroup OOM-kill
//! counter (cgroup v1 `memory.oom_control`, v2 `memory.events`) and queues
//! the container id when it rises; `GetOOMEvent` long-polls the queue.
//!
//! On cgroup v2 the thread sleeps in `read(2)` on an inotify descriptor
//! (the kernel reports every change of `memory.events` as IN_MODIFY), so an
//! idle agent does no work at all: in a micro-VM under a trapping
//! hypervisor every wake-up costs. On cgroup v1, which has no such event
//! for `memory.oom_control` without an eventfd per cgroup, it polls.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::reaper::lock;

/// How often the counters are read when they cannot be watched (v1).
pub const OOM_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Errors of the OOM watcher.
#[derive(Debug, thiserror::Error)]
pub enum OomError {
    /// Could not start the polling thread.
    #[error("cannot start the OOM watcher thread")]
    Thread(#[source] std::io::Error),
}

/// Where the cgroups' OOM-kill counters are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterFiles {
    /// The hierarchy root cgroup paths are relative to.
    root: PathBuf,
    /// The counter file in each cgroup.
    file: &'static str,
    /// Whether the kernel reports changes of `file` to inotify.
    notifies: bool,
}

impl CounterFiles {
    /// cgroup v2: `<root>/<cgroup>/memory.events`, watched with inotify.
    pub fn unified(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            file: "memory.events",
            notifies: true,
        }
    }

    /// cgroup v1: `<root>/<cgroup>/memory.oom_control`, polled.
    pub fn legacy(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            file: "memory.oom_control",
            notifies: false,
        }
    }

    /// This host's layout (looked up once).
    pub fn detect() -> &'static Self {
        static FILES: OnceLock<CounterFiles> = OnceLock::new();
        FILES.get_or_init(|| match libcgroups::common::get_cgroup_setup() {
            Ok(libcgroups::common::CgroupSetup::Unified) => Self::unified("/sys/fs/cgroup"),
            _ => Self::legacy("/sys/fs/cgroup/memory"),
        })
    }

    /// The counter file of the cgroup at `cgroup_path`.
    pub fn path(&self, cgroup_path: &Path) -> PathBuf {
        let relative = cgroup_path.strip_prefix("/").unwrap_or(cgroup_path);
        self.root.join(relative).join(self.file)
    }

    /// The OOM-kill count in `file`, or `None` if it cannot be read.
    pub fn read(file: &Path) -> Option<u64> {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|line| {
            let mut parts = line.split_whitespace();
            (parts.next() == Some("oom_kill"))
                .then(|| parts.next()?.parse().ok())
                .flatten()
        })
    }
}

#[derive(Debug)]
struct Watched {
    file: PathBuf,
    count: u64,
    wd: Option<WatchDescriptor>,
}

#[derive(Debug, Default)]
struct OomState {
    watched: HashMap<String, Watched>,
    events: VecDeque<String>,
}

/// Watches containers' cgroups for OOM kills.
#[derive(Debug)]
pub struct OomWatcher {
    files: CounterFiles,
    /// Set when the counters notify (cgroup v2).
    inotify: Option<Inotify>,
    state: Mutex<OomState>,
    event: Condvar,
}

impl OomWatcher {
    /// Starts the watcher for this host's cgroup layout.
    pub fn start() -> Result<Arc<Self>, OomError> {
        Self::start_with(CounterFiles::detect().clone())
    }

    /// Starts the watcher for counters laid out as `files`.
    pub fn start_with(files: CounterFiles) -> Result<Arc<Self>, OomError> {
        let inotify = if files.notifies {
            match Inotify::init(InitFlags::IN_CLOEXEC) {
                Ok(i) => Some(i),
                Err(err) => {
                    log::warn!("no inotify ({err}); polling OOM counters");
                    None
                }
            }
        } else {
            None
        };
        let watcher = Arc::new(Self {
            files,
            inotify,
            state: Mutex::new(OomState::default()),
            event: Condvar::new(),
        });
        let thread_watcher = Arc::clone(&watcher);
        std::thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || loop {
                match &thread_watcher.inotify {
                    // Blocks until a watched counter file changes.
                    Some(inotify) => {
                        if inotify.read_events().is_err() {
                            std::thread::sleep(OOM_POLL_INTERVAL);
                        }
                    }
                    None => std::thread::sleep(OOM_POLL_INTERVAL),
                }
                thread_watcher.poll();
            })
            .map_err(OomError::Thread)?;
        Ok(watcher)
    }

    /// Watches the container whose cgroup path is `cgroup_path`.
    pub fn watch(&self, id: &str, cgroup_path: &Path) {
        let file = self.files.path(cgroup_path);
        let count = CounterFiles::read(&file).unwrap_or(0);
        let wd = self.inotify.as_ref().and_then(|inotify| {
            inotify
                .add_watch(&file, AddWatchFlags::IN_MODIFY)
                .map_err(|err| log::warn!("cannot watch {}: {err}", file.display()))
                .ok()
        });
        let old = lock(&self.state)
            .watched
            .insert(id.to_owned(), Watched { file, count, wd });
        self.forget(old);
    }

    /// Stops watching `id` (after one last look, so no OOM kill is missed).
    pub fn unwatch(&self, id: &str) {
        self.poll();
        let old = lock(&self.state).watched.remove(id);
        self.forget(old);
    }

    fn forget(&self, old: Option<Watched>) {
        if let (Some(inotify), Some(wd)) = (&self.inotify, old.and_then(|w| w.wd)) {
            // The cgroup may be gone already, and its watch with it.
            let _ = inotify.rm_watch(wd);
        }
    }

    fn poll(&self) {
        let watched: Vec<(String, PathBuf)> = lock(&self.state)
            .watched
            .iter()
            .map(|(id, w)| (id.clone(), w.file.clone()))
            .collect();
        let counts: Vec<(String, u64)> = watched
            .into_iter()
            .filter_map(|(id, file)| CounterFiles::read(&file).map(|count| (id, count)))
            .collect();
        let mut state = lock(&self.state);
        let mut fired = false;
        for (id, count) in counts {
            let Some(w) = state.watched.get_mut(&id) else {
                continue;
            };
            if count > w.count {
                w.count = count;
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
    CounterFiles::read(&CounterFiles::detect().path(cgroup_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(oom_kill: u64) -> String {
        format!("low 0\nhigh 0\nmax 3\noom 1\noom_kill {oom_kill}\n")
    }

    #[test]
    fn counter_files_lay_out_and_parse() {
        let v2 = CounterFiles::unified("/sys/fs/cgroup");
        assert_eq!(
            v2.path(Path::new("/skiff/c1")),
            Path::new("/sys/fs/cgroup/skiff/c1/memory.events")
        );
        let v1 = CounterFiles::legacy("/sys/fs/cgroup/memory");
        assert_eq!(
            v1.path(Path::new("skiff/c1")),
            Path::new("/sys/fs/cgroup/memory/skiff/c1/memory.oom_control")
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.events");
        std::fs::write(&f, events(7)).unwrap();
        assert_eq!(CounterFiles::read(&f), Some(7));
        std::fs::write(&f, "oom_kill x\n").unwrap();
        assert_eq!(CounterFiles::read(&f), None);
        assert_eq!(CounterFiles::read(&dir.path().join("nope")), None);
    }

    /// The v2 path end to end on plain files: a rise of the counter wakes
    /// the watcher through inotify (no polling), and is reported once.
    #[test]
    fn inotify_reports_a_rising_counter() {
        let dir = tempfile::tempdir().unwrap();
        let cgroup = dir.path().join("c1");
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::write(cgroup.join("memory.events"), events(0)).unwrap();
        let watcher = OomWatcher::start_with(CounterFiles::unified(dir.path())).unwrap();
        assert!(watcher.inotify.is_some());
        watcher.watch("c1", Path::new("c1"));
        assert_eq!(watcher.next_event(Some(Duration::from_millis(100))), None);
        // Other counters change: no OOM event.
        std::fs::write(
            cgroup.join("memory.events"),
            events(0).replace("max 3", "max 4"),
        )
        .unwrap();
        assert_eq!(watcher.next_event(Some(Duration::from_millis(200))), None);
        std::fs::write(cgroup.join("memory.events"), events(1)).unwrap();
        assert_eq!(
            watcher.next_event(Some(Duration::from_secs(5))).as_deref(),
            Some("c1")
        );
        assert_eq!(watcher.next_event(Some(Duration::from_millis(100))), None);
        watcher.unwatch("c1");
        std::fs::write(cgroup.join("memory.events"), events(2)).unwrap();
        assert_eq!(watcher.next_event(Some(Duration::from_millis(200))), None);
    }
}
