//! End-to-end tests: a real agent process runs real containers (root only).

mod common;

use common::{ctx, skip, spec, Agent, Rootfs};
use skiff_agent_proto::agent as pb;

#[test]
fn health_and_version() {
    if skip() {
        return;
    }
    let agent = Agent::start();
    let health = agent.client.health(ctx(), &pb::Empty::new()).unwrap();
    assert_eq!(health.status, "SERVING");
    let version = agent.client.version(ctx(), &pb::Empty::new()).unwrap();
    assert_eq!(
        version.protocol_version,
        skiff_agent_proto::PROTOCOL_VERSION
    );
}

#[test]
fn echo_output() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    let (code, out, err) = agent.run(
        "echo",
        &spec(&["sh", "-c", "echo hello; echo oops >&2"]),
        rootfs.path(),
    );
    assert_eq!(String::from_utf8_lossy(&out), "hello\n");
    assert_eq!(String::from_utf8_lossy(&err), "oops\n");
    assert_eq!(code, 0);
}

#[test]
fn container_processes_get_default_sigpipe() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    // With SIGPIPE ignored (the Rust runtime's default, inherited across exec)
    // `yes | head` would never end: `yes` would spin on EPIPE.
    let (code, out, _) = agent.run(
        "sigpipe",
        &spec(&["cat", "/proc/self/status"]),
        rootfs.path(),
    );
    let out = String::from_utf8_lossy(&out);
    let ign = out
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .expect("SigIgn line");
    assert_eq!(
        ign & (1 << (libc::SIGPIPE - 1)),
        0,
        "SIGPIPE ignored: {ign:#x}"
    );
    assert_eq!(code, 0);
}

#[test]
fn exit_codes_and_signal_deaths() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    let (code, _, _) = agent.run("exit3", &spec(&["sh", "-c", "exit 3"]), rootfs.path());
    assert_eq!(code, 3);
    let (code, _, _) = agent.run("false", &spec(&["false"]), rootfs.path());
    assert_eq!(code, 1);
    // The shell kills itself: a signal death reports 128 + signal. (Without a
    // pid namespace, since PID 1 cannot be killed from inside its namespace.)
    let mut no_pidns = spec(&["sh", "-c", "kill -9 $$"]);
    let mut linux = no_pidns.linux().clone().unwrap();
    let namespaces = linux.namespaces().clone().unwrap();
    linux.set_namespaces(Some(
        namespaces
            .into_iter()
            .filter(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Pid)
            .collect(),
    ));
    no_pidns.set_linux(Some(linux));
    let (code, _, _) = agent.run("self-kill", &no_pidns, rootfs.path());
    assert_eq!(code, 128 + 9);

    // SignalProcess from outside. PID 1 of a pid namespace only takes
    // SIGKILL/SIGSTOP (or handled signals) from outside, so SIGKILL it...
    agent.create(
        "sleeper",
        &spec(&["sleep", "1000"]),
        rootfs.path(),
        false,
        false,
    );
    agent.start_container("sleeper");
    assert_eq!(agent.state("sleeper"), "running");

    // ...and SIGTERM an exec process, which is not PID 1.
    let process = spec(&["sleep", "1000"]).process().clone().unwrap();
    let mut exec = pb::ExecProcessRequest::new();
    exec.container_id = "sleeper".into();
    exec.exec_id = "victim".into();
    exec.process_json = serde_json::to_vec(&process).unwrap();
    let pid = agent.client.exec_process(ctx(), &exec).unwrap().pid;
    // The pid is the exec's own: a live process that is not the init's.
    assert!(pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(cmdline.starts_with(b"sleep\0"), "{cmdline:?}");
    let mut req = pb::SignalProcessRequest::new();
    req.container_id = "sleeper".into();
    req.exec_id = "victim".into();
    req.signal = 15;
    agent.client.signal_process(ctx(), &req).unwrap();
    assert_eq!(agent.wait("sleeper", "victim"), 128 + 15);

    req.exec_id = String::new();
    req.signal = 9;
    agent.client.signal_process(ctx(), &req).unwrap();
    assert_eq!(agent.wait("sleeper", ""), 128 + 9);
    assert_eq!(agent.state("sleeper"), "stopped");
    agent.remove("sleeper");
}

