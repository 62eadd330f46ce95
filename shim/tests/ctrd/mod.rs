//! A private containerd 1.6 for the integration tests, and the helpers the
//! containerd e2e and CRI tests share.
//!
//! Each [`Containerd`] has its own root, state and sockets in a temp dir and
//! a PATH starting with the directory holding the built
//! `containerd-shim-skiff-v2` and `skiff-agent`. [`Containerd::start`] runs
//! it with the CRI plugin disabled (driven with `ctr`);
//! [`Containerd::start_cri`] enables the CRI plugin, in a network namespace
//! the test made, with a `skiff` runtime beside `runc`.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The namespace `ctr`-driven tests use.
pub const NAMESPACE: &str = "skiff-test";
/// The namespace containerd's CRI plugin uses.
pub const CRI_NAMESPACE: &str = "k8s.io";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn shim_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-skiff-v2"))
}

pub fn bin_dir() -> PathBuf {
    shim_bin().parent().unwrap().to_owned()
}

/// Returns the image tarball when the test can run; None (after printing
/// why) when it cannot. Panics under CI=true instead of skipping.
pub fn prerequisites() -> Option<PathBuf> {
    static PREREQ: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = PREREQ.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        for tool in ["containerd", "ctr", "runc"] {
            if !on_path(tool) {
                return Err(format!("{tool} missing (run scripts/containerd-env deps)"));
            }
        }
        if !Path::new("/bin/busybox").exists() {
            return Err("/bin/busybox missing (run scripts/containerd-env deps)".into());
        }
        build_agent()?;
        let out = Command::new(repo_root().join("scripts/containerd-env"))
            .arg("image")
            .output()
            .map_err(|e| format!("scripts/containerd-env: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "scripts/containerd-env image failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(PathBuf::from(path))
    });
    match result {
        Ok(path) => Some(path.clone()),
        Err(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("containerd e2e prerequisites missing under CI: {reason}")
        }
        Err(reason) => {
            eprintln!("skipped: {reason}");
            None
        }
    }
}

pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Makes sure `skiff-agent` sits next to the shim binary (same profile).
pub fn build_agent() -> Result<(), String> {
    let dir = bin_dir();
    let profile = dir.file_name().unwrap().to_string_lossy().into_owned();
    let target_dir = dir.parent().unwrap();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-q", "-p", "skiff-agent", "--bin", "skiff-agent"])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(repo_root());
    if profile == "release" {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cargo build skiff-agent: {e}"))?;
    if !out.status.success() || !dir.join("skiff-agent").exists() {
        return Err(format!(
            "cannot build skiff-agent: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A private containerd.
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The containerd namespace `ctr` works in.
    namespace: &'static str,
    /// The network namespace containerd runs in (CRI), if not the host's.
    netns: Option<PathBuf>,
}

/// What containerd's CRI plugin is started with ([`Containerd::start_cri`]).
pub struct CriSetup<'a> {
    /// The network namespace containerd runs in: CNI's bridge and the
    /// pods' host-side veths land there, never in the machine's own.
    pub netns: &'a Path,
    /// The CNI network config list (JSON) written into `conf_dir`.
    pub cni_conflist: &'a str,
    /// The sandbox (pause) image's name, imported by the test.
    pub sandbox_image: &'a str,
    /// skiff runtimes (`io.containerd.skiff.v2`) by handler name, each
    /// with the config its options name (`ConfigPath`).
    pub skiff_runtimes: &'a [(&'a str, PathBuf)],
}

impl Containerd {
    /// A containerd with the CRI plugin disabled, driven with `ctr`.
    pub fn start() -> Self {
        Self::start_with(NAMESPACE, None, |_| {
            (
                "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]".to_owned(),
                String::new(),
            )
        })
    }

    /// A containerd with its CRI plugin: runtimes `runc` (the default)
    /// and `cri.skiff_runtimes` (`io.containerd.skiff.v2`, with
    /// `ConfigPath` options),
    /// CNI from Debian's plugins with `cri.cni_conflist`, and
    /// `restrict_oom_score_adj` (root here lacks CAP_SYS_RESOURCE).
    pub fn start_cri(cri: &CriSetup<'_>) -> Self {
        Self::start_with(CRI_NAMESPACE, Some(cri.netns.to_owned()), |d| {
            let conf_dir = d.join("net.d");
            std::fs::create_dir_all(&conf_dir).unwrap();
            std::fs::write(conf_dir.join("10-skiff-test.conflist"), cri.cni_conflist).unwrap();
            let cri_key = "plugins.\"io.containerd.grpc.v1.cri\"";
            let skiff: String = cri
                .skiff_runtimes
                .iter()
                .map(|(name, config)| {
                    format!(
                        r#"
    [{cri_key}.containerd.runtimes.{name}]
      runtime_type = "io.containerd.skiff.v2"
      [{cri_key}.containerd.runtimes.{name}.options]
        ConfigPath = "{}""#,
                        config.display()
                    )
                })
                .collect();
            let tables = format!(
                r#"
[{cri_key}]
  sandbox_image = "{sandbox}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [{cri_key}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri_key}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"{skiff}
  [{cri_key}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{conf_dir}"
    max_conf_num = 1
"#,
                sandbox = cri.sandbox_image,
                conf_dir = conf_dir.display(),
            );
            (String::new(), tables)
        })
    }

    fn start_with(
        namespace: &'static str,
        netns: Option<PathBuf>,
        plugins: impl FnOnce(&Path) -> (String, String),
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skiff-ctrd-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = dir.path();
        // Top-level keys, then the plugins' tables after containerd's own.
        let (top, tables) = plugins(d);
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
{top}

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = "{d}/debug.sock"
  level = "debug"

[metrics]
  address = ""
{tables}"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
            d = d.display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let mut c = Self {
            dir,
            child: None,
            namespace,
            netns,
        };
        c.spawn();
        c
    }

    /// The temp dir holding containerd's root, state and sockets.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn spawn(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("containerd.log"))
            .unwrap();
        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(netns) = &self.netns {
            // Only the network namespace changes (unlike `ip netns exec`,
            // which also gives a mount namespace of its own): containerd's
            // mounts stay visible to the test.
            let ns = std::fs::File::open(netns).unwrap();
            // SAFETY: the closure runs in the forked child before exec and
            // only calls setns(2) on an fd that stays open until then; it
            // allocates nothing and takes no lock.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd.spawn().unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.ctr(&["version"]).status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops containerd (SIGTERM), leaving shims and containers running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// This containerd's shims: processes naming its socket, but itself.
    pub fn shims(&self) -> Vec<i32> {
        processes_mentioning(&self.sock().display().to_string())
            .into_iter()
            .filter(|p| Some(*p as u32) != self.child.as_ref().map(Child::id))
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a")
            .arg(self.sock())
            .arg("-n")
            .arg(self.namespace)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().unwrap()
    }

    /// Runs ctr, asserts success, returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}): {}\n--- containerd log tail ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 4000)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn import(&self, image: &Path) {
        self.ctr_ok(&["images", "import", image.to_str().unwrap()]);
    }

    /// The bundle containerd made for `id`.
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir
            .path()
            .join("state/io.containerd.runtime.v2.task")
            .join(self.namespace)
            .join(id)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let tasks =
                String::from_utf8_lossy(&self.ctr(&["tasks", "ls", "-q"]).stdout).into_owned();
            for id in tasks.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
                let _ = self.ctr(&["tasks", "delete", "-f", id]);
            }
            let containers =
                String::from_utf8_lossy(&self.ctr(&["containers", "ls", "-q"]).stdout).into_owned();
            for id in containers.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = self.ctr(&["containers", "delete", id]);
            }
        }
        self.stop();
        // Unmount whatever is left under the temp dir (snapshots), deepest first.
        let root = self.dir.path().display().to_string();
        let mut mounts: Vec<String> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

pub fn tail(text: &str, n: usize) -> &str {
    let start = text.len().saturating_sub(n);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    &text[start..]
}

pub fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .collect()
}

pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn pid_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    !stat
        .rsplit_once(')')
        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) && pid_alive(pid) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// The CRI tests' sandbox (pause) image tarball (`scripts/containerd-env
/// pause-image`): `localhost/pause:latest`.
pub fn pause_image() -> PathBuf {
    let out = Command::new(repo_root().join("scripts/containerd-env"))
        .arg("pause-image")
        .output()
        .expect("scripts/containerd-env");
    assert!(
        out.status.success(),
        "scripts/containerd-env pause-image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
