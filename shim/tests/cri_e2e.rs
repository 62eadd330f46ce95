//! Kubernetes pods through containerd's CRI plugin, driven the way the
//! kubelet drives them.
//!
//! Each test starts a private containerd 1.6 with its CRI plugin enabled
//! (root, state and sockets in a temp dir) inside a network namespace the
//! test made, with runtime `runc` and skiff runtimes (`skiff` for the `vm`
//! handler, `skiff-linux` for the `linux` one: `io.containerd.skiff.v2`
//! with `ConfigPath` options) and a CNI bridge network from Debian's
//! `containernetworking-plugins`: the bridge, the pods' veths and every
//! packet stay in namespaces the test made. The sandbox image is built
//! locally (`scripts/containerd-env pause-image`), the busybox image as for
//! the containerd e2e tests. A CRI client (`k8s-cri` over tonic, on the
//! CRI socket) runs pods through the `runtime.v1` calls the kubelet makes
//! and checks what each returns and what the containers see.
//!
//! The same suite runs with `runc` (`cri_pod_lifecycle_runc`: the harness
//! asks only what a runtime should give), skiff's `linux` handler (the
//! agent as a host process) and skiff's `vm` handler (one boot, sized from
//! the pod's resources). They need root, containerd, runc, busybox-static,
//! the CNI plugins and iproute2; the VM test also the test kernel and
//! agent initramfs (`SKIFF_TEST_KERNEL`, `SKIFF_TEST_AGENT_INITRD`) and
//! `/dev/kvm`. They skip with a reason otherwise, and fail instead when
//! `CI=true`. The ignored `cri_bench` is `benches/cri-bench.sh`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

mod cni;
mod ctrd;

use ctrd::*;

/// The pods' subnet, on the bridge in containerd's network namespace.
const SUBNET_PREFIX: &str = "10.98.0.";
const BUSYBOX: &str = "localhost/busybox:latest";
const PAUSE: &str = "localhost/pause:latest";
/// Which runtime a test's pods use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runtime {
    /// containerd's runc (the harness's own check).
    Runc,
    /// skiff with `handler = "linux"`.
    SkiffLinux,
    /// skiff with `handler = "vm"`.
    SkiffVm,
}

impl Runtime {
    /// The runtime handler (a RuntimeClass's `handler`) [`CriEnv`]
    /// registers it under.
    fn handler(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::SkiffLinux => "skiff-linux",
            Runtime::SkiffVm => "skiff",
        }
    }

    /// The shim binary containerd starts for it.
    fn shim(self) -> &'static str {
        match self {
            Runtime::Runc => "containerd-shim-runc-v2",
            Runtime::SkiffLinux | Runtime::SkiffVm => "containerd-shim-skiff-v2",
        }
    }
}
/// What the pod's sandbox config gives DNS (never queried: checked in the
/// container's resolv.conf only).
const DNS_SERVER: &str = "10.98.0.53";
const DNS_SEARCH: &str = "skiff.test";

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Skips (or fails under CI) with `reason`.
fn skip(reason: &str) {
    assert!(!ci(), "CRI e2e prerequisites missing under CI: {reason}");
    eprintln!("skipped: {reason}");
}

/// A blocking CRI client.
struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// Calls one CRI method on a clone of the client, blocking; the reply or
/// the gRPC status.
macro_rules! call {
    ($cri:expr, $svc:ident . $method:ident ( $req:expr )) => {{
        let mut client = $cri.$svc.clone();
        let req = $req;
        $cri.rt
            .block_on(async move { client.$method(req).await })
            .map(|r| r.into_inner())
    }};
}

impl Cri {
    fn connect(sock: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let path = sock.to_owned();
        let channel = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]:50051")
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .expect("connect to containerd's CRI socket");
        Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }
}

/// A private containerd with CRI in a network namespace of the test's,
/// and a client on it.
struct CriEnv {
    cri: Cri,
    ctrd: Containerd,
    netns: cni::Netns,
    /// The pods' log directories and kubelet-style files.
    files: tempfile::TempDir,
    /// The pods' cgroup parent (`/skiff-cri-<pid>`), removed at the end.
    cgroup_parent: String,
}

