//! `skiff`: run a micro-VM by hand, and tell what this host can run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use shim::check;
use shim::config::{Config, HandlerKind};
use shim::run::{self as skiff_run, Root, RunRequest};
use shim::vmm::{
    self, BootSource, CpuTemplate, DiskConfig, ExitReason, KernelSpec, VmConfig, VsockConfig,
};

#[derive(Parser)]
#[command(name = "skiff", version, about = "skiff: containers in KVM micro-VMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report what this host can run (hardware KVM, PVM, or no KVM) and the
    /// CPU template and kernel parameters skiff picks for it.
    Check,
    /// Run one container in a fresh sandbox (no containerd), streaming its
    /// output; exits with the container's exit status.
    Run(RunArgs),
    /// Micro-VM commands.
    #[command(subcommand)]
    Vm(VmCommand),
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("root").required(true).args(["rootfs", "image"])))]
struct RunArgs {
    /// Sandbox handler: `vm` (a micro-VM) or `linux` (a sandboxed host
    /// process). Default: the config's.
    #[arg(long, value_parser = ["vm", "linux"])]
    handler: Option<String>,
    /// The skiff config (default: $SKIFF_CONFIG, else
    /// /etc/skiff/config.toml if present, else built-in defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The container's root filesystem (a directory).
    #[arg(long, value_name = "DIR")]
    rootfs: Option<PathBuf>,
    /// An OCI image layout (a directory or a tar of one), `:TAG` picking
    /// one of several images; unpacked for the run. Its Entrypoint, Cmd,
    /// Env, WorkingDir and User apply.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// Guest kernel (`vm`; overrides the config's).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs with the agent (`vm`; overrides the config's).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest memory in MiB (`vm`; overrides the config's).
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Extra guest kernel parameters (`vm`; appended to the config's).
    #[arg(long, value_name = "PARAMS")]
    kernel_params: Option<String>,
    /// Run the VMM threads without their seccomp filters (`vm`; for
    /// debugging only; overrides the config's `seccomp`).
    #[arg(long)]
    no_seccomp: bool,
    /// An environment entry NAME=value. Repeatable.
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// The container's hostname.
    #[arg(long, default_value = "skiff")]
    hostname: String,
    /// A network namespace for the container (e.g. `/var/run/netns/NAME`
    /// with one veth in it, as CNI leaves it): `linux` joins it; `vm` wires
    /// the VM's NIC to it and configures the guest with its addresses and
    /// routes. Default: loopback only.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// The command and its arguments (with --image: replaces the image's
    /// Cmd; default: the image's Entrypoint and Cmd).
    #[arg(last = true, required_unless_present = "image", value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Boot a kernel in a micro-VM with the serial console on stdout; exits
    /// 0 when the guest resets or powers off cleanly.
    Boot(BootArgs),
    /// Snapshot a running `skiff vm boot` / `skiff vm restore` (process
    /// PID, started with --snapshot-dir): the VM is written to its
    /// snapshot directory and runs on.
    Snapshot {
        /// The `skiff vm boot` process.
        pid: i32,
    },
    /// Restore a micro-VM from a snapshot (`skiff vm boot --snapshot-dir`)
    /// and run it like `boot`. Memory and vCPUs are the snapshot's; give
    /// it the devices the snapshotted VM had (disks, vsock, --rng).
    Restore(RestoreArgs),
}

#[derive(clap::Args)]
struct BootArgs {
    /// Kernel: ELF vmlinux (PVH entry preferred) or bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// CPU template: default or pvm-compat (default: what `skiff check` picks).
    #[arg(long)]
    cpu_template: Option<String>,
    #[command(flatten)]
    devices: DeviceArgs,
    #[command(flatten)]
    snapshot: SnapshotArgs,
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The snapshot directory (`vm.state` and `memory`).
    #[arg(long)]
    from: PathBuf,
    #[command(flatten)]
    devices: DeviceArgs,
    #[command(flatten)]
    snapshot: SnapshotArgs,
}

/// The VM's devices and how it runs.
#[derive(clap::Args)]
struct DeviceArgs {
    /// A virtio-blk disk: FILE or FILE,ro. Repeatable.
    #[arg(long = "disk", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// Write the serial console to this file instead of stdout.
    #[arg(long)]
    serial_out: Option<PathBuf>,
    /// Give the guest a virtio-vsock device whose host side listens on this
    /// unix socket (hybrid vsock: `CONNECT <port>`; guest connections to
    /// host port P go to PATH_P).
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID (with --vsock-uds).
    #[arg(long, default_value_t = 3, requires = "vsock_uds")]
    vsock_cid: u64,
    /// Give the guest a virtio-rng device (entropy from the host).
    #[arg(long)]
    rng: bool,
    /// Run the VMM threads without their seccomp filters (for debugging
    /// only: a denied system call then shows up as what it is).
    #[arg(long)]
    no_seccomp: bool,
}

/// Taking snapshots of the running VM.
#[derive(clap::Args)]
struct SnapshotArgs {
    /// Where a snapshot of the running VM goes: one is taken on SIGUSR1
    /// (and after --snapshot-after); the VM runs on. Restore it with
    /// `skiff vm restore --from DIR`.
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,
    /// Take a snapshot this many seconds after the VM starts.
    #[arg(long, value_name = "SECS", requires = "snapshot_dir")]
    snapshot_after: Option<f64>,
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut parts = s.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("empty disk path")?;
    let mut read_only = false;
    for opt in parts {
        match opt {
            "ro" => read_only = true,
            "rw" => read_only = false,
            other => return Err(format!("unknown disk option {other:?} (known: ro, rw)")),
        }
    }
    Ok(DiskConfig {
        path: Some(path.into()),
        read_only,
    })
}

/// Logs to stderr; `SKIFF_LOG` = error|warn|info|debug|trace (default info).
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        shim::task::log_enabled(m)
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("skiff: {}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    if let Some(code) = shim::vmm::jail::main_if_vmm() {
        return code;
    }
    let epoch = Instant::now();
    let level = std::env::var("SKIFF_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let _ = log::set_logger(&StderrLogger).map(|()| log::set_max_level(level));
    match run(Cli::parse(), epoch) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("skiff: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, epoch: Instant) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check => {
            let r = check::detect();
            println!("host: {}", r.kind);
            println!("evidence: {}", r.evidence);
            println!("cpu template: {}", r.template);
            println!(
                "extra kernel parameters: {}",
                if r.extra_cmdline.is_empty() {
                    "(none)"
                } else {
                    r.extra_cmdline
                }
            );
            println!("kernel command line: {}", r.cmdline());
            println!(
                "seccomp filters (one per VMM thread kind; any other system call kills the VMM):"
            );
            for filter in vmm::seccomp::describe() {
                println!("  {filter}");
            }
            println!(
                "jailed VMM (vmm = \"process\"): own mount, PID, IPC, UTS and network \
                 namespaces, no capabilities, no_new_privs, uid/gid vmm_uid/vmm_gid \
                 (serving a virtio-fs share: uid 0 with CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, \
                 FOWNER, FSETID, SETGID, SETUID, MKNOD only); {}",
                match vmm::jail::cgroup::host_layout() {
                    Ok(layout) => format!("its cgroup: {layout}, under the pod's or the shim's"),
                    Err(e) => format!("no cgroup of its own can be made here: {e}"),
                }
            );
            if r.kind != check::HostKind::NoKvm {
                match vmm::snapshot::probe() {
                    Ok(p) => {
                        println!(
                            "VM templates: snapshot and restore work here (a 32 MiB test VM: \
                             snapshot {:?}, restore {:?}); template = true uses them",
                            p.snapshot, p.restore
                        );
                        if !p.tsc_restored {
                            println!(
                                "  except the guest TSC: the guest reads the host's TSC here \
                                 (PVM), so a restored guest's TSC has run on since the \
                                 snapshot; skiff moves its kvmclock on by as much"
                            );
                        }
                    }
                    Err(e) => println!(
                        "VM templates: restore does NOT work here ({:#}); set template = false",
                        anyhow::Error::from(e)
                    ),
                }
            }
            Ok(if r.kind == check::HostKind::NoKvm {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Run(a) => run_container(a),
        Command::Vm(VmCommand::Boot(a)) => boot(a, epoch),
        Command::Vm(VmCommand::Restore(a)) => restore(a, epoch),
        Command::Vm(VmCommand::Snapshot { pid }) => {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .with_context(|| format!("no process {pid}"))?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            if !args.iter().any(|a| a.starts_with(b"--snapshot-dir")) {
                bail!("process {pid} is not a skiff VM started with --snapshot-dir");
            }
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGUSR1,
            )?;
            println!("asked process {pid} for a snapshot (it logs where and how long)");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_container(a: RunArgs) -> anyhow::Result<ExitCode> {
    let (mut config, _) = Config::resolve(a.config.as_deref())?;
    if let Some(handler) = a.handler.as_deref() {
        config.handler = if handler == "vm" {
            HandlerKind::Vm
        } else {
            HandlerKind::Linux
        };
    }
    config.kernel = a.kernel.or(config.kernel);
    config.initrd = a.initrd.or(config.initrd);
    if let Some(mib) = a.memory_mib {
        config.memory_mib = mib;
    }
    if let Some(params) = a.kernel_params {
        config.kernel_params = format!("{} {params}", config.kernel_params);
    }
    if a.no_seccomp {
        config.seccomp = false;
    }
    for entry in &a.env {
        if !entry.contains('=') {
            bail!("--env {entry:?} is not NAME=value");
        }
    }
    let root = match (&a.rootfs, &a.image) {
        (Some(dir), _) => Root::Dir(dir),
        (None, Some(image)) => Root::Image(image),
        (None, None) => bail!("--rootfs or --image is required"),
    };
    let req = RunRequest {
        config: &config,
        root,
        args: &a.command,
        env: &a.env,
        hostname: &a.hostname,
        netns: a.netns.as_deref(),
    };
    let outcome = skiff_run::run(&req, &mut std::io::stdout(), &mut std::io::stderr())?;
    log::info!(
        "sandbox ready in {:?}; container ran {:?}; exit status {}",
        outcome.sandbox_ready,
        outcome.container,
        outcome.status
    );
    Ok(ExitCode::from(
        u8::try_from(outcome.status).unwrap_or(u8::MAX),
    ))
}

fn boot(a: BootArgs, epoch: Instant) -> anyhow::Result<ExitCode> {
    let host = check::detect();
    if host.kind == check::HostKind::NoKvm {
        bail!("this host has no usable KVM: {}", host.evidence);
    }
    let cpu_template: CpuTemplate = match &a.cpu_template {
        Some(t) => t.parse()?,
        None => host.template,
    };
    let cmdline = a.cmdline.unwrap_or_else(|| {
        if cpu_template == CpuTemplate::PvmCompat {
            format!("{} {}", check::BASE_CMDLINE, check::PVM_CMDLINE)
        } else {
            check::BASE_CMDLINE.to_owned()
        }
    });
    let config = VmConfig {
        vcpus: a.vcpus,
        mem_mib: a.mem_mib,
        boot: BootSource::Kernel(KernelSpec {
            kernel: a.kernel,
            initrd: a.initrd,
            cmdline,
        }),
        cpu_template,
        ..device_config(a.devices, epoch)
    };
    let vm = vmm::Vm::start(config).context("cannot run the VM")?;
    serve(vm, &a.snapshot, epoch)
}

/// A config with `d`'s devices; the caller sets what boots.
fn device_config(d: DeviceArgs, epoch: Instant) -> VmConfig {
    VmConfig {
        vcpus: 1,
        mem_mib: 128,
        // Replaced by the caller (a restore loads nothing).
        boot: BootSource::Raw {
            image: Vec::new(),
            load_addr: 0,
            protocol: vmm::BootProtocol::Linux64,
        },
        disks: d.disks,
        vsock: d.vsock_uds.map(|uds_path| VsockConfig {
            guest_cid: d.vsock_cid,
            uds_path,
        }),
        cpu_template: CpuTemplate::default(),
        serial: d
            .serial_out
            .map(vmm::SerialOutput::File)
            .unwrap_or(vmm::SerialOutput::Stdout),
        epoch,
        rng: d.rng,
        net: None,
        fs: None,
        seccomp: !d.no_seccomp,
    }
}

fn restore(a: RestoreArgs, epoch: Instant) -> anyhow::Result<ExitCode> {
    let saved = vmm::snapshot::read(&a.from)?;
    let config = VmConfig {
        vcpus: u8::try_from(saved.vcpus.len()).context("the snapshot's vCPU count")?,
        mem_mib: saved.mem_size >> 20,
        ..device_config(a.devices, epoch)
    };
    let built = vmm::Vm::restore(config, &a.from)
        .with_context(|| format!("cannot restore {}", a.from.display()))?;
    log::info!("restored {} in {:?}", a.from.display(), epoch.elapsed());
    let vm = built.start().context("cannot run the VM")?;
    serve(vm, &a.snapshot, epoch)
}

/// Runs `vm` to its end, snapshotting it into `snap.snapshot_dir` on
/// SIGUSR1 and after `snap.snapshot_after`.
fn serve(vm: vmm::RunningVm, snap: &SnapshotArgs, epoch: Instant) -> anyhow::Result<ExitCode> {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use std::os::fd::AsRawFd;

    let mut usr1 = None;
    if snap.snapshot_dir.is_some() {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGUSR1);
        // This thread only: the VM's threads are running already.
        mask.thread_block()?;
        usr1 = Some(SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK)?);
    }
    let mut after = snap
        .snapshot_after
        .map(|s| epoch + std::time::Duration::from_secs_f64(s.max(0.0)));
    while !vm.has_exited() {
        let mut fds = vec![libc::pollfd {
            fd: vm.exit_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(sfd) = &usr1 {
            fds.push(libc::pollfd {
                fd: sfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let wait_ms = after.map_or(-1, |t| {
            i32::try_from(t.saturating_duration_since(Instant::now()).as_millis())
                .unwrap_or(i32::MAX)
        });
        // SAFETY: `fds` is a valid array of pollfds for the call and its
        // length is passed with it.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        let signalled = usr1
            .as_mut()
            .is_some_and(|sfd| matches!(sfd.read_signal(), Ok(Some(_))));
        let due = after.is_some_and(|t| Instant::now() >= t);
        if due {
            after = None;
        }
        if let (true, Some(dir)) = (signalled || due, &snap.snapshot_dir) {
            let t = Instant::now();
            match vm.snapshot(dir) {
                Ok(()) => log::info!("snapshot written to {} in {:?}", dir.display(), t.elapsed()),
                Err(e) => log::error!("snapshot failed: {:#}", anyhow::Error::from(e)),
            }
        }
    }
    let report = vm.wait();
    if let Some(t) = report.first_entry {
        log::info!("first vCPU entry {} us after start", t.as_micros());
    }
    if let Some(t) = report.boot_timer {
        log::info!(
            "guest init reached the boot timer {} ms after start",
            t.as_millis()
        );
    }
    match report.exit {
        ExitReason::Reset | ExitReason::Shutdown => {
            log::info!("VM exited: {:?}", report.exit);
            Ok(ExitCode::SUCCESS)
        }
        other => bail!("VM failed: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options_parse() {
        assert_eq!(
            parse_disk("/a.img,ro").unwrap(),
            DiskConfig {
                path: Some("/a.img".into()),
                read_only: true
            }
        );
        assert!(!parse_disk("/a.img").unwrap().read_only);
        assert!(parse_disk("/a.img,bogus").unwrap_err().contains("bogus"));
        assert!(parse_disk(",ro").is_err());
    }
}
