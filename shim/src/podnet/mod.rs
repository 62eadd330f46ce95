//! The host side of pod networking: the pod's network namespace (made by
//! CNI) joined to the guest's NIC.
//!
//! Everything runs on a helper thread inside the namespace
//! ([`run_in_netns`]); the caller's thread never changes namespace.

mod netns;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use netns::{run_in_netns, NetnsError};