impl CriEnv {
    /// Starts it with skiff runtimes for `configs` (a skiff config's text
    /// for [`Runtime::SkiffLinux`] and [`Runtime::SkiffVm`]); None (after
    /// saying why) when the test cannot run here.
    fn start(configs: &[(Runtime, String)]) -> Option<CriEnv> {
        let busybox = prerequisites()?;
        if let Some(reason) = cni::unavailable() {
            skip(&reason);
            return None;
        }
        let netns = cni::Netns::new("cri").unwrap();
        netns.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
        let files = tempfile::Builder::new()
            .prefix("skiff-cri-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let runtimes: Vec<(&str, PathBuf)> = configs
            .iter()
            .map(|(rt, text)| {
                let path = files.path().join(format!("{}.toml", rt.handler()));
                std::fs::write(&path, text).unwrap();
                (rt.handler(), path)
            })
            .collect();
        let ipam = files.path().join("ipam");
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "skiff-cri-test",
            "plugins": [{
                "type": "bridge",
                "bridge": format!("skcri{}", std::process::id() % 100_000),
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("{SUBNET_PREFIX}0/24")}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam,
                },
            }],
        })
        .to_string();
        let ctrd = Containerd::start_cri(&CriSetup {
            netns: &netns.path(),
            cni_conflist: &conflist,
            sandbox_image: PAUSE,
            skiff_runtimes: &runtimes,
        });
        ctrd.import(&busybox);
        ctrd.import(&pause_image());
        let cri = Cri::connect(&ctrd.sock());
        Some(CriEnv {
            cri,
            ctrd,
            netns,
            files,
            cgroup_parent: format!("/skiff-cri-{}", std::process::id()),
        })
    }

    fn fail(&self, what: &str, status: tonic::Status) -> ! {
        panic!(
            "{what}: {status}\n--- containerd log tail ---\n{}",
            tail(&self.ctrd.log(), 6000)
        )
    }
}

impl Drop for CriEnv {
    fn drop(&mut self) {
        // Whatever a failed test left: pods stopped and removed (which
        // stops their containers and shims).
        if let Ok(list) = call!(
            self.cri,
            runtime.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        ) {
            for pod in list.items {
                let _ = call!(
                    self.cri,
                    runtime.stop_pod_sandbox(cri::StopPodSandboxRequest {
                        pod_sandbox_id: pod.id.clone()
                    })
                );
                let _ = call!(
                    self.cri,
                    runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                        pod_sandbox_id: pod.id
                    })
                );
            }
        }
        // The pods' cgroup parents, deepest first, in every hierarchy.
        let name = self.cgroup_parent.trim_start_matches('/');
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten() {
            let dir = hierarchy.unwrap().path().join(name);
            let mut dirs: Vec<PathBuf> = walk_dirs(&dir);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if dir.is_dir() {
        out.push(dir.to_owned());
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk_dirs(&e.path()));
            }
        }
    }
    out
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What the pod asks for, kubelet style.
struct PodSpec<'a> {
    name: &'a str,
    runtime: Runtime,
    /// CPU limit in millicores and memory limit in bytes (the pod's
    /// `resources`, as the kubelet sums them for the sandbox).
    cpu_millis: i64,
    memory_bytes: i64,
}

/// A running pod and the config it was made with.
struct Pod {
    id: String,
    config: cri::PodSandboxConfig,
    log_dir: PathBuf,
}

fn run_pod(env: &CriEnv, spec: &PodSpec<'_>) -> Pod {
    let uid = format!("uid-{}-{}", spec.name, std::process::id());
    let log_dir = env.files.path().join(format!("pods/{}", spec.name));
    std::fs::create_dir_all(&log_dir).unwrap();
    let period = 100_000;
    let resources = cri::LinuxContainerResources {
        cpu_period: period,
        cpu_quota: spec.cpu_millis * period / 1000,
        cpu_shares: spec.cpu_millis * 1024 / 1000,
        memory_limit_in_bytes: spec.memory_bytes,
        ..Default::default()
    };
    let config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: spec.name.into(),
            uid: uid.clone(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: spec.name.into(),
        log_directory: log_dir.display().to_string(),
        dns_config: Some(cri::DnsConfig {
            servers: vec![DNS_SERVER.into()],
            searches: vec![DNS_SEARCH.into()],
            options: vec!["ndots:2".into()],
        }),
        labels: labels(&[("app", spec.name)]),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("{}/pod{uid}", env.cgroup_parent),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            resources: Some(resources),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = call!(
        env.cri,
        runtime.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: spec.runtime.handler().into(),
        })
    )
    .unwrap_or_else(|e| env.fail("RunPodSandbox", e))
    .pod_sandbox_id;
    Pod {
        id,
        config,
        log_dir,
    }
}

/// A container of `pod` running `script` in busybox's `sh`.
fn create_container(
    env: &CriEnv,
    pod: &Pod,
    name: &str,
    script: &str,
    mounts: Vec<cri::Mount>,
    memory_limit: i64,
) -> String {
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: vec!["sh".into()],
        args: vec!["-c".into(), script.into()],
        envs: vec![cri::KeyValue {
            key: "SKIFF_CRI".into(),
            value: name.into(),
        }],
        mounts,
        labels: labels(&[("container", name)]),
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 100_000,
                cpu_shares: 1024,
                memory_limit_in_bytes: memory_limit,
                ..Default::default()
            }),
            // The kubelet gives each container the pod's namespace modes.
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: pod
                    .config
                    .linux
                    .as_ref()
                    .and_then(|l| l.security_context.as_ref())
                    .and_then(|s| s.namespace_options.clone()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    let id = call!(
        env.cri,
        runtime.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        })
    )
    .unwrap_or_else(|e| env.fail(&format!("CreateContainer {name}"), e))
    .container_id;
    call!(
        env.cri,
        runtime.start_container(cri::StartContainerRequest {
            container_id: id.clone()
        })
    )
    .unwrap_or_else(|e| env.fail(&format!("StartContainer {name}"), e));
    id
}

