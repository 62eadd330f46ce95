//! Test fixture: a busybox rootfs from Debian's busybox-static and a real
//! `skiff-agent` process on a temporary unix socket, driven by the generated
//! ttrpc client.

#![allow(dead_code, missing_docs)]

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Spec;
use skiff_agent_proto::agent as pb;
use skiff_agent_proto::agent_ttrpc::AgentClient;

pub const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh",
    "echo",
    "cat",
    "sleep",
    "true",
    "false",
    "head",
    "dd",
    "sha256sum",
    "kill",
    "stty",
    "ls",
    "ps",
    "wc",
    "tail",
    "yes",
    "id",
    "hostname",
    "env",
    "seq",
    "tr",
];

/// Returns true (after printing why) when the test cannot run here.
pub fn skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not root");
        return true;
    }
    if !Path::new(BUSYBOX).exists() {
        eprintln!("skipped: {BUSYBOX} missing (apt-get install -y busybox-static)");
        return true;
    }
    false
}

/// A busybox rootfs in a temp dir.
pub struct Rootfs {
    pub dir: tempfile::TempDir,
}

impl Rootfs {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skiff-rootfs-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        for sub in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        for applet in APPLETS {
            symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The default OCI spec (runc's) running `args`.
pub fn spec(args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap();
    process.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    process.set_env(Some(vec![
        "PATH=/bin".into(),
        "TERM=xterm".into(),
        "HOME=/root".into(),
    ]));
    spec.set_process(Some(process));
    let mut root = spec.root().clone().unwrap();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    spec
}

pub fn spec_json(spec: &Spec) -> Vec<u8> {
    serde_json::to_vec(spec).unwrap()
}

/// The agent binary under test: cargo's, or `$SKIFF_AGENT_BIN` (e.g. the
/// static build that goes into the guest initramfs).
pub fn agent_binary() -> PathBuf {
    std::env::var_os("SKIFF_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_skiff-agent")))
}

/// A running agent process with its own state dir and cgroup parent.
pub struct Agent {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub cgroup_parent: String,
    pub client: AgentClient,
    killed: bool,
}

impl Agent {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skiff-agent-")
            .tempdir()
            .unwrap();
        let state = dir.path().join("state");
        Self::start_in(dir, &state, None)
    }

    /// An agent whose state dir is `state` (kept across agents).
    pub fn start_with_state(state: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skiff-agent-")
            .tempdir()
            .unwrap();
        Self::start_in(dir, state, None)
    }

    /// An agent with a given state dir and cgroup parent.
    pub fn start_with(state: &Path, cgroup_parent: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skiff-agent-")
            .tempdir()
            .unwrap();
        Self::start_in(dir, state, Some(cgroup_parent.to_owned()))
    }

    /// Kills the agent process only, leaving its containers running.
    pub fn kill_only(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Drop would remove the containers; skip its sandbox teardown.
        self.killed = true;
    }

