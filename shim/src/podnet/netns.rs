//! Running code inside a network namespace given by path.
//!
//! The namespace is entered by a short-lived thread of its own
//! ([`run_in_netns`]): `setns(CLONE_NEWNET)` changes only the calling
//! thread's namespace, so the thread that asks is never moved, and the
//! helper thread ends with the closure, taking the namespace with it.
//! Sockets, netlink sockets and taps opened by the closure stay bound to
//! that namespace after the thread is gone.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};

/// Why code could not be run in a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// Nothing at the namespace's path (the pod is gone, or never was).
    #[error("no network namespace at {}", path.display())]
    NotFound {
        /// The path asked for.
        path: PathBuf,
    },
    /// The path exists but could not be opened.
    #[error("cannot open the network namespace {}", path.display())]
    Open {
        /// The path asked for.
        path: PathBuf,
        /// What `open` said.
        #[source]
        source: io::Error,
    },
    /// The path is not a network namespace (a plain file: an unmounted
    /// `/var/run/netns/<name>`, or another kind of namespace).
    #[error("{} is not a network namespace", path.display())]
    NotANetns {
        /// The path asked for.
        path: PathBuf,
    },
    /// `setns` failed for another reason (missing `CAP_SYS_ADMIN`).
    #[error("cannot enter the network namespace {}", path.display())]
    Enter {
        /// The path asked for.
        path: PathBuf,
        /// What `setns` said.
        #[source]
        source: io::Error,
    },
    /// The helper thread could not be started.
    #[error("cannot start a thread to enter a network namespace")]
    Thread(#[source] io::Error),
}

/// Runs `f` on a new thread inside the network namespace at `netns`
/// (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`) and returns what it
/// returned. The calling thread's namespace never changes. A panic in `f`
/// is resumed on the calling thread.
pub fn run_in_netns<F, T>(netns: &Path, f: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let file = File::open(netns).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => NetnsError::NotFound {
            path: netns.to_owned(),
        },
        _ => NetnsError::Open {
            path: netns.to_owned(),
            source,
        },
    })?;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("podnet-netns".into())
            .spawn_scoped(scope, move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| match errno {
                    Errno::EINVAL => NetnsError::NotANetns {
                        path: netns.to_owned(),
                    },
                    errno => NetnsError::Enter {
                        path: netns.to_owned(),
                        source: errno.into(),
                    },
                })?;
                drop(file);
                Ok(f())
            })
            .map_err(NetnsError::Thread)?;
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::podnet::testing::{skip_reason, TestNetns};

    fn current_netns() -> u64 {
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    #[test]
    fn a_missing_path_is_not_found() {
        let err = run_in_netns(Path::new("/nonexistent/netns/x"), || ()).unwrap_err();
        assert!(
            matches!(&err, NetnsError::NotFound { path } if path == Path::new("/nonexistent/netns/x")),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "no network namespace at /nonexistent/netns/x"
        );
    }

    #[test]
    fn a_plain_file_is_not_a_netns() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netns");
        std::fs::write(&path, b"").unwrap();
        let err = run_in_netns(&path, || ()).unwrap_err();
        assert!(matches!(err, NetnsError::NotANetns { .. }), "{err:?}");
    }

    #[test]
    fn the_closure_runs_inside_and_the_caller_stays_outside() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        let ns = TestNetns::new().unwrap();
        let before = current_netns();
        let expected = std::fs::metadata(ns.path()).unwrap().ino();
        let inside = run_in_netns(ns.path(), current_netns).unwrap();
        assert_eq!(inside, expected);
        assert_ne!(inside, before);
        assert_eq!(current_netns(), before);
    }

    #[test]
    fn a_panic_reaches_the_caller() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        let ns = TestNetns::new().unwrap();
        let caught = std::panic::catch_unwind(|| run_in_netns(ns.path(), || panic!("inside")));
        assert!(caught.is_err());
    }
}