fn container_status(env: &CriEnv, id: &str) -> cri::ContainerStatus {
    call!(
        env.cri,
        runtime.container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
    )
    .unwrap_or_else(|e| env.fail("ContainerStatus", e))
    .status
    .expect("ContainerStatus has a status")
}

/// The known PVM guest fault (stale translations after a COW break) kills
/// a guest process with SIGSEGV now and then; an exec it hit is run again.
fn hit_guest_fault(r: &cri::ExecSyncResponse) -> bool {
    r.exit_code == 139 || String::from_utf8_lossy(&r.stderr).contains("Segmentation fault")
}

/// ExecSync of `sh -c script` in `id` (retried, at most 3 times, on the
/// known PVM guest fault in the `vm` test).
fn exec_sync(env: &CriEnv, id: &str, script: &str) -> cri::ExecSyncResponse {
    for attempt in 1.. {
        let r = call!(
            env.cri,
            runtime.exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                timeout: 300,
            })
        )
        .unwrap_or_else(|e| env.fail(&format!("ExecSync {script:?}"), e));
        if attempt < 3 && hit_guest_fault(&r) {
            eprintln!("ExecSync {script:?}: the known PVM guest fault, again");
            continue;
        }
        return r;
    }
    unreachable!()
}

/// ExecSync that must succeed; its stdout.
fn exec_ok(env: &CriEnv, id: &str, script: &str) -> String {
    let r = exec_sync(env, id, script);
    assert_eq!(
        r.exit_code,
        0,
        "{script:?}: stdout {:?} stderr {:?}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).into_owned()
}

/// The CRI log file's lines as (stream, tag, message), each line checked
/// against the format `<RFC 3339 nano time> <stream> <P|F> <message>`.
fn cri_log(path: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let mut parts = line.splitn(4, ' ');
            let (time, stream, tag) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let msg = parts.next().unwrap_or_default();
            assert!(
                time.len() >= 20 && time.as_bytes()[4] == b'-' && time.contains('T'),
                "not a CRI log time in {line:?}"
            );
            assert!(
                stream == "stdout" || stream == "stderr",
                "stream in {line:?}"
            );
            assert!(tag == "F" || tag == "P", "tag in {line:?}");
            (stream.to_owned(), tag.to_owned(), msg.to_owned())
        })
        .collect()
}

