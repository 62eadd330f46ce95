//! The VM runner: a KVM micro-VM in this process.
//!
//! [`Vm::start`] builds the VM from a [`VmConfig`] (memory, kernel, devices,
//! vCPUs) and starts one thread per vCPU (`vcpu0`, ...) plus one thread per
//! virtio device (`vmm-blk0`, ..., `vmm-vsock`) that serves the device's
//! queue notifications (ioeventfds) and host side, so that a disk busy with
//! I/O holds up neither the vsock device (the agent's channel) nor another
//! disk. Exits go straight to `vmm-core` devices through its buses;
//! interrupts go out through irqfds. The VM ends on an i8042 reset, a
//! shutdown (triple fault), a vCPU error, or [`RunningVm::stop`];
//! [`RunningVm::wait`] joins every thread and closes every fd before it
//! returns the [`VmReport`].

mod blk;
mod config;
mod devices;
mod file_disk;
pub mod fs;
mod fs_slot;
mod irq;
pub mod jail;
mod net;
mod platform;
mod rng;
pub mod seccomp;
mod serial_log;
mod shared;
mod slot;
pub mod snapshot;
pub mod tap;
mod vcpu;
mod vsock;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use crate::sync::lock;
use devices::{DeviceSetupError, Devices};
use shared::Shared;
use slot::DiskSlotError;

pub use blk::disk_name;
pub use config::{
    BootSource, DiskConfig, FsConfig, NetConfig, SerialOutput, VmConfig, VsockConfig,
};
pub use file_disk::{FileDisk, FileDiskError};
pub use platform::boot::{BootInfo, BootProtocol, KernelSpec};
pub use platform::cpuid::CpuTemplate;
pub use serial_log::SERIAL_LOG_CAP_BYTES;
pub use shared::ExitReason;
#[cfg(feature = "test-utils")]
pub use vcpu::{TEST_FORBIDDEN_SYSCALL_PORT, TEST_PANIC_PORT};
pub use vsock::connect as vsock_connect;

