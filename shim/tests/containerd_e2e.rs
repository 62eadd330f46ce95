//! containerd-shim-skiff-v2 under a real containerd 1.6.
//!
//! Each test starts a private containerd (own root, state and sockets in a
//! temp dir, CRI disabled) whose PATH starts with the directory holding the
//! built `containerd-shim-skiff-v2` and `skiff-agent`, imports the busybox
//! image `scripts/containerd-env image` builds, and drives it with `ctr`.
//! Needs root, containerd, ctr, runc and busybox-static
//! (`scripts/containerd-env deps`); skips with a reason otherwise, and fails
//! instead when `CI=true`.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

mod cni;
mod ctrd;

use ctrd::*;

const SKIFF: &str = "io.containerd.skiff.v2";
const RUNC: &str = "io.containerd.runc.v2";
const IMAGE: &str = "localhost/busybox:latest";

/// What a skiff container leaves on the host, read from its bundle.
#[derive(Debug)]
struct Footprint {
    shim_pid: i32,
    /// The `linux` handler's agent process (`None` for `vm`: the agent
    /// is inside the VM, which runs in the shim's jailed VMM child).
    agent_pid: Option<i32>,
    socket: PathBuf,
    state_dir: PathBuf,
    rootfs: PathBuf,
}

impl Footprint {
    fn read(bundle: &Path) -> Self {
        let read = |name: &str| {
            std::fs::read_to_string(bundle.join(name))
                .unwrap()
                .trim()
                .to_owned()
        };
        let state_dir = PathBuf::from(read("skiff-state"));
        let agent_pid = std::fs::read_to_string(state_dir.join("agent.pid"))
            .ok()
            .map(|p| p.trim().parse().unwrap());
        Self {
            shim_pid: read("shim.pid").parse().unwrap(),
            agent_pid,
            socket: PathBuf::from(read("address").trim_start_matches("unix://")),
            state_dir,
            rootfs: bundle.join("rootfs"),
        }
    }

    fn assert_gone(&self) {
        wait_until("the shim to exit", Duration::from_secs(10), || {
            !pid_alive(self.shim_pid)
        });
        if let Some(agent) = self.agent_pid {
            wait_until("the agent to exit", Duration::from_secs(10), || {
                !pid_alive(agent)
            });
        }
        wait_until("the shim socket to go", Duration::from_secs(5), || {
            !self.socket.exists()
        });
        assert!(
            !self.state_dir.exists(),
            "state dir left: {}",
            self.state_dir.display()
        );
        let rootfs = self.rootfs.display().to_string();
        assert!(
            !mount_points().contains(&rootfs),
            "rootfs still mounted: {rootfs}"
        );
    }
}

fn run_rm(ctrd: &Containerd, runtime: &str, id: &str, cmd: &[&str]) -> Output {
    let mut args = vec!["run", "--rm", "--runtime", runtime, IMAGE, id];
    args.extend_from_slice(cmd);
    ctrd.ctr(&args)
}

#[test]
fn harness_works_with_the_runc_shim() {
    let Some(image) = prerequisites() else { return };
    let ctrd = Containerd::start();
    ctrd.import(&image);
    let out = run_rm(&ctrd, RUNC, &unique("runc"), &["echo", "hello from runc"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctrd.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from runc\n");
}

#[test]
fn run_rm_echo_and_exit_codes() {
    let Some(image) = prerequisites() else { return };
    let ctrd = Containerd::start();
    ctrd.import(&image);

    let id = unique("echo");
    let out = run_rm(&ctrd, SKIFF, &id, &["echo", "hi"]);
    assert!(
        out.status.success(),
        "{}\n--- containerd log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&ctrd.log(), 6000)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

    let out = run_rm(
        &ctrd,
        SKIFF,
        &unique("exit3"),
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err\n"));

    let out = run_rm(&ctrd, SKIFF, &unique("false"), &["false"]);
    assert_eq!(out.status.code(), Some(1));
    // Exit statuses match runc's, signal deaths included (PID 1 of a pid
    // namespace ignores its own SIGKILL, so both report 0 for that).
    for cmd in ["kill -9 $$", "sleep 100 & kill -9 $!; wait $!", "exit 255"] {
        let skiff = run_rm(&ctrd, SKIFF, &unique("code"), &["sh", "-c", cmd]);
        let runc = run_rm(&ctrd, RUNC, &unique("code"), &["sh", "-c", cmd]);
        assert_eq!(skiff.status.code(), runc.status.code(), "{cmd}");
    }

    // A binary that does not exist is an error ctr shows.
    let out = run_rm(&ctrd, SKIFF, &unique("nobin"), &["/bin/no-such-binary"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-binary"), "{err}");

    // Nothing left: shims, agents, mounts, sockets.
    wait_until("shims to exit", Duration::from_secs(10), || {
        ctrd.shims().is_empty()
    });
    // (Global mount counts race with the other tests; this containerd's
    // mounts are ours alone.)
    let root = ctrd.dir().display().to_string();
    let left: Vec<String> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(&root))
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
    let ls = ctrd.ctr_ok(&["containers", "ls", "-q"]);
    assert!(ls.trim().is_empty(), "containers left: {ls}");
}

#[test]
fn detached_exec_ps_pause_resume_kill_delete() {
    let Some(image) = prerequisites() else { return };
    let ctrd = Containerd::start();
    ctrd.import(&image);
    let id = unique("detached");
    ctrd.ctr_ok(&["run", "-d", "--runtime", SKIFF, IMAGE, &id, "sleep", "1000"]);
    let fp = Footprint::read(&ctrd.bundle(&id));
    assert!(pid_alive(fp.shim_pid) && fp.agent_pid.is_some_and(pid_alive));
    assert!(mount_points().contains(&fp.rootfs.display().to_string()));

    let ls = ctrd.ctr_ok(&["tasks", "ls"]);
    assert!(
        ls.lines().any(|l| l.contains(&id) && l.contains("RUNNING")),
        "{ls}"
    );

    let out = ctrd.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo from exec; ps | wc -l",
    ]);
    assert!(out.starts_with("from exec\n"), "{out}");
    let out = ctrd.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e2",
        &id,
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));

    let ps = ctrd.ctr_ok(&["tasks", "ps", &id]);
    let pids: Vec<&str> = ps.lines().skip(1).collect();
    assert!(!pids.is_empty(), "{ps}");

    ctrd.ctr_ok(&["tasks", "pause", &id]);
    let ls = ctrd.ctr_ok(&["tasks", "ls"]);
    assert!(
        ls.lines().any(|l| l.contains(&id) && l.contains("PAUSED")),
        "{ls}"
    );
    ctrd.ctr_ok(&["tasks", "resume", &id]);
    let ls = ctrd.ctr_ok(&["tasks", "ls"]);
    assert!(
        ls.lines().any(|l| l.contains(&id) && l.contains("RUNNING")),
        "{ls}"
    );

    // Stats come back as cgroups v1 metrics.
    let metrics = ctrd.ctr_ok(&["tasks", "metrics", &id]);
    assert!(
        metrics.contains("memory") || metrics.contains("METRIC"),
        "{metrics}"
    );

    ctrd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &id]);
    wait_until("the task to stop", Duration::from_secs(10), || {
        ctrd.ctr_ok(&["tasks", "ls"])
            .lines()
            .any(|l| l.contains(&id) && l.contains("STOPPED"))
    });
    ctrd.ctr_ok(&["tasks", "delete", &id]);
    ctrd.ctr_ok(&["containers", "delete", &id]);
    fp.assert_gone();
}