/// Waits up to `timeout` for `cond`; a timeout fails with containerd's
/// log tail.
fn wait_for(env: &CriEnv, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n--- containerd log tail ---\n{}",
            tail(&env.ctrd.log(), 8000)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn has_line(log: &[(String, String, String)], stream: &str, msg: &str) -> bool {
    log.iter()
        .any(|(s, t, m)| s == stream && t == "F" && m == msg)
}

/// The pod through every call the kubelet makes, checking each answer and
/// what the containers see, with pods of `rt` (the `vm` handler adds
/// the checks only a VM has).
fn pod_lifecycle(env: &CriEnv, rt: Runtime) {
    let cri = &env.cri;
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{rt:?} [{:>7.1?}] {what}", t0.elapsed());
    let version = call!(
        cri,
        runtime.version(cri::VersionRequest {
            version: "v1".into()
        })
    )
    .unwrap_or_else(|e| env.fail("Version", e));
    assert_eq!(version.runtime_name, "containerd");
    assert_eq!(version.runtime_api_version, "v1");
    let image = call!(
        cri,
        images.image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: BUSYBOX.into(),
                ..Default::default()
            }),
            verbose: false,
        })
    )
    .unwrap_or_else(|e| env.fail("ImageStatus", e));
    assert!(image.image.is_some(), "the busybox image is known to CRI");

    // The pod: 2 CPUs, 128 MiB (the `vm` handler sizes its VM from it).
    let web = PodSpec {
        name: "web",
        runtime: rt,
        cpu_millis: 2000,
        memory_bytes: 128 << 20,
    };
    let pod = run_pod(env, &web);
    let status = call!(
        cri,
        runtime.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: true,
        })
    )
    .unwrap_or_else(|e| env.fail("PodSandboxStatus", e));
    let pod_status = status.status.expect("pod status");
    assert_eq!(pod_status.state, cri::PodSandboxState::SandboxReady as i32);
    let pod_ip = pod_status.network.expect("pod network").ip;
    assert!(
        pod_ip.starts_with(SUBNET_PREFIX),
        "pod IP {pod_ip} from the test's CNI network"
    );
    let shim_pid = pod_shim(&pod, rt);
    phase("pod ready");

    // The app: logs to both streams, leaves a termination message and
    // exits 7 on SIGTERM.
    let termination = env.files.path().join("termination-log");
    std::fs::write(&termination, "").unwrap();
    let app = create_container(
        env,
        &pod,
        "app",
        "trap 'echo bye; echo last-words > /dev/termination-log; exit 7' TERM; \
         echo hello-stdout; echo hello-stderr >&2; \
         while :; do sleep 1; done",
        vec![cri::Mount {
            container_path: "/dev/termination-log".into(),
            host_path: termination.display().to_string(),
            readonly: false,
            ..Default::default()
        }],
        96 << 20,
    );
    let st = container_status(env, &app);
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    assert!(st.started_at > 0);
    let app_log = pod.log_dir.join("app.log");
    assert_eq!(Path::new(&st.log_path), app_log);
    wait_for(
        env,
        "the app's first lines in its CRI log",
        Duration::from_secs(120),
        || {
            let log = cri_log(&app_log);
            has_line(&log, "stdout", "hello-stdout") && has_line(&log, "stderr", "hello-stderr")
        },
    );

    phase("app running, its first lines logged");
    // ExecSync: output on both streams and the exit code.
    let r = exec_sync(env, &app, "echo out-$((6*7)); echo err >&2; exit 3");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "out-42\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
    assert_eq!(r.exit_code, 3);

    // What CRI binds into every container: hostname, resolv.conf, hosts,
    // the pod's IP on eth0, the container's env.
    let seen = exec_ok(
        env,
        &app,
        "cat /etc/hostname; echo ---; cat /etc/resolv.conf; echo ---; cat /etc/hosts; \
         echo ---; ip -4 addr show eth0; echo ---; echo $SKIFF_CRI; hostname; \
         echo ---; cat /proc/sys/kernel/random/boot_id; nproc; grep MemTotal /proc/meminfo",
    );
    let parts: Vec<&str> = seen.split("---\n").collect();
    assert_eq!(parts.len(), 6, "{seen}");
    assert_eq!(parts[0].trim(), "web");
    assert!(
        parts[1].contains(&format!("nameserver {DNS_SERVER}")),
        "{seen}"
    );
    assert!(parts[1].contains(&format!("search {DNS_SEARCH}")), "{seen}");
    assert!(parts[1].contains("ndots:2"), "{seen}");
    assert!(parts[2].contains("localhost"), "{seen}");
    assert!(parts[3].contains(&format!("inet {pod_ip}/24")), "{seen}");
    assert_eq!(parts[4].trim(), "app\nweb");
    if rt == Runtime::SkiffVm {
        vm_checks(parts[5], shim_pid, &env.cgroup_parent);
    }

    // The pod's IP answers from containerd's network namespace (the
    // test's bridge).
    let ping = env
        .netns
        .exec(&["/bin/busybox", "ping", "-c", "1", "-W", "30", &pod_ip])
        .unwrap_or_else(|e| panic!("ping the pod: {e}"));
    assert!(ping.contains("1 packets received"), "{ping}");

    // A second container joins the pod: IPC (/dev/shm) and the network
    // are the pod's.
    let peer = create_container(
        env,
        &pod,
        "peer",
        "echo from-peer > /dev/shm/hello; httpd -f -p 8080 -h /dev/shm",
        vec![],
        96 << 20,
    );
    assert_ne!(peer, app);
    // One exec (each costs seconds in a PVM guest) waits in the container
    // for the peer's file in /dev/shm and its httpd on localhost.
    let fetched = exec_ok(
        env,
        &app,
        "for i in $(seq 1 120); do \
           if [ -s /dev/shm/hello ] && wget -q -O /tmp/got http://127.0.0.1:8080/hello; then \
             cat /dev/shm/hello /tmp/got; exit 0; \
           fi; sleep 1; \
         done; exit 1",
    );
    assert_eq!(fetched, "from-peer\nfrom-peer\n", "/dev/shm, then HTTP");

    phase("binds, pod IP, /dev/shm and localhost checked");
    // Stats from the container's cgroup.
    let stats = call!(
        cri,
        runtime.container_stats(cri::ContainerStatsRequest {
            container_id: app.clone()
        })
    )
    .unwrap_or_else(|e| env.fail("ContainerStats", e))
    .stats
    .expect("stats");
    assert_eq!(stats.attributes.as_ref().unwrap().id, app);
    let memory = stats.memory.expect("memory stats");
    let ws = memory.working_set_bytes.map(|v| v.value).unwrap_or(0);
    assert!(
        ws > 0 && ws < 96 << 20,
        "working set {ws} within the container's limit"
    );
    let cpu = stats.cpu.expect("cpu stats");
    assert!(
        cpu.usage_core_nano_seconds.map(|v| v.value).unwrap_or(0) > 0,
        "cpu usage {cpu:?}"
    );
    let all = call!(
        cri,
        runtime.list_container_stats(cri::ListContainerStatsRequest { filter: None })
    )
    .unwrap_or_else(|e| env.fail("ListContainerStats", e));
    let ids: Vec<&str> = all
        .stats
        .iter()
        .filter_map(|s| s.attributes.as_ref().map(|a| a.id.as_str()))
        .collect();
    assert!(
        ids.contains(&app.as_str()) && ids.contains(&peer.as_str()),
        "{ids:?}"
    );

    // UpdateContainerResources changes the container's cgroup where it
    // runs (in the guest, for the `vm` handler).
    call!(
        cri,
        runtime.update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: app.clone(),
            linux: Some(cri::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 50_000,
                cpu_shares: 512,
                memory_limit_in_bytes: 64 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
    )
    .unwrap_or_else(|e| env.fail("UpdateContainerResources", e));
    let limits = exec_ok(
        env,
        &app,
        // cgroup v1 (the host's, bound at the container's cgroup), or v2 (the
        // guest's: no cgroup namespace, so under the container's path).
        "if [ -e /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then \
           cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us; \
         else \
           p=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup); \
           cat $p/memory.max; cut -d' ' -f1 $p/cpu.max; \
         fi",
    );
    assert_eq!(
        limits,
        format!("{}\n50000\n", 64 << 20),
        "limits seen in the container"
    );

    // ListContainers sees both, running.
    let list = call!(
        cri,
        runtime.list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: pod.id.clone(),
                ..Default::default()
            })
        })
    )
    .unwrap_or_else(|e| env.fail("ListContainers", e));
    let mut running: Vec<&str> = list
        .containers
        .iter()
        .filter(|c| c.state == cri::ContainerState::ContainerRunning as i32)
        .map(|c| c.id.as_str())
        .collect();
    running.sort();
    let mut want = vec![app.as_str(), peer.as_str()];
    want.sort();
    assert_eq!(running, want);

    // ReopenContainerLog: the kubelet rotated the file; new output goes to
    // a new one.
    let rotated = pod.log_dir.join("app.log.1");
    std::fs::rename(&app_log, &rotated).unwrap();
    call!(
        cri,
        runtime.reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: app.clone()
        })
    )
    .unwrap_or_else(|e| env.fail("ReopenContainerLog", e));
    let fds = exec_ok(
        env,
        &app,
        "ls -l /proc/1/fd/; echo after-reopen > /proc/1/fd/1",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !has_line(&cri_log(&app_log), "stdout", "after-reopen") {
        assert!(
            Instant::now() < deadline,
            "no output after the reopen in the new log: {:?}, rotated {:?}, the app's fds {fds}",
            std::fs::read_to_string(&app_log),
            std::fs::read_to_string(&rotated),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!has_line(&cri_log(&rotated), "stdout", "after-reopen"));
    assert!(has_line(&cri_log(&rotated), "stdout", "hello-stdout"));

    phase("stats, update, list, reopen done");
    // A second pod fetches from the web pod's IP: of the same runtime, but
    // runc's for `vm` (a VM pod's network reached from a runc pod; a
    // second guest would cost minutes here).
    let client_rt = match rt {
        Runtime::SkiffVm => Runtime::Runc,
        other => other,
    };
    let client_pod = run_pod(
        env,
        &PodSpec {
            name: "client",
            runtime: client_rt,
            ..web
        },
    );
    let client_shim = pod_shim(&client_pod, client_rt);
    let client = create_container(
        env,
        &client_pod,
        "fetch",
        &format!(
            "for i in $(seq 1 120); do \
               if wget -q -O /tmp/got http://{pod_ip}:8080/hello; then cat /tmp/got; exit 0; fi; \
               sleep 1; \
             done; exit 1"
        ),
        vec![],
        96 << 20,
    );
    let st = wait_exited(env, &client, Duration::from_secs(300));
    assert_eq!(st.exit_code, 0, "the client pod's fetch: {st:?}");
    assert!(
        has_line(
            &cri_log(&client_pod.log_dir.join("fetch.log")),
            "stdout",
            "from-peer"
        ),
        "the web pod's answer in the client's log"
    );
    remove_pod(env, &client_pod, &[&client], client_shim);

    phase("client pod fetched over the pod IP and removed");
    // A container that fails: its exit code, reason Error, its output.
    let failing = create_container(
        env,
        &pod,
        "failing",
        "echo about-to-fail; exit 3",
        vec![],
        96 << 20,
    );
    let st = wait_exited(env, &failing, Duration::from_secs(120));
    assert_eq!((st.exit_code, st.reason.as_str()), (3, "Error"), "{st:?}");
    assert!(has_line(
        &cri_log(&pod.log_dir.join("failing.log")),
        "stdout",
        "about-to-fail"
    ));

    // A container over its memory limit is OOM-killed (in the guest, for
    // `vm`): 137 and reason OOMKilled (containerd's from our TaskOOM).
    // Small: every page a PVM guest faults in costs a trap.
    let oom = create_container(
        env,
        &pod,
        "oom",
        "echo filling; exec dd if=/dev/zero of=/dev/null bs=24M count=1",
        vec![],
        12 << 20,
    );
    let st = wait_exited(env, &oom, Duration::from_secs(300));
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (137, "OOMKilled"),
        "{st:?}"
    );
    let oom_log = cri_log(&pod.log_dir.join("oom.log"));
    assert!(has_line(&oom_log, "stdout", "filling"));

    // StopContainer: SIGTERM, the app's trap runs, exit 7, its last words
    // reach the kubelet's file on the host.
    call!(
        cri,
        runtime.stop_container(cri::StopContainerRequest {
            container_id: app.clone(),
            timeout: 60,
        })
    )
    .unwrap_or_else(|e| env.fail("StopContainer app", e));
    phase("the app stopped (SIGTERM, its trap's exit)");
    let st = container_status(env, &app);
    assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(st.exit_code, 7, "{st:?}");
    assert!(st.finished_at >= st.started_at);
    assert!(has_line(&cri_log(&app_log), "stdout", "bye"));
    assert_eq!(
        std::fs::read_to_string(&termination).unwrap(),
        "last-words\n"
    );

    // A container that ignores SIGTERM is killed after the grace period.
    let stubborn = create_container(
        env,
        &pod,
        "stubborn",
        "trap '' TERM; echo ready; while :; do sleep 1; done",
        vec![],
        96 << 20,
    );
    wait_for(
        env,
        "the stubborn one to start",
        Duration::from_secs(120),
        || {
            has_line(
                &cri_log(&pod.log_dir.join("stubborn.log")),
                "stdout",
                "ready",
            )
        },
    );
    let grace = Duration::from_secs(3);
    let started = Instant::now();
    call!(
        cri,
        runtime.stop_container(cri::StopContainerRequest {
            container_id: stubborn.clone(),
            timeout: grace.as_secs() as i64,
        })
    )
    .unwrap_or_else(|e| env.fail("StopContainer stubborn", e));
    let took = started.elapsed();
    phase(&format!(
        "the stubborn one killed after {took:?} (grace {grace:?})"
    ));
    assert!(
        took >= grace,
        "killed after the grace period, not before ({took:?})"
    );
    let st = container_status(env, &stubborn);
    assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(st.exit_code, 137, "SIGKILL after the grace period");

    phase("failing, OOM and stop checks done");
    remove_pod(
        env,
        &pod,
        &[&app, &peer, &stubborn, &failing, &oom],
        shim_pid,
    );
    phase("pod removed, nothing left");
}

