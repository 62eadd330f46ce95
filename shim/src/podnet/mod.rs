//! The host side of pod networking: the pod's network namespace (made by
//! CNI) joined to the guest's NIC by a [`Tap`].
//!
//! Everything runs on a helper thread inside the namespace
//! ([`run_in_netns`]); the caller's thread never changes namespace.

mod netns;
mod tap;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use netns::{run_in_netns, NetnsError};
pub use tap::{
    Tap, TapError, MAX_NAME_LEN, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO,
    VNET_HDR_LEN,
};
