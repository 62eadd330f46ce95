//! Lock helpers shared by the whole crate.

use std::sync::{Condvar, Mutex, MutexGuard};

/// Locks `m`, taking the guard even if another thread panicked while
/// holding it: every state the shim keeps behind a mutex stays valid across
/// a panic (plain maps and counters, updated in one step), and refusing to
/// serve after one would turn a bug in one request into a dead shim.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits on `cv` with the guard of [`lock`], with the same tolerance of a
/// poisoned mutex.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard)
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