/// The pod's shim: one, of `rt`'s kind, naming the pod.
fn pod_shim(pod: &Pod, rt: Runtime) -> i32 {
    let shims: Vec<i32> = processes_mentioning(&pod.id)
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(rt.shim()))
        })
        .collect();
    assert_eq!(shims.len(), 1, "one {} for the pod: {shims:?}", rt.shim());
    shims[0]
}

/// Waits until container `id` has exited; its status.
fn wait_exited(env: &CriEnv, id: &str, timeout: Duration) -> cri::ContainerStatus {
    let mut st = None;
    wait_for(env, &format!("container {id} to exit"), timeout, || {
        let s = container_status(env, id);
        let done = s.state == cri::ContainerState::ContainerExited as i32;
        st = Some(s);
        done
    });
    st.unwrap()
}

/// Removes `containers` and the pod as the kubelet does, then checks that
/// nothing of it is left on the host: no shim, agent or VMM process, no
/// mount naming it, no state directory, no cgroup below the pod's.
fn remove_pod(env: &CriEnv, pod: &Pod, containers: &[&str], shim_pid: i32) {
    let cri = &env.cri;
    // The skiff sandbox's state directory, from the sandbox's bundle.
    let state_dir = std::fs::read_to_string(env.ctrd.bundle(&pod.id).join("skiff-state"))
        .ok()
        .map(|s| PathBuf::from(s.trim()));
    for id in containers {
        call!(
            cri,
            runtime.remove_container(cri::RemoveContainerRequest {
                container_id: id.to_string()
            })
        )
        .unwrap_or_else(|e| env.fail("RemoveContainer", e));
    }
    let t = Instant::now();
    let mut took = Vec::new();
    call!(
        cri,
        runtime.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone()
        })
    )
    .unwrap_or_else(|e| env.fail("StopPodSandbox", e));
    took.push(("StopPodSandbox", t.elapsed()));
    call!(
        cri,
        runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone()
        })
    )
    .unwrap_or_else(|e| env.fail("RemovePodSandbox", e));
    took.push(("RemovePodSandbox", t.elapsed()));
    let left = call!(
        cri,
        runtime.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
    )
    .unwrap_or_else(|e| env.fail("ListPodSandbox", e));
    assert!(
        left.items.iter().all(|p| p.id != pod.id),
        "the pod is still listed: {:?}",
        left.items
    );

    // Nothing of the pod is left on the host: no shim, no agent or VMM,
    // nothing mounted under containerd's dirs for it.
    wait_for(
        env,
        "the pod's processes to go",
        Duration::from_secs(30),
        || processes_mentioning(&pod.id).is_empty() && !pid_alive(shim_pid),
    );
    took.push(("processes gone", t.elapsed()));
    eprintln!("pod {} removed: {took:?}", pod.id);
    let mounts: Vec<String> = mount_points()
        .into_iter()
        .filter(|m| m.contains(&pod.id) || containers.iter().any(|c| m.contains(c)))
        .collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    if let Some(dir) = state_dir {
        assert!(!dir.exists(), "state dir left: {}", dir.display());
    }
    let parent = &pod.config.linux.as_ref().unwrap().cgroup_parent;
    let pod_cgroup = Path::new("/sys/fs/cgroup/memory").join(parent.trim_start_matches('/'));
    let below = || -> Vec<PathBuf> {
        walk_dirs(&pod_cgroup)
            .into_iter()
            .filter(|d| *d != pod_cgroup)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !below().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        below().is_empty(),
        "cgroups left below the pod's: {:?}",
        below()
    );
}

