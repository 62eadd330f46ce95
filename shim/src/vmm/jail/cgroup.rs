//! The jailed VMM's own cgroup: `skiff/<sandbox>` under the pod's cgroup
//! when the sandbox's spec names one ([`pod_parent`]), else under the
//! shim's, holding guest memory plus the VMM's overhead, the vCPUs' CPU,
//! and a bound on its threads. cgroup v2 (one hierarchy) or v1 (the
//! `memory`, `cpu` and `pids` hierarchies).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The v1 controllers the VMM is put under.
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// The CFS period the CPU quota is expressed in.
const CPU_PERIOD: Duration = Duration::from_millis(100);

/// Errors setting a cgroup up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/cgroup` could not be read or names no usable hierarchy.
    #[error("cannot find this process's cgroup ({0})")]
    Unknown(String),
    /// A cgroup file could not be written or a directory made.
    #[error("cannot set up cgroup {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What the cgroup holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Most bytes of memory (guest RAM plus the VMM's overhead).
    pub memory_bytes: u64,
    /// Most CPUs' worth of time per period.
    pub cpus: u32,
    /// Most tasks (threads).
    pub pids: u32,
}

/// A VMM cgroup (one directory per hierarchy); removed on drop once empty.
#[derive(Debug)]
pub struct VmmCgroup {
    dirs: Vec<PathBuf>,
}

