//! `template-bench`: VMs restored from a template against VMs booted, in
//! one run on one host (the ratios hold; PVM inflates absolute figures).
//!
//! ```sh
//! cargo run --release -p skiff-benches --bin template-bench -- \
//!     --kernel "$(guest-image/kernel/build.sh | tail -1)" \
//!     --initrd "$(guest-image/initramfs/agent-build.sh | tail -1)"
//! ```
//!
//! 1. VM start to agent ready, through the `vm` handler (jailed VMM):
//!    cold boot vs restore from the template, alternating, `--rounds` of
//!    each (goal: restore <= 1/50 of the cold boot).
//! 2. The VMM's own restore of the template (`Vm::restore`: memory
//!    mapped, KVM and device state set), no guest work (goal <= 10 ms).
//! 3. `--pods` idle sandboxes restored from the template, then as many
//!    booted (two boots at a time): the total Pss of their VMM processes,
//!    guest memory included (goal: restored <= 0.3x booted).
//!
//! Needs root, /dev/kvm and busybox-static.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use shim::config::Config;
use shim::sandbox::vm::{VmHandler, VmSandbox};
use shim::sandbox::SandboxRequest;
use shim::testing::busybox_rootfs;
use shim::vmm;

#[derive(Parser)]
struct Args {
    /// Guest kernel (vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// Agent initramfs (guest-image/initramfs/agent-build.sh).
    #[arg(long)]
    initrd: PathBuf,
    /// Cold boots and restores each, alternating.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Idle pods for the memory comparison (0 skips it).
    #[arg(long, default_value_t = 10)]
    pods: usize,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
}

