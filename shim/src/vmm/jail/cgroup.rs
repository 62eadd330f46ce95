//! The jailed VMM's own cgroup: `skiff/<sandbox>` under the shim's cgroup,
//! holding guest memory plus the VMM's overhead, the vCPUs' CPU, and a
//! bound on its threads. cgroup v2 (one hierarchy) or v1 (the `memory`,
//! `cpu` and `pids` hierarchies).

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
    match std::fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(source) => Err(CgroupError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The directories `skiff/<name>` takes under this process's cgroups.
fn dirs(name: &str) -> Result<(Layout, Vec<PathBuf>), CgroupError> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| CgroupError::Unknown(e.to_string()))?;
    let v2_mounted = Path::new(CGROUP_ROOT).join("cgroup.controllers").exists();
    let layout = layout(&text, v2_mounted)?;
    let under = |base: PathBuf, path: &str| base.join(path.trim_start_matches('/')).join("skiff");
    let dirs = match &layout {
        Layout::V2(path) => vec![under(PathBuf::from(CGROUP_ROOT), path).join(name)],
        Layout::V1(list) => list
            .iter()
            .map(|(c, path)| under(Path::new(CGROUP_ROOT).join(c), path).join(name))
            .collect(),
    };
    Ok((layout, dirs))
}

impl VmmCgroup {
    /// Makes `skiff/<name>` with `limits` (an old one of that name is
    /// reused).
    pub fn create(name: &str, limits: CgroupLimits) -> Result<Self, CgroupError> {
        let (layout, dirs) = dirs(name)?;
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

    /// Removes a cgroup `skiff/<name>` a dead shim left (waits up to
    /// `timeout` for its processes to go).
    pub fn remove_leftover(name: &str, timeout: Duration) -> Result<(), CgroupError> {
        let (_, dirs) = dirs(name)?;
        remove_dirs(&dirs, timeout)
    }
}

fn remove_dirs(dirs: &[PathBuf], timeout: Duration) -> Result<(), CgroupError> {
    let deadline = Instant::now() + timeout;
    for dir in dirs {
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
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
        let cgroup = VmmCgroup::create(&name, limits).unwrap();
        let dirs = cgroup.dirs().to_vec();
        assert!(!dirs.is_empty());
        let read = |dir: &Path, file: &str| {
            std::fs::read_to_string(dir.join(file))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let mut seen = Vec::new();
        for dir in &dirs {
            assert!(dir.ends_with(Path::new("skiff").join(&name)), "{dir:?}");
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
        assert!(own.contains(&format!("/skiff/{name}")), "{own}");
        child.kill().unwrap();
        child.wait().unwrap();
        drop(cgroup);
        for dir in &dirs {
            assert!(!dir.exists(), "{dir:?} left behind");
        }
        // Removing what is already gone is fine.
        VmmCgroup::remove_leftover(&name, Duration::from_millis(10)).unwrap();
    }
}