#[test]
fn exec_into_running_container() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    agent.create(
        "box",
        &spec(&["sleep", "1000"]),
        rootfs.path(),
        false,
        false,
    );
    agent.start_container("box");

    let mut process = spec(&["sh", "-c", "echo exec-$((6*7)); exit 5"])
        .process()
        .clone()
        .unwrap();
    process.set_cwd("/tmp".into());
    let mut req = pb::ExecProcessRequest::new();
    req.container_id = "box".into();
    req.exec_id = "e1".into();
    req.process_json = serde_json::to_vec(&process).unwrap();
    agent.client.exec_process(ctx(), &req).unwrap();
    assert_eq!(agent.read_all("box", "e1", false), b"exec-42\n");
    assert_eq!(agent.wait("box", "e1"), 5);

    // The exec sees the init process in its pid namespace.
    process.set_args(Some(vec![
        "sh".into(),
        "-c".into(),
        "cat /proc/1/cmdline".into(),
    ]));
    req.exec_id = "e2".into();
    req.process_json = serde_json::to_vec(&process).unwrap();
    agent.client.exec_process(ctx(), &req).unwrap();
    assert_eq!(agent.read_all("box", "e2", false), b"sleep\x001000\x00");
    assert_eq!(agent.wait("box", "e2"), 0);

    // A duplicate exec id is refused.
    let err = agent.client.exec_process(ctx(), &req).unwrap_err();
    assert_eq!(common::code_of(&err), ttrpc::Code::ALREADY_EXISTS);

    // Container processes are the agent's children (the spawner makes them
    // with CLONE_PARENT), so the agent's reaper collects them.
    let mut state = pb::ContainerRequest::new();
    state.container_id = "box".into();
    let pid = agent.client.state_container(ctx(), &state).unwrap().pid;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ppid = status.lines().find(|l| l.starts_with("PPid:")).unwrap();
    assert_eq!(
        ppid.split_whitespace().nth(1).unwrap(),
        agent.pid().to_string()
    );

    let mut list = pb::ContainerRequest::new();
    list.container_id = "box".into();
    let pids = agent.client.list_processes(ctx(), &list).unwrap().pids;
    assert_eq!(pids.len(), 1, "only sleep is left: {pids:?}");
    agent.remove("box");
}

#[test]
fn stdin_round_trip_and_close() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    agent.create("cat", &spec(&["cat"]), rootfs.path(), true, false);
    agent.start_container("cat");
    let payload: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let reader = agent.connect();
    let out = std::thread::spawn(move || common::read_all(&reader, "cat", "", false));
    for chunk in payload.chunks(64 * 1024) {
        let mut req = pb::WriteStdinRequest::new();
        req.container_id = "cat".into();
        req.data = chunk.to_vec();
        let written = agent.client.write_stdin(ctx(), &req).unwrap();
        assert_eq!(written.len as usize, chunk.len());
    }
    let mut close = pb::ProcessRequest::new();
    close.container_id = "cat".into();
    agent.client.close_stdin(ctx(), &close).unwrap();
    assert_eq!(agent.wait("cat", ""), 0);
    assert!(
        out.join().unwrap() == payload,
        "binary data came back intact"
    );
    agent.remove("cat");
}

