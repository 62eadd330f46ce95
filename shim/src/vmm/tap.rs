//! A tap device: the host end of a guest's virtio-net NIC.
//!
//! [`Tap::create`] opens `/dev/net/tun` as `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, non-blocking, with a 12-byte `virtio_net_hdr_v1` in
//! front of every frame ([`VNET_HDR_LEN`]), so a virtio-net device can
//! pass its buffers through unchanged. The device lives in the network
//! namespace of the thread that creates it and disappears when the last
//! copy of its fd is closed (it is not persistent).
//!
//! The fd moves between processes: `OwnedFd::from(tap)` gives it up and
//! `Tap::try_from(fd)` takes it back (checking it is a tap with vnet
//! headers), as a jailed VMM receives it over its control socket.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// The bytes of the `virtio_net_hdr_v1` in front of every frame read from
/// or written to a [`Tap`].
pub const VNET_HDR_LEN: usize = 12;

/// The longest interface name Linux takes (`IFNAMSIZ` less the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// [`Tap::set_offloads`]: the guest takes frames with partial checksums.
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
/// [`Tap::set_offloads`]: the guest takes TCPv4 segmentation offload.
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
/// [`Tap::set_offloads`]: the guest takes TCPv6 segmentation offload.
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
/// [`Tap::set_offloads`]: the guest takes TSO with ECN.
pub const TUN_F_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
/// [`Tap::set_offloads`]: the guest takes UDP fragmentation offload.
pub const TUN_F_UFO: u32 = libc::TUN_F_UFO;

const TUN_PATH: &str = "/dev/net/tun";

