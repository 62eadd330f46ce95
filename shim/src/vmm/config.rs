//! What a VM is built from: [`VmConfig`] and the parts it names.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::platform::boot::{BootProtocol, KernelSpec};
use super::platform::cpuid::CpuTemplate;

/// How the guest starts.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// A Linux kernel (ELF `vmlinux`, PVH preferred, or bzImage).
    Kernel(KernelSpec),
    /// Raw code loaded at `load_addr` and entered with `protocol` at
    /// `load_addr`; for tiny test guests.
    Raw {
        /// The code.
        image: Vec<u8>,
        /// Where it goes, and where the vCPU starts.
        load_addr: u64,
        /// CPU mode at entry.
        protocol: BootProtocol,
    },
}

/// A virtio-blk disk slot for the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Backing file; `None` is an empty slot (capacity 0) that
    /// [`RunningVm::set_disk`](super::RunningVm::set_disk) can fill while
    /// the VM runs.
    pub path: Option<PathBuf>,
    /// Whether the guest may only read it (fixed for the slot's life).
    pub read_only: bool,
}

impl DiskConfig {
    /// A writable disk backed by `path`.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: Some(path.into()),
            read_only: false,
        }
    }

    /// An empty, writable slot.
    pub fn empty() -> Self {
        DiskConfig {
            path: None,
            read_only: false,
        }
    }
}

/// The guest's virtio-vsock device, served by the hybrid vsock muxer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 to 0xfffffffe).
    pub guest_cid: u64,
    /// The unix socket host processes connect to (`CONNECT <port>\n`);
    /// guest connections to host port P go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// The guest's virtio-net NIC, over a tap device the caller opened.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The tap: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte vnet
    /// header (`virtio_net_hdr_v1`), non-blocking.
    pub tap: Arc<OwnedFd>,
    /// The NIC's MAC, in the device's configuration space.
    pub mac: [u8; 6],
    /// The link's MTU, offered as `VIRTIO_NET_F_MTU`.
    pub mtu: u16,
}

/// A virtio-fs device sharing a host directory with the guest.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// The directory (for a jailed VMM, relative to the jail's root: it
    /// is opened again, inside the jail, at each FUSE INIT).
    pub dir: PathBuf,
    /// The tag the guest mounts it by (1 to 36 bytes).
    pub tag: String,
    /// How long the guest may cache names and attributes.
    pub cache: super::fs::CacheMode,
}

/// Where the serial console goes.
#[derive(Clone, Debug, Default)]
pub enum SerialOutput {
    /// This process's stdout.
    #[default]
    Stdout,
    /// A file (created or truncated, mode 0600), rotated to `<path>.1` when
    /// it would pass [`SERIAL_LOG_CAP_BYTES`](super::SERIAL_LOG_CAP_BYTES)
    /// bytes.
    File(PathBuf),
    /// A shared buffer (tests read the console from it).
    Buffer(Arc<Mutex<Vec<u8>>>),
    /// Nowhere.
    Discard,
}

/// Everything a VM is built from.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// What to boot.
    pub boot: BootSource,
    /// virtio-blk disks, in order (`vda`, `vdb`, ...).
    pub disks: Vec<DiskConfig>,
    /// The vsock device, if any (after the disks).
    pub vsock: Option<VsockConfig>,
    /// CPU template.
    pub cpu_template: CpuTemplate,
    /// Where the serial console goes.
    pub serial: SerialOutput,
    /// The instant the boot timer and first-entry figures count from
    /// (usually process start).
    pub epoch: Instant,
    /// Whether each VMM thread installs its seccomp filter
    /// ([`super::seccomp`]); `false` is for debugging only, and every
    /// start says so in the log.
    pub seccomp: bool,
    /// A virtio-rng device (after the disks and vsock): the guest's
    /// `hwrng` feeds its entropy pool from the host's `getrandom`.
    pub rng: bool,
    /// A virtio-net NIC (after the rng).
    pub net: Option<NetConfig>,
    /// A virtio-fs share (after every other device).
    pub fs: Option<FsConfig>,
}

impl VmConfig {
    /// How many virtio devices the VM gets: the disks, then the vsock
    /// device, the rng, the NIC, the share.
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
            + usize::from(self.net.is_some())
            + usize::from(self.fs.is_some())
    }
}