#[test]
fn large_output_is_intact() {
    let Some(image) = prerequisites() else { return };
    let ctrd = Containerd::start();
    ctrd.import(&image);
    // ~17 MB of distinct lines (no pipeline: a writer that outlives its
    // reader would depend on SIGPIPE, see TASK-PROGRESS.md).
    const LAST: u32 = 2_300_000;
    let out = run_rm(
        &ctrd,
        SKIFF,
        &unique("large"),
        &["seq", "1", &LAST.to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: String = (1..=LAST).map(|n| format!("{n}\n")).collect();
    assert!(out.stdout.len() > 16 << 20);
    assert_eq!(out.stdout.len(), expected.len());
    assert_eq!(
        Sha256::digest(&out.stdout),
        Sha256::digest(expected.as_bytes()),
        "output differs"
    );
}

/// The pid `ctr tasks ls` shows for the task `id`.
fn task_pid(ctrd: &Containerd, id: &str) -> i32 {
    let ls = ctrd.ctr_ok(&["tasks", "ls"]);
    ls.lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid for {id} in {ls}"))
}

/// Starts an attached `ctr` command (e.g. `run --rm`, which returns once
/// the task's Wait does), its output captured.
fn spawn_ctr(ctrd: &Containerd, args: &[&str]) -> std::process::Child {
    ctrd.ctr_command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits at most `bound` for the attached `ctr` to return (saying how long
/// it took since `since`, and after what), and checks its exit code.
fn expect_ctr_exit(
    ctrd: &Containerd,
    mut ctr: std::process::Child,
    bound: Duration,
    since: (Instant, &str),
    code: i32,
) {
    wait_until("ctr to return", bound, || ctr.try_wait().unwrap().is_some());
    eprintln!(
        "ctr returned {:.1} s after {}",
        since.0.elapsed().as_secs_f64(),
        since.1
    );
    let out = ctr.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}\n--- containerd log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&ctrd.log(), 8000)
    );
}

/// SIGKILLs the shim of container `id`, waits until containerd sees the
/// task stop (it notices the dead shim and runs `delete`), deletes the task
/// (an explicit delete finds it gone or removes it) and the container, and
/// checks nothing of the shim is left.
fn kill_shim_then_delete(ctrd: &Containerd, fp: &Footprint, id: &str) {
    // SAFETY: kill(2) on a shim this test started.
    unsafe { libc::kill(fp.shim_pid, libc::SIGKILL) };
    wait_until("the shim to die", Duration::from_secs(10), || {
        !pid_alive(fp.shim_pid)
    });
    wait_until("the task to stop", Duration::from_secs(30), || {
        let ls = ctrd.ctr_ok(&["tasks", "ls"]);
        !ls.lines().any(|l| l.contains(id) && l.contains("RUNNING"))
    });
    let _ = ctrd.ctr(&["tasks", "delete", id]);
    ctrd.ctr_ok(&["containers", "delete", id]);
    fp.assert_gone();
}

#[test]
fn killed_shim_is_cleaned_up_by_delete() {
    let Some(image) = prerequisites() else { return };
    let ctrd = Containerd::start();
    ctrd.import(&image);
    let id = unique("killed");
    ctrd.ctr_ok(&["run", "-d", "--runtime", SKIFF, IMAGE, &id, "sleep", "1000"]);
    let fp = Footprint::read(&ctrd.bundle(&id));
    let task_pid = task_pid(&ctrd, &id);
    assert!(pid_alive(task_pid));
    kill_shim_then_delete(&ctrd, &fp, &id);
    wait_until(
        "the container process to go",
        Duration::from_secs(10),
        || !pid_alive(task_pid),
    );
}

/// The `linux` handler's agent is SIGKILLed under an attached `ctr run
/// --rm`: the shim sees its sandbox end and stops the task, so `ctr run`
/// (blocked in the task's Wait) returns 137 within 30 s; the container's
/// process (which outlived the agent) is removed, and with `--rm` nothing
/// of the shim is left.
#[test]
fn linux_agent_death_stops_the_task() {
    let Some(image) = prerequisites() else { return };
    let ctrd = Containerd::start();
    ctrd.import(&image);
    let id = unique("agent-death");
    let run = spawn_ctr(
        &ctrd,
        &[
            "run",
            "--rm",
            "--runtime",
            SKIFF,
            IMAGE,
            &id,
            "sleep",
            "1000",
        ],
    );
    wait_until("the task to run", Duration::from_secs(30), || {
        ctrd.ctr_ok(&["tasks", "ls"])
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("RUNNING"))
    });
    let fp = Footprint::read(&ctrd.bundle(&id));
    let agent = fp.agent_pid.expect("the linux handler's agent pid");
    let task_pid = task_pid(&ctrd, &id);
    assert!(pid_alive(task_pid) && pid_alive(agent));

    let killed = Instant::now();
    // SAFETY: kill(2) on the agent this test's shim started.
    unsafe { libc::kill(agent, libc::SIGKILL) };
    expect_ctr_exit(
        &ctrd,
        run,
        Duration::from_secs(30),
        (killed, "the agent's SIGKILL"),
        137,
    );
    wait_until(
        "the container process to go",
        Duration::from_secs(10),
        || !pid_alive(task_pid),
    );
    fp.assert_gone();
}

#[test]
fn containerd_restart_keeps_the_container_managed() {
    let Some(image) = prerequisites() else { return };
    let mut ctrd = Containerd::start();
    ctrd.import(&image);
    let id = unique("restart");
    ctrd.ctr_ok(&["run", "-d", "--runtime", SKIFF, IMAGE, &id, "sleep", "1000"]);
    let fp = Footprint::read(&ctrd.bundle(&id));
    ctrd.restart();
    assert!(pid_alive(fp.shim_pid), "the shim died with containerd");
    let ls = ctrd.ctr_ok(&["tasks", "ls"]);
    assert!(
        ls.lines().any(|l| l.contains(&id) && l.contains("RUNNING")),
        "{ls}"
    );
    let out = ctrd.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "after",
        &id,
        "echo",
        "still here",
    ]);
    assert_eq!(out, "still here\n");
    ctrd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &id]);
    wait_until("the task to stop", Duration::from_secs(10), || {
        ctrd.ctr_ok(&["tasks", "ls"])
            .lines()
            .any(|l| l.contains(&id) && l.contains("STOPPED"))
    });
    ctrd.ctr_ok(&["tasks", "delete", &id]);
    ctrd.ctr_ok(&["containers", "delete", &id]);
    fp.assert_gone();
}

#[test]
fn config_errors_show_up_in_ctr() {
    let Some(image) = prerequisites() else { return };
    let ctrd = Containerd::start();
    ctrd.import(&image);
    let dir = ctrd.dir();
    let cases = [
        ("vcpu = 2\n", "unknown field `vcpu`"),
        ("memory_mib = 1\n", "memory_mib = 1 is out of range"),
        (
            "agent_path = \"/nonexistent/skiff-agent\"\n",
            "skiff-agent binary was not found",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let id = unique("badcfg");
        let out = ctrd.ctr(&[
            "run",
            "--rm",
            "--runtime",
            SKIFF,
            "--runtime-config-path",
            path.to_str().unwrap(),
            IMAGE,
            &id,
            "true",
        ]);
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{text}: {err}");
        let _ = ctrd.ctr(&["containers", "delete", &id]);
    }
    // A good config file works.
    let good = dir.join("good.toml");
    std::fs::write(&good, "handler = \"linux\"\nlog_level = \"debug\"\n").unwrap();
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        SKIFF,
        "--runtime-config-path",
        good.to_str().unwrap(),
        IMAGE,
        &unique("goodcfg"),
        "echo",
        "configured",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "configured\n");
}