/// How a VM ran.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmReport {
    /// Why it ended.
    pub exit: ExitReason,
    /// When the guest wrote the boot-timer marker, since the epoch.
    pub boot_timer: Option<Duration>,
    /// When vCPU 0 first entered the guest, since the epoch.
    pub first_entry: Option<Duration>,
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available on this host?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] platform::memory::MemoryLayoutError),
    /// The kernel could not be loaded.
    #[error(transparent)]
    Boot(#[from] platform::boot::BootError),
    /// The VM could not be created.
    #[error(transparent)]
    Vm(#[from] platform::vm::VmError),
    /// A vCPU could not be configured.
    #[error(transparent)]
    Vcpu(#[from] platform::vcpu::VcpuError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] platform::mptable::MptableError),
    /// A KVM ioctl failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What we tried.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A device could not be set up.
    #[error(transparent)]
    Device(#[from] DeviceSetupError),
    /// A disk could not be put into, or taken out of, slot `index`.
    #[error("cannot change disk slot {index}")]
    DiskSlot {
        /// The slot (virtio device index).
        index: usize,
        /// What is wrong.
        #[source]
        source: DiskSlotError,
    },
    /// A VMM thread could not install its seccomp filter; the VM did not
    /// start.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// The jailed VMM process failed.
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    /// Taking or restoring a snapshot failed.
    #[error("snapshot")]
    Snapshot(#[from] snapshot::SnapshotError),
    /// An OS resource (eventfd, thread) could not be created.
    #[error("cannot create {what}")]
    Os {
        /// What we tried.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A VM that is running.
pub struct RunningVm {
    shared: Arc<Shared>,
    vcpus: Vec<JoinHandle<()>>,
    device_threads: Vec<JoinHandle<()>>,
    devices: Arc<Devices>,
    // Kept alive (with the guest memory it maps) until every thread is
    // joined.
    _vm: Arc<platform::KvmVm>,
}

/// The log level of a guest-triggerable fault seen `count` times before:
/// the first is a warning, later ones debug (a guest must not flood the
/// log).
pub(crate) fn first_warn(count: u64) -> log::Level {
    if count == 0 {
        log::Level::Warn
    } else {
        log::Level::Debug
    }
}

/// `err` and its sources, `: `-separated, for a report that crosses a
/// thread or process boundary as text.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Os { what, source }
}

/// Builds and starts VMs.
pub struct Vm;

impl Vm {
    /// Builds the VM: everything but starting its threads.
    pub fn build(config: VmConfig) -> Result<BuiltVm, VmmError> {
        if config.vcpus == 0 || config.vcpus > platform::mptable::MAX_CPUS {
            return Err(VmmError::Config(format!(
                "{} vCPUs requested; 1 to {} are supported",
                config.vcpus,
                platform::mptable::MAX_CPUS
            )));
        }
        let mem_size = mem_bytes(&config)?;
        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        log::debug!("start: /dev/kvm open at {:?}", config.epoch.elapsed());
        let mem = platform::create_guest_memory(mem_size)?;
        log::debug!("start: guest memory mapped at {:?}", config.epoch.elapsed());
        let boot = match &config.boot {
            BootSource::Kernel(spec) => {
                // Tell the guest where its virtio-mmio devices are.
                let mut spec = spec.clone();
                for i in 0..config.virtio_device_count() {
                    spec.cmdline.push_str(&format!(
                        " virtio_mmio.device=4K@{:#x}:{}",
                        platform::layout::virtio_mmio_window(i as u32),
                        platform::layout::VIRTIO_IRQ_BASE + i as u32
                    ));
                }
                platform::load_kernel(&mem, &spec)?
            }
            BootSource::Raw {
                image,
                load_addr,
                protocol,
            } => {
                use vm_memory::Bytes;
                mem.write_slice(image, vm_memory::GuestAddress(*load_addr))
                    .map_err(|_| {
                        VmmError::Config(format!(
                            "raw image of {} bytes does not fit at {load_addr:#x}",
                            image.len()
                        ))
                    })?;
                BootInfo {
                    entry: *load_addr,
                    protocol: *protocol,
                    kernel_end: load_addr + image.len() as u64,
                    initrd: None,
                }
            }
        };
        log::debug!("start: kernel loaded at {:?}", config.epoch.elapsed());
        // Always: it is how a guest without ACPI finds the IOAPIC and CPUs.
        platform::mptable::setup_mptable(&mem, config.vcpus)?;
        let vm = Arc::new(platform::create_vm(&kvm, mem.clone())?);
        log::debug!("start: VM created at {:?}", config.epoch.elapsed());
        let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(os("an exit eventfd"))?;
        let shared = Arc::new(Shared::new(exit_evt, config.epoch));
        let ram = platform::GuestRam::new(mem.clone());
        let devices = Arc::new(Devices::new(vm.fd(), ram, &config, shared.clone())?);
        log::debug!("start: devices ready at {:?}", config.epoch.elapsed());

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmmError::Kvm {
                what: "report its supported CPUID",
                source,
            })?;
        let mut fds = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let fd = create_vcpu(&vm, u64::from(id))?;
            platform::configure_vcpu(
                &fd,
                &mem,
                &supported,
                config.cpu_template,
                &boot,
                id,
                config.vcpus,
            )?;
            fds.push(fd);
        }

        Ok(BuiltVm {
            vm,
            shared,
            devices,
            vcpu_fds: fds,
            seccomp: config.seccomp,
            msrs: snapshot_msrs(&kvm),
            tsc_lag: None,
        })
    }

    /// Builds a VM from snapshot `dir` ([`RunningVm::snapshot`]) with
    /// `config`'s devices (which must be the snapshot's: its memory size,
    /// vCPUs and devices): guest memory is the snapshot's memory file
    /// mapped copy on write, KVM and device state are restored, and
    /// nothing of the guest runs until [`BuiltVm::start`].
    pub fn restore(config: VmConfig, dir: &std::path::Path) -> Result<BuiltVm, VmmError> {
        let (state, memory, path) = snapshot::open(dir)?;
        Self::restore_files(config, state, &path, &memory)
    }

    /// Like [`Vm::restore`], from the snapshot's open state file (`path`,
    /// for errors) and memory file: what a jailed VMM is passed.
    pub fn restore_files(
        config: VmConfig,
        state: std::fs::File,
        path: &std::path::Path,
        memory: &std::fs::File,
    ) -> Result<BuiltVm, VmmError> {
        let saved = snapshot::read_file(state, path)?;
        let mem_size = mem_bytes(&config)?;
        let mismatch = |what, saved: u64, config: u64| snapshot::SnapshotError::Mismatch {
            what,
            saved,
            config,
        };
        if saved.mem_size != mem_size {
            return Err(mismatch("memory bytes", saved.mem_size, mem_size).into());
        }
        if saved.vcpus.len() != usize::from(config.vcpus) {
            return Err(
                mismatch("vCPUs", saved.vcpus.len() as u64, u64::from(config.vcpus)).into(),
            );
        }
        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        let mem = platform::memory::guest_memory_from_file(mem_size, memory)
            .map_err(snapshot::SnapshotError::from)?;
        let vm = Arc::new(platform::create_vm(&kvm, mem.clone())?);
        let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(os("an exit eventfd"))?;
        let shared = Arc::new(Shared::new(exit_evt, config.epoch));
        let ram = platform::GuestRam::new(mem);
        let devices = Arc::new(Devices::new(vm.fd(), ram, &config, shared.clone())?);
        devices
            .restore_state(&saved.devices)
            .map_err(snapshot::SnapshotError::from)?;
        let mut fds = Vec::with_capacity(saved.vcpus.len());
        for (id, state) in saved.vcpus.iter().enumerate() {
            let fd = create_vcpu(&vm, id as u64)?;
            platform::snapshot::restore_vcpu(&fd, state).map_err(snapshot::SnapshotError::from)?;
            fds.push(fd);
        }
        // The clock last, once every vCPU's TSC is restored, and moved on
        // by as much as the TSC could not be put back (PVM: the guest reads
        // the host's TSC). Otherwise the guest's clock jumps by the time
        // since the snapshot, and back, and its timers stall for as long.
        let lag = fds
            .first()
            .zip(saved.vcpus.first())
            .and_then(|(fd, state)| platform::snapshot::tsc_lag_ns(fd, state));
        platform::snapshot::restore_vm(vm.fd(), &saved.vm, lag)
            .map_err(snapshot::SnapshotError::from)?;
        if let Some(ns) = lag {
            log::info!(
                "restore: the guest TSC ran on {:?} since the snapshot (not restorable \
                 here); its clock is moved on by as much",
                Duration::from_nanos(ns)
            );
            for fd in &fds {
                // Tells the guest it was stopped, so its watchdogs (soft
                // lockup, RCU stalls) do not take the gap for a hang.
                if let Err(e) = fd.kvmclock_ctrl() {
                    log::debug!("restore: KVM_KVMCLOCK_CTRL: {e}");
                }
            }
        }
        Ok(BuiltVm {
            vm,
            shared,
            devices,
            vcpu_fds: fds,
            seccomp: config.seccomp,
            msrs: snapshot_msrs(&kvm),
            tsc_lag: lag.map(Duration::from_nanos),
        })
    }

    /// Builds the VM and starts its threads.
    pub fn start(config: VmConfig) -> Result<RunningVm, VmmError> {
        Self::build(config)?.start()
    }
}

/// `config`'s guest memory in bytes.
fn mem_bytes(config: &VmConfig) -> Result<u64, VmmError> {
    config
        .mem_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| VmmError::Config(format!("{} MiB is too much memory", config.mem_mib)))
}

fn create_vcpu(vm: &platform::KvmVm, id: u64) -> Result<kvm_ioctls::VcpuFd, VmmError> {
    vm.fd().create_vcpu(id).map_err(|source| VmmError::Kvm {
        what: "create a vCPU",
        source,
    })
}

/// The MSRs this host's KVM saves (none if it cannot say: a snapshot of
/// such a VM then fails to restore its MSRs, and says so).
fn snapshot_msrs(kvm: &Kvm) -> Arc<[u32]> {
    match platform::snapshot::msr_index_list(kvm) {
        Ok(list) => list.into(),
        Err(e) => {
            log::warn!("snapshots will hold no MSRs: {e}");
            Arc::from([])
        }
    }
}

/// A VM that is built — memory mapped, kernel loaded, devices and vCPUs
/// created, every file it needs open — but not yet running: nothing of the
/// guest has run. The jailed VMM confines itself between
/// [`Vm::build`] and [`BuiltVm::start`].
pub struct BuiltVm {
    vm: Arc<platform::KvmVm>,
    shared: Arc<Shared>,
    devices: Arc<Devices>,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    seccomp: bool,
    /// The MSRs a snapshot saves.
    msrs: Arc<[u32]>,
    /// Restored from a snapshot: how far the guest TSC had run on, where
    /// it could not be put back.
    tsc_lag: Option<Duration>,
}

impl BuiltVm {
    /// For a VM restored from a snapshot on a host that cannot put the
    /// guest TSC back (PVM: the guest reads the host's TSC), how far it had
    /// run on; the guest's kvmclock is moved on by as much.
    pub fn tsc_lag(&self) -> Option<Duration> {
        self.tsc_lag
    }

    /// Starts one thread per virtio device and one per vCPU; each
    /// installs its seccomp filter ([`seccomp`]) before it serves anything,
    /// and the guest runs only once every one has.
    pub fn start(self) -> Result<RunningVm, VmmError> {
        let BuiltVm {
            vm,
            shared,
            devices,
            vcpu_fds: fds,
            seccomp,
            msrs,
            tsc_lag: _,
        } = self;
        if !seccomp {
            log::warn!(
                "seccomp filters are OFF for this VM's threads (seccomp = false): \
                 for debugging only"
            );
        }
        vcpu::install_kick_handler();
        let mut running = RunningVm {
            shared: shared.clone(),
            vcpus: Vec::new(),
            device_threads: Vec::new(),
            devices: devices.clone(),
            _vm: vm,
        };
        let mut installed = Vec::new();
        let started = devices
            .spawn_device_threads(
                &shared,
                seccomp,
                &mut running.device_threads,
                &mut installed,
            )
            .map_err(os("a device thread"))
            .and_then(|()| {
                installed
                    .into_iter()
                    .try_for_each(|i| i.wait().map_err(VmmError::from))
            })
            .and_then(|()| {
                for (id, fd) in fds.into_iter().enumerate() {
                    let (filter, installed) = seccomp::handoff(seccomp::ThreadKind::Vcpu, seccomp);
                    let t = vcpu::spawn(
                        id as u8,
                        fd,
                        devices.clone(),
                        shared.clone(),
                        msrs.clone(),
                        filter,
                    )
                    .map_err(os("a vCPU thread"))?;
                    running.vcpus.push(t);
                    installed.wait()?;
                }
                Ok(())
            });
        if let Err(e) = started {
            running.shared.request_exit(ExitReason::Stopped);
            running.join();
            return Err(e);
        }
        Ok(running)
    }
}

impl RunningVm {
    /// Asks the VM to stop; [`RunningVm::wait`] then returns
    /// [`ExitReason::Stopped`] unless it had already ended for another reason.
    pub fn stop(&self) {
        self.shared.request_exit(ExitReason::Stopped);
    }

    /// Puts the disk `disk` into the empty virtio-blk slot `index` (its
    /// position in [`VmConfig::disks`]), or with `None` takes the slot's
    /// medium out, and tells the guest with a configuration change
    /// interrupt: its driver re-reads the capacity (Linux logs
    /// `[vdX] new size`). Only take out a disk the guest no longer uses.
    pub fn set_disk(&self, index: usize, disk: Option<&DiskConfig>) -> Result<(), VmmError> {
        let medium = disk
            .map(FileDisk::open)
            .transpose()
            .map_err(DeviceSetupError::from)?;
        self.set_medium(index, medium)
    }

    /// Like [`RunningVm::set_disk`], with the medium already open.
    pub fn set_medium(&self, index: usize, medium: Option<FileDisk>) -> Result<(), VmmError> {
        let slot_error = |source| VmmError::DiskSlot { index, source };
        if medium
            .as_ref()
            .is_some_and(|m| vmm_core::devices::blk::BlockBackend::capacity(m) == 0)
        {
            return Err(slot_error(DiskSlotError::EmptyImage));
        }
        self.devices.swap_disk(index, medium).map_err(slot_error)
    }

    /// Writes a snapshot of the VM into `dir` ([`snapshot`]): pauses the
    /// vCPUs (each saves its state out of `KVM_RUN`), then the device
    /// threads (each first serves what the guest notified), saves the
    /// irqchip, PIT, clock, devices and guest memory, and lets the VM run
    /// on.
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<(), VmmError> {
        self.snapshot_with(|saved, mem| snapshot::write(dir, saved, mem))
    }

    /// Like [`RunningVm::snapshot`], into the open, empty files `state`
    /// and `memory` (what a jailed VMM is passed).
    pub fn snapshot_to_files(
        &self,
        state: &mut std::fs::File,
        memory: &mut std::fs::File,
    ) -> Result<(), VmmError> {
        self.snapshot_with(|saved, mem| snapshot::write_files(state, memory, saved, mem))
    }

    fn snapshot_with(
        &self,
        write: impl FnOnce(
            &snapshot::VmSnapshot,
            &vm_memory::GuestMemoryMmap,
        ) -> Result<(), snapshot::SnapshotError>,
    ) -> Result<(), VmmError> {
        const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let n = self.vcpus.len();
        let pause = &self.shared.pause;
        pause.request(n, true);
        let mut devices_paused = false;
        let taken = (|| {
            if !pause.wait_parked(n, PAUSE_TIMEOUT, || vcpu::kick(&self.vcpus)) {
                return Err(snapshot::SnapshotError::PauseTimeout {
                    what: "vCPUs",
                    timeout: PAUSE_TIMEOUT,
                });
            }
            devices_paused = true;
            if !self.devices.pause(PAUSE_TIMEOUT) {
                return Err(snapshot::SnapshotError::PauseTimeout {
                    what: "device threads",
                    timeout: PAUSE_TIMEOUT,
                });
            }
            let mut vcpus = Vec::with_capacity(n);
            for (id, saved) in pause.take_saved().into_iter().enumerate() {
                match saved {
                    Some(Ok(state)) => vcpus.push(state),
                    Some(Err(reason)) => {
                        return Err(snapshot::SnapshotError::VcpuSave { id, reason })
                    }
                    None => {
                        return Err(snapshot::SnapshotError::VcpuSave {
                            id,
                            reason: "it saved nothing".into(),
                        })
                    }
                }
            }
            let vm = platform::snapshot::save_vm(self._vm.fd())?;
            let saved = snapshot::VmSnapshot {
                mem_size: self._vm.memory().iter().map(|r| r.len()).sum(),
                vm,
                vcpus,
                devices: self.devices.save_state()?,
            };
            write(&saved, self._vm.memory())
        })();
        if devices_paused {
            self.devices.resume();
        }
        pause.resume();
        Ok(taken?)
    }

    /// Readable once the VM is to end (an eventfd; do not read it): for
    /// an owner that polls it next to other fds, then calls
    /// [`RunningVm::wait`].
    pub fn exit_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.shared.exit_evt)
    }

    /// Whether the VM has ended (without waiting).
    pub fn has_exited(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    /// Why the VM ended, once it has (without waiting or joining).
    pub fn exit_reason(&self) -> Option<ExitReason> {
        if !self.has_exited() {
            return None;
        }
        Some(
            lock(&self.shared.exit)
                .clone()
                .unwrap_or(ExitReason::Stopped),
        )
    }

    /// Waits until the VM ends, joins all its threads and reports.
    pub fn wait(mut self) -> VmReport {
        // Block on the exit eventfd until some thread requests an exit.
        while !self.shared.stop.load(Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.shared.exit_evt),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is a valid pollfd for the duration of the call,
            // and the count (1) matches.
            unsafe { libc::poll(&mut pfd, 1, 100) };
        }
        self.join();
        let exit = lock(&self.shared.exit)
            .clone()
            .unwrap_or(ExitReason::Stopped);
        VmReport {
            exit,
            boot_timer: self.devices.boot_timer(),
            first_entry: *lock(&self.shared.first_entry),
        }
    }

    fn join(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        vcpu::kick_and_join(std::mem::take(&mut self.vcpus));
        self.devices.wake_device_threads();
        for t in std::mem::take(&mut self.device_threads) {
            let _ = t.join();
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.shared.request_exit(ExitReason::Stopped);
        self.join();
    }
}

/// Builds the VM, runs it to the end, and reports.
pub fn run(config: VmConfig) -> Result<VmReport, VmmError> {
    Ok(Vm::start(config)?.wait())
}

/// A running VM, in this process or in a jailed VMM process: what the
/// sandbox layer drives.
pub enum VmHandle {
    /// VMM threads in this process.
    Inline(RunningVm),
    /// A jailed VMM process.
    Jailed(jail::JailedVm),
}

impl VmHandle {
    /// Starts `config` inline (`jail` `None`) or in a jailed VMM process.
    pub fn start(config: VmConfig, jail: Option<&jail::JailConfig>) -> Result<Self, VmmError> {
        Ok(match jail {
            None => VmHandle::Inline(Vm::start(config)?),
            Some(jail) => VmHandle::Jailed(jail::JailedVm::start(&config, jail)?),
        })
    }

    /// Restores snapshot `dir` ([`VmHandle::snapshot`]) with `config`'s
    /// devices, inline (`jail` `None`) or in a jailed VMM process (which is
    /// passed the open files), and runs it.
    pub fn restore(
        config: VmConfig,
        jail: Option<&jail::JailConfig>,
        dir: &std::path::Path,
    ) -> Result<Self, VmmError> {
        Ok(match jail {
            None => VmHandle::Inline(Vm::restore(config, dir)?.start()?),
            Some(jail) => VmHandle::Jailed(jail::JailedVm::restore(&config, jail, dir)?),
        })
    }

    /// Writes a snapshot of the running VM into `dir` (see
    /// [`RunningVm::snapshot`]); a jailed VMM writes into files the shim
    /// opened for it.
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<(), VmmError> {
        match self {
            VmHandle::Inline(vm) => vm.snapshot(dir),
            VmHandle::Jailed(vm) => snapshot::write_with(dir, |state, memory| {
                vm.snapshot(state, memory).map_err(VmmError::from)
            }),
        }
    }

    /// Asks the VM to stop.
    pub fn stop(&self) {
        match self {
            VmHandle::Inline(vm) => vm.stop(),
            VmHandle::Jailed(vm) => vm.stop(),
        }
    }

    /// Why the VM ended, once it has (without waiting).
    pub fn exit_reason(&self) -> Option<ExitReason> {
        match self {
            VmHandle::Inline(vm) => vm.exit_reason(),
            VmHandle::Jailed(vm) => vm.exit_reason(),
        }
    }

    /// Whether the VM has ended (without waiting).
    pub fn has_exited(&self) -> bool {
        self.exit_reason().is_some()
    }

    /// See [`RunningVm::set_disk`].
    pub fn set_disk(&self, index: usize, disk: Option<&DiskConfig>) -> Result<(), VmmError> {
        match self {
            VmHandle::Inline(vm) => vm.set_disk(index, disk),
            VmHandle::Jailed(vm) => Ok(vm.set_disk(index, disk)?),
        }
    }

    /// The jailed VMM's pid; `None` inline.
    pub fn vmm_pid(&self) -> Option<i32> {
        match self {
            VmHandle::Inline(_) => None,
            VmHandle::Jailed(vm) => Some(vm.pid()),
        }
    }

    /// Waits until the VM ends and reports.
    pub fn wait(self) -> VmReport {
        match self {
            VmHandle::Inline(vm) => vm.wait(),
            VmHandle::Jailed(vm) => vm.wait(),
        }
    }
}
