//! `vm-bench`: the `vm` handler's costs against the `linux` handler's, in
//! one run on one host (so the ratios hold; PVM inflates absolute figures).
//!
//! ```sh
//! cargo run --release -p skiff-benches --bin vm-bench -- \
//!     --kernel "$(guest-image/kernel/build.sh | tail -1)" \
//!     --initrd "$(guest-image/initramfs/agent-build.sh | tail -1)"
//! ```
//!
//! 1. Agent Health round trip, N calls: over hybrid vsock into the VM vs
//!    over the unix socket of the `linux` handler's host agent.
//! 2. vsock throughput through the guest, one connection at a time:
//!    host → guest (the probe hashes what it reads) and guest → host.
//! 3. Shim + VMM memory: Pss of the bench process and the jailed VMM
//!    process outside the guest RAM mapping, with the VM and its container
//!    running; and VM start to agent ready.
//!
//! The VM part runs twice: with the jailed VMM process (the default), then
//! with the VMM inline (`vmm = "inline"`).
//!
//! Needs root, /dev/kvm, busybox-static and skiff-agent next to this binary
//! (`cargo build --release -p skiff-agent`) for the `linux` side.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use shim::config::{Config, HandlerKind, VmmMode};
use shim::sandbox::vm::{VmHandler, VmSandbox};
use shim::sandbox::{handler_for, Sandbox, SandboxRequest};
use shim::testing::{
    busybox_rootfs, noise, probe_binary, probe_connect, probe_sink, probe_source, sink_answer,
    source_matches, spec_json,
};

#[derive(Parser)]
struct Args {
    /// Guest kernel (vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// Agent initramfs (guest-image/initramfs/agent-build.sh).
    #[arg(long)]
    initrd: PathBuf,
    /// Health calls per handler.
    #[arg(long, default_value_t = 500)]
    calls: usize,
    /// Bytes per throughput run.
    #[arg(long, default_value_t = 4 << 20)]
    bytes: usize,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Health round trips: (p50, p99).
fn health(sandbox: &dyn Sandbox, calls: usize) -> anyhow::Result<(Duration, Duration)> {
    let agent = sandbox.agent();
    for _ in 0..calls / 10 {
        agent.health(Duration::from_secs(10))?;
    }
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        agent.health(Duration::from_secs(10))?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok((percentile(&times, 0.5), percentile(&times, 0.99)))
}

/// Pss (kB) of process `pid` (or `self`) outside the guest RAM mapping,
/// and of it.
fn pss_split(pid: &str, guest_bytes: u64) -> anyhow::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut other, mut guest) = (0u64, 0u64);
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            let (a, b) = first.split_once('-').unwrap_or(("0", "0"));
            let size = u64::from_str_radix(b, 16)? - u64::from_str_radix(a, 16)?;
            // The guest RAM mapping (the kernel may have merged it with a
            // neighbouring anonymous mapping, so at least its size).
            in_guest = size >= guest_bytes;
        } else if first == "Pss:" {
            let kb: u64 = f.next().unwrap_or("0").parse()?;
            if in_guest {
                guest += kb;
            } else {
                other += kb;
            }
        }
    }
    Ok((other, guest))
}

fn main() -> std::process::ExitCode {
    // The jailed VMM re-executes this binary.
    if let Some(code) = shim::vmm::jail::main_if_vmm() {
        return code;
    }
    match bench() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vm_bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn request<'a>(
    id: &'a str,
    state_dir: &'a Path,
    rootfs: &'a Path,
    config: &'a Config,
) -> SandboxRequest<'a> {
    SandboxRequest {
        id,
        state_dir,
        hostname: "bench",
        rootfs,
        cgroups_path: None,
        netns: None,
        size: shim::sandbox::PodSize::default(),
        config,
        ready_timeout: Duration::from_secs(10),
    }
}

/// What one VM run measured.
struct VmFigures {
    ready: Duration,
    health: (Duration, Duration),
    up: Duration,
    down: Duration,
    /// Pss (kB) of the bench process and the VMM process outside guest
    /// RAM, and of guest RAM.
    other_kb: u64,
    guest_kb: u64,
}