/// Which cgroup hierarchies this process is in.
#[derive(Debug, PartialEq, Eq)]
enum Layout {
    /// cgroup v2: the unified hierarchy's path.
    V2(String),
    /// cgroup v1: (controller, path) for each controller we use.
    V1(Vec<(&'static str, String)>),
}

fn layout(proc_self_cgroup: &str, v2_mounted: bool) -> Result<Layout, CgroupError> {
    let mut v1 = Vec::new();
    let mut unified = None;
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            unified = Some(path.to_owned());
            continue;
        }
        for c in V1_CONTROLLERS {
            if controllers.split(',').any(|x| x == c) {
                v1.push((c, path.to_owned()));
            }
        }
    }
    if v1.len() == V1_CONTROLLERS.len() {
        return Ok(Layout::V1(v1));
    }
    match unified {
        Some(path) if v2_mounted => Ok(Layout::V2(path)),
        _ => Err(CgroupError::Unknown(
            "neither cgroup v2 nor the v1 memory, cpu and pids controllers".into(),
        )),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io {
        path: path.to_owned(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    // Another shim may remove an empty `skiff` parent just as this one
    // makes its child there (see `remove_dirs`): try again.
    let mut result = std::fs::create_dir_all(path);
    for _ in 0..3 {
        match &result {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                result = std::fs::create_dir_all(path);
            }
            _ => break,
        }
    }
    match result {
        Ok(()) => Ok(()),
        Err(source) => Err(CgroupError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The directories `skiff/<name>` takes under `parent` (a path in every
/// hierarchy), or under this process's cgroups.
fn dirs(name: &str, parent: Option<&str>) -> Result<(Layout, Vec<PathBuf>), CgroupError> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| CgroupError::Unknown(e.to_string()))?;
    let v2_mounted = Path::new(CGROUP_ROOT).join("cgroup.controllers").exists();
    let layout = layout(&text, v2_mounted)?;
    let under = |base: PathBuf, own: &str| {
        base.join(parent.unwrap_or(own).trim_start_matches('/'))
            .join("skiff")
            .join(name)
    };
    let dirs = match &layout {
        Layout::V2(path) => vec![under(PathBuf::from(CGROUP_ROOT), path)],
        Layout::V1(list) => list
            .iter()
            .map(|(c, path)| under(Path::new(CGROUP_ROOT).join(c), path))
            .collect(),
    };
    Ok((layout, dirs))
}

/// Which cgroup hierarchies a VMM cgroup would use on this host, for
/// `skiff check`: `cgroup v1 (memory, cpu, pids)` or `cgroup v2`.
pub fn host_layout() -> Result<String, CgroupError> {
    let (layout, _) = dirs("check", None)?;
    Ok(match layout {
        Layout::V2(_) => "cgroup v2 (memory, cpu, pids)".into(),
        Layout::V1(_) => format!("cgroup v1 ({})", V1_CONTROLLERS.join(", ")),
    })
}

/// The pod's cgroup, from the sandbox container's `linux.cgroupsPath`: the
/// parent of a cgroupfs path (`/kubepods/burstable/pod<uid>/<id>`, as CRI
/// gives it; `ctr` gives `/<namespace>/<id>`), or the slice of a systemd
/// one (`kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`, expanded
/// to its path). `None` for a relative path (relative to the runtime's own
/// cgroup, as runc reads it: the VMM then goes under the shim's) or one
/// that could climb out (`..`).
pub fn pod_parent(cgroups_path: &str) -> Option<String> {
    if cgroups_path.split('/').any(|c| c == "..") {
        return None;
    }
    if let Some(path) = cgroups_path.strip_prefix('/') {
        let parent = Path::new(path).parent()?;
        return Some(format!("/{}", parent.display()));
    }
    let mut parts = cgroups_path.split(':');
    let (Some(slice), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let slice = if slice.is_empty() { "-.slice" } else { slice };
    let unit = slice.strip_suffix(".slice")?;
    if unit == "-" {
        return Some("/".into());
    }
    if unit.is_empty() || unit.contains('/') || unit.starts_with('-') || unit.ends_with('-') {
        return None;
    }
    // systemd nests `a-b-c.slice` in `a.slice/a-b.slice/`.
    let mut path = String::new();
    let mut prefix = String::new();
    for part in unit.split('-') {
        if part.is_empty() {
            return None;
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push('/');
        path.push_str(&prefix);
        path.push_str(".slice");
    }
    Some(path)
}

/// Whether `dir` can be a VMM cgroup directory named `name` (what a
/// leftover record may name: it lives where the VMM could rewrite it).
fn is_vmm_cgroup_dir(dir: &Path, name: &str) -> bool {
    dir.starts_with(CGROUP_ROOT)
        && dir.is_absolute()
        && dir.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        })
        && dir.file_name().is_some_and(|n| n == name)
        && dir
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|n| n == "skiff")
}

impl VmmCgroup {
    /// Makes `skiff/<name>` under `parent` (the pod's cgroup, see
    /// [`pod_parent`]; `None`: the shim's) with `limits` (an old one of
    /// that name is reused).
    pub fn create(
        name: &str,
        parent: Option<&str>,
        limits: CgroupLimits,
    ) -> Result<Self, CgroupError> {
        let (layout, dirs) = dirs(name, parent)?;
        let cgroup = VmmCgroup { dirs };
        let quota = (CPU_PERIOD * limits.cpus).as_micros();
        let period = CPU_PERIOD.as_micros();
        match layout {
            Layout::V2(_) => {
                let dir = &cgroup.dirs[0];
                // Controllers must be enabled from the top down.
                let skiff = dir.parent().expect("skiff/<name> has a parent");
                let base = skiff.parent().expect("skiff has a parent");
                mkdir(skiff)?;
                for parent in [base, skiff] {
                    write(&parent.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
                }
                mkdir(dir)?;
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                write(&dir.join("memory.swap.max"), "0").ok();
                write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
            }
            Layout::V1(_) => {
                for dir in &cgroup.dirs {
                    mkdir(dir)?;
                }
                for dir in &cgroup.dirs {
                    match dir
                        .strip_prefix(CGROUP_ROOT)
                        .ok()
                        .and_then(|p| p.iter().next())
                    {
                        Some(c) if c == "memory" => {
                            write(
                                &dir.join("memory.limit_in_bytes"),
                                &limits.memory_bytes.to_string(),
                            )?;
                        }
                        Some(c) if c == "cpu" => {
                            write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                            write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                        }
                        _ => write(&dir.join("pids.max"), &limits.pids.to_string())?,
                    }
                }
            }
        }
        Ok(cgroup)
    }

    /// Moves process `pid` into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The cgroup's directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Writes the cgroup's directories to `record` (one per line), for
    /// [`VmmCgroup::remove_leftover`] after a dead shim.
    pub fn record(&self, record: &Path) -> std::io::Result<()> {
        let mut text = String::new();
        for dir in &self.dirs {
            text.push_str(&dir.to_string_lossy());
            text.push('\n');
        }
        std::fs::write(record, text)
    }

    /// Removes a cgroup `skiff/<name>` a dead shim left: the directories
    /// in `record` (those that can be a VMM cgroup named `name`; others
    /// are ignored), or without one, `skiff/<name>` under this process's
    /// cgroups. Waits up to `timeout` for its processes to go.
    pub fn remove_leftover(
        name: &str,
        record: &Path,
        timeout: Duration,
    ) -> Result<(), CgroupError> {
        let dirs = match std::fs::read_to_string(record) {
            Ok(text) => text
                .lines()
                .map(PathBuf::from)
                .filter(|d| {
                    let ok = is_vmm_cgroup_dir(d, name);
                    if !ok {
                        log::warn!("ignoring {} in {}", d.display(), record.display());
                    }
                    ok
                })
                .collect(),
            Err(_) => dirs(name, None)?.1,
        };
        remove_dirs(&dirs, timeout)
    }
}

fn remove_dirs(dirs: &[PathBuf], timeout: Duration) -> Result<(), CgroupError> {
    let deadline = Instant::now() + timeout;
    for dir in dirs {
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => {
                    // The `skiff` directory above it too, once empty (a
                    // pod's has only this one; a shared one stays while
                    // other VMMs are in it).
                    if let Some(skiff) = dir.parent().filter(|p| p.ends_with("skiff")) {
                        let _ = std::fs::remove_dir(skiff);
                    }
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // EBUSY while a task is still leaving.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(source) => {
                    return Err(CgroupError::Io {
                        path: dir.clone(),
                        source,
                    })
                }
            }
        }
    }
    Ok(())
}

impl Drop for VmmCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_dirs(&self.dirs, Duration::from_secs(2)) {
            log::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hierarchies_are_read_from_proc_self_cgroup() {
        let v1 = "9:name=systemd:/\n8:pids:/a\n4:memory:/b/c\n2:cpu,cpuacct:/\n0::/\n";
        assert_eq!(
            layout(v1, false).unwrap(),
            Layout::V1(vec![
                ("pids", "/a".into()),
                ("memory", "/b/c".into()),
                ("cpu", "/".into())
            ])
        );
        assert_eq!(
            layout("0::/system.slice/containerd.service\n", true).unwrap(),
            Layout::V2("/system.slice/containerd.service".into())
        );
        // v1 without pids, and no v2 mounted: nothing usable.
        assert!(layout("4:memory:/\n2:cpu:/\n0::/\n", false).is_err());
        assert!(layout("garbage", true).is_err());
    }

    #[test]
    fn a_cgroup_is_made_limited_joined_and_removed() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: making cgroups needs root");
            return;
        }
        let name = format!("unit-test-{}", std::process::id());
        let limits = CgroupLimits {
            memory_bytes: 96 << 20,
            cpus: 2,
            pids: 20,
        };
        // Under a pod parent of the test's own (as CRI's pod cgroup).
        let parent = format!("/skiff-unit-pod-{}", std::process::id());
        let cgroup = VmmCgroup::create(&name, Some(&parent), limits).unwrap();
        let dirs = cgroup.dirs().to_vec();
        let record = std::env::temp_dir().join(format!("{name}.cgroup"));
        cgroup.record(&record).unwrap();
        assert!(!dirs.is_empty());
        let read = |dir: &Path, file: &str| {
            std::fs::read_to_string(dir.join(file))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let mut seen = Vec::new();
        for dir in &dirs {
            assert!(dir.ends_with(Path::new("skiff").join(&name)), "{dir:?}");
            assert!(
                dir.to_string_lossy().contains(&format!("{parent}/skiff/")),
                "{dir:?}"
            );
            for (file, want) in [
                ("memory.limit_in_bytes", "100663296"),
                ("memory.max", "100663296"),
                ("cpu.cfs_quota_us", "200000"),
                ("cpu.max", "200000 100000"),
                ("pids.max", "20"),
            ] {
                if dir.join(file).exists() {
                    assert_eq!(read(dir, file), want, "{dir:?}/{file}");
                    seen.push(file);
                }
            }
        }
        assert!(seen.iter().any(|f| f.starts_with("memory")), "{seen:?}");
        assert!(seen.iter().any(|f| f.starts_with("cpu")), "{seen:?}");
        assert!(seen.contains(&"pids.max"), "{seen:?}");

        // A child process joins it.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        cgroup.add(child.id() as i32).unwrap();
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert!(own.contains(&format!("{parent}/skiff/{name}")), "{own}");
        child.kill().unwrap();
        child.wait().unwrap();
        // A dead shim's leftover: forget the handle, remove by the record.
        std::mem::forget(cgroup);
        assert!(dirs.iter().all(|d| d.is_dir()));
        VmmCgroup::remove_leftover(&name, &record, Duration::from_secs(2)).unwrap();
        for dir in &dirs {
            assert!(!dir.exists(), "{dir:?} left behind");
            // The pod's `skiff` directory held only this one: gone too.
            assert!(!dir.parent().unwrap().exists(), "{dir:?}'s skiff left");
        }
        // Removing what is already gone is fine.
        VmmCgroup::remove_leftover(&name, &record, Duration::from_millis(10)).unwrap();
        let _ = std::fs::remove_file(&record);
        for dir in &dirs {
            // The test's pod parent and its `skiff`.
            let skiff = dir.parent().unwrap();
            let _ = std::fs::remove_dir(skiff);
            let _ = std::fs::remove_dir(skiff.parent().unwrap());
        }
    }

    #[test]
    fn the_pod_parent_comes_from_the_cgroups_path() {
        // cgroupfs, as CRI and ctr give it.
        assert_eq!(
            pod_parent("/kubepods/burstable/pod1234/abcd").as_deref(),
            Some("/kubepods/burstable/pod1234")
        );
        assert_eq!(pod_parent("/default/c1").as_deref(), Some("/default"));
        assert_eq!(pod_parent("/c1").as_deref(), Some("/"));
        // systemd: the slice, expanded.
        assert_eq!(
            pod_parent("kubepods-burstable-pod1234.slice:cri-containerd:abcd").as_deref(),
            Some("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice")
        );
        assert_eq!(
            pod_parent("system.slice:docker:x").as_deref(),
            Some("/system.slice")
        );
        assert_eq!(pod_parent(":cri-containerd:x").as_deref(), Some("/"));
        // Relative, climbing out, or malformed: none (the shim's cgroup).
        for bad in [
            "relative/c1",
            "/a/../../etc/c1",
            "a--b.slice:p:n",
            "a.slice:p",
            "a.slice:p:n:extra",
            "notaslice:p:n",
            "a/b.slice:p:n",
        ] {
            assert_eq!(pod_parent(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_leftover_record_names_only_vmm_cgroups() {
        for (dir, ok) in [
            ("/sys/fs/cgroup/memory/kubepods/skiff/abc", true),
            ("/sys/fs/cgroup/skiff/abc", true),
            ("/sys/fs/cgroup/memory/kubepods/abc", false),
            ("/sys/fs/cgroup/memory/skiff/other", false),
            ("/sys/fs/cgroup/memory/../../../etc/skiff/abc", false),
            ("/etc/skiff/abc", false),
            ("sys/fs/cgroup/skiff/abc", false),
        ] {
            assert_eq!(is_vmm_cgroup_dir(Path::new(dir), "abc"), ok, "{dir}");
        }
    }
}