#[test]
fn terminal_resize() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    // Wait for a line on stdin, then report the terminal size.
    agent.create(
        "tty",
        &spec(&[
            "sh",
            "-c",
            "read line; stty size; test -t 0 && echo is-a-tty",
        ]),
        rootfs.path(),
        true,
        true,
    );
    agent.start_container("tty");
    let mut resize = pb::TtyWinResizeRequest::new();
    resize.container_id = "tty".into();
    resize.rows = 37;
    resize.cols = 101;
    agent.client.tty_win_resize(ctx(), &resize).unwrap();
    let mut req = pb::WriteStdinRequest::new();
    req.container_id = "tty".into();
    req.data = b"go\n".to_vec();
    agent.client.write_stdin(ctx(), &req).unwrap();
    let out = String::from_utf8_lossy(&agent.read_all("tty", "", false)).into_owned();
    assert_eq!(agent.wait("tty", ""), 0);
    assert!(out.contains("37 101"), "stty size output: {out:?}");
    assert!(out.contains("is-a-tty"), "output: {out:?}");
    // No separate stderr on a terminal.
    let mut read = pb::ReadStreamRequest::new();
    read.container_id = "tty".into();
    let err = agent.client.read_stderr(ctx(), &read).unwrap_err();
    assert_eq!(common::code_of(&err), ttrpc::Code::FAILED_PRECONDITION);
    agent.remove("tty");
}

#[test]
fn large_output_is_lossless() {
    use sha2::{Digest, Sha256};
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    // 64 MiB of pseudo-random bytes; the container prints their hash on stderr.
    let script = "dd if=/dev/urandom of=/tmp/blob bs=1M count=64 2>/dev/null; \
                  sha256sum /tmp/blob >&2; cat /tmp/blob";
    let mut spec = spec(&["sh", "-c", script]);
    // /tmp in the rootfs is a directory on the host disk; fine for 64 MiB.
    spec.set_hostname(Some("big".into()));
    let (code, out, err) = agent.run("big", &spec, rootfs.path());
    assert_eq!(code, 0, "stderr: {}", String::from_utf8_lossy(&err));
    assert_eq!(out.len(), 64 << 20);
    let digest: String = Sha256::digest(&out)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let reported = String::from_utf8_lossy(&err);
    assert!(
        reported.starts_with(&digest),
        "sha256 mismatch: got {digest}, container says {reported}"
    );
}

#[test]
fn pause_and_resume() {
    use std::time::Duration;
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    // Prints a counter every 20 ms.
    agent.create(
        "ticker",
        &spec(&[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i; sleep 0.02; done",
        ]),
        rootfs.path(),
        false,
        false,
    );
    agent.start_container("ticker");
    let mut req = pb::ContainerRequest::new();
    req.container_id = "ticker".into();
    let mut read = pb::ReadStreamRequest::new();
    read.container_id = "ticker".into();
    // Wait for it to run.
    agent.client.read_stdout(ctx(), &read).unwrap();

    agent.client.pause_container(ctx(), &req).unwrap();
    assert_eq!(agent.state("ticker"), "paused");
    // Drain what was printed before the freeze; then nothing more arrives.
    let short = || ttrpc::context::with_timeout(300_000_000);
    while agent.client.read_stdout(short(), &read).is_ok() {}
    std::thread::sleep(Duration::from_millis(300));
    let err = agent.client.read_stdout(short(), &read).unwrap_err();
    assert_eq!(
        common::code_of(&err),
        ttrpc::Code::DEADLINE_EXCEEDED,
        "paused container made progress"
    );
    // Pausing twice is a state error.
    let err = agent.client.pause_container(ctx(), &req).unwrap_err();
    assert_eq!(common::code_of(&err), ttrpc::Code::FAILED_PRECONDITION);

    agent.client.resume_container(ctx(), &req).unwrap();
    assert_eq!(agent.state("ticker"), "running");
    let resp = agent.client.read_stdout(ctx(), &read).unwrap();
    assert!(!resp.data.is_empty(), "resumed container prints again");

    // Removing a paused container works too.
    agent.client.pause_container(ctx(), &req).unwrap();
    agent.remove("ticker");
}

