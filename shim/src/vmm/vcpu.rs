//! vCPU threads: run, dispatch exits, stop when told.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::devices::Devices;
use super::platform;
use super::seccomp::Installer;
use super::shared::{ExitReason, Shared};
use crate::sync::lock;

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: being interrupted makes KVM_RUN return EINTR.
}

/// Installs the no-op handler for the kick signal (once per process).
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            log::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// Starts vCPU `id`'s thread; it installs its seccomp filter with
/// `filter` before its first `KVM_RUN`.
///
/// `msrs` are the MSRs a snapshot saves ([`platform::snapshot`]).
pub fn spawn(
    id: u8,
    fd: VcpuFd,
    devices: Arc<Devices>,
    shared: Arc<Shared>,
    msrs: Arc<[u32]>,
    filter: Installer,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            if !filter.install() {
                return;
            }
            // A bug that panics a vCPU thread ends the VM with a reason
            // instead of leaving a guest with a vCPU that never runs again.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(id, fd, &devices, &shared, &msrs)
            }));
            if ran.is_err() {
                shared.request_exit(ExitReason::VcpuError(format!(
                    "vCPU {id}: the thread panicked"
                )));
            }
        })
}

/// A port that makes the vCPU thread panic, in test builds only: how the
/// tests prove a panicking vCPU thread ends the VM (QEMU's `isa-debug-exit`
/// port, which no Linux guest touches).
#[cfg(feature = "test-utils")]
pub const TEST_PANIC_PORT: u16 = 0xf4;

/// A port that makes the vCPU thread make a system call its seccomp filter
/// forbids (`getppid`), in test builds only: how the tests prove a denied
/// call kills the jailed VMM and is reported as such.
#[cfg(feature = "test-utils")]
pub const TEST_FORBIDDEN_SYSCALL_PORT: u16 = 0xf5;

fn run(id: u8, mut fd: VcpuFd, devices: &Devices, shared: &Shared, msrs: &[u32]) {
    let mut first = id == 0;
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.pause.requested() {
            shared.pause.park(usize::from(id), &shared.stop, || {
                platform::snapshot::save_vcpu(&fd, msrs).map_err(|e| super::error_chain(&e))
            });
            continue;
        }
        if first {
            first = false;
            let at = shared.epoch.elapsed();
            *lock(&shared.first_entry) = Some(at);
        }
        match fd.run() {
            Ok(exit) => {
                if let Some(reason) = handle_exit(id, exit, devices) {
                    shared.request_exit(reason);
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => shared.request_exit(ExitReason::VcpuError(format!(
                "vCPU {id}: KVM_RUN failed: {e}"
            ))),
        }
    }
}

/// Serves one exit; returns why the VM must end, if it must.
fn handle_exit(id: u8, exit: VcpuExit<'_>, devices: &Devices) -> Option<ExitReason> {
    match exit {
        VcpuExit::IoIn(port, data) => devices.pio_read(port, data),
        #[cfg(feature = "test-utils")]
        VcpuExit::IoOut(TEST_PANIC_PORT, _) => {
            panic!("vCPU {id}: the guest wrote the test panic port")
        }
        #[cfg(feature = "test-utils")]
        VcpuExit::IoOut(TEST_FORBIDDEN_SYSCALL_PORT, _) => {
            // Not on any filter's list: with the filter on, the process
            // dies here with SIGSYS.
            let parent = nix::unistd::getppid();
            return Some(ExitReason::VcpuError(format!(
                "vCPU {id}: the forbidden test call returned (parent {parent}): no filter?"
            )));
        }
        VcpuExit::IoOut(port, data) => devices.pio_write(port, data),
        VcpuExit::MmioRead(addr, data) => devices.mmio_read(addr, data),
        VcpuExit::MmioWrite(addr, data) => devices.mmio_write(addr, data),
        VcpuExit::Shutdown | VcpuExit::Hlt => return Some(ExitReason::Shutdown),
        VcpuExit::SystemEvent(kind, _) => {
            return Some(if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                ExitReason::Reset
            } else {
                ExitReason::Shutdown
            })
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(ExitReason::VcpuError(format!(
                "vCPU {id}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            )))
        }
        VcpuExit::InternalError => {
            return Some(ExitReason::VcpuError(format!(
                "vCPU {id}: KVM internal error (an instruction the hypervisor cannot emulate?)"
            )))
        }
        other => {
            return Some(ExitReason::VcpuError(format!(
                "vCPU {id}: unexpected exit {other:?}"
            )))
        }
    }
    None
}

/// Kicks each of `threads` (still running) out of `KVM_RUN` once.
pub fn kick(threads: &[JoinHandle<()>]) {
    for t in threads {
        if !t.is_finished() {
            // SAFETY: the handle is not joined (we only borrow it), so its
            // pthread_t is valid; the signal has a no-op handler installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }
}

/// Kicks each thread out of `KVM_RUN` until it notices the stop flag, then
/// joins it.
pub fn kick_and_join(threads: Vec<JoinHandle<()>>) {
    for t in threads {
        while !t.is_finished() {
            // SAFETY: the handle is not joined yet, so its pthread_t is valid;
            // the signal has a no-op handler installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = t.join();
    }
}