/// A skiff config selecting the `vm` handler, written into `ctrd`'s dir;
/// `None` (after saying why) when this host or environment cannot boot it.
/// The kernel and agent initramfs come from `SKIFF_TEST_KERNEL` and
/// `SKIFF_TEST_AGENT_INITRD` (scripts/test builds and sets both); CI must
/// have them.
/// How many guests the tests of this file boot at once. This host has 2
/// CPUs and an emulating KVM (PVM): with every VM test's guests booting
/// at once, a guest's first container create outlived the agent's 60 s
/// request deadline. The tests run in parallel threads; each VM takes a
/// slot ([`vm_slot`]) for as long as it lives.
const VM_SLOTS: usize = 2;

/// A slot for one guest, held until dropped.
struct VmSlot;

static VM_SLOTS_USED: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static VM_SLOT_FREED: std::sync::Condvar = std::sync::Condvar::new();

/// Waits for one of the [`VM_SLOTS`].
fn vm_slot() -> VmSlot {
    let mut used = VM_SLOTS_USED.lock().unwrap_or_else(|e| e.into_inner());
    while *used >= VM_SLOTS {
        used = VM_SLOT_FREED.wait(used).unwrap_or_else(|e| e.into_inner());
    }
    *used += 1;
    VmSlot
}

impl Drop for VmSlot {
    fn drop(&mut self) {
        *VM_SLOTS_USED.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        VM_SLOT_FREED.notify_one();
    }
}

/// Templates shared by the VM tests (under the target dir, so a clean
/// clone starts without): the first VM of a config is booted and
/// snapshotted, later ones are restored, as with the default config. A
/// rebuilt shim has other templates (its binary is part of the key); the
/// store keeps the newest few.
fn shared_templates() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("skiff-e2e-templates")
}

fn vm_config(ctrd: &Containerd) -> Option<PathBuf> {
    vm_config_with(ctrd, &shared_templates())
}

/// A `vm` config whose templates live in `templates`.
fn vm_config_with(ctrd: &Containerd, templates: &Path) -> Option<PathBuf> {
    vm_config_text(ctrd, templates, "")
}

/// A `vm` config whose templates live in `templates`, with `extra` lines.
fn vm_config_text(ctrd: &Containerd, templates: &Path, extra: &str) -> Option<PathBuf> {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let (kernel, initrd) = shim::testing::vm_artifacts()?;
    let (kernel, initrd) = (kernel.display(), initrd.display());
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        assert!(!ci, "CI runs on a host with /dev/kvm");
        eprintln!("skipped: /dev/kvm is not available");
        return None;
    }
    let path = ctrd.dir().join("vm.toml");
    std::fs::write(
        &path,
        format!(
            "handler = \"vm\"\nkernel = \"{kernel}\"\ninitrd = \"{initrd}\"\n\
             memory_mib = 256\nlog_level = \"debug\"\ntemplate_dir = \"{}\"\n{extra}",
            templates.display()
        ),
    )
    .unwrap();
    Some(path)
}

/// `ctr run --rm` through the `vm` handler, twice, with templates in a
/// directory of the test's own: output and exit code come back from the
/// container in the micro-VM, and nothing is left. The first run boots its
/// VM and makes the template; the second restores its VM from it (the log
/// says so).
#[test]
fn vm_run_rm_echo_and_exit_code() {
    let Some(image) = prerequisites() else { return };
    let ctrd = Containerd::start();
    let templates = ctrd.dir().join("templates");
    let Some(config) = vm_config_with(&ctrd, &templates) else {
        return;
    };
    let _slot = vm_slot();
    ctrd.import(&image);
    for round in ["boot", "restore"] {
        vm_run_rm_echo(&ctrd, &config);
        let log = ctrd.log();
        let made = log
            .lines()
            .any(|l| l.contains(": template ") && l.contains(" made in "));
        let restored = log.contains("VM restored from template");
        assert_eq!(
            (made, restored),
            (true, round == "restore"),
            "{round}: template made, VM restored\n--- containerd log ---\n{}",
            tail(&log, 8000)
        );
    }
}

/// One `ctr run --rm` of the echo container.
fn vm_run_rm_echo(ctrd: &Containerd, config: &Path) {
    let t = Instant::now();
    let id = unique("vm-echo");
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        SKIFF,
        "--runtime-config-path",
        config.to_str().unwrap(),
        IMAGE,
        &id,
        "sh",
        "-c",
        "echo hello from the vm; echo to stderr >&2; exit 3",
    ]);
    eprintln!("vm run --rm took {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n--- containerd log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&ctrd.log(), 8000)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from the vm\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to stderr\n"));
    wait_until("the shim to exit", Duration::from_secs(30), || {
        ctrd.shims().is_empty()
    });
    let ls = ctrd.ctr_ok(&["containers", "ls", "-q"]);
    assert!(ls.trim().is_empty(), "containers left: {ls}");
}

/// Guest kernel lines reporting a process killed by a fault, from the
/// VM's serial log in the sandbox state dir.
fn guest_faults(fp: &Footprint) -> Vec<String> {
    std::fs::read(fp.state_dir.join("serial.log"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .filter(|l| l.contains("traps:") || l.contains("segfault at"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `ctr task exec` of `script` in the VM. A failed attempt is repeated (up
/// to five in all, each with a fresh exec id) only when the guest kernel
/// logged a new process fault meanwhile: the known PVM stale-page fault
/// (guest-image/README.md), printed here. Any other result is returned.
fn exec_in_vm(ctrd: &Containerd, fp: &Footprint, id: &str, exec_id: &str, script: &str) -> Output {
    retry_on_guest_fault(fp, |attempt| {
        let eid = format!("{exec_id}-{attempt}");
        ctrd.ctr(&["tasks", "exec", "--exec-id", &eid, id, "sh", "-c", script])
    })
}

/// Runs `attempt(n)` (n = 1, 2, ...) until it succeeds, it fails without a
/// new guest process fault, or five attempts are used (see
/// [`exec_in_vm`]).
fn retry_on_guest_fault(fp: &Footprint, mut run: impl FnMut(u32) -> Output) -> Output {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let before = guest_faults(fp).len();
        let out = run(attempt);
        let mut faults = guest_faults(fp);
        if !out.status.success() {
            // The guest's console line can trail the exit status.
            let deadline = Instant::now() + Duration::from_secs(5);
            while faults.len() == before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
                faults = guest_faults(fp);
            }
        }
        if !out.status.success() && faults.len() > before && attempt < 5 {
            for line in &faults[before..] {
                eprintln!("known PVM guest fault (guest-image/README.md), exec retried: {line}");
            }
            continue;
        }
        return out;
    }
}

/// Threads of a live process.
/// The shim's jailed VMM process (`skiff-vmm <sandbox>`, its child), if
/// it has one.
fn vmm_pid(shim_pid: i32) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The parent is the first field after the `(comm)` one.
        let ppid: i32 = stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (ppid == shim_pid && cmdline.starts_with(b"skiff-vmm\0")).then_some(pid)
    })
}

/// A `Key:` field of `/proc/<pid>/status`.
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in:\n{status}"))
        .trim()
        .to_owned()
}

/// A process's VmRSS in KiB (0 if it is gone).
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn thread_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `ctr run -d` of `sleep 1000` as `id` through the `vm` handler's
/// config; the container's footprint once it runs.
fn vm_run_sleeper(ctrd: &Containerd, config: &Path, id: &str) -> Footprint {
    vm_run_sleeper_with(ctrd, config, id, &[])
}

