//! The VMM process: the shim's binary re-executed as `skiff-vmm` by
//! [`super::JailedVm::start`], in fresh mount, PID, IPC, UTS and network
//! namespaces, with the control socket as fd 3 and a log pipe as stderr.
//!
//! It reads `Start`, builds the VM while it may still open files, confines
//! itself ([`super::confine`]), starts the vCPU and device threads (each
//! installs its seccomp filter before it runs anything of the guest's),
//! installs the control thread's filter, answers `Done`, and then serves
//! `SetDisk`, `Snapshot` and `Stop` until the VM ends; it reports `Exited`
//! and exits. A `Start` that restores a snapshot comes with the snapshot's
//! open state and memory files, and builds the VM from them.
//! A closed control socket (the shim is gone) stops the VM.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use super::confine::confine;
use super::wire::{self, BootSpec, Reply, Request, VmSpec};
use crate::vmm::seccomp::{install, ThreadKind};
use crate::vmm::{
    error_chain, BootProtocol, BootSource, DiskConfig, FileDisk, FsConfig, KernelSpec, NetConfig,
    RunningVm, SerialOutput, Vm, VmConfig, VsockConfig,
};

/// The VMM process's `argv[0]`: how `ps` shows it, and how the binaries
/// know to run [`main`].
pub const VMM_ARGV0: &str = "skiff-vmm";
/// The control socket's fd in the VMM process.
pub const CONTROL_FD: i32 = 3;

/// Runs the VMM process if this process was started as one: call first
/// thing in `main` of every binary that starts jailed VMMs.
pub fn main_if_vmm() -> Option<ExitCode> {
    let argv0 = std::env::args_os().next()?;
    if argv0 != VMM_ARGV0 {
        return None;
    }
    let _ = log::set_logger(&PipeLogger).map(|()| log::set_max_level(log::LevelFilter::Info));
    // SAFETY: the shim put the control socket at CONTROL_FD for this
    // process (see `JailedVm::start`); nothing else in it owns that fd.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    Some(match serve(&control) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            log::error!("{message}");
            let _ = wire::send(&control, &Reply::Failed(message), &[]);
            ExitCode::FAILURE
        }
    })
}

/// Log lines for the shim, which re-logs them: `LEVEL message`.
struct PipeLogger;

impl log::Log for PipeLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let line = format!("{} {}", r.level(), r.args()).replace('\n', " ");
            eprintln!("{line}");
        }
    }
    fn flush(&self) {}
}

/// The VM config `spec` describes.
fn vm_config(spec: VmSpec, seccomp: bool, tap: Option<OwnedFd>) -> Result<VmConfig, String> {
    let net = match (spec.net, tap) {
        (None, None) => None,
        (Some(n), Some(tap)) => Some(NetConfig {
            tap: Arc::new(tap),
            mac: n.mac,
            mtu: n.mtu,
        }),
        (Some(_), None) => return Err("Start asks for a NIC but came without its tap".into()),
        (None, Some(_)) => return Err("Start came with a tap but asks for no NIC".into()),
    };
    let boot = match spec.boot {
        BootSpec::Kernel {
            kernel,
            initrd,
            cmdline,
        } => BootSource::Kernel(KernelSpec {
            kernel,
            initrd,
            cmdline,
        }),
        BootSpec::Raw {
            image,
            load_addr,
            mode,
        } => BootSource::Raw {
            image,
            load_addr,
            protocol: match mode.as_str() {
                "real" => BootProtocol::RealMode,
                "pvh" => BootProtocol::Pvh,
                "linux64" => BootProtocol::Linux64,
                other => return Err(format!("unknown boot mode {other:?}")),
            },
        },
    };
    Ok(VmConfig {
        vcpus: spec.vcpus,
        mem_mib: spec.mem_mib,
        boot,
        disks: spec
            .disks
            .into_iter()
            .map(|d| DiskConfig {
                path: d.path,
                read_only: d.read_only,
            })
            .collect(),
        vsock: spec.vsock.map(|(guest_cid, uds_path)| VsockConfig {
            guest_cid,
            uds_path,
        }),
        cpu_template: spec
            .cpu_template
            .parse()
            .map_err(|e| format!("cpu template {:?}: {e}", spec.cpu_template))?,
        serial: spec
            .serial
            .map_or(SerialOutput::Discard, SerialOutput::File),
        epoch: Instant::now(),
        rng: spec.rng,
        net,
        // Relative: the server opens it at each FUSE INIT, inside the jail.
        fs: spec.fs.map(|fs| FsConfig {
            dir: fs.dir,
            tag: fs.tag,
            cache: fs.cache,
        }),
        seccomp,
    })
}