#[test]
fn oom_kill_is_reported() {
    use oci_spec::runtime::{LinuxMemoryBuilder, LinuxResourcesBuilder};
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    let oom_client = agent.connect();
    let oom_waiter = std::thread::spawn(move || oom_client.get_oom_event(ctx(), &pb::Empty::new()));

    // 32 MiB limit; dd allocates a 256 MiB block buffer and fills it.
    let mut spec = spec(&[
        "sh",
        "-c",
        "dd if=/dev/zero of=/dev/null bs=256M count=1; sleep 1000",
    ]);
    let mut linux = spec.linux().clone().unwrap();
    linux.set_resources(Some(
        LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(32 << 20)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap(),
    ));
    spec.set_linux(Some(linux));
    agent.create("hog", &spec, rootfs.path(), false, false);
    agent.start_container("hog");

    let event = oom_waiter.join().unwrap().unwrap();
    assert_eq!(event.container_id, "hog");
    let mut req = pb::ContainerRequest::new();
    req.container_id = "hog".into();
    let stats = agent.client.stats_container(ctx(), &req).unwrap();
    let memory = stats.memory.unwrap();
    assert!(memory.oom_kill_count >= 1, "stats: {memory:?}");
    assert_eq!(memory.limit_bytes, 32 << 20);
    assert!(stats.pids.unwrap().current >= 1);
    agent.remove("hog");
}

#[test]
fn update_resources() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    agent.create(
        "upd",
        &spec(&["sleep", "1000"]),
        rootfs.path(),
        false,
        false,
    );
    agent.start_container("upd");
    let mut req = pb::UpdateContainerRequest::new();
    req.container_id = "upd".into();
    req.resources_json = br#"{"memory": {"limit": 67108864}, "pids": {"limit": 50}}"#.to_vec();
    agent.client.update_container(ctx(), &req).unwrap();
    let mut stats_req = pb::ContainerRequest::new();
    stats_req.container_id = "upd".into();
    let stats = agent.client.stats_container(ctx(), &stats_req).unwrap();
    assert_eq!(stats.memory.unwrap().limit_bytes, 64 << 20);
    assert_eq!(stats.pids.unwrap().limit, 50);
    req.resources_json = b"{not json".to_vec();
    let err = agent.client.update_container(ctx(), &req).unwrap_err();
    assert_eq!(common::code_of(&err), ttrpc::Code::INVALID_ARGUMENT);
    agent.remove("upd");
}