/// [`vm_run_sleeper`] with more `ctr run` flags (`flags`, e.g.
/// `--cap-add CAP_SYS_ADMIN`).
fn vm_run_sleeper_with(ctrd: &Containerd, config: &Path, id: &str, flags: &[&str]) -> Footprint {
    let t = Instant::now();
    let config = config.to_str().unwrap();
    let mut args = vec![
        "run",
        "-d",
        "--runtime",
        SKIFF,
        "--runtime-config-path",
        config,
    ];
    args.extend_from_slice(flags);
    args.extend_from_slice(&[IMAGE, id, "sleep", "1000"]);
    let out = ctrd.ctr(&args);
    assert!(
        out.status.success(),
        "{}\n--- containerd log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&ctrd.log(), 8000)
    );
    eprintln!("vm run -d of {id} took {:.1} s", t.elapsed().as_secs_f64());
    Footprint::read(&ctrd.bundle(id))
}

/// What the hostile pod member prints on the console when its flood
/// starts.
const FLOOD_MARKER: &str = "skiff-flood-start";
/// How long the member floods (the guest's `timeout`).
const FLOOD_SECS: u32 = 15;
/// The bound on an exec's answer while the flood runs.
const FLOOD_EXEC_BOUND: Duration = Duration::from_secs(90);
/// The bound on the shim's own resident memory under the flood (a debug
/// build; the guest's memory is in its VMM process).
const FLOOD_SHIM_RSS_BOUND_KIB: u64 = 96 * 1024;
/// The bound on the VMM process's resident memory under the flood: the
/// guest's memory (`memory_mib` in [`vm_config`], all of it touched by a
/// guest writing a disk through its page cache) plus 64 MiB.
const FLOOD_VMM_RSS_BOUND_KIB: u64 = (256 + 64) * 1024;

/// The highest values seen on the host while a guest floods.
#[derive(Debug, Default)]
struct FloodPeak {
    /// The shim's VmRSS, in KiB.
    rss_kib: u64,
    /// The VMM process's VmRSS, in KiB.
    vmm_rss_kib: u64,
    /// The serial log's current file.
    serial_log: u64,
    /// The serial log's rotated file.
    serial_log_1: u64,
    /// Bytes allocated on the host for the sandbox's state dir.
    state_dir_allocated: u64,
    /// The sum of the apparent sizes of the disk images in it.
    images_size: u64,
    /// How much containerd's log (the shim's log included) grew.
    log_growth: u64,
}

impl FloodPeak {
    fn sample(&mut self, fp: &Footprint) {
        use std::os::unix::fs::MetadataExt;
        self.rss_kib = self.rss_kib.max(rss_kib(fp.shim_pid));
        if let Some(vmm) = vmm_pid(fp.shim_pid) {
            self.vmm_rss_kib = self.vmm_rss_kib.max(rss_kib(vmm));
        }
        let len = |name: &str| {
            std::fs::metadata(fp.state_dir.join(name))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        self.serial_log = self.serial_log.max(len("serial.log"));
        self.serial_log_1 = self.serial_log_1.max(len("serial.log.1"));
        let (mut allocated, mut images) = (0, 0);
        for entry in std::fs::read_dir(&fp.state_dir).unwrap().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            allocated += meta.blocks() * 512;
            if entry.file_name().to_string_lossy().ends_with(".ext4") {
                images += meta.len();
            }
        }
        self.state_dir_allocated = self.state_dir_allocated.max(allocated);
        self.images_size = self.images_size.max(images);
    }

    /// Serial log files within their cap, the shim's and the VMM's memory
    /// within [`FLOOD_SHIM_RSS_BOUND_KIB`] and
    /// [`FLOOD_VMM_RSS_BOUND_KIB`], the host disk within the images' fixed
    /// sizes and the two log files, containerd's log within 1 MiB of
    /// growth.
    fn check(&self) {
        use shim::vmm::SERIAL_LOG_CAP_BYTES;
        eprintln!("flood peaks: {self:?}");
        assert!(self.rss_kib > 0, "no VmRSS sampled");
        assert!(self.vmm_rss_kib > 0, "no VmRSS of the VMM sampled");
        assert!(self.serial_log <= SERIAL_LOG_CAP_BYTES, "{self:?}");
        assert!(self.serial_log_1 <= SERIAL_LOG_CAP_BYTES, "{self:?}");
        assert!(self.rss_kib <= FLOOD_SHIM_RSS_BOUND_KIB, "{self:?}");
        assert!(self.vmm_rss_kib <= FLOOD_VMM_RSS_BOUND_KIB, "{self:?}");
        assert!(
            self.state_dir_allocated <= self.images_size + 2 * SERIAL_LOG_CAP_BYTES + (1 << 20),
            "{self:?}"
        );
        assert!(self.log_growth <= 1 << 20, "{self:?}");
    }
}

