//! What the vCPU threads, the device threads and the VM's owner share: the
//! stop flag and why the VM ended.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::sync::lock;

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 (Linux `reboot=k`;
    /// also what `panic=-1` ends in).
    Reset,
    /// A vCPU shut down (triple fault), or the guest asked KVM to.
    Shutdown,
    /// The host asked the VM to stop.
    Stopped,
    /// A vCPU failed: KVM could not run it, or it hit an exit we can't serve.
    VcpuError(String),
    /// The jailed VMM process ended without reporting how the VM ended:
    /// killed (by a signal, a seccomp filter, the OOM killer) or crashed.
    VmmDied(String),
}

/// State the vCPU threads, the device threads and the owner share.
pub struct Shared {
    /// Set once the VM is to end; every thread polls it.
    pub stop: AtomicBool,
    /// The first reason given for ending.
    pub exit: Mutex<Option<ExitReason>>,
    /// Written on every exit request, to wake the owner.
    pub exit_evt: EventFd,
    /// When vCPU 0 first entered the guest, since `epoch`.
    pub first_entry: Mutex<Option<Duration>>,
    /// What the boot figures count from.
    pub epoch: Instant,
}

impl Shared {
    /// Nothing stopped yet; `exit_evt` is the owner's wake-up.
    pub fn new(exit_evt: EventFd, epoch: Instant) -> Self {
        Shared {
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_evt,
            first_entry: Mutex::new(None),
            epoch,
        }
    }

    /// Records why the VM ends (the first reason wins) and wakes the owner.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut e = lock(&self.exit);
        if e.is_none() {
            *e = Some(reason);
        }
        drop(e);
        self.stop.store(true, Ordering::SeqCst);
        // An eventfd write only fails if the counter would overflow.
        let _ = self.exit_evt.write(1);
    }
}
