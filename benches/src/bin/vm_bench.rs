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
//! 3. Shim + VMM memory: the bench process's Rss minus the guest RAM
//!    mapping's Rss, with the VM and its container running.
//!
//! Needs root, /dev/kvm, busybox-static and skiff-agent next to this binary
//! (`cargo build --release -p skiff-agent`) for the `linux` side.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use shim::config::{Config, HandlerKind};
use shim::sandbox::vm::VmHandler;
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

/// Rss (kB) of this process outside the guest RAM mapping, and of it.
fn rss_split(guest_bytes: u64) -> anyhow::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
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
        } else if first == "Rss:" {
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
    let (linux_state, vm_state) = (dir.path().join("linux"), dir.path().join("vm"));
    let request = |id, state_dir| SandboxRequest {
        id,
        state_dir,
        hostname: "bench",
        rootfs: &rootfs,
        config: &config,
        ready_timeout: Duration::from_secs(10),
    };

    // The linux handler first (milliseconds), then the VM (a minute or two).
    let linux = handler_for(HandlerKind::Linux)
        .start(&request("bench-linux", &linux_state))
        .context("linux sandbox (is skiff-agent next to this binary?)")?;
    let (l50, l99) = health(linux.as_ref(), args.calls)?;
    linux.stop(Duration::from_secs(10))?;

    let t = Instant::now();
    let vm = VmHandler::default().start_vm(&request("bench-vm", &vm_state))?;
    eprintln!("VM agent ready after {:.1} s", t.elapsed().as_secs_f64());
    let (v50, v99) = health(&vm, args.calls)?;

    let guest_rootfs = vm.share_path(&rootfs)?;
    let agent = vm.agent();
    agent.create_container(
        "probe",
        spec_json(&["/bin/skiff-vsock-probe", "serve", "1025"]),
        &guest_rootfs,
        false,
        false,
    )?;
    agent.start_container("probe")?;
    let uds = vm_state.join("vsock.sock");
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
    let (other_kb, guest_kb) = rss_split(u64::from(args.memory_mib) << 20)?;
    let _ = agent.signal_process("probe", "", 9, false);
    let report = vm.stop_vm(Duration::from_secs(30))?;

    let mib = args.bytes as f64 / f64::from(1 << 20);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("agent Health round trip, {} calls:", args.calls);
    println!(
        "  linux handler (unix socket): p50 {:.0} us, p99 {:.0} us",
        us(l50),
        us(l99)
    );
    println!(
        "  vm handler (hybrid vsock):   p50 {:.0} us, p99 {:.0} us  -> {:.1}x the unix socket",
        us(v50),
        us(v99),
        v50.as_secs_f64() / l50.as_secs_f64()
    );
    println!("vsock throughput through the guest ({mib:.0} MiB, one connection, hashes checked):");
    println!(
        "  host -> guest: {:.2} MiB/s   guest -> host: {:.2} MiB/s",
        mib / up.as_secs_f64(),
        mib / down.as_secs_f64()
    );
    println!(
        "bench process (shim-equivalent + VMM) Rss outside guest RAM: {:.1} MiB; guest RAM touched: {:.1} MiB of {}",
        other_kb as f64 / 1024.0,
        guest_kb as f64 / 1024.0,
        args.memory_mib
    );
    println!("VM ended: {:?}", report.map(|r| r.exit));
    Ok(())
}