/// What only the `vm` handler has: the VM sized from the pod, the
/// containers inside it.
fn vm_checks(guest: &str, shim_pid: i32, cgroup_parent: &str) {
    // The container runs in the guest: its kernel is the guest's.
    let host_boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let lines: Vec<&str> = guest.lines().collect();
    assert_eq!(lines.len(), 3, "{guest}");
    assert_ne!(
        lines[0],
        host_boot_id.trim(),
        "the container runs in the VM"
    );
    // 2 CPUs and 128 MiB for the pod: 2 vCPUs, the guest's own 256 MiB
    // plus the pod's 128.
    assert_eq!(lines[1], "2", "vCPUs from the pod's CPU limit");
    let kib: u64 = lines[2]
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        kib > 320 * 1024 && kib <= 384 * 1024,
        "guest memory {kib} KiB from 256 MiB + the pod's 128 MiB"
    );
    // The VMM is the shim's child with the pod's memory.
    let vmm: Vec<i32> = processes_mentioning("skiff-vmm")
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<i32>().ok())
                })
                == Some(shim_pid)
        })
        .collect();
    assert_eq!(vmm.len(), 1, "one VMM child of the pod's shim: {vmm:?}");
    // Its cgroup is under the pod's (the kubelet's cgroup parent).
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", vmm[0])).unwrap();
    let memory = cgroups
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == "memory"))
        })
        .or_else(|| cgroups.lines().find(|l| l.starts_with("0::")))
        .unwrap_or_default();
    assert!(
        memory.contains(&format!("{cgroup_parent}/pod")),
        "the VMM's cgroup {memory:?} is under the pod's {cgroup_parent}"
    );
}