#[test]
fn bad_input_is_typed_and_leaves_nothing_behind() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    let roots = [rootfs.path(), agent.dir.path()];
    let mounts = common::mounts_under(&roots);
    let cgroups = agent.cgroup_dirs();
    let children = agent.children();
    let state_entries = || {
        let state = agent.dir.path().join("state");
        ["bundles", "containers"]
            .iter()
            .map(|d| {
                std::fs::read_dir(state.join(d))
                    .map(|e| e.count())
                    .unwrap_or(0)
            })
            .sum::<usize>()
    };
    let code =
        |result: ttrpc::Result<pb::CreateContainerResponse>| common::code_of(&result.unwrap_err());

    // Invalid JSON, and JSON that is not a runtime spec.
    assert_eq!(
        code(agent.try_create("bad1", b"{not json", rootfs.path(), false, false)),
        ttrpc::Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(agent.try_create("bad2", br#"{"ociVersion": 7}"#, rootfs.path(), false, false)),
        ttrpc::Code::INVALID_ARGUMENT
    );
    // Empty args.
    let empty = common::spec_json(&spec(&[]));
    assert_eq!(
        code(agent.try_create("bad3", &empty, rootfs.path(), false, false)),
        ttrpc::Code::INVALID_ARGUMENT
    );
    // Missing rootfs.
    let good = common::spec_json(&spec(&["true"]));
    let missing = rootfs.path().join("does-not-exist");
    let err = agent
        .try_create("bad4", &good, &missing, false, false)
        .unwrap_err();
    assert_eq!(common::code_of(&err), ttrpc::Code::NOT_FOUND);
    assert!(format!("{err:?}").contains("does-not-exist"), "{err:?}");
    // Bad uid.
    let mut bad_uid = spec(&["true"]);
    let mut process = bad_uid.process().clone().unwrap();
    let mut user = process.user().clone();
    user.set_uid(u32::MAX);
    process.set_user(user);
    bad_uid.set_process(Some(process));
    let err = agent
        .try_create(
            "bad5",
            &common::spec_json(&bad_uid),
            rootfs.path(),
            false,
            false,
        )
        .unwrap_err();
    assert_eq!(common::code_of(&err), ttrpc::Code::INVALID_ARGUMENT);
    assert!(format!("{err:?}").contains("uid"), "{err:?}");
    // Bad container id.
    assert_eq!(
        code(agent.try_create("../escape", &good, rootfs.path(), false, false)),
        ttrpc::Code::INVALID_ARGUMENT
    );
    // A binary that does not exist fails in libcontainer, after namespaces
    // and cgroups were made: it must clean those up.
    let missing_binary = common::spec_json(&spec(&["/bin/no-such-binary"]));
    let err = agent
        .try_create("bad6", &missing_binary, rootfs.path(), false, false)
        .unwrap_err();
    assert_eq!(common::code_of(&err), ttrpc::Code::INTERNAL);
    assert!(format!("{err:?}").contains("no-such-binary"), "{err:?}");

    // Unknown container ids.
    let mut req = pb::ContainerRequest::new();
    req.container_id = "nope".into();
    let err = agent.client.start_container(ctx(), &req).unwrap_err();
    assert_eq!(common::code_of(&err), ttrpc::Code::NOT_FOUND);
    assert!(
        format!("{err:?}").contains("\\\"nope\\\" does not exist"),
        "{err:?}"
    );
    let mut wait = pb::ProcessRequest::new();
    wait.container_id = "nope".into();
    let err = agent.client.wait_process(ctx(), &wait).unwrap_err();
    assert_eq!(common::code_of(&err), ttrpc::Code::NOT_FOUND);
    let err = agent.client.remove_container(ctx(), &req).unwrap_err();
    assert_eq!(common::code_of(&err), ttrpc::Code::NOT_FOUND);

    // Duplicate id.
    agent.create(
        "dup",
        &spec(&["sleep", "1000"]),
        rootfs.path(),
        false,
        false,
    );
    assert_eq!(
        code(agent.try_create("dup", &good, rootfs.path(), false, false)),
        ttrpc::Code::ALREADY_EXISTS
    );
    agent.remove("dup");

    // Nothing leaked.
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(common::mounts_under(&roots), mounts, "mounts leaked");
    assert_eq!(agent.cgroup_dirs(), cgroups, "cgroups leaked");
    assert_eq!(agent.children(), children, "processes leaked");
    assert_eq!(state_entries(), 0, "bundles or state leaked");
}

#[test]
fn long_polls_do_not_block_other_requests() {
    use std::time::{Duration, Instant};
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    agent.create(
        "quiet",
        &spec(&["sleep", "1000"]),
        rootfs.path(),
        false,
        false,
    );
    agent.start_container("quiet");
    // Eight blocked long polls on the same connection...
    let pollers: Vec<_> = (0..8)
        .map(|i| {
            let client = agent.client.clone();
            std::thread::spawn(move || {
                let mut req = pb::ReadStreamRequest::new();
                req.container_id = "quiet".into();
                if i % 2 == 0 {
                    let mut wait = pb::ProcessRequest::new();
                    wait.container_id = "quiet".into();
                    client.wait_process(ctx(), &wait).map(|_| ())
                } else {
                    client.read_stdout(ctx(), &req).map(|_| ())
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // ...and Health still answers at once.
    let started = Instant::now();
    agent.client.health(ctx(), &pb::Empty::new()).unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    agent.remove("quiet");
    for poller in pollers {
        poller.join().unwrap().unwrap();
    }
}

#[test]
fn process_setup_follows_the_spec() {
    use oci_spec::runtime::{PosixRlimitBuilder, PosixRlimitType};
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    let script = "id; hostname; ulimit -n; umask; grep NoNewPrivs /proc/self/status; \
                  grep CapEff /proc/self/status; (echo x > /x) 2>/dev/null && echo rw || echo ro; \
                  wc -c < /proc/timer_list; pwd";
    let mut spec = spec(&["sh", "-c", script]);
    spec.set_hostname(Some("skiffy".into()));
    let mut root = spec.root().clone().unwrap();
    root.set_readonly(Some(true));
    spec.set_root(Some(root));
    let mut process = spec.process().clone().unwrap();
    let mut user = process.user().clone();
    user.set_uid(1000);
    user.set_gid(1001);
    user.set_additional_gids(Some(vec![2000]));
    user.set_umask(Some(0o077));
    process.set_user(user);
    process.set_cwd("/tmp".into());
    process.set_no_new_privileges(Some(true));
    process.set_rlimits(Some(vec![PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .soft(123u64)
        .hard(123u64)
        .build()
        .unwrap()]));
    spec.set_process(Some(process));
    let (code, out, err) = agent.run("setup", &spec, rootfs.path());
    let out = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(
        code,
        0,
        "stdout: {out}\nstderr: {}",
        String::from_utf8_lossy(&err)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("uid=1000 gid=1001"), "{out}");
    assert!(lines[0].contains("2000"), "additional gid: {out}");
    assert_eq!(lines[1], "skiffy");
    assert_eq!(lines[2], "123");
    assert_eq!(lines[3], "0077");
    assert!(lines[4].ends_with('1'), "no_new_privs: {out}");
    // Exactly the spec's ambient set survives the switch to uid 1000:
    // CAP_AUDIT_WRITE, CAP_KILL and CAP_NET_BIND_SERVICE.
    assert!(lines[5].ends_with("0000000020000420"), "caps: {out}");
    assert_eq!(lines[6], "ro");
    assert_eq!(lines[7], "0", "/proc/timer_list is masked");
    assert_eq!(lines[8], "/tmp");
}

#[test]
fn seccomp_from_the_spec() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    let mut spec = spec(&["sh", "-c", "mkdir /tmp/d && echo made || echo refused"]);
    let seccomp: oci_spec::runtime::LinuxSeccomp = serde_json::from_str(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}"#,
    )
    .unwrap();
    let mut linux = spec.linux().clone().unwrap();
    linux.set_seccomp(Some(seccomp));
    spec.set_linux(Some(linux));
    let (code, out, _) = agent.run("seccomp", &spec, rootfs.path());
    assert_eq!(code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "refused\n");
}

#[test]
fn joins_a_namespace_by_path() {
    use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType};
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    let mut first = spec(&["sleep", "1000"]);
    first.set_hostname(Some("shared-uts".into()));
    let created = agent.create("first", &first, rootfs.path(), false, false);
    agent.start_container("first");
    let mut req = pb::ContainerRequest::new();
    req.container_id = "first".into();
    let pid = agent.client.state_container(ctx(), &req).unwrap().pid;
    // CreateContainer answered the same init pid.
    assert_eq!(pid, created);

    // The second container joins the first's UTS namespace by path.
    let mut second = spec(&["hostname"]);
    second.set_hostname(None);
    let mut linux = second.linux().clone().unwrap();
    let namespaces = linux
        .namespaces()
        .clone()
        .unwrap()
        .into_iter()
        .map(|ns| {
            if ns.typ() == LinuxNamespaceType::Uts {
                LinuxNamespaceBuilder::default()
                    .typ(LinuxNamespaceType::Uts)
                    .path(format!("/proc/{pid}/ns/uts"))
                    .build()
                    .unwrap()
            } else {
                ns
            }
        })
        .collect();
    linux.set_namespaces(Some(namespaces));
    second.set_linux(Some(linux));
    let (code, out, err) = agent.run("second", &second, rootfs.path());
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert_eq!(String::from_utf8_lossy(&out), "shared-uts\n");
    agent.remove("first");
}

#[test]
fn concurrent_containers_and_execs() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    let children = agent.children();
    std::thread::scope(|s| {
        for i in 0..6 {
            let agent = &agent;
            let rootfs = rootfs.path();
            s.spawn(move || {
                let client = agent.connect();
                let id = format!("c{i}");
                // The init process lives until its stdin closes.
                let script = format!("echo start-{i}; read x; exit {i}");
                let mut req = pb::CreateContainerRequest::new();
                req.container_id = id.clone();
                req.spec_json = common::spec_json(&spec(&["sh", "-c", &script]));
                req.rootfs = rootfs.display().to_string();
                req.stdin = true;
                client.create_container(ctx(), &req).unwrap();
                let mut start = pb::ContainerRequest::new();
                start.container_id = id.clone();
                client.start_container(ctx(), &start).unwrap();
                // An exec racing the init process.
                let process = spec(&["echo", "exec"]).process().clone().unwrap();
                let mut exec = pb::ExecProcessRequest::new();
                exec.container_id = id.clone();
                exec.exec_id = "e".into();
                exec.process_json = serde_json::to_vec(&process).unwrap();
                client.exec_process(ctx(), &exec).unwrap();
                assert_eq!(common::read_all(&client, &id, "e", false), b"exec\n");
                let mut close = pb::ProcessRequest::new();
                close.container_id = id.clone();
                client.close_stdin(ctx(), &close).unwrap();
                let out = common::read_all(&client, &id, "", false);
                assert_eq!(String::from_utf8_lossy(&out), format!("start-{i}\n"));
                let mut wait = pb::ProcessRequest::new();
                wait.container_id = id.clone();
                assert_eq!(client.wait_process(ctx(), &wait).unwrap().exit_status, i);
                client.remove_container(ctx(), &start).unwrap();
            });
        }
    });
    assert_eq!(agent.children(), children, "processes leaked");
    assert_eq!(agent.cgroup_dirs(), 0, "cgroups leaked");
}

#[test]
fn exec_on_a_terminal() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    agent.create(
        "host",
        &spec(&["sleep", "1000"]),
        rootfs.path(),
        false,
        false,
    );
    agent.start_container("host");
    let process = spec(&["sh", "-c", "stty size; test -t 1 && echo tty"])
        .process()
        .clone()
        .unwrap();
    let mut exec = pb::ExecProcessRequest::new();
    exec.container_id = "host".into();
    exec.exec_id = "t".into();
    exec.process_json = serde_json::to_vec(&process).unwrap();
    exec.terminal = true;
    agent.client.exec_process(ctx(), &exec).unwrap();
    let out = String::from_utf8_lossy(&agent.read_all("host", "t", false)).into_owned();
    assert_eq!(agent.wait("host", "t"), 0);
    assert!(out.contains("tty"), "{out:?}");
    agent.remove("host");
}

#[test]
fn rootfs_mounts_and_devices() {
    use oci_spec::runtime::MountBuilder;
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("hello"), "from the host\n").unwrap();
    let script = "cat /data/hello; (echo x > /data/new) 2>/dev/null && echo rw || echo ro; \
                  readlink /dev/fd; test -c /dev/zero && echo chr; \
                  grep -c ' /dev/shm tmpfs ' /proc/mounts; grep -c ' /dev/mqueue mqueue ' /proc/mounts; \
                  grep -c ' /sys/fs/cgroup' /proc/mounts >/dev/null && echo cgroup";
    let mut spec = spec(&["sh", "-c", script]);
    let mut mounts = spec.mounts().clone().unwrap();
    mounts.push(
        MountBuilder::default()
            .destination("/data")
            .typ("bind")
            .source(shared.path())
            .options(vec!["rbind".into(), "ro".into(), "rprivate".into()])
            .build()
            .unwrap(),
    );
    spec.set_mounts(Some(mounts));
    let (code, out, err) = agent.run("mounts", &spec, rootfs.path());
    let out = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(code, 0, "{out}\n{}", String::from_utf8_lossy(&err));
    assert_eq!(
        out,
        "from the host\nro\n/proc/self/fd\nchr\n1\n1\ncgroup\n",
        "stderr: {}",
        String::from_utf8_lossy(&err)
    );
    assert!(!shared.path().join("new").exists());
}

