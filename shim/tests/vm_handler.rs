//! The `vm` sandbox handler with `vm_rootfs = "block"`, and virtio-vsock,
//! with a real Linux guest, in one boot: a busybox rootfs with `skiff-vsock-probe` becomes the VM's
//! `/dev/vda`, the agent boots as PID 1 and answers over hybrid vsock, and
//! the container it starts serves vsock port 1025. The host then moves
//! 16 MiB each way on each of several concurrent connections (plus echo
//! connections) and checks every hash; a connection to a port nobody
//! listens on is refused by the guest. Meanwhile two more containers of
//! the pod run in the same VM, one after the other, each from its own
//! rootfs hot-attached to the same spare disk slot (a third share while
//! both slots are taken is refused). The probe container is killed; the
//! sandbox stops and the VM must end by the agent's reset.
//!
//! The booted VM is also the template (`template_dir` in the test's temp
//! dir): once its agent answers, it is snapshotted. Two more sandboxes are
//! then restored from it, each in its own jailed VMM, and run a container:
//! both answer; the bytes their `/dev/urandom` gives differ from each
//! other's and from the template VM's; their clocks are the host's (the
//! snapshot is minutes old by then). Last, a template whose state file is
//! corrupt is not used: the next sandbox boots and makes a new one.
//!
//! A boot costs one to two minutes on a PVM host. The kernel and agent
//! initramfs come from `SKIFF_TEST_KERNEL` / `SKIFF_TEST_AGENT_INITRD`
//! (scripts/test builds and sets both); without them the test says so and
//! returns, except under CI.

use std::path::Path;
use std::time::{Duration, Instant};

use oci_spec::runtime::Spec;
use shim::agent_client::AgentClient;
use shim::config::{Config, VmRootfs};
use shim::sandbox::vm::{VmHandler, VmSandbox};
use shim::sandbox::{Sandbox, SandboxHandler, SandboxRequest};
use shim::testing::{
    busybox_rootfs, noise, probe_binary, probe_connect, probe_echo, probe_sink, probe_source,
    sink_answer, source_matches, spec_json, vm_artifacts, BUSYBOX,
};
use shim::vmm::{vsock_connect, ExitReason};

/// Bytes per SINK/SOURCE connection.
const BULK: u64 = 16 << 20;
/// Concurrent connections per direction.
const BULK_CONNS: usize = 2;
/// Echo connections and bytes each.
const ECHO_CONNS: usize = 4;
const ECHO_BYTES: usize = 1 << 20;
/// Bound on the probe container's start.
const PROBE_START: Duration = Duration::from_secs(120);

/// Runs `script` in a container of `sandbox` from `rootfs`; its exit
/// status and stdout.
fn run_script(sandbox: &VmSandbox, rootfs: &Path, id: &str, script: &str) -> (u32, String) {
    let device = sandbox.share_path(rootfs).expect("a free disk slot");
    let agent = sandbox.agent();
    agent
        .create_container(
            id,
            spec_json(&["/bin/sh", "-c", script]),
            &device,
            false,
            false,
        )
        .unwrap_or_else(|e| panic!("CreateContainer {id}: {e}"));
    agent.start_container(id).expect("StartContainer");
    let mut out = Vec::new();
    loop {
        match agent.read_stream(id, "", false) {
            Ok(chunk) => {
                out.extend_from_slice(&chunk.data);
                if chunk.eof {
                    break;
                }
            }
            Err(err) if err.is_timeout() => continue,
            Err(err) => panic!("ReadStdout {id}: {err}"),
        }
    }
    let status = loop {
        match agent.wait_process(id, "") {
            Ok(status) => break status.status,
            Err(err) if err.is_timeout() => continue,
            Err(err) => panic!("WaitProcess {id}: {err}"),
        }
    };
    agent.remove_container(id).expect("RemoveContainer");
    sandbox.unshare_path(rootfs).expect("the disk is taken out");
    (status, String::from_utf8_lossy(&out).into_owned())
}