fn serve(control: &OwnedFd) -> Result<(), String> {
    let (request, files) = wire::recv::<Request>(control).map_err(|e| error_chain(&e))?;
    let Request::Start {
        vm,
        jail,
        log_level,
        restore,
    } = request
    else {
        return Err(format!("expected Start, got {request:?}"));
    };
    let mut files = files;
    // The tap rides last, after the snapshot's files.
    let tap = if vm.net.is_some() { files.pop() } else { None };
    let snapshot = match (restore, <[OwnedFd; 2]>::try_from(files)) {
        (false, _) => None,
        (true, Ok([state, memory])) => {
            Some((std::fs::File::from(state), std::fs::File::from(memory)))
        }
        (true, Err(files)) => {
            return Err(format!(
                "Start restores a snapshot but came with {} files, not 2",
                files.len()
            ))
        }
    };
    if let Ok(level) = log_level.parse() {
        log::set_max_level(level);
    }
    // Relative paths (serial log, vsock socket) name the same files before
    // and after the pivot into the root.
    std::env::set_current_dir(&jail.root)
        .map_err(|e| format!("cannot enter {}: {e}", jail.root.display()))?;
    let config = vm_config(*vm, jail.seccomp, tap)?;
    let built = match snapshot {
        None => Vm::build(config),
        Some((state, memory)) => {
            Vm::restore_files(config, state, std::path::Path::new("vm.state"), &memory)
        }
    }
    .map_err(|e| error_chain(&e))?;
    confine(&jail).map_err(|e| error_chain(&e))?;
    let vm = built.start().map_err(|e| error_chain(&e))?;
    if jail.seccomp {
        install(ThreadKind::Control).map_err(|e| error_chain(&e))?;
    }
    wire::send(control, &Reply::Done, &[]).map_err(|e| error_chain(&e))?;
    log::debug!("VM started, confined in {}", jail.root.display());
    run(control, vm)
}

/// Serves the shim until the VM ends.
fn run(control: &OwnedFd, vm: RunningVm) -> Result<(), String> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: control.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: vm.exit_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        if fds[1].revents != 0 || vm.has_exited() {
            let report = vm.wait();
            log::debug!("VM ended: {:?}", report.exit);
            let _ = wire::send(control, &Reply::Exited(report), &[]);
            return Ok(());
        }
        if fds[0].revents == 0 {
            continue;
        }
        match wire::recv::<Request>(control) {
            Ok((Request::Stop, _)) => vm.stop(),
            Ok((Request::Snapshot, files)) => {
                let reply = match snapshot(&vm, files) {
                    Ok(()) => Reply::Done,
                    Err(message) => Reply::Failed(message),
                };
                wire::send(control, &reply, &[]).map_err(|e| error_chain(&e))?;
            }
            Ok((Request::SetDisk { index, path }, mut files)) => {
                let reply = match set_disk(&vm, index, path, files.pop()) {
                    Ok(()) => Reply::Done,
                    Err(message) => Reply::Failed(message),
                };
                wire::send(control, &reply, &[]).map_err(|e| error_chain(&e))?;
            }
            Ok((other, _)) => {
                let reply = Reply::Failed(format!("unexpected request {other:?}"));
                wire::send(control, &reply, &[]).map_err(|e| error_chain(&e))?;
            }
            Err(wire::WireError::Closed) => {
                log::warn!("the shim closed the control channel; stopping the VM");
                vm.stop();
                let _ = vm.wait();
                return Ok(());
            }
            Err(e) => {
                let reply = Reply::Failed(error_chain(&e));
                wire::send(control, &reply, &[]).map_err(|e| error_chain(&e))?;
            }
        }
    }
}

fn snapshot(vm: &RunningVm, files: Vec<OwnedFd>) -> Result<(), String> {
    let [state, memory] = <[OwnedFd; 2]>::try_from(files)
        .map_err(|f| format!("Snapshot came with {} files, not 2", f.len()))?;
    let (mut state, mut memory) = (std::fs::File::from(state), std::fs::File::from(memory));
    let t = Instant::now();
    vm.snapshot_to_files(&mut state, &mut memory)
        .map_err(|e| error_chain(&e))?;
    log::info!("snapshot written in {:?}", t.elapsed());
    Ok(())
}

fn set_disk(
    vm: &RunningVm,
    index: usize,
    path: Option<PathBuf>,
    file: Option<OwnedFd>,
) -> Result<(), String> {
    let medium = match (path, file) {
        (Some(path), Some(fd)) => {
            Some(FileDisk::from_file(std::fs::File::from(fd), path).map_err(|e| error_chain(&e))?)
        }
        (None, None) => None,
        (Some(_), None) => return Err("SetDisk named an image but passed no file".into()),
        (None, Some(_)) => return Err("SetDisk passed a file but named no image".into()),
    };
    vm.set_medium(index, medium).map_err(|e| error_chain(&e))
}
