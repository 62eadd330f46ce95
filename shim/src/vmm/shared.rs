//! What the vCPU threads, the device threads and the VM's owner share: the
//! stop flag and why the VM ended, and the pauses a snapshot takes (of the
//! vCPU threads, then of the device threads).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::platform::snapshot::VcpuState;
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
    /// Pausing the vCPUs (for a snapshot).
    pub pause: Pause,
    /// Pausing the device threads (for a snapshot, once the vCPUs are).
    pub device_pause: Pause,
}

/// Pausing the vCPU threads: the owner asks ([`Pause::request`]) and kicks
/// them out of `KVM_RUN`; each, seeing the request, saves its state if
/// asked, parks ([`Pause::park`]) and runs again once the owner resumes
/// ([`Pause::resume`]) or the VM stops.
#[derive(Default)]
pub struct Pause {
    requested: AtomicBool,
    state: Mutex<PauseState>,
    changed: Condvar,
}

#[derive(Default)]
struct PauseState {
    /// Whether parked threads save their state.
    save: bool,
    /// How many vCPU threads are parked.
    parked: usize,
    /// Each vCPU's saved state, or why it could not be saved.
    saved: Vec<Option<Result<VcpuState, String>>>,
}

impl Pause {
    /// Asks every vCPU thread of `vcpus` to park, saving its state first
    /// if `save`.
    pub fn request(&self, vcpus: usize, save: bool) {
        let mut st = lock(&self.state);
        st.save = save;
        st.saved = (0..vcpus).map(|_| None).collect();
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Whether a pause is asked for (each vCPU loop checks).
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Called by vCPU `id` out of `KVM_RUN` when a pause is requested:
    /// saves with `save` if asked, then waits until resumed or `stop`.
    pub fn park(
        &self,
        id: usize,
        stop: &AtomicBool,
        save: impl FnOnce() -> Result<VcpuState, String>,
    ) {
        let mut st = lock(&self.state);
        if st.save {
            let state = save();
            if let Some(slot) = st.saved.get_mut(id) {
                *slot = Some(state);
            }
        }
        st.parked += 1;
        self.changed.notify_all();
        while self.requested() && !stop.load(Ordering::SeqCst) {
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.parked -= 1;
    }

    /// Called by a thread that saves nothing (a device thread) when a
    /// pause is requested: waits until resumed or `stop`.
    pub fn park_idle(&self, stop: &AtomicBool) {
        self.park(usize::MAX, stop, || Err("nothing to save".into()));
    }

    /// Waits up to `timeout` until `vcpus` threads are parked, calling
    /// `kick` between looks (a kick may land before a thread enters
    /// `KVM_RUN`). Whether they all parked.
    pub fn wait_parked(&self, vcpus: usize, timeout: Duration, kick: impl Fn()) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        while st.parked < vcpus {
            if Instant::now() >= deadline {
                return false;
            }
            drop(st);
            kick();
            st = lock(&self.state);
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(2))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// The vCPUs' saved states (taken; `None` for one that saved none).
    pub fn take_saved(&self) -> Vec<Option<Result<VcpuState, String>>> {
        std::mem::take(&mut lock(&self.state).saved)
    }

    /// Lets the parked vCPU threads run again.
    pub fn resume(&self) {
        let _st = lock(&self.state);
        self.requested.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }
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
            pause: Pause::default(),
            device_pause: Pause::default(),
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