/// [`run_script`], repeated (with a fresh id, up to five attempts in all)
/// only when a process of the script was killed by the known PVM guest
/// fault (a stale page: guest-image/README.md), which the shell reports
/// (the scripts send their stderr to stdout).
fn run_script_retrying(
    sandbox: &VmSandbox,
    rootfs: &Path,
    id: &str,
    script: &str,
) -> (u32, String) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (status, out) = run_script(sandbox, rootfs, &format!("{id}-{attempt}"), script);
        // A pipeline's status is its last command's: look at the output.
        if out.contains("Segmentation fault") && attempt < 5 {
            eprintln!("known PVM guest fault (guest-image/README.md), script retried: {out:?}");
            continue;
        }
        return (status, out);
    }
}

/// What each VM's container reports: 32 bytes of `/dev/urandom` in hex
/// (`od` reads them itself: one process, one chance less for the PVM
/// fault), a `@` line, then the guest's wall clock (seconds since the
/// epoch).
const ENTROPY_AND_CLOCK: &str = "exec 2>&1; od -An -tx1 -N32 /dev/urandom; echo @; date +%s";

/// The urandom bytes and the clock from [`ENTROPY_AND_CLOCK`]'s output.
fn entropy_and_clock(out: &str) -> (String, u64) {
    let (bytes, clock) = out
        .split_once("\n@\n")
        .unwrap_or_else(|| panic!("bytes, @, clock: {out:?}"));
    let bytes: String = bytes.split_whitespace().collect();
    assert_eq!(bytes.len(), 64, "32 bytes in hex: {out:?}");
    let clock = clock
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("a clock: {out:?}"));
    (bytes, clock)
}

/// The host's wall clock, seconds since the epoch.
fn host_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Starts sandbox `id` of `config` in `dir`.
fn start(config: &Config, dir: &Path, id: &str, rootfs: &Path) -> VmSandbox {
    VmHandler::with_vmm_exe(env!("CARGO_BIN_EXE_skiff"))
        .with_rootfs(VmRootfs::Block)
        .start_vm(&SandboxRequest {
            id,
            state_dir: &dir.join(id),
            hostname: id,
            rootfs,
            cgroups_path: None,
            netns: None,
            size: shim::sandbox::PodSize::default(),
            config,
            ready_timeout: config.vm_ready_timeout(),
        })
        .unwrap_or_else(|e| panic!("sandbox {id} starts: {e:#?}"))
}

