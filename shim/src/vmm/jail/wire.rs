//! The control channel between the shim and its jailed VMM: one JSON
//! message per `SOCK_SEQPACKET` datagram, open files (at most
//! [`MAX_FILES`]) riding along as `SCM_RIGHTS` where a request hands some
//! over.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

use crate::vmm::{ExitReason, VmReport};

/// Largest message either side sends (a `Start` with a tiny guest's code
/// inline is the biggest).
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;
/// Most files one message carries (a restoring `Start`: the snapshot's
/// state and memory files, and the NIC's tap); any more that arrive are
/// closed.
pub const MAX_FILES: usize = 3;

/// Errors on the control channel.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The other end closed the channel (the process is gone).
    #[error("the control channel is closed")]
    Closed,
    /// Nothing arrived in time.
    #[error("no answer on the control channel within {0:?}")]
    Timeout(Duration),
    /// A message does not fit [`MAX_MESSAGE_BYTES`].
    #[error("a control message of more than {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    /// A message would carry more than [`MAX_FILES`] files.
    #[error("a control message with more than {MAX_FILES} files")]
    TooManyFiles,
    /// A message is not what the protocol allows.
    #[error("a malformed control message")]
    Malformed(#[source] serde_json::Error),
    /// The socket failed.
    #[error("the control channel failed")]
    Io(#[source] std::io::Error),
}

fn io(e: nix::Error) -> WireError {
    WireError::Io(std::io::Error::from(e))
}

/// How the guest starts, as the wire carries it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum BootSpec {
    /// A kernel (and initramfs) by host path, opened before confinement.
    Kernel {
        /// The kernel image.
        kernel: PathBuf,
        /// The initramfs.
        initrd: Option<PathBuf>,
        /// The command line.
        cmdline: String,
    },
    /// Raw code (tiny test guests).
    Raw {
        /// The code.
        image: Vec<u8>,
        /// Load and entry address.
        load_addr: u64,
        /// `real`, `protected` or `long`.
        mode: String,
    },
}

/// A disk slot, as the wire carries it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskSpec {
    /// Backing file (host path, opened before confinement), or an empty slot.
    pub path: Option<PathBuf>,
    /// Read-only for the guest.
    pub read_only: bool,
}

/// The VM to build: [`crate::vmm::VmConfig`] without what cannot cross a
/// process boundary. Paths of the serial log and the vsock socket are
/// relative to the jail's root (they are reopened there after confinement).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSpec {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// What boots.
    pub boot: BootSpec,
    /// Disk slots.
    pub disks: Vec<DiskSpec>,
    /// The vsock device: guest CID and socket (relative to the root).
    pub vsock: Option<(u64, PathBuf)>,
    /// CPU template name.
    pub cpu_template: String,
    /// The serial log (relative to the root), or none.
    pub serial: Option<PathBuf>,
    /// A virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// A virtio-net NIC: its MAC and MTU; its tap rides along with
    /// `Start`, after the snapshot's files.
    #[serde(default)]
    pub net: Option<NetSpec>,
    /// A virtio-fs share: its directory relative to the root.
    #[serde(default)]
    pub fs: Option<FsSpec>,
}

/// A virtio-fs share, as the wire carries it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsSpec {
    /// The shared directory, relative to the jail's root.
    pub dir: PathBuf,
    /// The tag.
    pub tag: String,
    /// The cache mode.
    pub cache: crate::vmm::fs::CacheMode,
}

/// The NIC, as the wire carries it (the tap is a file riding along).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetSpec {
    /// The MAC.
    pub mac: [u8; 6],
    /// The MTU.
    pub mtu: u16,
}

/// How the VMM confines itself before the guest runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Confinement {
    /// The directory that becomes its `/`.
    pub root: PathBuf,
    /// The user it runs as.
    pub uid: u32,
    /// The group it runs as.
    pub gid: u32,
    /// Whether per-thread seccomp filters are installed.
    pub seccomp: bool,
    /// Most open files.
    pub max_files: u64,
    /// Keep uid 0 and the file-system capabilities a virtio-fs server
    /// needs ([`super::confine::FS_CAPS`]) instead of switching to
    /// `uid`/`gid` with none.
    #[serde(default)]
    pub fs_caps: bool,
}

/// What the shim asks of the VMM process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Request {
    /// Build the VM, confine, start it.
    Start {
        /// The VM.
        vm: Box<VmSpec>,
        /// The jail.
        jail: Confinement,
        /// The log level (`log::LevelFilter` name).
        log_level: String,
        /// Restore the VM from the snapshot whose state and memory files
        /// ride along, instead of booting it.
        #[serde(default)]
        restore: bool,
    },
    /// Pause the VM, write a snapshot into the two empty files that ride
    /// along (state, then memory), let it run on.
    Snapshot,
    /// Put the file that rides along into disk slot `index`; with `path`
    /// `None` (and no file), take the slot's medium out.
    SetDisk {
        /// The slot.
        index: usize,
        /// The image's host path, for logs.
        path: Option<PathBuf>,
    },
    /// Stop the VM.
    Stop,
}

/// What the VMM process answers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Reply {
    /// The request was carried out.
    Done,
    /// It failed; the error chain.
    Failed(String),
    /// The VM ended (sent once, unasked; the process exits after it).
    Exited(VmReport),
}

impl Reply {
    /// An exit with only a reason.
    pub fn exited(exit: ExitReason) -> Self {
        Reply::Exited(VmReport {
            exit,
            boot_timer: None,
            first_entry: None,
        })
    }
}