#[test]
fn signal_all_and_sandbox_hostname() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let agent = Agent::start();
    let mut sandbox = pb::CreateSandboxRequest::new();
    sandbox.hostname = "sbx".into();
    // A shared file system is the micro-VM's: on the host the request is
    // refused whole, before it is looked at, and mounts nothing.
    let mut with_share = sandbox.clone();
    with_share.shared_fs = Some(pb::SharedFs {
        tag: "skiff".into(),
        mount_point: "/run/skiff/host-must-not-mount".into(),
        ..Default::default()
    })
    .into();
    let err = agent.client.create_sandbox(ctx(), &with_share).unwrap_err();
    assert_eq!(common::code_of(&err), ttrpc::Code::FAILED_PRECONDITION);
    assert!(!std::path::Path::new("/run/skiff/host-must-not-mount").exists());
    agent.client.create_sandbox(ctx(), &sandbox).unwrap();

    // Background children plus a shell that waits: `all` kills every one.
    let mut spec = spec(&["sh", "-c", "hostname; sleep 1000 & sleep 1000 & wait"]);
    spec.set_hostname(None);
    agent.create("fam", &spec, rootfs.path(), false, false);
    agent.start_container("fam");
    let mut read = pb::ReadStreamRequest::new();
    read.container_id = "fam".into();
    let first = agent.client.read_stdout(ctx(), &read).unwrap();
    assert_eq!(first.data, b"sbx\n", "the sandbox hostname applies");
    let mut list = pb::ContainerRequest::new();
    list.container_id = "fam".into();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while agent
        .client
        .list_processes(ctx(), &list)
        .unwrap()
        .pids
        .len()
        < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "children did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut signal = pb::SignalProcessRequest::new();
    signal.container_id = "fam".into();
    signal.signal = 9;
    signal.all = true;
    agent.client.signal_process(ctx(), &signal).unwrap();
    assert_eq!(agent.wait("fam", ""), 128 + 9);

    // DestroySandbox removes what is left.
    agent.create("left", &spec, rootfs.path(), false, false);
    agent
        .client
        .destroy_sandbox(ctx(), &pb::Empty::new())
        .unwrap();
    let err = agent.client.state_container(ctx(), &list).unwrap_err();
    assert_eq!(common::code_of(&err), ttrpc::Code::NOT_FOUND);
    assert_eq!(agent.cgroup_dirs(), 0);
}

#[test]
fn restarted_agent_cleans_up_stale_containers() {
    if skip() {
        return;
    }
    let rootfs = Rootfs::new();
    let state = tempfile::tempdir().unwrap();
    let first = Agent::start_with_state(state.path());
    first.create(
        "stale",
        &spec(&["sleep", "1000"]),
        rootfs.path(),
        false,
        false,
    );
    first.start_container("stale");
    let mut req = pb::ContainerRequest::new();
    req.container_id = "stale".into();
    let pid = first.client.state_container(ctx(), &req).unwrap().pid;
    // The agent dies without removing its container.
    let cgroup_parent = first.cgroup_parent.clone();
    first.kill_only();

    let second = Agent::start_with(state.path(), &cgroup_parent);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true),
        "stale container process {pid} still runs"
    );
    assert_eq!(second.cgroup_dirs(), 0, "stale cgroup left");
    // The id is free again.
    second.create("stale", &spec(&["true"]), rootfs.path(), false, false);
    second.remove("stale");
}