/// Runs a container of the pod from a rootfs of its own (shared into the
/// running VM) whose `/marker` holds `marker`, with, if `volume`, a
/// read-only bind mount at `/vol` of a host directory whose `data` holds
/// `vol-<marker>` and must not be writable. Its shell exits 5 if it reads
/// what it should, 6 if not, 7 if it could write to the volume. Returns the exit status and the guest devices of the rootfs
/// and the volume.
fn sidecar(sandbox: &VmSandbox, dir: &Path, marker: &str, volume: bool) -> (u32, Vec<String>) {
    let rootfs = dir.join(marker);
    busybox_rootfs(&rootfs, &["sh"], None).unwrap();
    std::fs::write(rootfs.join("marker"), format!("{marker}\n")).unwrap();
    std::fs::create_dir_all(rootfs.join("vol")).unwrap();
    let mut devices = vec![sandbox.share_path(&rootfs).expect("a free disk slot")];
    // Shell builtins only: one busybox image per container.
    let mut script = format!("read m < /marker; [ \"$m\" = {marker} ] || exit 6;");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&spec_json(&["/bin/sh", "-c", ""])).unwrap();
    if volume {
        let vol = dir.join(format!("{marker}-vol"));
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::write(vol.join("data"), format!("vol-{marker}\n")).unwrap();
        let mount = |opts: &[&str]| {
            serde_json::json!({"destination": "/vol", "type": "bind",
                "source": vol, "options": opts})
        };
        // A read-write bind is refused, and leaves nothing shared.
        let mut rw = spec.clone();
        rw["mounts"] = serde_json::json!([mount(&["rbind", "rw"])]);
        let rw: Spec = serde_json::from_value(rw).unwrap();
        let err = VmHandler::with_vmm_exe(env!("CARGO_BIN_EXE_skiff"))
            .with_rootfs(VmRootfs::Block)
            .volumes(rw.mounts().as_deref().unwrap_or_default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("read-write bind mounts need"), "{err}");
        let mounts = spec["mounts"].as_array_mut().expect("spec_json has mounts");
        mounts.push(mount(&["rbind", "ro", "nosuid"]));
        script.push_str(&format!(
            "read v < /vol/data; [ \"$v\" = vol-{marker} ] || exit 6; \
             {{ echo x > /vol/new; }} 2>/dev/null && exit 7;"
        ));
    }
    script.push_str("exit 5");
    spec["process"]["args"][2] = script.into();
    let mut spec: Spec = serde_json::from_value(spec).unwrap();
    let mounts = spec.mounts_mut().get_or_insert_with(Vec::new);
    let volumes = VmHandler::new(VmRootfs::Block)
        .volumes(mounts)
        .expect("volumes the VM serves");
    let volumes = sandbox
        .share_volumes(mounts, &volumes)
        .expect("volumes shared");
    if volume {
        let mount = spec.mounts().as_ref().unwrap().last().unwrap().clone();
        assert_eq!(mount.typ().as_deref(), Some("ext4"), "{mount:?}");
        assert_eq!(
            mount.options().as_deref(),
            Some(&["ro".to_owned(), "nosuid".to_owned()][..])
        );
        devices.push(mount.source().as_ref().unwrap().display().to_string());
    }
    let agent: &AgentClient = sandbox.agent();
    let spec = serde_json::to_vec(&spec).unwrap();
    agent
        .create_container(marker, spec, &devices[0], false, false)
        .unwrap_or_else(|e| panic!("CreateContainer {marker} on {devices:?}: {e}"));
    agent.start_container(marker).expect("StartContainer");
    let status = loop {
        match agent.wait_process(marker, "") {
            Ok(status) => break status.status,
            Err(err) if err.is_timeout() => continue,
            Err(err) => panic!("WaitProcess: {err}"),
        }
    };
    agent.remove_container(marker).expect("RemoveContainer");
    for path in volumes.iter().chain([&rootfs]) {
        sandbox.unshare_path(path).expect("the disk is taken out");
    }
    (status, devices)
}

/// Host → guest: BULK bytes, the guest answers with its count and hash.
fn sink(uds: &Path, seed: u64) -> Duration {
    let data = noise(seed, BULK as usize);
    let stream = probe_connect(uds, PROBE_START).expect("probe reachable");
    let (answer, took) = probe_sink(stream, &data).expect("SINK");
    assert_eq!(answer, sink_answer(&data), "guest-side count and hash");
    took
}

/// Guest → host: BULK bytes of the probe's pattern.
fn source(uds: &Path) -> Duration {
    let stream = probe_connect(uds, PROBE_START).expect("probe reachable");
    let (got, took) = probe_source(stream, BULK).expect("SOURCE");
    assert!(
        source_matches(&got, BULK),
        "{} bytes, pattern broken",
        got.len()
    );
    took
}

/// Both ways on one connection.
fn echo(uds: &Path, seed: u64) {
    let data = noise(seed, ECHO_BYTES);
    let stream = probe_connect(uds, PROBE_START).expect("probe reachable");
    let got = probe_echo(stream, &data).expect("ECHO");
    assert!(got == data, "echoed {} bytes, differ", got.len());
}