/// `ctr run -d`, `ctr task exec`, a second container of the same pod
/// (`ctr run --rm` with the group annotation), `kill` and `delete`
/// through the `vm` handler; the shim (and with it the VM's threads, memory and fds) and
/// every file the sandbox had are gone afterwards.
#[test]
fn vm_detached_exec_kill_delete() {
    let Some(image) = prerequisites() else { return };
    let ctrd = Containerd::start();
    let Some(config) = vm_config(&ctrd) else {
        return;
    };
    let _slot = vm_slot();
    ctrd.import(&image);
    let id = unique("vm-detached");
    let fp = vm_run_sleeper(&ctrd, &config, &id);
    assert!(pid_alive(fp.shim_pid));
    assert_eq!(
        fp.agent_pid, None,
        "no host agent process with the vm handler"
    );
    assert!(fp.state_dir.join("vsock.sock").exists());
    // The VM runs in the shim's jailed VMM child (`skiff-vmm <sandbox>`):
    // serving the pod's virtio-fs share, uid 0 with exactly the file
    // server's capabilities (CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER,
    // FSETID, SETGID, SETUID, MKNOD), no_new_privs, every thread under a
    // seccomp filter, PID 1 of its own PID namespace, in its own cgroup.
    // (Without a share, nobody with no capabilities: tests/vm_jail.rs.)
    let vmm = vmm_pid(fp.shim_pid).expect("the shim has a skiff-vmm child");
    let cmdline = std::fs::read(format!("/proc/{vmm}/cmdline")).unwrap();
    assert_eq!(cmdline, format!("skiff-vmm\0{id}\0").into_bytes());
    let st = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    let fs_caps = format!("{:016x}", (1u64 << 27) | 0xdf);
    assert_eq!(status_field(&st, "CapEff"), fs_caps, "{st}");
    assert_eq!(status_field(&st, "CapPrm"), fs_caps, "{st}");
    assert_eq!(status_field(&st, "CapBnd"), fs_caps, "{st}");
    assert_eq!(status_field(&st, "CapInh"), "0000000000000000", "{st}");
    assert_eq!(status_field(&st, "NoNewPrivs"), "1", "{st}");
    assert_eq!(status_field(&st, "Uid"), "0\t0\t0\t0", "{st}");
    assert_eq!(
        status_field(&st, "NSpid"),
        format!("{vmm}\t1"),
        "its own PID namespace: {st}"
    );
    for task in std::fs::read_dir(format!("/proc/{vmm}/task")).unwrap() {
        let task = task.unwrap().path();
        let st = std::fs::read_to_string(task.join("status")).unwrap();
        assert_eq!(
            status_field(&st, "Seccomp"),
            "2",
            "{}: {st}",
            task.display()
        );
    }
    let shim_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", fp.shim_pid)).unwrap();
    let vmm_cgroup = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    // Named after the sandbox's state directory.
    let name = fp.state_dir.file_name().unwrap().to_string_lossy();
    assert!(
        vmm_cgroup
            .lines()
            .any(|l| l.ends_with(&format!("/skiff/{name}"))),
        "VMM cgroups (state dir {}):\n{vmm_cgroup}\nshim's:\n{shim_cgroup}",
        fp.state_dir.display()
    );
    let threads = thread_count(vmm);
    assert!(
        threads >= 3,
        "VMM threads (control, vsock, vCPU): {threads}"
    );

    let ls = ctrd.ctr_ok(&["tasks", "ls"]);
    assert!(
        ls.lines().any(|l| l.contains(&id) && l.contains("RUNNING")),
        "{ls}"
    );
    // One exec, shell built-ins only (one guest process): its output
    // shows the guest's kernel, its exit code comes back.
    let out = exec_in_vm(
        &ctrd,
        &fp,
        &id,
        "e1",
        "read -r rel </proc/sys/kernel/osrelease; echo from exec in ${rel%%-*}; \
         echo written-in-the-guest > /from-guest; exit 7",
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(out.starts_with("from exec in 6.12."), "{out}");
    // The guest's write to its rootfs (virtio-fs) is in the container's
    // snapshot on the host, where `ctr snapshot diff` and commits see it.
    let snapshots = ctrd
        .dir()
        .join("root/io.containerd.snapshotter.v1.overlayfs/snapshots");
    let found: Vec<_> = std::fs::read_dir(&snapshots)
        .unwrap()
        .filter_map(|e| {
            let f = e.ok()?.path().join("fs/from-guest");
            std::fs::read_to_string(&f).ok()
        })
        .collect();
    assert_eq!(found, ["written-in-the-guest\n"], "{}", snapshots.display());
    assert!(
        !host_release.starts_with("6.12."),
        "cannot tell guest from host"
    );

    // A second container of the same pod (group annotation) joins the VM:
    // its rootfs goes into a spare disk slot, and out again on --rm. It is
    // hostile for FLOOD_SECS first (CAP_SYS_ADMIN for the guest's devices
    // and an unthrottled /dev/kmsg): it spams the serial console through
    // the tty and through printk, and storms its disk with direct writes
    // (no dirty pages left to flush at its end), while an exec in the
    // first container must still answer and the host's side stays
    // bounded.
    assert_eq!(ctrd.shims(), vec![fp.shim_pid]);
    let group = format!("io.containerd.runc.v2.group={id}");
    let flood = format!(
        "set -e; mkdir -p /tmp/dev /tmp/proc; mount -t devtmpfs dev /tmp/dev; \
         mount -t proc proc /tmp/proc; echo on >/tmp/proc/sys/kernel/printk_devkmsg; \
         echo {FLOOD_MARKER} >/tmp/dev/kmsg; l=$(printf %0200d 0); \
         timeout {FLOOD_SECS} yes $l >/tmp/dev/ttyS0 & \
         timeout {FLOOD_SECS} sh -c \"while :; do echo skiff-flood-$l; done\" >/tmp/dev/kmsg & \
         timeout {FLOOD_SECS} dd if=/dev/zero of=/storm bs=1M oflag=direct 2>/dev/null & \
         wait; \
         read -r rel </proc/sys/kernel/osrelease; echo pod member in ${{rel%%-*}}; exit 4"
    );
    let t = Instant::now();
    let (out, peak) = std::thread::scope(|s| {
        let member = s.spawn(|| {
            retry_on_guest_fault(&fp, |attempt| {
                let member = format!("{id}-member{attempt}");
                ctrd.ctr(&[
                    "run",
                    "--rm",
                    "--runtime",
                    SKIFF,
                    "--runtime-config-path",
                    config.to_str().unwrap(),
                    "--annotation",
                    &group,
                    "--cap-add",
                    "CAP_SYS_ADMIN",
                    IMAGE,
                    &member,
                    "sh",
                    "-c",
                    &flood,
                ])
            })
        });
        wait_until("the flood to start", Duration::from_secs(300), || {
            member.is_finished() || serial_text(&fp).contains(FLOOD_MARKER)
        });
        let flooded = Instant::now();
        let log_before = ctrd.log().len();
        let (ctrd, fp, id) = (&ctrd, &fp, &id);
        let alive = s.spawn(move || {
            retry_on_guest_fault(fp, |attempt| {
                let eid = format!("alive-{attempt}");
                let mut exec = spawn_ctr(
                    ctrd,
                    &["tasks", "exec", "--exec-id", &eid, id, "echo", "alive"],
                );
                wait_until("an exec under the flood", FLOOD_EXEC_BOUND, || {
                    exec.try_wait().unwrap().is_some()
                });
                eprintln!(
                    "exec under the flood answered in {:.1} s",
                    flooded.elapsed().as_secs_f64()
                );
                exec.wait_with_output().unwrap()
            })
        });
        let mut peak = FloodPeak::default();
        while !member.is_finished() {
            peak.sample(fp);
            std::thread::sleep(Duration::from_millis(250));
        }
        peak.log_growth = ctrd.log().len().saturating_sub(log_before) as u64;
        eprintln!(
            "flood: {:.1} s from its start to the member's end",
            flooded.elapsed().as_secs_f64()
        );
        let alive = alive.join().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&alive.stdout),
            "alive\n",
            "exec under the flood: {}",
            String::from_utf8_lossy(&alive.stderr)
        );
        (member.join().unwrap(), peak)
    });
    peak.check();
    eprintln!(
        "second container of the pod: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}\n--- containerd log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&ctrd.log(), 8000)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("pod member in 6.12."), "{stdout}");
    assert_eq!(ctrd.shims(), vec![fp.shim_pid], "the pod's one shim ran it");
    // The first container's rootfs is still bound in the pod's share; the
    // member's went with it.
    let entries: Vec<String> = std::fs::read_dir(fp.state_dir.join("shared"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["e0"], "the member's rootfs is unbound with it");

    ctrd.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", &id]);
    wait_until("the task to stop", Duration::from_secs(60), || {
        ctrd.ctr_ok(&["tasks", "ls"])
            .lines()
            .any(|l| l.contains(&id) && l.contains("STOPPED"))
    });
    ctrd.ctr_ok(&["tasks", "delete", &id]);
    ctrd.ctr_ok(&["containers", "delete", &id]);
    fp.assert_gone();
}

/// `ctr events` of a containerd, running in the background into a file.
struct Events {
    child: Child,
    path: PathBuf,
}

impl Events {
    fn start(ctrd: &Containerd) -> Self {
        let path = ctrd.dir().join("events.log");
        let file = std::fs::File::create(&path).unwrap();
        let child = ctrd
            .ctr_command(&["events"])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, path }
    }

    /// The event on `topic` (`/tasks/exit`, ...) about container `id`
    /// (and process `exec_id`, for events that name one), if one was
    /// published.
    fn find(&self, topic: &str, id: &str, exec_id: &str) -> Option<String> {
        let container = format!("\"container_id\":\"{id}\"");
        let process = format!("\"id\":\"{exec_id}\"");
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .find(|l| {
                l.contains(&format!(" {topic} "))
                    && l.contains(&container)
                    && (l.contains(&process) || !l.contains("\"id\":"))
            })
            .map(str::to_owned)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The VM's serial log (the current file and the rotated one) as text.
fn serial_text(fp: &Footprint) -> String {
    let path = fp.state_dir.join("serial.log");
    let mut text = String::new();
    for p in [path.with_extension("log.1"), path] {
        text.push_str(&String::from_utf8_lossy(
            &std::fs::read(p).unwrap_or_default(),
        ));
    }
    text
}

/// `/dev/kmsg` of the guest as `$k`, from a devtmpfs (the container has
/// CAP_SYS_ADMIN but not `--privileged`, whose device list is the host's:
/// a hundred nodes for the guest to make, and none of them its own).
const GUEST_KMSG: &str = "mkdir -p /tmp/dev && mount -t devtmpfs dev /tmp/dev && k=/tmp/dev/kmsg;";

/// One way for a sandbox to end.
struct GuestDeath {
    name: &'static str,
    strike: Strike,
}

/// What ends the sandbox.
enum Strike {
    /// A script for `ctr task exec` in a container in the guest's root
    /// PID namespace with CAP_SYS_ADMIN and CAP_SYS_PTRACE. It writes
    /// `skiff-death-<name>` to the kernel log (so to the serial log) right
    /// before it strikes.
    Guest(String),
    /// The host SIGKILLs the pod's VMM process (`skiff-vmm`).
    KillVmm,
}

/// The deaths in lanes: the pods of a lane boot one after the other, the
/// lanes at once (this 2-CPU host does not boot three guests at once
/// within the agent's 60 s for a create).
fn guest_deaths() -> Vec<Vec<GuestDeath>> {
    let death = |name, strike: &str| GuestDeath {
        name,
        strike: Strike::Guest(format!("set -e; {GUEST_KMSG} {strike}")),
    };
    vec![
        vec![
            // The guest's init (the agent) killed, and with it a guest
            // kernel panic ("Attempted to kill init!"). Init ignores every
            // signal sent to it from its own PID namespace, SIGKILL
            // included, but not a fault of its own: int3 over the agent's
            // text through /proc/1/mem, and its next instruction raises
            // SIGTRAP. panic=-1 and reboot=k reset the VM through the
            // i8042, as `reboot -f` does: a pod rebooting takes the host's
            // same path.
            death(
                "init",
                "m=$(awk '$2 == \"r-xp\" && $6 ~ /^\\// {print $1; exit}' /proc/1/maps); \
                 s=$((0x${m%-*})); e=$((0x${m#*-})); \
                 tr '\\000' '\\314' </dev/zero | head -c $((e - s)) >/tmp/int3; \
                 echo skiff-death-init >$k; \
                 dd if=/tmp/int3 of=/proc/1/mem bs=4096 seek=$((s / 4096)) conv=notrunc",
            ),
        ],
        vec![
            // The agent stops answering (the VM runs on): the agent moved
            // into a cgroup of its own and frozen. The shim gives up on it
            // after two Health requests without an answer. (The sleep lets
            // the agent answer this exec's start first: a request caught
            // in the freeze waits out its own 60 s deadline.)
            death(
                "silent",
                "mkdir -p /tmp/cg; mount -t cgroup2 cg /tmp/cg; mkdir /tmp/cg/frozen; \
                 sleep 5; echo 1 >/tmp/cg/frozen/cgroup.procs; echo skiff-death-silent >$k; \
                 echo 1 >/tmp/cg/frozen/cgroup.freeze",
            ),
            // The VMM process killed from the host (the OOM killer, an
            // operator, a seccomp filter's SIGSYS all end it alike).
            GuestDeath {
                name: "vmm",
                strike: Strike::KillVmm,
            },
        ],
    ]
}

/// Three ways a sandbox ends, one pod each: the guest's init (the agent)
/// killed by a fault, so a guest kernel panic and a VM reset; the agent
/// frozen (silent, the VM running on); the VMM process SIGKILLed from the
/// host. For each, within 30 s of the strike (its marker in the serial
/// log, or the kill): `ctr task attach` (the task's Wait) and the striking
/// `ctr task exec` (which also waits for its output's EOF) return 137;
/// then TaskExit and TaskDelete events with 137 were published (`ctr
/// events`; the attached ctr deletes the task it waited for), the task
/// is gone from `ctr task ls`, the container deletes cleanly, and the
/// shim, its socket, the sandbox's state dir and the rootfs mount are
/// gone.
#[test]
fn vm_guest_deaths_stop_their_tasks() {
    let Some(image) = prerequisites() else { return };
    let ctrd = Containerd::start();
    let Some(config) = vm_config(&ctrd) else {
        return;
    };
    ctrd.import(&image);
    let events = Events::start(&ctrd);
    let started = Instant::now();
    std::thread::scope(|s| {
        let pods: Vec<_> = guest_deaths()
            .into_iter()
            .map(|lane| {
                let (ctrd, config, events) = (&ctrd, &config, &events);
                s.spawn(move || {
                    let _slot = vm_slot();
                    for death in &lane {
                        guest_death_stops_its_task(ctrd, config, events, death, started);
                    }
                })
            })
            .collect();
        let failed: Vec<String> = pods
            .into_iter()
            .filter_map(|pod| pod.join().err())
            .map(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default()
            })
            .collect();
        assert!(
            failed.is_empty(),
            "{} pod(s) failed:\n{}",
            failed.len(),
            failed.join("\n\n")
        );
    });
}

/// The lines of containerd's log about container `id` or from its shim.
fn pod_log(ctrd: &Containerd, fp: &Footprint, id: &str) -> String {
    let shim = format!("pid={}", fp.shim_pid);
    let log = ctrd.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(id) || l.contains(&shim))
        .map(|l| tail(l, 400))
        .collect();
    tail(&lines.join("\n"), 12000).to_owned()
}