fn linux_config() -> String {
    "handler = \"linux\"\nlog_level = \"debug\"\n".into()
}

/// The same pods with containerd's runc: the harness asks only what a
/// runtime should give.
#[test]
fn cri_pod_lifecycle_runc() {
    let Some(env) = CriEnv::start(&[]) else {
        return;
    };
    pod_lifecycle(&env, Runtime::Runc);
}

/// The pod with the `linux` handler: the agent is a host process, the
/// same protocol as in the VM.
#[test]
fn cri_pod_lifecycle_linux() {
    let Some(env) = CriEnv::start(&[(Runtime::SkiffLinux, linux_config())]) else {
        return;
    };
    pod_lifecycle(&env, Runtime::SkiffLinux);
}

/// The pod in skiff's micro-VM: one boot, sized from the pod's resources
/// (its own template key, so no template is restored here).
#[test]
fn cri_pod_lifecycle_vm() {
    let templates = tempfile::tempdir().unwrap();
    let Some(config) = vm_config(templates.path()) else {
        return;
    };
    let Some(env) = CriEnv::start(&[(Runtime::SkiffVm, config)]) else {
        return;
    };
    pod_lifecycle(&env, Runtime::SkiffVm);
}

/// The `vm` handler's config, templates in `templates`; None (after saying
/// why) without a test kernel, agent initramfs or `/dev/kvm`.
fn vm_config(templates: &Path) -> Option<String> {
    let Some((kernel, initrd)) = shim::testing::vm_artifacts() else {
        skip("no test kernel or agent initramfs (SKIFF_TEST_KERNEL, SKIFF_TEST_AGENT_INITRD)");
        return None;
    };
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        skip("/dev/kvm is not available");
        return None;
    }
    Some(format!(
        "handler = \"vm\"\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = 256\n\
         max_vcpus = 2\nmax_memory_mib = 512\nlog_level = \"info\"\ntemplate_dir = \"{}\"\n",
        kernel.display(),
        initrd.display(),
        templates.display()
    ))
}