/// A connected pair of control sockets (close-on-exec).
pub fn pair() -> Result<(OwnedFd, OwnedFd), WireError> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io)
}

/// Sends `message`, with `files` (at most [`MAX_FILES`]) as `SCM_RIGHTS`.
pub fn send<T: Serialize>(sock: &OwnedFd, message: &T, files: &[RawFd]) -> Result<(), WireError> {
    let bytes = serde_json::to_vec(message).map_err(WireError::Malformed)?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge);
    }
    let iov = [std::io::IoSlice::new(&bytes)];
    if files.len() > MAX_FILES {
        return Err(WireError::TooManyFiles);
    }
    let cmsgs: Vec<ControlMessage<'_>> = if files.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(files)]
    };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::EPIPE | nix::Error::ECONNRESET) => return Err(WireError::Closed),
            Err(e) => return Err(io(e)),
        }
    }
}

/// Waits up to `timeout` (`None`: forever) for `sock` to be readable.
pub fn readable(sock: &OwnedFd, timeout: Option<Duration>) -> Result<bool, WireError> {
    let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid pollfd for the call and the count is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(WireError::Io(e));
        }
    }
}

/// Receives one message (blocking), and the files that rode along, in
/// the order they were sent.
pub fn recv<T: for<'de> Deserialize<'de>>(sock: &OwnedFd) -> Result<(T, Vec<OwnedFd>), WireError> {
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FILES]);
    let (len, truncated, file) = loop {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut file = Vec::new();
                for c in msg.cmsgs().map_err(io)? {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        for fd in fds {
                            // SAFETY: the kernel just installed `fd` in
                            // this process for us; nothing else owns it.
                            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                            // Any beyond MAX_FILES is closed here.
                            if file.len() < MAX_FILES {
                                file.push(owned);
                            }
                        }
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (msg.bytes, truncated, file);
            }
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::ECONNRESET) => return Err(WireError::Closed),
            Err(e) => return Err(io(e)),
        }
    };
    if truncated {
        return Err(WireError::TooLarge);
    }
    if len == 0 {
        return Err(WireError::Closed);
    }
    let message = serde_json::from_slice(&buf[..len]).map_err(WireError::Malformed)?;
    Ok((message, file))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, Write};

    use super::*;

    #[test]
    fn messages_and_files_cross_the_channel() {
        let (a, b) = pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"disk").unwrap();
        let request = Request::SetDisk {
            index: 2,
            path: Some("/x/image-2.ext4".into()),
        };
        send(&a, &request, &[file.as_raw_fd()]).unwrap();
        assert!(readable(&b, Some(Duration::from_secs(5))).unwrap());
        let (got, mut fds): (Request, _) = recv(&b).unwrap();
        assert_eq!(got, request);
        assert_eq!(fds.len(), 1);
        let mut passed = std::fs::File::from(fds.pop().expect("the file rode along"));
        passed.rewind().unwrap();
        let mut text = String::new();
        passed.read_to_string(&mut text).unwrap();
        assert_eq!(text, "disk");

        send(&b, &Reply::exited(ExitReason::Reset), &[]).unwrap();
        let (got, fds): (Reply, _) = recv(&a).unwrap();
        assert_eq!(got, Reply::exited(ExitReason::Reset));
        assert!(fds.is_empty());

        // Files arrive in order; more than MAX_FILES are refused.
        let mut second = tempfile::tempfile().unwrap();
        second.write_all(b"memory").unwrap();
        let files = [file.as_raw_fd(), second.as_raw_fd()];
        send(&a, &Request::Stop, &files).unwrap();
        let (_, fds): (Request, _) = recv(&b).unwrap();
        let sizes: Vec<u64> = fds
            .into_iter()
            .map(|fd| std::fs::File::from(fd).metadata().unwrap().len())
            .collect();
        assert_eq!(sizes, [4, 6]);
        assert!(matches!(
            send(
                &a,
                &Request::Stop,
                &[files[0], files[1], files[0], files[1]]
            ),
            Err(WireError::TooManyFiles)
        ));
    }

    #[test]
    fn garbage_closed_and_silent_channels_are_typed_errors() {
        let (a, b) = pair().unwrap();
        assert!(!readable(&b, Some(Duration::from_millis(10))).unwrap());
        nix::sys::socket::send(a.as_raw_fd(), b"{not json", MsgFlags::empty()).unwrap();
        assert!(matches!(recv::<Request>(&b), Err(WireError::Malformed(_))));
        drop(a);
        assert!(readable(&b, Some(Duration::from_secs(5))).unwrap());
        assert!(matches!(recv::<Request>(&b), Err(WireError::Closed)));
        assert!(matches!(
            send(&b, &Request::Stop, &[]),
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn oversized_messages_are_refused_both_ways() {
        let (a, b) = pair().unwrap();
        let huge = Request::SetDisk {
            index: 0,
            path: Some(PathBuf::from("x".repeat(MAX_MESSAGE_BYTES))),
        };
        assert!(matches!(send(&a, &huge, &[]), Err(WireError::TooLarge)));
        let raw = vec![b' '; MAX_MESSAGE_BYTES + 1];
        nix::sys::socket::send(a.as_raw_fd(), &raw, MsgFlags::empty()).unwrap();
        assert!(matches!(recv::<Request>(&b), Err(WireError::TooLarge)));
    }
}