fn bench() -> anyhow::Result<()> {
    let args = Args::parse();
    let probe = probe_binary().map_err(anyhow::Error::msg)?;
    let dir = tempfile::Builder::new()
        .prefix("skiff-vm-bench-")
        .tempdir()?;
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs, &["sh", "true"], Some(&probe))?;
    let config = Config {
        kernel: Some(args.kernel.clone()),
        initrd: Some(args.initrd.clone()),
        memory_mib: args.memory_mib,
        ..Config::default()
    };
    let linux_state = dir.path().join("linux");

    // The linux handler first (milliseconds), then the VM (a minute or two
    // per VMM mode).
    let linux = handler_for(&Config {
        handler: HandlerKind::Linux,
        ..config.clone()
    })
    .start(&request("bench-linux", &linux_state, &rootfs, &config))
    .context("linux sandbox (is skiff-agent next to this binary?)")?;
    let (l50, l99) = health(linux.as_ref(), args.calls)?;
    linux.stop(Duration::from_secs(10))?;

    let mut runs = Vec::new();
    for mode in [VmmMode::Process, VmmMode::Inline] {
        let config = Config {
            vmm: mode,
            ..config.clone()
        };
        let state = dir.path().join(format!("vm-{mode:?}"));
        let vm = VmHandler::default().start_vm(&request("bench-vm", &state, &rootfs, &config))?;
        eprintln!(
            "{mode:?}: VM agent ready after {:.1} s",
            vm.ready_after().as_secs_f64()
        );
        runs.push((mode, vm_run(&vm, &args, &rootfs, &state)?));
    }

    let mib = args.bytes as f64 / f64::from(1 << 20);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("agent Health round trip, {} calls:", args.calls);
    println!(
        "  linux handler (unix socket): p50 {:.0} us, p99 {:.0} us",
        us(l50),
        us(l99)
    );
    for (mode, f) in &runs {
        println!(
            "  vm handler, {mode:?} VMM (hybrid vsock): p50 {:.0} us, p99 {:.0} us  -> {:.1}x the unix socket",
            us(f.health.0),
            us(f.health.1),
            f.health.0.as_secs_f64() / l50.as_secs_f64()
        );
    }
    println!("vsock throughput through the guest ({mib:.0} MiB, one connection, hashes checked):");
    for (mode, f) in &runs {
        println!(
            "  {mode:?} VMM: host -> guest {:.2} MiB/s, guest -> host {:.2} MiB/s",
            mib / f.up.as_secs_f64(),
            mib / f.down.as_secs_f64()
        );
    }
    println!(
        "VM start to agent ready, and Pss of the bench process (shim-equivalent) + VMM process:"
    );
    for (mode, f) in &runs {
        println!(
            "  {mode:?} VMM: ready after {:.1} s; Pss outside guest RAM {:.1} MiB; guest RAM touched {:.1} MiB of {}",
            f.ready.as_secs_f64(),
            f.other_kb as f64 / 1024.0,
            f.guest_kb as f64 / 1024.0,
            args.memory_mib
        );
    }
    if let [(_, p), (_, i)] = runs.as_slice() {
        println!(
            "  process / inline: ready {:.2}x, Pss outside guest RAM {:.2}x",
            p.ready.as_secs_f64() / i.ready.as_secs_f64(),
            p.other_kb as f64 / i.other_kb as f64
        );
    }
    Ok(())
}

/// Health, throughput and memory of a running VM sandbox; stops it.
fn vm_run(vm: &VmSandbox, args: &Args, rootfs: &Path, state: &Path) -> anyhow::Result<VmFigures> {
    let health = health(vm, args.calls)?;
    let guest_rootfs = vm.share_path(rootfs)?;
    let agent = vm.agent();
    agent.create_container(
        "probe",
        spec_json(&["/bin/skiff-vsock-probe", "serve", "1025"]),
        &guest_rootfs,
        false,
        false,
    )?;
    agent.start_container("probe")?;
    let uds = state.join("vsock.sock");
    drop(probe_connect(&uds, Duration::from_secs(120))?);

    let data = noise(1, args.bytes);
    let (answer, up) = probe_sink(probe_connect(&uds, Duration::from_secs(10))?, &data)?;
    if answer != sink_answer(&data) {
        bail!("host->guest: the guest saw {answer}");
    }
    let (got, down) = probe_source(
        probe_connect(&uds, Duration::from_secs(10))?,
        args.bytes as u64,
    )?;
    if !source_matches(&got, args.bytes as u64) {
        bail!("guest->host: {} bytes, pattern broken", got.len());
    }
    let guest_bytes = u64::from(args.memory_mib) << 20;
    let (mut other_kb, mut guest_kb) = pss_split("self", guest_bytes)?;
    if let Some(pid) = vm.vmm_pid() {
        let (o, g) = pss_split(&pid.to_string(), guest_bytes)?;
        other_kb += o;
        guest_kb += g;
    }
    let _ = agent.signal_process("probe", "", 9, false);
    let report = vm.stop_vm(Duration::from_secs(30))?;
    eprintln!("VM ended: {:?}", report.map(|r| r.exit));
    Ok(VmFigures {
        ready: vm.ready_after(),
        health,
        up,
        down,
        other_kb,
        guest_kb,
    })
}
