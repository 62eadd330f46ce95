//! Agent benchmarks (root only; not a timed test):
//!
//! - `Health` round trip over the unix socket: p50 / p99;
//! - create + start + wait of `/bin/true` through the agent vs `runc run` of
//!   the same bundle, medians and their ratio.
//!
//! ```text
//! cargo build --release -p skiff-agent --bins --examples
//! target/release/examples/agent_bench [--agent target/release/skiff-agent] [--runs 30]
//! ```

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use oci_spec::runtime::Spec;
use skiff_agent_proto::agent as pb;
use skiff_agent_proto::agent_ttrpc::AgentClient;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

fn build_rootfs(dir: &Path) -> Result<()> {
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("copy /bin/busybox (apt-get install -y busybox-static)")?;
    for applet in ["sh", "true"] {
        symlink("busybox", dir.join("bin").join(applet))?;
    }
    Ok(())
}

fn true_spec(rootfs: &Path) -> Result<Spec> {
    let mut spec = Spec::default();
    let mut process = spec
        .process()
        .clone()
        .context("default spec has a process")?;
    process.set_args(Some(vec!["/bin/true".into()]));
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    let mut root = spec.root().clone().context("default spec has a root")?;
    root.set_path(rootfs.to_owned());
    spec.set_root(Some(root));
    Ok(spec)
}

fn main() -> Result<()> {
    let mut agent_bin = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("skiff-agent"))
        .unwrap_or_else(|| PathBuf::from("skiff-agent"));
    let mut runs = 30usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agent" => agent_bin = PathBuf::from(args.next().context("--agent PATH")?),
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("agent_bench needs root");
    }

    let dir = tempfile::Builder::new().prefix("skiff-bench-").tempdir()?;
    let rootfs = dir.path().join("rootfs");
    build_rootfs(&rootfs)?;
    let socket = dir.path().join("agent.sock");
    let mut agent = Command::new(&agent_bin)
        .arg("--listen")
        .arg(format!("unix://{}", socket.display()))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--cgroup-parent")
        .arg(format!("/skiff-bench-{}", std::process::id()))
        .arg("--log-level")
        .arg("warn")
        .spawn()
        .with_context(|| format!("start {}", agent_bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("the agent did not listen");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let client = AgentClient::new(ttrpc::Client::connect(&format!(
        "unix://{}",
        socket.display()
    ))?);

    // Health round trip.
    for _ in 0..200 {
        client.health(ctx(), &pb::Empty::new())?;
    }
    let mut health: Vec<Duration> = (0..5000)
        .map(|_| {
            let start = Instant::now();
            client
                .health(ctx(), &pb::Empty::new())
                .map(|_| start.elapsed())
        })
        .collect::<Result<_, _>>()?;
    health.sort();
    println!(
        "Health round trip: p50 {:.1} us, p99 {:.1} us ({} calls)",
        percentile(&health, 0.5).as_secs_f64() * 1e6,
        percentile(&health, 0.99).as_secs_f64() * 1e6,
        health.len()
    );

    // create + start + wait /bin/true through the agent.
    let spec = true_spec(&rootfs)?;
    let spec_json = serde_json::to_vec(&spec)?;
    let mut agent_times = Vec::new();
    let mut agent_with_remove = Vec::new();
    for i in 0..runs + 2 {
        let id = format!("bench-{i}");
        let start = Instant::now();
        let mut create = pb::CreateContainerRequest::new();
        create.container_id = id.clone();
        create.spec_json = spec_json.clone();
        create.rootfs = rootfs.display().to_string();
        client.create_container(ctx(), &create)?;
        let mut req = pb::ContainerRequest::new();
        req.container_id = id.clone();
        client.start_container(ctx(), &req)?;
        let mut wait = pb::ProcessRequest::new();
        wait.container_id = id.clone();
        let status = client.wait_process(ctx(), &wait)?;
        let elapsed = start.elapsed();
        client.remove_container(ctx(), &req)?;
        let with_remove = start.elapsed();
        if status.exit_status != 0 {
            bail!("/bin/true exited {}", status.exit_status);
        }
        if i >= 2 {
            agent_times.push(elapsed);
            agent_with_remove.push(with_remove);
        }
    }

    // runc run of the same bundle.
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle)?;
    std::fs::write(bundle.join("config.json"), &spec_json)?;
    let runc_root = dir.path().join("runc-root");
    let mut runc_times = Vec::new();
    for i in 0..runs + 2 {
        let start = Instant::now();
        let status = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("runc-bench-{}-{i}", std::process::id()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .context("run runc (apt-get install -y runc)")?;
        let elapsed = start.elapsed();
        if !status.success() {
            bail!("runc run failed: {status}");
        }
        if i >= 2 {
            runc_times.push(elapsed);
        }
    }

    let _ = agent.kill();
    let _ = agent.wait();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let _ = std::fs::remove_dir(
            hierarchy
                .path()
                .join(format!("skiff-bench-{}", std::process::id())),
        );
    }

    agent_times.sort();
    agent_with_remove.sort();
    runc_times.sort();
    let agent_p50 = percentile(&agent_times, 0.5);
    let runc_p50 = percentile(&runc_times, 0.5);
    println!(
        "create+start+wait /bin/true via agent: p50 {:.2} ms, p90 {:.2} ms (with remove: p50 {:.2} ms)",
        ms(agent_p50),
        ms(percentile(&agent_times, 0.9)),
        ms(percentile(&agent_with_remove, 0.5)),
    );
    println!(
        "runc run /bin/true:                    p50 {:.2} ms, p90 {:.2} ms",
        ms(runc_p50),
        ms(percentile(&runc_times, 0.9)),
    );
    println!(
        "ratio agent/runc (p50): {:.2}x over {runs} runs each",
        agent_p50.as_secs_f64() / runc_p50.as_secs_f64()
    );
    Ok(())
}
