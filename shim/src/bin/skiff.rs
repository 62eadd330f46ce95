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
    /// A virtio-blk disk: FILE or FILE,ro. Repeatable.
    #[arg(long = "disk", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// CPU template: default or pvm-compat (default: what `skiff check` picks).
    #[arg(long)]
    cpu_template: Option<String>,
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
    /// Run the VMM threads without their seccomp filters (for debugging
    /// only: a denied system call then shows up as what it is).
    #[arg(long)]
    no_seccomp: bool,
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
                 namespaces, no capabilities, no_new_privs, uid/gid vmm_uid/vmm_gid; {}",
                match vmm::jail::cgroup::host_layout() {
                    Ok(layout) => format!("its cgroup: {layout}, under the pod's or the shim's"),
                    Err(e) => format!("no cgroup of its own can be made here: {e}"),
                }
            );
            Ok(if r.kind == check::HostKind::NoKvm {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Run(a) => run_container(a),
        Command::Vm(VmCommand::Boot(a)) => boot(a, epoch),
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
        disks: a.disks,
        vsock: a.vsock_uds.map(|uds_path| VsockConfig {
            guest_cid: a.vsock_cid,
            uds_path,
        }),
        cpu_template,
        serial: a
            .serial_out
            .map(vmm::SerialOutput::File)
            .unwrap_or(vmm::SerialOutput::Stdout),
        epoch,
        rng: false,
        seccomp: !a.no_seccomp,
    };
    let report = vmm::run(config).context("cannot run the VM")?;
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