/// One pod of [`vm_guest_deaths_stop_their_tasks`].
fn guest_death_stops_its_task(
    ctrd: &Containerd,
    config: &Path,
    events: &Events,
    death: &GuestDeath,
    started: Instant,
) {
    const BOUND: Duration = Duration::from_secs(30);
    let name = death.name;
    let id = unique(&format!("vm-death-{name}"));
    let fp = vm_run_sleeper_with(
        ctrd,
        config,
        &id,
        &[
            "--cap-add",
            "CAP_SYS_ADMIN",
            "--cap-add",
            "CAP_SYS_PTRACE",
            "--with-ns",
            "pid:/proc/1/ns/pid",
        ],
    );
    eprintln!(
        "{name}: running {:.1} s after the start",
        started.elapsed().as_secs_f64()
    );
    // Attached: ctr returns the task's exit status once its Wait does.
    let mut wait = spawn_ctr(ctrd, &["tasks", "attach", &id]);
    std::thread::sleep(Duration::from_secs(1));
    if wait.try_wait().unwrap().is_some() {
        let out = wait.wait_with_output().unwrap();
        panic!(
            "{name}: ctr task attach returned ({}) before the strike: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (exec, struck) = match &death.strike {
        Strike::Guest(script) => strike_in_guest(ctrd, &fp, &id, name, script),
        Strike::KillVmm => {
            let vmm = vmm_pid(fp.shim_pid).expect("the shim has a skiff-vmm child");
            // SAFETY: kill(2) on the VMM process of a shim this test started.
            assert_eq!(unsafe { libc::kill(vmm, libc::SIGKILL) }, 0);
            (None, Instant::now())
        }
    };
    eprintln!(
        "{name}: struck {:.1} s after the start",
        started.elapsed().as_secs_f64()
    );
    expect_ctr_exit(
        ctrd,
        wait,
        BOUND,
        (struck, &format!("{name}: the strike (task attach)")),
        137,
    );
    // The striking exec is a process of the sandbox too.
    if let Some(exec) = exec {
        let left = BOUND.saturating_sub(struck.elapsed());
        expect_ctr_exit(
            ctrd,
            exec,
            left,
            (struck, &format!("{name}: the strike (exec)")),
            137,
        );
    }
    // The TaskExit of the task, and its delete by the attached ctr (which
    // deletes the task it waited for), both with 137.
    for (topic, what) in [("/tasks/exit", "TaskExit"), ("/tasks/delete", "TaskDelete")] {
        wait_until(
            &format!("{name}: the {what} event"),
            Duration::from_secs(10),
            || events.find(topic, &id, &id).is_some(),
        );
        let event = events.find(topic, &id, &id).unwrap();
        assert!(
            event.contains("\"exit_status\":137"),
            "{name}: {event}\n--- containerd log of the pod ---\n{}",
            pod_log(ctrd, &fp, &id)
        );
    }
    let ls = ctrd.ctr_ok(&["tasks", "ls"]);
    assert!(!ls.contains(&id), "{name}: {ls}");
    ctrd.ctr_ok(&["containers", "delete", &id]);
    fp.assert_gone();
    eprintln!(
        "{name}: clean {:.1} s after the strike",
        struck.elapsed().as_secs_f64()
    );
}

/// Runs `script` (a [`Strike::Guest`]) in pod `id` until its marker is in
/// the serial log; the striking exec and when it struck.
fn strike_in_guest(
    ctrd: &Containerd,
    fp: &Footprint,
    id: &str,
    name: &str,
    script: &str,
) -> (Option<std::process::Child>, Instant) {
    let marker = format!("skiff-death-{name}");
    // The strike, repeated (with a fresh exec id) only when the exec ended
    // before striking and the guest logged the known PVM process fault.
    let mut attempt = 0;
    let (exec, struck) = loop {
        attempt += 1;
        let faults = guest_faults(fp).len();
        let exec_id = format!("strike-{attempt}");
        let mut exec = spawn_ctr(
            ctrd,
            &[
                "tasks",
                "exec",
                "--exec-id",
                &exec_id,
                id,
                "sh",
                "-c",
                script,
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        let struck = loop {
            if serial_text(fp).contains(&marker) {
                break Some(Instant::now());
            }
            if exec.try_wait().unwrap().is_some() && !serial_text(fp).contains(&marker) {
                break None;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: no {marker} in the serial log"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        match struck {
            Some(at) => break (exec, at),
            None if guest_faults(fp).len() > faults && attempt < 3 => {
                eprintln!("{name}: known PVM guest fault (guest-image/README.md), strike retried");
            }
            None => {
                let out = exec.wait_with_output().unwrap();
                panic!(
                    "{name}: the strike ended ({}) without striking\nstdout: {}\nstderr: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    };
    (Some(exec), struck)
}

/// The `vm` handler's shim is killed with its container running: the VM
/// (threads and memory of that process) dies with it, and containerd's
/// `delete` removes what it left: the disk images, vsock socket and serial
/// log in the state dir, the shim socket and the rootfs mount.
#[test]
fn vm_killed_shim_is_cleaned_up_by_delete() {
    let Some(image) = prerequisites() else { return };
    let ctrd = Containerd::start();
    let Some(config) = vm_config(&ctrd) else {
        return;
    };
    let _slot = vm_slot();
    ctrd.import(&image);
    let id = unique("vm-killed");
    let fp = vm_run_sleeper(&ctrd, &config, &id);
    for name in ["shared", "vsock.sock", "serial.log"] {
        assert!(fp.state_dir.join(name).exists(), "{name} while running");
    }
    let state_dir = fp.state_dir.display().to_string();
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&state_dir))
            .count()
    };
    // The share, and the container's rootfs bound under it.
    assert!(mounted() >= 2, "the share's mounts while running");
    kill_shim_then_delete(&ctrd, &fp, &id);
    assert_eq!(mounted(), 0, "the dead shim's share is unmounted by delete");
}

#[test]
fn vm_unservable_binds_are_refused_before_boot() {
    let Some(image) = prerequisites() else { return };
    let ctrd = Containerd::start();
    let Some(config) = vm_config_text(&ctrd, &shared_templates(), "vm_rootfs = \"block\"\n") else {
        return;
    };
    ctrd.import(&image);
    let vol = ctrd.dir().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("file"), b"x").unwrap();
    let cases = [
        (
            format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display()),
            "read-write bind mounts need the virtio-fs share",
        ),
        (
            format!(
                "type=bind,src={}/file,dst=/f,options=rbind:ro",
                vol.display()
            ),
            "only directories can be bind-mounted into the VM",
        ),
    ];
    for (mount, expected) in &cases {
        let id = unique("vm-bind");
        let t = Instant::now();
        let out = ctrd.ctr(&[
            "run",
            "--rm",
            "--runtime",
            SKIFF,
            "--runtime-config-path",
            config.to_str().unwrap(),
            "--mount",
            mount,
            IMAGE,
            &id,
            "true",
        ]);
        eprintln!("refused in {:.1} s", t.elapsed().as_secs_f64());
        assert!(!out.status.success(), "{mount}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{mount}: {err}");
        let _ = ctrd.ctr(&["containers", "delete", &id]);
    }
    wait_until("the shims to exit", Duration::from_secs(30), || {
        ctrd.shims().is_empty()
    });
}

/// Why the pod network test cannot run, if it cannot (a failure under CI).
fn cni_prerequisites() -> bool {
    match cni::unavailable() {
        None => true,
        Some(reason) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "pod network prerequisites missing under CI: {reason}"
            );
            eprintln!("skipped: {reason}");
            false
        }
    }
}

/// `ctr run -d` of `cmd` as `id` in the pod network namespace `netns`,
/// through `runtime` (with `config` for skiff) and `flags`.
fn run_in_pod(
    ctrd: &Containerd,
    runtime: &str,
    config: &Path,
    netns: &Path,
    flags: &[&str],
    id: &str,
    cmd: &[&str],
) {
    let ns = format!("network:{}", netns.display());
    let mut args = vec!["run", "-d", "--runtime", runtime, "--with-ns", &ns];
    if runtime == SKIFF {
        args.extend(["--runtime-config-path", config.to_str().unwrap()]);
    }
    args.extend_from_slice(flags);
    args.push(IMAGE);
    args.push(id);
    args.extend_from_slice(cmd);
    let t = Instant::now();
    let out = ctrd.ctr(&args);
    assert!(
        out.status.success(),
        "ctr run {id}: {}\n--- containerd log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&ctrd.log(), 8000)
    );
    eprintln!(
        "run -d of {id} ({runtime}) took {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// An exec's stdout, asserted successful.
fn exec_ok(ctrd: &Containerd, fp: &Footprint, id: &str, what: &str, script: &str) -> String {
    let t = Instant::now();
    let out = exec_in_vm(ctrd, fp, id, &unique(what), script);
    eprintln!("{what} in {id} took {:.1} s", t.elapsed().as_secs_f64());
    assert!(
        out.status.success(),
        "{what} in {id}: {}{}\n--- serial ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&serial_text(fp), 4000)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Links and ingress qdiscs in a pod's namespace: what the VM's wiring
/// leaves (or not).
fn pod_links_and_qdiscs(pod: &cni::Pod<'_>) -> (String, String) {
    (
        pod.netns.exec(&["ip", "-br", "link"]).unwrap(),
        pod.netns
            .exec(&["tc", "qdisc", "show", "dev", "eth0", "ingress"])
            .unwrap(),
    )
}

/// Pod networking on a CNI bridge, all in namespaces the test makes
/// (`cni`): pod A (`vm`) serves a 4 MiB file with busybox httpd on its pod
/// IP; pod B (`vm`) and pod C (runc) fetch it and get its hash; A and B
/// ping each other; a second container of pod A fetches over localhost;
/// deleting the pods leaves no tap and no tc qdisc in their namespaces.
/// A pod namespace with no interface is refused at create, nothing left.
#[test]
fn vm_pod_network() {
    let Some(image) = prerequisites() else { return };
    if !cni_prerequisites() {
        return;
    }
    let ctrd = Containerd::start();
    let Some(config) = vm_config(&ctrd) else {
        return;
    };
    ctrd.import(&image);
    let net = cni::CniNet::new().unwrap();
    let (a, b, c) = (
        net.add_pod().unwrap(),
        net.add_pod().unwrap(),
        net.add_pod().unwrap(),
    );
    let (links_before, _) = pod_links_and_qdiscs(&a);
    let (id_a, id_b, id_c) = (unique("pod-a"), unique("pod-b"), unique("pod-c"));

    // A bad pod network fails at create, before a VM starts, and leaves
    // nothing in the namespace.
    let empty = cni::Netns::new("empty").unwrap();
    let ns = format!("network:{}", empty.path().display());
    let bad = unique("pod-bad");
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        SKIFF,
        "--runtime-config-path",
        config.to_str().unwrap(),
        "--with-ns",
        &ns,
        IMAGE,
        &bad,
        "true",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no interface") && stderr.contains(empty.name()),
        "{stderr}"
    );
    let links = empty.exec(&["ip", "-br", "link"]).unwrap();
    assert!(!links.contains("tap0_skiff"), "{links}");
    let _ = ctrd.ctr(&["containers", "rm", &bad]);

    // Pod A serves a 4 MiB random file made on the host, from a read-only
    // volume (the guest's CPU is slow under PVM: nothing to compute there).
    let www = tempfile::tempdir().unwrap();
    let data = shim::testing::noise(12, 4 << 20);
    let sum: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(www.path().join("f"), &data).unwrap();
    std::fs::write(www.path().join("f.sum"), format!("{sum}\n")).unwrap();
    let volume = format!(
        "type=bind,src={},dst=/www,options=rbind:ro",
        www.path().display()
    );
    // The pod's /etc/hosts and /etc/resolv.conf, bound read-write as the
    // CRI plugin binds them: the guest gets copies.
    let pod_files = tempfile::tempdir().unwrap();
    let hosts = format!("127.0.0.1 localhost\n{} pod-a\n", a.ip);
    let resolv = "nameserver 10.99.0.53\nsearch pods.test\n";
    std::fs::write(pod_files.path().join("hosts"), &hosts).unwrap();
    std::fs::write(pod_files.path().join("resolv.conf"), resolv).unwrap();
    let bind = |name: &str| {
        format!(
            "type=bind,src={},dst=/etc/{name},options=rbind:rw",
            pod_files.path().join(name).display()
        )
    };
    let (hosts_mount, resolv_mount) = (bind("hosts"), bind("resolv.conf"));
    let _slots = (vm_slot(), vm_slot());
    run_in_pod(
        &ctrd,
        SKIFF,
        &config,
        &a.netns.path(),
        &[
            "--mount",
            &volume,
            "--mount",
            &hosts_mount,
            "--mount",
            &resolv_mount,
        ],
        &id_a,
        &["httpd", "-f", "-p", "8080", "-h", "/www"],
    );
    let fp_a = Footprint::read(&ctrd.bundle(&id_a));
    let (links, qdiscs) = pod_links_and_qdiscs(&a);
    assert!(links.contains("tap0_skiff"), "{links}");
    assert!(qdiscs.contains("ingress"), "{qdiscs}");
    let addr = exec_ok(
        &ctrd,
        &fp_a,
        &id_a,
        "addr",
        "ip -4 -o addr show eth0; echo ---; cat /etc/hosts /etc/resolv.conf",
    );
    let (addr, files) = addr.split_once("---\n").unwrap();
    assert!(addr.contains(&format!("inet {}/24", a.ip)), "{addr}");
    assert_eq!(files, format!("{hosts}{resolv}"));
    // httpd may still be starting: the first fetch waits for it.
    let fetch = format!(
        "i=0; until wget -q -O /dev/null http://{a}:8080/f.sum; do \
           i=$((i + 1)); [ $i -lt 60 ] || exit 1; sleep 1; done; \
         wget -q -O - http://{a}:8080/f | sha256sum",
        a = a.ip
    );

    // B, in a VM of its own.
    run_in_pod(
        &ctrd,
        SKIFF,
        &config,
        &b.netns.path(),
        &[],
        &id_b,
        &["sleep", "1000"],
    );
    let fp_b = Footprint::read(&ctrd.bundle(&id_b));
    let got = exec_ok(&ctrd, &fp_b, &id_b, "fetch", &fetch);
    assert_eq!(
        got.split_whitespace().next(),
        Some(sum.as_str()),
        "B got {got}"
    );
    exec_ok(
        &ctrd,
        &fp_b,
        &id_b,
        "ping",
        &format!("ping -c 1 -W 10 {}", a.ip),
    );
    exec_ok(
        &ctrd,
        &fp_a,
        &id_a,
        "ping",
        &format!("ping -c 1 -W 10 {}", b.ip),
    );

    // C, under runc.
    let ns_c = format!("network:{}", c.netns.path().display());
    let script_c = format!("{fetch} && ping -c 1 -W 10 {}", a.ip);
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNC,
        "--with-ns",
        &ns_c,
        IMAGE,
        &id_c,
        "sh",
        "-c",
        &script_c,
    ]);
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{got}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        got.split_whitespace().next(),
        Some(sum.as_str()),
        "C got {got}"
    );

    // A second container of pod A shares its network: localhost.
    let group = format!("io.containerd.runc.v2.group={id_a}");
    let ns_a = format!("network:{}", a.netns.path().display());
    let member = unique("pod-a-member");
    let out = retry_on_guest_fault(&fp_a, |attempt| {
        let member = format!("{member}-{attempt}");
        ctrd.ctr(&[
            "run",
            "--rm",
            "--runtime",
            SKIFF,
            "--runtime-config-path",
            config.to_str().unwrap(),
            "--annotation",
            &group,
            "--with-ns",
            &ns_a,
            IMAGE,
            &member,
            "wget",
            "-q",
            "-O",
            "-",
            "http://127.0.0.1:8080/f.sum",
        ])
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), sum);

    // Gone with their pods: the taps and the qdiscs; B's shim is killed
    // (SIGKILL), and containerd's delete removes them.
    let _ = ctrd.ctr(&["tasks", "kill", "-s", "SIGKILL", &id_a]);
    wait_until("the task to be deleted", Duration::from_secs(60), || {
        ctrd.ctr(&["tasks", "delete", &id_a]).status.success()
    });
    ctrd.ctr_ok(&["containers", "rm", &id_a]);
    kill_shim_then_delete(&ctrd, &fp_b, &id_b);
    for pod in [&a, &b] {
        let (links, qdiscs) = pod_links_and_qdiscs(pod);
        assert!(!links.contains("tap0_skiff"), "{links}");
        assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    }
    assert_eq!(pod_links_and_qdiscs(&a).0, links_before);
    wait_until("the shims to exit", Duration::from_secs(30), || {
        ctrd.shims().is_empty()
    });
}