    fn start_in(dir: tempfile::TempDir, state: &Path, cgroup_parent: Option<String>) -> Self {
        let socket = dir.path().join("agent.sock");
        let cgroup_parent = cgroup_parent.unwrap_or_else(|| {
            format!(
                "/skiff-test-{}-{}",
                std::process::id(),
                dir.path().file_name().unwrap().to_string_lossy()
            )
        });
        let child = Command::new(agent_binary())
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .arg("--state-dir")
            .arg(state)
            .arg("--cgroup-parent")
            .arg(&cgroup_parent)
            .arg("--rootfs-mount-dir")
            .arg(dir.path().join("rootfs-mounts"))
            .arg("--log-level")
            .arg(std::env::var("SKIFF_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // The agent renames its socket into place once it is listening.
        let mut child = child;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agent did not create its socket");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let client = connect(&socket);
        Self {
            child,
            dir,
            socket,
            cgroup_parent,
            client,
            killed: false,
        }
    }

    /// Where this agent mounts block-device rootfs.
    pub fn rootfs_mount_dir(&self) -> PathBuf {
        self.dir.path().join("rootfs-mounts")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A second connection.
    pub fn connect(&self) -> AgentClient {
        connect(&self.socket)
    }

    /// The agent's child processes.
    pub fn children(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let tasks = format!("/proc/{}/task", self.pid());
        for task in std::fs::read_dir(tasks).unwrap().flatten() {
            let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        out
    }

    /// Cgroup directories under this agent's cgroup parent, all hierarchies.
    pub fn cgroup_dirs(&self) -> usize {
        let mut count = 0;
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let dir = hierarchy
                .path()
                .join(self.cgroup_parent.trim_start_matches('/'));
            if let Ok(entries) = std::fs::read_dir(dir) {
                count += entries.flatten().filter(|e| e.path().is_dir()).count();
            }
        }
        count
    }

    /// Creates a container; returns its init pid.
    pub fn create(&self, id: &str, spec: &Spec, rootfs: &Path, stdin: bool, terminal: bool) -> i32 {
        self.try_create(id, &spec_json(spec), rootfs, stdin, terminal)
            .unwrap_or_else(|e| panic!("create {id}: {e:?}"))
            .pid
    }

    pub fn try_create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &Path,
        stdin: bool,
        terminal: bool,
    ) -> ttrpc::Result<pb::CreateContainerResponse> {
        let mut req = pb::CreateContainerRequest::new();
        req.container_id = id.into();
        req.spec_json = spec_json.to_vec();
        req.rootfs = rootfs.display().to_string();
        req.stdin = stdin;
        req.terminal = terminal;
        self.client.create_container(ctx(), &req)
    }

    pub fn start_container(&self, id: &str) {
        let mut req = pb::ContainerRequest::new();
        req.container_id = id.into();
        self.client.start_container(ctx(), &req).unwrap();
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> i32 {
        let mut req = pb::ProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        self.client.wait_process(ctx(), &req).unwrap().exit_status
    }

    pub fn read_all(&self, id: &str, exec_id: &str, stderr: bool) -> Vec<u8> {
        read_all(&self.client, id, exec_id, stderr)
    }

    pub fn remove(&self, id: &str) {
        let mut req = pb::ContainerRequest::new();
        req.container_id = id.into();
        self.client.remove_container(ctx(), &req).unwrap();
    }

    pub fn state(&self, id: &str) -> String {
        let mut req = pb::ContainerRequest::new();
        req.container_id = id.into();
        self.client.state_container(ctx(), &req).unwrap().status
    }

    /// Create, start, collect stdout/stderr, wait, remove.
    pub fn run(&self, id: &str, spec: &Spec, rootfs: &Path) -> (i32, Vec<u8>, Vec<u8>) {
        self.create(id, spec, rootfs, false, false);
        self.start_container(id);
        let (out, err) = std::thread::scope(|s| {
            let err = s.spawn(|| read_all(&self.connect(), id, "", true));
            let out = self.read_all(id, "", false);
            (out, err.join().unwrap())
        });
        let code = self.wait(id, "");
        self.remove(id);
        (code, out, err)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Remove whatever a failed test left running, then stop the agent.
        let _ = self.client.destroy_sandbox(
            ttrpc::context::with_timeout(10_000_000_000),
            &pb::Empty::new(),
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.killed {
            return;
        }
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let _ = std::fs::remove_dir(
                hierarchy
                    .path()
                    .join(self.cgroup_parent.trim_start_matches('/')),
            );
        }
    }
}

pub fn connect(socket: &Path) -> AgentClient {
    let client = ttrpc::Client::connect(&format!("unix://{}", socket.display())).unwrap();
    AgentClient::new(client)
}

/// A context with a generous deadline, so a hung agent fails the test.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(20_000_000_000)
}

pub fn read_all(client: &AgentClient, id: &str, exec_id: &str, stderr: bool) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut req = pb::ReadStreamRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        let resp = if stderr {
            client.read_stderr(ctx(), &req)
        } else {
            client.read_stdout(ctx(), &req)
        }
        .unwrap();
        if resp.eof {
            return out;
        }
        out.extend_from_slice(&resp.data);
    }
}

/// The ttrpc status code of an error.
pub fn code_of(err: &ttrpc::Error) -> ttrpc::Code {
    match err {
        ttrpc::Error::RpcStatus(status) => status.code(),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

/// Mounts whose mount point lies under one of `roots` — what one test can
/// leak, unaffected by tests running in parallel elsewhere.
pub fn mounts_under(roots: &[&Path]) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| roots.iter().any(|r| Path::new(m).starts_with(r)))
        .collect()
}