/// Why a tap could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long for an interface name or holds a
    /// character Linux refuses (`/`, whitespace, NUL).
    #[error(
        "{name:?} is not a valid tap name (1 to {MAX_NAME_LEN} bytes, no '/', whitespace or NUL)"
    )]
    InvalidName {
        /// The name asked for.
        name: String,
    },
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_PATH}")]
    OpenTun(#[source] io::Error),
    /// `TUNSETIFF` failed (the name is taken by a device that is not a
    /// free tap of ours, or `CAP_NET_ADMIN` is missing).
    #[error("cannot create the tap {name}")]
    Create {
        /// The tap's name.
        name: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// An fd given to [`Tap::try_from`] is not a tap with vnet headers
    /// and no packet information.
    #[error("the fd is not a tap with vnet headers")]
    NotATap,
    /// Another ioctl or fcntl on the tap failed.
    #[error("cannot {what} on the tap")]
    Ioctl {
        /// What was being done.
        what: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

mod ioctls {
    nix::ioctl_write_ptr_bad!(tunsetiff, libc::TUNSETIFF, libc::ifreq);
    nix::ioctl_read_bad!(tungetiff, libc::TUNGETIFF, libc::ifreq);
    nix::ioctl_write_ptr_bad!(tunsetvnethdrsz, libc::TUNSETVNETHDRSZ, libc::c_int);
    nix::ioctl_write_int_bad!(tunsetoffload, libc::TUNSETOFFLOAD);
}

/// The flags a skiff tap has: Ethernet frames, no packet information,
/// a vnet header.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// An open, non-blocking tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks `name` is a name Linux takes for a link.
pub(crate) fn check_name(name: &str) -> Result<(), TapError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
    if valid {
        Ok(())
    } else {
        Err(TapError::InvalidName { name: name.into() })
    }
}

fn zeroed_ifreq() -> libc::ifreq {
    // SAFETY: `ifreq` is a name array and a union of integers, arrays and
    // a pointer; all zeros is a valid value of each.
    unsafe { std::mem::zeroed() }
}

impl Tap {
    /// Creates the tap `name` in the calling thread's network namespace
    /// (run it through [`super::run_in_netns`]), with 12-byte vnet headers,
    /// non-blocking. The link is down; its MTU is the kernel's default.
    pub fn create(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let mut req = zeroed_ifreq();
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
        // SAFETY: TUNSETIFF reads an `ifreq`, which `req` is, NUL-terminated
        // (the name is at most IFNAMSIZ - 1 bytes).
        unsafe { ioctls::tunsetiff(file.as_raw_fd(), &req) }.map_err(|errno| TapError::Create {
            name: name.into(),
            source: errno.into(),
        })?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int`, which `hdr_len` is.
        unsafe { ioctls::tunsetvnethdrsz(file.as_raw_fd(), &hdr_len) }.map_err(|errno| {
            TapError::Ioctl {
                what: "set the vnet header size",
                source: errno.into(),
            }
        })?;
        Ok(Tap {
            file,
            name: name.into(),
        })
    }

    /// The tap's interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the tap which offloads the guest takes (`TUNSETOFFLOAD`, an
    /// or of the `TUN_F_*` consts; 0 for none): the kernel then may hand
    /// out frames with partial checksums or larger than the MTU, described
    /// by the vnet header.
    pub fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        // The bits as they are; the kernel refuses those it doesn't know.
        let arg = flags as libc::c_int;
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // involved.
        unsafe { ioctls::tunsetoffload(self.file.as_raw_fd(), arg) }
            .map(drop)
            .map_err(|errno| TapError::Ioctl {
                what: "set the offloads",
                source: errno.into(),
            })
    }

    /// Reads one frame, vnet header first, into `buf`; `None` when no frame
    /// is waiting. A frame longer than `buf` is cut short.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        would_block((&self.file).read(buf))
    }

    /// Writes one frame, vnet header first; `None` when the tap cannot
    /// take it now.
    pub fn write(&self, frame: &[u8]) -> io::Result<Option<usize>> {
        would_block((&self.file).write(frame))
    }
}

fn would_block(result: io::Result<usize>) -> io::Result<Option<usize>> {
    match result {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl From<Tap> for OwnedFd {
    fn from(tap: Tap) -> OwnedFd {
        tap.file.into()
    }
}

impl TryFrom<OwnedFd> for Tap {
    type Error = TapError;

    /// Takes back a tap's fd (from [`OwnedFd::from`], maybe through another
    /// process): checks it is a tap with vnet headers and no packet
    /// information, learns its name and makes it non-blocking.
    fn try_from(fd: OwnedFd) -> Result<Tap, TapError> {
        let mut req = zeroed_ifreq();
        // SAFETY: TUNGETIFF writes an `ifreq`, which `req` is.
        unsafe { ioctls::tungetiff(fd.as_raw_fd(), &mut req) }.map_err(|_| TapError::NotATap)?;
        // SAFETY: TUNGETIFF filled the flags member; every bit pattern is a
        // valid `c_short`.
        let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags });
        if flags & TAP_FLAGS != TAP_FLAGS || flags & libc::IFF_TUN != 0 {
            return Err(TapError::NotATap);
        }
        let name: Vec<u8> = req
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let set_nonblocking = || {
            let fl = OFlag::from_bits_retain(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
            fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))
        };
        set_nonblocking().map_err(|errno| TapError::Ioctl {
            what: "make the fd non-blocking",
            source: errno.into(),
        })?;
        Ok(Tap {
            file: File::from(fd),
            name: String::from_utf8_lossy(&name).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podnet::run_in_netns;
    use crate::podnet::testing::{skip_reason, TestNetns};

    #[test]
    fn names_are_checked() {
        for bad in [
            "",
            "0123456789abcdef",
            "a/b",
            "a b",
            "a\0",
            ".",
            "..",
            "a:1",
        ] {
            assert!(
                matches!(check_name(bad), Err(TapError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        for good in ["tap0_skiff", "0123456789abcde", "t"] {
            check_name(good).unwrap();
        }
        let err = Tap::create("much-too-long-name").unwrap_err();
        assert!(matches!(err, TapError::InvalidName { .. }), "{err:?}");
    }

    #[test]
    fn a_tap_is_made_passed_on_and_taken_back() {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
        let ns = TestNetns::new().unwrap();
        let tap = run_in_netns(ns.path(), || Tap::create("tap0_skiff"))
            .unwrap()
            .unwrap();
        assert_eq!(tap.name(), "tap0_skiff");
        assert!(ns.link_exists("tap0_skiff"));
        tap.set_offloads(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
            .unwrap();
        tap.set_offloads(0).unwrap();
        // Down, nothing to read: None, not an error.
        let mut buf = [0u8; 2048];
        assert_eq!(tap.read(&mut buf).unwrap(), None);

        // Through a copy of the fd, as a VMM receives it.
        let fd = OwnedFd::from(tap);
        let copy = fd.try_clone().unwrap();
        let again = Tap::try_from(copy).unwrap();
        assert_eq!(again.name(), "tap0_skiff");
        assert_eq!(again.read(&mut buf).unwrap(), None);

        // Not persistent: gone with its last fd (soon: a thread of another
        // test forking a child holds a copy until the child execs).
        drop(again);
        assert!(ns.link_exists("tap0_skiff"));
        drop(fd);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while ns.link_exists("tap0_skiff") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!ns.link_exists("tap0_skiff"));
    }

    #[test]
    fn other_fds_are_not_taps() {
        let file = File::open("/dev/null").unwrap();
        let err = Tap::try_from(OwnedFd::from(file)).unwrap_err();
        assert!(matches!(err, TapError::NotATap), "{err:?}");
    }
}