#[test]
fn vm_sandbox_and_vsock_with_a_real_guest() {
    let Some((kernel, initrd)) = vm_artifacts() else {
        return;
    };
    assert!(
        Path::new(BUSYBOX).exists(),
        "needs {BUSYBOX} (busybox-static)"
    );
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("skiff-vm-handler-")
        .tempdir()
        .unwrap();
    let templates = dir.path().join("templates");
    let config = Config {
        kernel: Some(kernel),
        initrd: Some(initrd),
        memory_mib: 256,
        vm_disks: 3,
        // This test is about the disks (shim/tests/vm_virtiofs.rs is about
        // the default, the virtio-fs share).
        vm_rootfs: VmRootfs::Block,
        template: true,
        template_dir: templates.clone(),
        ..Config::default()
    };
    let rootfs = dir.path().join("rootfs");
    let probe = probe_binary().unwrap_or_else(|e| panic!("{e}"));
    busybox_rootfs(&rootfs, &["sh", "true", "od", "date"], Some(&probe)).unwrap();
    let state_dir = dir.path().join("state");
    eprintln!("[{:6.1}s] rootfs ready", t0.elapsed().as_secs_f64());

    // A pod cgroup as CRI's cgroupfs driver names it: the VMM's cgroup
    // goes under the pod's.
    let pod = format!("/skiff-test-pod-{}", std::process::id());
    let cgroups_path = format!("{pod}/vm-handler-test");
    let sandbox = VmHandler::with_vmm_exe(env!("CARGO_BIN_EXE_skiff"))
        .with_rootfs(VmRootfs::Block)
        .start_vm(&SandboxRequest {
            id: "vm-handler-test",
            state_dir: &state_dir,
            hostname: "skiffvm",
            rootfs: &rootfs,
            cgroups_path: Some(&cgroups_path),
            netns: None,
            size: shim::sandbox::PodSize::default(),
            config: &config,
            ready_timeout: config.vm_ready_timeout(),
        })
        .unwrap_or_else(|e| panic!("the sandbox starts: {e:#?}"));
    eprintln!(
        "[{:6.1}s] agent answered {:.1} s after VM start",
        t0.elapsed().as_secs_f64(),
        sandbox.ready_after().as_secs_f64(),
    );
    assert!(!sandbox.restored(), "the first VM boots");
    let template = std::fs::read_dir(&templates)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .expect("the booted VM was made the template");
    for file in ["vm.state", "memory", "inputs", "memory-id"] {
        assert!(template.join(file).is_file(), "template has {file}");
    }
    let snapshot_taken = host_clock();
    let vmm = sandbox.vmm_pid().expect("a jailed VMM");
    let vmm_cgroup = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    let in_pod: Vec<&str> = vmm_cgroup
        .lines()
        .filter(|l| l.contains(&format!("{pod}/skiff/")))
        .collect();
    assert!(!in_pod.is_empty(), "{vmm_cgroup}");
    let record = std::fs::read_to_string(state_dir.join("vmm-cgroup")).unwrap();
    assert_eq!(record.lines().count(), in_pod.len(), "{record}");
    let agent = sandbox.agent();
    let guest_rootfs = sandbox.share_path(&rootfs).unwrap();
    assert_eq!(guest_rootfs, "/dev/vda");
    assert_eq!(sandbox.share_path(&rootfs).unwrap(), "/dev/vda");
    let err = sandbox.share_path(Path::new("/elsewhere")).unwrap_err();
    assert!(err.to_string().contains("/elsewhere"), "{err}");

    agent
        .create_container(
            "probe",
            spec_json(&["/bin/skiff-vsock-probe", "serve", "1025"]),
            &guest_rootfs,
            false,
            false,
        )
        .expect("CreateContainer");
    agent.start_container("probe").expect("StartContainer");
    let uds = state_dir.join("vsock.sock");
    drop(probe_connect(&uds, PROBE_START).expect("the probe listens"));
    eprintln!("[{:6.1}s] probe listening", t0.elapsed().as_secs_f64());

    // Many connections at once, both directions, every byte checked.
    let t = Instant::now();
    std::thread::scope(|s| {
        let mut sinks = Vec::new();
        let mut sources = Vec::new();
        for i in 0..BULK_CONNS {
            let uds = &uds;
            sinks.push(s.spawn(move || sink(uds, 7 + i as u64)));
            sources.push(s.spawn(move || source(uds)));
        }
        for i in 0..ECHO_CONNS {
            let uds = &uds;
            s.spawn(move || echo(uds, 100 + i as u64));
        }
        for (name, handles) in [("host->guest", sinks), ("guest->host", sources)] {
            for h in handles {
                let took = h.join().expect("transfer thread");
                eprintln!(
                    "  {name}: {} MiB in {:.2} s ({:.1} MiB/s, concurrent)",
                    BULK >> 20,
                    took.as_secs_f64(),
                    (BULK >> 20) as f64 / took.as_secs_f64()
                );
            }
        }
    });
    eprintln!(
        "[{:6.1}s] {} connections moved {} MiB in {:.1} s, hashes match",
        t0.elapsed().as_secs_f64(),
        2 * BULK_CONNS + ECHO_CONNS,
        (2 * BULK_CONNS as u64 * BULK + 2 * (ECHO_CONNS * ECHO_BYTES) as u64) >> 20,
        t.elapsed().as_secs_f64()
    );

    // Two more containers of the pod, one after the other, in slot 1; the
    // second also gets a read-only volume (slot 2).
    let t = Instant::now();
    let (status, devices) = sidecar(&sandbox, dir.path(), "second", false);
    assert_eq!(
        (status, devices),
        (5, vec!["/dev/vdb".to_owned()]),
        "second container"
    );
    let (status, devices) = sidecar(&sandbox, dir.path(), "third", true);
    assert_eq!(
        (status, devices),
        (5, vec!["/dev/vdb".to_owned(), "/dev/vdc".to_owned()]),
        "third container: same slot, new medium, and a volume"
    );
    eprintln!(
        "[{:6.1}s] two more containers ran from hot-attached disks in {:.1} s",
        t0.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    // Every slot taken (probe in vda, two more): a fourth is refused.
    let extra: Vec<_> = (0..2)
        .map(|i| dir.path().join(format!("extra{i}")))
        .collect();
    for (path, want) in extra.iter().zip(["/dev/vdb", "/dev/vdc"]) {
        std::fs::create_dir_all(path).unwrap();
        assert_eq!(sandbox.share_path(path).unwrap(), want);
    }
    let err = sandbox.share_path(&dir.path().join("fourth")).unwrap_err();
    assert!(
        err.to_string().contains("all 3 disk slots are in use"),
        "{err}"
    );
    for path in &extra {
        sandbox.unshare_path(path).unwrap();
    }

    // Nobody listens on port 4444: the guest answers the request with RST
    // and the muxer closes the host stream at once (no OK line).
    let t = Instant::now();
    let refused = vsock_connect(&uds, 4444, Duration::from_secs(30));
    assert!(refused.is_err(), "a closed guest port must refuse");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "refused, not timed out"
    );

    // The agent still answers, and the container dies by SIGKILL.
    agent
        .signal_process("probe", "", 9, false)
        .expect("SignalProcess");
    let status = loop {
        match agent.wait_process("probe", "") {
            Ok(status) => break status,
            Err(err) if err.is_timeout() => continue,
            Err(err) => panic!("WaitProcess: {err}"),
        }
    };
    assert_eq!(status.status, 128 + 9);
    agent.remove_container("probe").expect("RemoveContainer");
    let serial = std::fs::read_to_string(state_dir.join("serial.log")).unwrap_or_default();
    for line in serial
        .lines()
        .filter(|l| l.contains("traps:") || l.contains("segfault"))
    {
        eprintln!("guest: {line}");
    }

    // The template VM's own entropy, after its refresh.
    let (status, out) = run_script_retrying(&sandbox, &rootfs, "entropy0", ENTROPY_AND_CLOCK);
    assert_eq!(status, 0, "{out}");
    let (template_bytes, _) = entropy_and_clock(&out);

    // Two sandboxes restored from the template, at once, each in its own
    // VMM process.
    let t = Instant::now();
    let clones: Vec<VmSandbox> = std::thread::scope(|s| {
        let handles: Vec<_> = ["clone1", "clone2"]
            .map(|id| {
                let (config, dir, rootfs) = (&config, dir.path(), &rootfs);
                s.spawn(move || start(config, dir, id, rootfs))
            })
            .into_iter()
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!(
        "[{:6.1}s] two sandboxes restored from the template in {:.1} s",
        t0.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    assert!(
        host_clock() >= snapshot_taken + 5,
        "the test ran long enough for a stale clock to show"
    );
    let mut seen = vec![template_bytes];
    for (i, clone) in clones.iter().enumerate() {
        assert!(clone.restored(), "clone {i} was restored, not booted");
        assert_ne!(clone.vmm_pid(), sandbox.vmm_pid());
        let before = host_clock();
        let (status, out) = run_script_retrying(
            clone,
            &rootfs,
            &format!("entropy{}", i + 1),
            ENTROPY_AND_CLOCK,
        );
        let after = host_clock();
        assert_eq!(status, 0, "{out}");
        let (bytes, clock) = entropy_and_clock(&out);
        assert!(
            clock + 2 >= before && clock <= after + 2,
            "clone {i}: guest clock {clock}, host {before} to {after}, snapshot {snapshot_taken}"
        );
        assert!(!seen.contains(&bytes), "clone {i} repeats entropy {bytes}");
        seen.push(bytes);
    }
    eprintln!(
        "[{:6.1}s] clones ran containers: entropy differs, clocks current",
        t0.elapsed().as_secs_f64()
    );
    for clone in clones {
        let report = clone
            .stop_vm(Duration::from_secs(60))
            .expect("the clone stops")
            .expect("the clone was running");
        assert_eq!(report.exit, ExitReason::Reset, "the agent resets the clone");
    }

    // A corrupt template is not used: the next sandbox boots, and makes a
    // new template.
    let state = template.join("vm.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x55;
    std::fs::write(&state, &bytes).unwrap();
    let t = Instant::now();
    let rebuilt = start(&config, dir.path(), "rebuilt", &rootfs);
    assert!(!rebuilt.restored(), "a corrupt template is not restored");
    let fresh = std::fs::read(&state).expect("a new template");
    assert_ne!(fresh, bytes, "the template was rebuilt");
    let (status, out) = run_script_retrying(&rebuilt, &rootfs, "after-rebuild", "echo ok");
    assert_eq!((status, out.trim()), (0, "ok"));
    rebuilt
        .stop_vm(Duration::from_secs(60))
        .expect("the rebuilt sandbox stops");
    eprintln!(
        "[{:6.1}s] a corrupt template was rebuilt by a boot in {:.1} s",
        t0.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let report = sandbox
        .stop_vm(Duration::from_secs(60))
        .expect("the sandbox stops")
        .expect("the VM was running");
    eprintln!(
        "[{:6.1}s] VM ended in {:.1} s: {:?}",
        t0.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64(),
        report.exit
    );
    assert_eq!(report.exit, ExitReason::Reset, "the agent resets the VM");
    assert!(!state_dir.exists(), "the state dir is removed");
    // The VMM's cgroup is gone; the pod's (the test's, as kubelet's
    // would be) is left to its owner.
    for line in in_pod {
        let (controllers, path) = line.split_once(':').unwrap().1.split_once(':').unwrap();
        let root = Path::new("/sys/fs/cgroup").join(controllers);
        let dir = root.join(path.trim_start_matches('/'));
        assert!(!dir.exists(), "{} left", dir.display());
        let _ = std::fs::remove_dir(dir.parent().unwrap());
        let _ = std::fs::remove_dir(root.join(pod.trim_start_matches('/')));
    }
}