/// The shim's process and all its descendants (its agent or VMM, the
/// containers).
fn process_tree(root: i32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<i32>().ok())
            });
        if let Some(ppid) = ppid {
            parents.push((pid, ppid));
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// A process's proportional set size, KiB (0 if it is gone).
fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One pod of `rt` with one sleeping container, started the way the
/// kubelet starts it; the pod, its container and the shim.
fn start_sleeper_pod(env: &CriEnv, rt: Runtime, name: &str) -> (Pod, String, i32) {
    let pod = run_pod(
        env,
        &PodSpec {
            name,
            runtime: rt,
            cpu_millis: 1000,
            memory_bytes: 64 << 20,
        },
    );
    let c = create_container(env, &pod, "sleep", "exec sleep 100000", vec![], 64 << 20);
    assert_eq!(
        container_status(env, &c).state,
        cri::ContainerState::ContainerRunning as i32
    );
    let shim = pod_shim(&pod, rt);
    (pod, c, shim)
}

/// Pod start and stop as the kubelet sees them, and memory per idle pod,
/// for skiff `vm`, skiff `linux` and runc in one containerd: medians of
/// alternating rounds, ratios against runc. A benchmark, not a test:
/// `benches/cri-bench.sh` runs it (`SKIFF_CRI_BENCH_ROUNDS`, default 5;
/// `SKIFF_CRI_BENCH_PODS`, default 10).
#[test]
#[ignore = "a benchmark: benches/cri-bench.sh runs it"]
fn cri_bench() {
    let count = |var: &str, default: usize| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = count("SKIFF_CRI_BENCH_ROUNDS", 5);
    let pods = count("SKIFF_CRI_BENCH_PODS", 10);
    let templates = tempfile::tempdir().unwrap();
    let Some(vm) = vm_config(templates.path()) else {
        return;
    };
    let Some(env) = CriEnv::start(&[
        (Runtime::SkiffVm, vm),
        (Runtime::SkiffLinux, linux_config()),
    ]) else {
        return;
    };
    let runtimes = [Runtime::Runc, Runtime::SkiffLinux, Runtime::SkiffVm];
    // The first `vm` pod boots and makes the template: not measured.
    let (pod, c, shim) = start_sleeper_pod(&env, Runtime::SkiffVm, "warm");
    remove_pod(&env, &pod, &[&c], shim);

    let mut start: HashMap<&str, Vec<Duration>> = HashMap::new();
    let mut stop: HashMap<&str, Vec<Duration>> = HashMap::new();
    for round in 0..rounds {
        for rt in runtimes {
            let t = Instant::now();
            let (pod, c, shim) = start_sleeper_pod(&env, rt, &format!("b{round}"));
            start.entry(rt.handler()).or_default().push(t.elapsed());
            let t = Instant::now();
            call!(
                env.cri,
                runtime.stop_container(cri::StopContainerRequest {
                    container_id: c.clone(),
                    timeout: 0,
                })
            )
            .unwrap_or_else(|e| env.fail("StopContainer", e));
            remove_pod(&env, &pod, &[&c], shim);
            stop.entry(rt.handler()).or_default().push(t.elapsed());
        }
    }
    println!("\npod start (RunPodSandbox → CreateContainer → StartContainer → running) and stop (StopContainer → RemoveContainer → StopPodSandbox → RemovePodSandbox, processes gone), medians of {rounds}:");
    let runc_start = median(start["runc"].clone());
    let runc_stop = median(stop["runc"].clone());
    for rt in runtimes {
        let (a, b) = (
            median(start[rt.handler()].clone()),
            median(stop[rt.handler()].clone()),
        );
        println!(
            "  {:<12} start {:>10.1?} ({:>6.2}x runc)   stop {:>10.1?} ({:>6.2}x runc)",
            rt.handler(),
            a,
            a.as_secs_f64() / runc_start.as_secs_f64(),
            b,
            b.as_secs_f64() / runc_stop.as_secs_f64()
        );
    }

    println!("\nmemory per idle pod ({pods} pods of one sleeping container each; Pss of the shim and everything below it: agent or VMM with the guest's touched memory, containers):");
    let mut per_pod = HashMap::new();
    for rt in runtimes {
        let started: Vec<(Pod, String, i32)> = (0..pods)
            .map(|i| start_sleeper_pod(&env, rt, &format!("m{i}")))
            .collect();
        // Let the pods settle (the guests' boot-time work done).
        std::thread::sleep(Duration::from_secs(10));
        let total: u64 = started
            .iter()
            .flat_map(|(_, _, shim)| process_tree(*shim))
            .map(pss_kib)
            .sum();
        let each = total as f64 / pods as f64 / 1024.0;
        per_pod.insert(rt.handler(), each);
        for (pod, c, shim) in &started {
            remove_pod(&env, pod, &[c], *shim);
        }
    }
    for rt in runtimes {
        println!(
            "  {:<12} {:>8.1} MiB per pod ({:>5.2}x runc)",
            rt.handler(),
            per_pod[rt.handler()],
            per_pod[rt.handler()] / per_pod["runc"]
        );
    }
}
