//! skiff's agent protocol: what the shim (or the host `linux` sandbox
//! handler) and the guest agent say to each other.
//!
//! It holds the messages and the ttrpc client/server of `proto/agent.proto`
//! (package `skiff.agent.v1`, generated at build time: [`agent`],
//! [`agent_ttrpc`]), and what both ends must agree on besides the messages:
//! the agent's vsock port ([`AGENT_VSOCK_PORT`]), the serials that name the
//! VM's disks ([`disk_serial`]), the bounds of `RefreshGuest`'s fields
//! ([`REFRESH_ENTROPY_LEN`], [`MACHINE_ID_LEN`]) and of
//! `ConfigureNetwork`'s ([`NET_IFNAME_MAX_LEN`], [`NET_MTU`],
//! [`NET_FILE_MAX_LEN`]), the typed values behind protocol strings
//! ([`ContainerStatus`]) and how errors are worded ([`error_chain`]).
//!
//! Both the agent and the shim depend on it, so it stays small: it must
//! never depend on the container engine (`libcontainer`, the agent crate),
//! the shim, or the VMM crates (`vmm-core`, `platform-*`).

mod status;

pub use status::{ContainerStatus, UnknownStatusError};

/// The protocol version the agent reports in `Version`; bumped on
/// incompatible changes (2: CreateContainer answers the init pid).
pub const PROTOCOL_VERSION: u32 = 2;

/// The vsock port the agent listens on in the micro-VM; the shim connects
/// to it through the VMM's hybrid vsock (`CONNECT 1024`).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// How many bytes of host randomness a `RefreshGuest` request carries
/// (`RefreshGuestRequest.entropy`): at least 32 (256 bits, what the guest's
/// CRNG needs to count as seeded), at most 512.
pub const REFRESH_ENTROPY_LEN: std::ops::RangeInclusive<usize> = 32..=512;

/// The length of a machine id (`/etc/machine-id`, `RefreshGuestRequest.machine_id`):
/// 32 lowercase hex chars, 128 bits, never all zeros (machine-id(5)).
pub const MACHINE_ID_LEN: usize = 32;

/// The longest guest link name (`NetInterface.name`), in bytes: Linux's
/// `IFNAMSIZ` less the terminating NUL.
pub const NET_IFNAME_MAX_LEN: usize = 15;

/// The MTUs the agent accepts for the guest's NIC (`NetInterface.mtu`):
/// IPv4's minimum to the largest the kernel's link MTU field carries. A
/// link with IPv6 addresses needs at least 1280 ([`NET_IPV6_MIN_MTU`]).
pub const NET_MTU: std::ops::RangeInclusive<u32> = 68..=65535;

/// The smallest MTU of a link that carries IPv6 (RFC 8200): below it the
/// kernel turns IPv6 off on the link.
pub const NET_IPV6_MIN_MTU: u32 = 1280;

/// The most bytes of `ConfigureNetworkRequest.hosts` and `.resolv_conf`
/// each (64 KiB).
pub const NET_FILE_MAX_LEN: usize = 64 << 10;

/// Longest virtio-fs tag (the device's config space holds 36 bytes).
pub const SHARED_FS_TAG_MAX_LEN: usize = 36;

/// Where a shared file system may be mounted in the guest: under this.
pub const SHARED_FS_MOUNT_PARENT: &str = "/run/skiff";

/// What the serial of every disk skiff attaches to a VM starts with.
pub const DISK_SERIAL_PREFIX: &str = "skiff-";

/// The serial (virtio-blk GET_ID, `/sys/block/<name>/serial` in the guest)
/// of the disk the guest names `guest_disk_name`: `vdb` → `skiff-vdb`. The
/// agent compares it with the device it was told to use, so a disk the
/// guest named differently from the host is never mounted.
pub fn disk_serial(guest_disk_name: &str) -> String {
    format!("{DISK_SERIAL_PREFIX}{guest_disk_name}")
}

/// Formats an error with its sources, `outer: inner: innermost`, leaving
/// out a source whose text the outer message already contains. Both ends
/// of the protocol word errors this way.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

/// Protocol messages.
#[allow(
    missing_docs,
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    rust_2018_idioms,
    unused_qualifications,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unused
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// The `Agent` service: `AgentClient`, the `Agent` server trait and
/// `create_agent` to register an implementation.
#[allow(
    missing_docs,
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    rust_2018_idioms,
    unused_qualifications,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unused
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Layer(&'static str, #[source] Option<Box<Layer>>);

    #[test]
    fn error_chain_appends_each_new_source_once() {
        let inner = Layer("disk full", None);
        let middle = Layer("cannot write config.json: disk full", Some(Box::new(inner)));
        let outer = Layer("cannot create container", Some(Box::new(middle)));
        assert_eq!(
            error_chain(&outer),
            "cannot create container: cannot write config.json: disk full"
        );
    }

    #[test]
    fn disk_serials_name_the_guest_disk() {
        assert_eq!(disk_serial("vdb"), "skiff-vdb");
        assert!(disk_serial("vda").starts_with(DISK_SERIAL_PREFIX));
    }
}