fn main() -> std::process::ExitCode {
    // The jailed VMM re-executes this binary.
    if let Some(code) = shim::vmm::jail::main_if_vmm() {
        return code;
    }
    match bench() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("template-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Starts sandbox `id` of `config`, its state under `dir`.
fn start(config: &Config, dir: &Path, id: &str, rootfs: &Path) -> anyhow::Result<VmSandbox> {
    let state_dir = dir.join(id);
    VmHandler::default()
        .start_vm(&SandboxRequest {
            id,
            state_dir: &state_dir,
            hostname: id,
            rootfs,
            cgroups_path: None,
            netns: None,
            size: shim::sandbox::PodSize::default(),
            config,
            ready_timeout: Duration::from_secs(10),
        })
        .with_context(|| format!("sandbox {id}"))
}

fn stop(sandbox: VmSandbox) -> anyhow::Result<()> {
    sandbox
        .stop_vm(Duration::from_secs(60))
        .context("stopping a sandbox")?;
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Pss (kB) of process `pid`, from `smaps_rollup`.
fn pss(pid: i32) -> anyhow::Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no Pss in smaps_rollup")
}

/// Total Pss (kB) of the sandboxes' VMM processes.
fn vmm_pss(pods: &[VmSandbox]) -> anyhow::Result<u64> {
    pods.iter()
        .map(|p| pss(p.vmm_pid().context("a jailed VMM")?))
        .sum()
}

fn bench() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("skiff-template-bench-")
        .tempdir()?;
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs, &["sh"], None)?;
    let templates = dir.path().join("templates");
    let with_template = Config {
        kernel: Some(args.kernel.clone()),
        initrd: Some(args.initrd.clone()),
        memory_mib: args.memory_mib,
        template: true,
        template_dir: templates.clone(),
        ..Config::default()
    };
    let cold = Config {
        template: false,
        ..with_template.clone()
    };

    // The template: made by the first sandbox.
    let t = Instant::now();
    let first = start(&with_template, dir.path(), "template", &rootfs)?;
    anyhow::ensure!(!first.restored(), "the template dir was not empty");
    stop(first)?;
    eprintln!("template made in {:.1} s", t.elapsed().as_secs_f64());

    // 1. Cold boot vs restore, alternating.
    let (mut boots, mut restores) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let booted = start(&cold, dir.path(), &format!("cold{round}"), &rootfs)?;
        anyhow::ensure!(!booted.restored());
        boots.push(booted.ready_after());
        stop(booted)?;
        let restored = start(&with_template, dir.path(), &format!("warm{round}"), &rootfs)?;
        anyhow::ensure!(restored.restored(), "a sandbox booted instead of restoring");
        restores.push(restored.ready_after());
        stop(restored)?;
        eprintln!(
            "round {round}: boot {:.2} s, restore {:.3} s",
            boots[round].as_secs_f64(),
            restores[round].as_secs_f64()
        );
    }
    let (boot, restore) = (median(boots), median(restores));
    println!(
        "VM start to agent ready, median of {}: cold boot {:.2} s, restore {:.3} s: {:.4}x (goal <= 0.02)",
        args.rounds,
        boot.as_secs_f64(),
        restore.as_secs_f64(),
        restore.as_secs_f64() / boot.as_secs_f64()
    );

    // 2. The VMM's own restore, without guest work: the handler's device
    // set (empty disk slots, vsock, rng), built and dropped.
    let template = std::fs::read_dir(&templates)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join(vmm::snapshot::STATE_FILE).is_file())
        .context("no template")?;
    let mut times = Vec::new();
    for i in 0..5 {
        let uds = dir.path().join(format!("restore{i}.sock"));
        let config = vmm::VmConfig {
            vcpus: 1,
            mem_mib: u64::from(args.memory_mib),
            boot: vmm::BootSource::Raw {
                image: Vec::new(),
                load_addr: 0,
                protocol: vmm::BootProtocol::Linux64,
            },
            disks: (0..with_template.vm_disks)
                .map(|_| vmm::DiskConfig::empty())
                .collect(),
            vsock: Some(vmm::VsockConfig {
                guest_cid: 3,
                uds_path: uds,
            }),
            cpu_template: shim::check::detect().template,
            serial: vmm::SerialOutput::Discard,
            epoch: Instant::now(),
            rng: true,
            net: None,
            fs: None,
            seccomp: true,
        };
        let t = Instant::now();
        let built = vmm::Vm::restore(config, &template)?;
        times.push(t.elapsed());
        drop(built);
    }
    println!(
        "the VMM's restore of a {} MiB guest (no guest work), median of 5: {:.2} ms (goal <= 10 ms)",
        args.memory_mib,
        median(times).as_secs_f64() * 1e3
    );

    // 3. Memory of idle pods.
    if args.pods > 0 {
        let mut pods = Vec::new();
        for i in 0..args.pods {
            pods.push(start(
                &with_template,
                dir.path(),
                &format!("pod{i}"),
                &rootfs,
            )?);
        }
        std::thread::sleep(Duration::from_secs(5));
        let restored = vmm_pss(&pods)?;
        for p in pods {
            stop(p)?;
        }
        let mut pods = Vec::new();
        for pair in (0..args.pods).collect::<Vec<_>>().chunks(2) {
            let started: Vec<anyhow::Result<VmSandbox>> = std::thread::scope(|s| {
                let handles: Vec<_> = pair
                    .iter()
                    .map(|i| {
                        let (cold, dir, rootfs) = (&cold, dir.path(), &rootfs);
                        s.spawn(move || start(cold, dir, &format!("boot{i}"), rootfs))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
                    })
                    .collect()
            });
            for p in started {
                pods.push(p?);
            }
        }
        std::thread::sleep(Duration::from_secs(5));
        let booted = vmm_pss(&pods)?;
        for p in pods {
            stop(p)?;
        }
        println!(
            "{} idle pods, total Pss of their VMM processes (guest memory included): restored {} MiB, booted {} MiB: {:.2}x (goal <= 0.3)",
            args.pods,
            restored >> 10,
            booted >> 10,
            restored as f64 / booted as f64
        );
    }
    Ok(())
}
