//! The FUSE wire protocol (kernel ABI 7.31 to 7.38, `linux/fuse.h`) as
//! virtio-fs carries it: the request header, the per-opcode arguments
//! parsed into a [`Request`], and the reply structures serialized by hand
//! (little-endian, as virtio is).
//!
//! Parsing is exact: every opcode's arguments must be as long as the
//! kernel sends them, names must end in their NUL and be valid [`Name`]s,
//! and a WRITE's data must be as long as it says. Anything else is a
//! [`FuseError`], which the device answers with [`FuseError::errno`].

use super::backend::{
    write_attr, write_entry_out, Attr, Entry, Errno, Handle, Inode, Name, Opened, SetAttr, SetTime,
    StatFs, ATTR_SIZE, ENTRY_OUT_SIZE,
};

/// The FUSE major version the device speaks.
pub const FUSE_KERNEL_VERSION: u32 = 7;
/// The highest FUSE minor version the device speaks.
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 38;
/// The lowest minor version the device accepts: 7.31 is the first one
/// virtio-fs drivers speak (Linux 5.4).
pub const FUSE_MIN_MINOR_VERSION: u32 = 31;

/// Size of `fuse_in_header`.
pub const IN_HEADER_SIZE: usize = 40;
/// Size of `fuse_out_header`.
pub const OUT_HEADER_SIZE: usize = 16;
/// Size of `fuse_init_out` (7.23 and later).
pub const INIT_OUT_SIZE: usize = 64;
/// Size of `fuse_attr_out`.
pub const ATTR_OUT_SIZE: usize = 16 + ATTR_SIZE;
/// Size of `fuse_open_out`.
pub const OPEN_OUT_SIZE: usize = 16;
/// Size of `fuse_write_out`.
pub const WRITE_OUT_SIZE: usize = 8;
/// Size of `fuse_statfs_out`.
pub const STATFS_OUT_SIZE: usize = 80;
/// Size of `fuse_getxattr_out`.
pub const GETXATTR_OUT_SIZE: usize = 8;
/// Size of `fuse_lseek_out`.
pub const LSEEK_OUT_SIZE: usize = 8;
/// Size of a CREATE reply: `fuse_entry_out` then `fuse_open_out`.
pub const CREATE_OUT_SIZE: usize = ENTRY_OUT_SIZE + OPEN_OUT_SIZE;
/// Longest symbolic link target the device passes on (`PATH_MAX` less
/// its NUL).
pub const SYMLINK_MAX: usize = 4095;
/// Longest extended attribute name (`XATTR_NAME_MAX`).
pub const XATTR_NAME_MAX: usize = 255;
/// Largest extended attribute value (`XATTR_SIZE_MAX`).
pub const XATTR_SIZE_MAX: usize = 64 << 10;
/// Size of `fuse_forget_one`, one BATCH_FORGET entry.
const FORGET_ONE_SIZE: usize = 16;

/// FUSE opcodes (`enum fuse_opcode`).
#[allow(missing_docs)]
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const BMAP: u32 = 37;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const POLL: u32 = 40;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SETUPMAPPING: u32 = 48;
    pub const REMOVEMAPPING: u32 = 49;
    pub const SYNCFS: u32 = 50;
    pub const TMPFILE: u32 = 51;
}

/// `fuse_init_in.flags` / `fuse_init_out.flags` bits (`FUSE_*`).
#[allow(missing_docs)]
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const POSIX_LOCKS: u32 = 1 << 1;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const EXPORT_SUPPORT: u32 = 1 << 4;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const DONT_MASK: u32 = 1 << 6;
    pub const FLOCK_LOCKS: u32 = 1 << 10;
    pub const AUTO_INVAL_DATA: u32 = 1 << 12;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const WRITEBACK_CACHE: u32 = 1 << 16;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const HANDLE_KILLPRIV: u32 = 1 << 19;
    pub const POSIX_ACL: u32 = 1 << 20;
    pub const MAX_PAGES: u32 = 1 << 22;
    pub const CACHE_SYMLINKS: u32 = 1 << 23;
    pub const EXPLICIT_INVAL_DATA: u32 = 1 << 25;
    pub const HANDLE_KILLPRIV_V2: u32 = 1 << 28;
    pub const SETXATTR_EXT: u32 = 1 << 29;
    pub const INIT_EXT: u32 = 1 << 30;
}

/// `fuse_setattr_in.valid` bits (`FATTR_*`).
#[allow(missing_docs)]
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const LOCKOWNER: u32 = 1 << 9;
    pub const CTIME: u32 = 1 << 10;
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// `fuse_getattr_in.getattr_flags`: `fh` is valid.
pub const FUSE_GETATTR_FH: u32 = 1 << 0;
/// `fuse_write_in.write_flags`: clear set-user-ID and set-group-ID bits.
pub const FUSE_WRITE_KILL_SUIDGID: u32 = 1 << 2;
/// `fuse_fsync_in.fsync_flags`: data only.
pub const FUSE_FSYNC_FDATASYNC: u32 = 1 << 0;

/// A malformed FUSE request. Every variant is guest-triggerable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FuseError {
    /// The request is shorter than `fuse_in_header`.
    #[error("request of {len} bytes is shorter than a FUSE header")]
    HeaderTooShort {
        /// The request's length.
        len: usize,
    },
    /// `fuse_in_header.len` is not the request's length.
    #[error("FUSE header says {header} bytes, the request has {actual}")]
    LengthMismatch {
        /// What the header says.
        header: u32,
        /// What the chain holds.
        actual: usize,
    },
    /// The header announces extensions, which the device never negotiates.
    #[error("FUSE header announces {units} extension units, none negotiated")]
    Extensions {
        /// `total_extlen`.
        units: u16,
    },
    /// The arguments are too short for the opcode's fixed structure.
    #[error("opcode {opcode} arguments are truncated")]
    Truncated {
        /// The opcode.
        opcode: u32,
    },
    /// The arguments go on past what the opcode takes.
    #[error("opcode {opcode} arguments carry {extra} trailing bytes")]
    TrailingBytes {
        /// The opcode.
        opcode: u32,
        /// Bytes left over.
        extra: usize,
    },
    /// A string argument is not NUL-terminated.
    #[error("opcode {opcode} string argument has no NUL terminator")]
    MissingNul {
        /// The opcode.
        opcode: u32,
    },
    /// A file name argument is not a valid [`Name`] (empty, `.`, `..`, a
    /// `/`, or too long); the reply carries `errno`.
    #[error("opcode {opcode} names an invalid file name")]
    BadName {
        /// The opcode.
        opcode: u32,
        /// What the reply says (`EINVAL` or `ENAMETOOLONG`).
        errno: Errno,
    },
    /// A WRITE's data is not as long as `fuse_write_in.size`.
    #[error("WRITE of {size} bytes carries {data} bytes of data")]
    WriteSizeMismatch {
        /// `fuse_write_in.size`.
        size: u32,
        /// Data bytes after the arguments.
        data: usize,
    },
    /// A SETXATTR's value is not as long as `fuse_setxattr_in.size`.
    #[error("SETXATTR of {size} bytes carries {data} bytes of value")]
    XattrSizeMismatch {
        /// `fuse_setxattr_in.size`.
        size: u32,
        /// Value bytes after the name.
        data: usize,
    },
    /// A BATCH_FORGET's count does not match its entries.
    #[error("BATCH_FORGET of {count} entries carries {bytes} bytes of them")]
    ForgetCountMismatch {
        /// `fuse_batch_forget_in.count`.
        count: u32,
        /// Bytes of `fuse_forget_one` entries.
        bytes: usize,
    },
}

impl FuseError {
    /// The error the reply carries.
    pub fn errno(&self) -> Errno {
        match self {
            FuseError::BadName { errno, .. } => *errno,
            FuseError::HeaderTooShort { .. }
            | FuseError::LengthMismatch { .. }
            | FuseError::Extensions { .. }
            | FuseError::Truncated { .. }
            | FuseError::TrailingBytes { .. }
            | FuseError::MissingNul { .. }
            | FuseError::WriteSizeMismatch { .. }
            | FuseError::XattrSizeMismatch { .. }
            | FuseError::ForgetCountMismatch { .. } => Errno::INVAL,
        }
    }
}

/// `fuse_in_header`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InHeader {
    /// Length of the whole request, header included.
    pub len: u32,
    /// The opcode ([`opcode`]).
    pub opcode: u32,
    /// The request's id, echoed in the reply.
    pub unique: u64,
    /// The node the request is about.
    pub nodeid: Inode,
    /// The caller's user id.
    pub uid: u32,
    /// The caller's group id.
    pub gid: u32,
    /// The caller's process id.
    pub pid: u32,
    /// Length of extensions, in 8-byte units.
    pub total_extlen: u16,
}

impl InHeader {
    /// Decodes the header at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<InHeader, FuseError> {
        let mut a = Args {
            rest: bytes,
            opcode: 0,
        };
        let h = a
            .take(IN_HEADER_SIZE)
            .map_err(|_| FuseError::HeaderTooShort { len: bytes.len() })?;
        let mut a = Args { rest: h, opcode: 0 };
        // Exactly IN_HEADER_SIZE bytes: none of these can fail.
        let header = InHeader {
            len: a.u32().unwrap_or(0),
            opcode: a.u32().unwrap_or(0),
            unique: a.u64().unwrap_or(0),
            nodeid: a.u64().unwrap_or(0),
            uid: a.u32().unwrap_or(0),
            gid: a.u32().unwrap_or(0),
            pid: a.u32().unwrap_or(0),
            total_extlen: a.u16().unwrap_or(0),
        };
        Ok(header)
    }

    /// Encodes the header (for drivers in tests).
    pub fn to_bytes(&self) -> [u8; IN_HEADER_SIZE] {
        let mut b = [0u8; IN_HEADER_SIZE];
        let mut w = Out::new(&mut b);
        w.u32(self.len);
        w.u32(self.opcode);
        w.u64(self.unique);
        w.u64(self.nodeid);
        w.u32(self.uid);
        w.u32(self.gid);
        w.u32(self.pid);
        w.u16(self.total_extlen);
        b
    }
}

/// The `(nodeid, nlookup)` pairs of a BATCH_FORGET, read from the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forgets<'a>(&'a [u8]);

impl<'a> Forgets<'a> {
    /// The pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (Inode, u64)> + 'a {
        self.0.chunks_exact(FORGET_ONE_SIZE).map(|c| {
            let mut a = Args { rest: c, opcode: 0 };
            (a.u64().unwrap_or(0), a.u64().unwrap_or(0))
        })
    }

    /// How many pairs.
    pub fn len(&self) -> usize {
        self.0.len() / FORGET_ONE_SIZE
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A parsed FUSE request; the node it is about is the header's `nodeid`.
/// Borrowed parts point into the device's input buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// INIT: the session starts.
    Init {
        /// The driver's major version.
        major: u32,
        /// The driver's minor version.
        minor: u32,
        /// The driver's readahead limit.
        max_readahead: u32,
        /// The `FUSE_*` capabilities the driver offers.
        flags: u32,
    },
    /// DESTROY: the session ends.
    Destroy,
    /// LOOKUP a name in the node (a directory).
    Lookup {
        /// The name.
        name: Name<'a>,
    },
    /// FORGET references to the node (no reply).
    Forget {
        /// References dropped.
        nlookup: u64,
    },
    /// BATCH_FORGET (no reply).
    BatchForget {
        /// The nodes and references dropped.
        forgets: Forgets<'a>,
    },
    /// GETATTR.
    Getattr {
        /// The handle, with `FUSE_GETATTR_FH`.
        handle: Option<Handle>,
    },
    /// SETATTR.
    Setattr {
        /// What to change.
        attr: SetAttr,
    },
    /// READLINK.
    Readlink,
    /// SYMLINK in the node (a directory).
    Symlink {
        /// The link's name.
        name: Name<'a>,
        /// Its target.
        target: &'a [u8],
    },
    /// MKNOD in the node.
    Mknod {
        /// The new node's name.
        name: Name<'a>,
        /// Type and permissions.
        mode: u32,
        /// Device number.
        rdev: u32,
        /// The caller's umask.
        umask: u32,
    },
    /// MKDIR in the node.
    Mkdir {
        /// The new directory's name.
        name: Name<'a>,
        /// Permissions.
        mode: u32,
        /// The caller's umask.
        umask: u32,
    },
    /// UNLINK from the node.
    Unlink {
        /// The name.
        name: Name<'a>,
    },
    /// RMDIR from the node.
    Rmdir {
        /// The name.
        name: Name<'a>,
    },
    /// RENAME or RENAME2 from the node.
    Rename {
        /// The old name.
        name: Name<'a>,
        /// The new parent.
        new_parent: Inode,
        /// The new name.
        new_name: Name<'a>,
        /// `RENAME_*` flags (0 for RENAME).
        flags: u32,
    },
    /// LINK: a new name for `inode` in the node (the new parent).
    Link {
        /// The node to link.
        inode: Inode,
        /// The new name.
        new_name: Name<'a>,
    },
    /// OPEN the node.
    Open {
        /// `open(2)` flags.
        flags: u32,
    },
    /// READ from the node.
    Read {
        /// The handle.
        handle: Handle,
        /// Where.
        offset: u64,
        /// How many bytes at most.
        size: u32,
    },
    /// WRITE to the node.
    Write {
        /// The handle.
        handle: Handle,
        /// Where.
        offset: u64,
        /// The data.
        data: &'a [u8],
        /// `FUSE_WRITE_KILL_SUIDGID`.
        kill_priv: bool,
    },
    /// STATFS.
    Statfs,
    /// RELEASE a file handle.
    Release {
        /// The handle.
        handle: Handle,
    },
    /// FSYNC a file.
    Fsync {
        /// The handle.
        handle: Handle,
        /// Data only.
        datasync: bool,
    },
    /// FLUSH a file.
    Flush {
        /// The handle.
        handle: Handle,
    },
    /// SETXATTR.
    Setxattr {
        /// The attribute's name.
        name: &'a [u8],
        /// Its value.
        value: &'a [u8],
        /// `XATTR_*` flags.
        flags: u32,
    },
    /// GETXATTR.
    Getxattr {
        /// The attribute's name.
        name: &'a [u8],
        /// The driver's buffer size; 0 asks for the size.
        size: u32,
    },
    /// LISTXATTR.
    Listxattr {
        /// The driver's buffer size; 0 asks for the size.
        size: u32,
    },
    /// REMOVEXATTR.
    Removexattr {
        /// The attribute's name.
        name: &'a [u8],
    },
    /// OPENDIR the node.
    Opendir {
        /// `open(2)` flags.
        flags: u32,
    },
    /// READDIR or READDIRPLUS.
    Readdir {
        /// The directory handle.
        handle: Handle,
        /// The cookie to go on after.
        offset: u64,
        /// How many bytes of entries at most.
        size: u32,
        /// READDIRPLUS.
        plus: bool,
    },
    /// RELEASEDIR.
    Releasedir {
        /// The handle.
        handle: Handle,
    },
    /// FSYNCDIR.
    Fsyncdir {
        /// The handle.
        handle: Handle,
        /// Data only.
        datasync: bool,
    },
    /// ACCESS.
    Access {
        /// `R_OK | W_OK | X_OK` or `F_OK`.
        mask: u32,
    },
    /// CREATE and open in the node.
    Create {
        /// The new file's name.
        name: Name<'a>,
        /// Type and permissions.
        mode: u32,
        /// `open(2)` flags.
        flags: u32,
        /// The caller's umask.
        umask: u32,
    },
    /// FALLOCATE.
    Fallocate {
        /// The handle.
        handle: Handle,
        /// Where.
        offset: u64,
        /// How much.
        length: u64,
        /// `fallocate(2)` mode.
        mode: u32,
    },
    /// LSEEK.
    Lseek {
        /// The handle.
        handle: Handle,
        /// From where.
        offset: u64,
        /// `SEEK_*`.
        whence: u32,
    },
    /// INTERRUPT an earlier request (no reply; every request is answered
    /// before the next is read, so there is never one to interrupt).
    Interrupt {
        /// The interrupted request's id.
        unique: u64,
    },
    /// An opcode the device does not implement: answered `ENOSYS`.
    Unsupported {
        /// The opcode.
        opcode: u32,
    },
}

impl Request<'_> {
    /// Whether the request gets no reply (FORGET, BATCH_FORGET,
    /// INTERRUPT).
    pub fn is_noreply(&self) -> bool {
        matches!(
            self,
            Request::Forget { .. } | Request::BatchForget { .. } | Request::Interrupt { .. }
        )
    }

    /// Bytes of reply (after the out header) a successful answer takes, for
    /// requests whose reply has a fixed size; 0 for a bare header, `None`
    /// for the variable ones (their buffers are capped at the room).
    pub fn fixed_reply_size(&self) -> Option<usize> {
        Some(match self {
            Request::Init { .. } => INIT_OUT_SIZE,
            Request::Lookup { .. }
            | Request::Symlink { .. }
            | Request::Mknod { .. }
            | Request::Mkdir { .. }
            | Request::Link { .. } => ENTRY_OUT_SIZE,
            Request::Getattr { .. } | Request::Setattr { .. } => ATTR_OUT_SIZE,
            Request::Open { .. } | Request::Opendir { .. } => OPEN_OUT_SIZE,
            Request::Write { .. } => WRITE_OUT_SIZE,
            Request::Statfs => STATFS_OUT_SIZE,
            Request::Create { .. } => CREATE_OUT_SIZE,
            Request::Lseek { .. } => LSEEK_OUT_SIZE,
            Request::Getxattr { size: 0, .. } | Request::Listxattr { size: 0 } => GETXATTR_OUT_SIZE,
            Request::Readlink
            | Request::Read { .. }
            | Request::Readdir { .. }
            | Request::Getxattr { .. }
            | Request::Listxattr { .. } => return None,
            Request::Destroy
            | Request::Forget { .. }
            | Request::BatchForget { .. }
            | Request::Unlink { .. }
            | Request::Rmdir { .. }
            | Request::Rename { .. }
            | Request::Release { .. }
            | Request::Fsync { .. }
            | Request::Flush { .. }
            | Request::Setxattr { .. }
            | Request::Removexattr { .. }
            | Request::Releasedir { .. }
            | Request::Fsyncdir { .. }
            | Request::Access { .. }
            | Request::Fallocate { .. }
            | Request::Interrupt { .. }
            | Request::Unsupported { .. } => 0,
        })
    }
}

/// Parses the arguments `args` (the request after its header) of a
/// request with opcode `op`.
pub fn parse_request(op: u32, args: &[u8]) -> Result<Request<'_>, FuseError> {
    use opcode as o;
    let mut a = Args {
        rest: args,
        opcode: op,
    };
    let req = match op {
        o::INIT => {
            let major = a.u32()?;
            let minor = a.u32()?;
            if major != FUSE_KERNEL_VERSION {
                // Another major's arguments are not ours to check.
                return Ok(Request::Init {
                    major,
                    minor,
                    max_readahead: 0,
                    flags: 0,
                });
            }
            let max_readahead = a.u32()?;
            let flags = a.u32()?;
            // 7.36 grew fuse_init_in from 16 to 64 bytes (flags2, unused).
            if a.rest.len() == 48 {
                a.take(48)?;
            }
            Request::Init {
                major,
                minor,
                max_readahead,
                flags,
            }
        }
        o::DESTROY => Request::Destroy,
        o::LOOKUP => Request::Lookup { name: a.name()? },
        o::FORGET => Request::Forget { nlookup: a.u64()? },
        o::BATCH_FORGET => {
            let count = a.u32()?;
            a.u32()?;
            let bytes = a.rest.len();
            if usize::try_from(count)
                .ok()
                .and_then(|c| c.checked_mul(FORGET_ONE_SIZE))
                != Some(bytes)
            {
                return Err(FuseError::ForgetCountMismatch { count, bytes });
            }
            Request::BatchForget {
                forgets: Forgets(a.take(bytes)?),
            }
        }
        o::GETATTR => {
            let flags = a.u32()?;
            a.u32()?;
            let fh = a.u64()?;
            Request::Getattr {
                handle: (flags & FUSE_GETATTR_FH != 0).then_some(fh),
            }
        }
        o::SETATTR => Request::Setattr { attr: a.setattr()? },
        o::READLINK => Request::Readlink,
        o::SYMLINK => {
            let name = a.name()?;
            let target = a.cstr()?;
            if target.is_empty() || target.len() > SYMLINK_MAX {
                return Err(FuseError::BadName {
                    opcode: op,
                    errno: if target.is_empty() {
                        Errno::INVAL
                    } else {
                        Errno::NAMETOOLONG
                    },
                });
            }
            Request::Symlink { name, target }
        }
        o::MKNOD => {
            let mode = a.u32()?;
            let rdev = a.u32()?;
            let umask = a.u32()?;
            a.u32()?;
            Request::Mknod {
                name: a.name()?,
                mode,
                rdev,
                umask,
            }
        }
        o::MKDIR => {
            let mode = a.u32()?;
            let umask = a.u32()?;
            Request::Mkdir {
                name: a.name()?,
                mode,
                umask,
            }
        }
        o::UNLINK => Request::Unlink { name: a.name()? },
        o::RMDIR => Request::Rmdir { name: a.name()? },
        o::RENAME | o::RENAME2 => {
            let new_parent = a.u64()?;
            let flags = if op == o::RENAME2 {
                let f = a.u32()?;
                a.u32()?;
                f
            } else {
                0
            };
            Request::Rename {
                name: a.name()?,
                new_parent,
                new_name: a.name()?,
                flags,
            }
        }
        o::LINK => Request::Link {
            inode: a.u64()?,
            new_name: a.name()?,
        },
        o::OPEN | o::OPENDIR => {
            let flags = a.u32()?;
            // open_flags: FUSE_OPEN_KILL_SUIDGID comes only with
            // ATOMIC_O_TRUNC, which is not negotiated.
            a.u32()?;
            if op == o::OPEN {
                Request::Open { flags }
            } else {
                Request::Opendir { flags }
            }
        }
        o::READ | o::READDIR | o::READDIRPLUS => {
            let handle = a.u64()?;
            let offset = a.u64()?;
            let size = a.u32()?;
            a.take(20)?; // read_flags, lock_owner, flags, padding
            if op == o::READ {
                Request::Read {
                    handle,
                    offset,
                    size,
                }
            } else {
                Request::Readdir {
                    handle,
                    offset,
                    size,
                    plus: op == o::READDIRPLUS,
                }
            }
        }
        o::WRITE => {
            let handle = a.u64()?;
            let offset = a.u64()?;
            let size = a.u32()?;
            let write_flags = a.u32()?;
            a.take(16)?; // lock_owner, flags, padding
            let data = a.rest;
            if usize::try_from(size).ok() != Some(data.len()) {
                return Err(FuseError::WriteSizeMismatch {
                    size,
                    data: data.len(),
                });
            }
            a.take(data.len())?;
            Request::Write {
                handle,
                offset,
                data,
                kill_priv: write_flags & FUSE_WRITE_KILL_SUIDGID != 0,
            }
        }
        o::STATFS => Request::Statfs,
        o::RELEASE | o::RELEASEDIR => {
            let handle = a.u64()?;
            a.take(16)?; // flags, release_flags, lock_owner
            if op == o::RELEASE {
                Request::Release { handle }
            } else {
                Request::Releasedir { handle }
            }
        }
        o::FSYNC | o::FSYNCDIR => {
            let handle = a.u64()?;
            let datasync = a.u32()? & FUSE_FSYNC_FDATASYNC != 0;
            a.u32()?;
            if op == o::FSYNC {
                Request::Fsync { handle, datasync }
            } else {
                Request::Fsyncdir { handle, datasync }
            }
        }
        o::FLUSH => {
            let handle = a.u64()?;
            a.take(16)?; // unused, padding, lock_owner
            Request::Flush { handle }
        }
        o::SETXATTR => {
            // The 8-byte fuse_setxattr_in: FUSE_SETXATTR_EXT is not
            // negotiated.
            let size = a.u32()?;
            let flags = a.u32()?;
            let name = a.xattr_name()?;
            let value = a.rest;
            if usize::try_from(size).ok() != Some(value.len()) {
                return Err(FuseError::XattrSizeMismatch {
                    size,
                    data: value.len(),
                });
            }
            a.take(value.len())?;
            Request::Setxattr { name, value, flags }
        }
        o::GETXATTR => {
            let size = a.u32()?;
            a.u32()?;
            Request::Getxattr {
                name: a.xattr_name()?,
                size,
            }
        }
        o::LISTXATTR => {
            let size = a.u32()?;
            a.u32()?;
            Request::Listxattr { size }
        }
        o::REMOVEXATTR => Request::Removexattr {
            name: a.xattr_name()?,
        },
        o::ACCESS => {
            let mask = a.u32()?;
            a.u32()?;
            Request::Access { mask }
        }
        o::CREATE => {
            let flags = a.u32()?;
            let mode = a.u32()?;
            let umask = a.u32()?;
            a.u32()?; // open_flags
            Request::Create {
                name: a.name()?,
                mode,
                flags,
                umask,
            }
        }
        o::FALLOCATE => {
            let handle = a.u64()?;
            let offset = a.u64()?;
            let length = a.u64()?;
            let mode = a.u32()?;
            a.u32()?;
            Request::Fallocate {
                handle,
                offset,
                length,
                mode,
            }
        }
        o::LSEEK => {
            let handle = a.u64()?;
            let offset = a.u64()?;
            let whence = a.u32()?;
            a.u32()?;
            Request::Lseek {
                handle,
                offset,
                whence,
            }
        }
        o::INTERRUPT => Request::Interrupt { unique: a.u64()? },
        other => {
            // Arguments of an opcode not implemented are not looked at.
            return Ok(Request::Unsupported { opcode: other });
        }
    };
    a.end()?;
    Ok(req)
}

/// Little-endian reads off the front of a request's arguments.
struct Args<'a> {
    rest: &'a [u8],
    opcode: u32,
}

impl<'a> Args<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FuseError> {
        if self.rest.len() < n {
            return Err(FuseError::Truncated {
                opcode: self.opcode,
            });
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FuseError> {
        let mut b = [0u8; N];
        b.copy_from_slice(self.take(N)?);
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, FuseError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, FuseError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, FuseError> {
        self.array().map(u64::from_le_bytes)
    }

    /// A NUL-terminated string, without its NUL.
    fn cstr(&mut self) -> Result<&'a [u8], FuseError> {
        let Some(nul) = self.rest.iter().position(|&b| b == 0) else {
            return Err(FuseError::MissingNul {
                opcode: self.opcode,
            });
        };
        let s = self.take(nul)?;
        self.take(1)?;
        Ok(s)
    }

    /// A NUL-terminated file name.
    fn name(&mut self) -> Result<Name<'a>, FuseError> {
        let opcode = self.opcode;
        let s = self.cstr()?;
        Name::new(s).map_err(|errno| FuseError::BadName { opcode, errno })
    }

    /// A NUL-terminated extended attribute name: 1 to
    /// [`XATTR_NAME_MAX`] bytes.
    fn xattr_name(&mut self) -> Result<&'a [u8], FuseError> {
        let opcode = self.opcode;
        let s = self.cstr()?;
        match s.len() {
            0 => Err(FuseError::BadName {
                opcode,
                errno: Errno::INVAL,
            }),
            n if n > XATTR_NAME_MAX => Err(FuseError::BadName {
                opcode,
                errno: Errno::RANGE,
            }),
            _ => Ok(s),
        }
    }

    fn setattr(&mut self) -> Result<SetAttr, FuseError> {
        let valid = self.u32()?;
        self.u32()?;
        let fh = self.u64()?;
        let size = self.u64()?;
        self.u64()?; // lock_owner
        let atime = self.u64()?;
        let mtime = self.u64()?;
        self.u64()?; // ctime
        let atimensec = self.u32()?;
        let mtimensec = self.u32()?;
        self.u32()?; // ctimensec
        let mode = self.u32()?;
        self.u32()?;
        let uid = self.u32()?;
        let gid = self.u32()?;
        self.u32()?;
        let has = |bit: u32| valid & bit != 0;
        let time = |now: u32, set: u32, secs: u64, nsecs: u32| {
            if has(now) {
                Some(SetTime::Now)
            } else if has(set) {
                Some(SetTime::At { secs, nsecs })
            } else {
                None
            }
        };
        Ok(SetAttr {
            handle: has(fattr::FH).then_some(fh),
            mode: has(fattr::MODE).then_some(mode),
            uid: has(fattr::UID).then_some(uid),
            gid: has(fattr::GID).then_some(gid),
            size: has(fattr::SIZE).then_some(size),
            atime: time(fattr::ATIME_NOW, fattr::ATIME, atime, atimensec),
            mtime: time(fattr::MTIME_NOW, fattr::MTIME, mtime, mtimensec),
            kill_suidgid: has(fattr::KILL_SUIDGID),
        })
    }

    /// Nothing may be left.
    fn end(&self) -> Result<(), FuseError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(FuseError::TrailingBytes {
                opcode: self.opcode,
                extra: self.rest.len(),
            })
        }
    }
}

/// Little-endian writes into a slice at least as long as what is written;
/// writes past its end are dropped (callers size it exactly).
pub(crate) struct Out<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl<'a> Out<'a> {
    /// A writer at the start of `out`.
    pub(crate) fn new(out: &'a mut [u8]) -> Self {
        Out { out, at: 0 }
    }

    fn bytes(&mut self, b: &[u8]) {
        let end = self.at.saturating_add(b.len());
        if let Some(dst) = self.out.get_mut(self.at..end) {
            dst.copy_from_slice(b);
        }
        self.at = end;
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    /// The sub-slice of the next `n` bytes (empty if it does not fit).
    fn next(&mut self, n: usize) -> &mut [u8] {
        let start = self.at;
        self.at = start.saturating_add(n);
        self.out.get_mut(start..self.at).unwrap_or_default()
    }
}

/// Writes `fuse_out_header` into `out` (16 bytes).
pub fn write_out_header(out: &mut [u8], len: u32, error: i32, unique: u64) {
    let mut w = Out::new(out);
    w.u32(len);
    w.u32(error as u32);
    w.u64(unique);
}

/// `fuse_init_out`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitOut {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Readahead limit.
    pub max_readahead: u32,
    /// Capabilities taken.
    pub flags: u32,
    /// Most requests in the background (0: the driver's default).
    pub max_background: u16,
    /// Background requests that mark congestion (0: the default).
    pub congestion_threshold: u16,
    /// Largest WRITE.
    pub max_write: u32,
    /// Timestamp granularity in nanoseconds.
    pub time_gran: u32,
    /// Most pages per request (with `FUSE_MAX_PAGES`).
    pub max_pages: u16,
}

impl InitOut {
    /// Writes it into `out` ([`INIT_OUT_SIZE`] bytes).
    pub fn write(&self, out: &mut [u8]) {
        let out = out.get_mut(..INIT_OUT_SIZE).unwrap_or_default();
        out.fill(0);
        let mut w = Out::new(out);
        w.u32(self.major);
        w.u32(self.minor);
        w.u32(self.max_readahead);
        w.u32(self.flags);
        w.u16(self.max_background);
        w.u16(self.congestion_threshold);
        w.u32(self.max_write);
        w.u32(self.time_gran);
        w.u16(self.max_pages);
        // map_alignment, flags2, unused: zero.
    }
}

/// Writes `fuse_attr_out` into `out` ([`ATTR_OUT_SIZE`] bytes).
pub fn write_attr_out(out: &mut [u8], attr: &Attr, valid: core::time::Duration) {
    let mut w = Out::new(out);
    w.u64(valid.as_secs());
    w.u32(valid.subsec_nanos());
    w.u32(0);
    let a = w.next(ATTR_SIZE);
    if a.len() == ATTR_SIZE {
        write_attr(a, attr);
    }
}

/// Writes `fuse_entry_out` into `out` (128 bytes).
pub fn write_entry(out: &mut [u8], entry: &Entry) {
    if let Some(e) = out.get_mut(..ENTRY_OUT_SIZE) {
        write_entry_out(e, entry);
    }
}

/// Writes `fuse_open_out` into `out` ([`OPEN_OUT_SIZE`] bytes).
pub fn write_open_out(out: &mut [u8], opened: &Opened) {
    let mut w = Out::new(out);
    w.u64(opened.handle);
    w.u32(opened.flags);
    w.u32(0);
}

/// Writes `fuse_statfs_out` into `out` ([`STATFS_OUT_SIZE`] bytes).
pub fn write_statfs_out(out: &mut [u8], s: &StatFs) {
    let out = out.get_mut(..STATFS_OUT_SIZE).unwrap_or_default();
    out.fill(0);
    let mut w = Out::new(out);
    w.u64(s.blocks);
    w.u64(s.bfree);
    w.u64(s.bavail);
    w.u64(s.files);
    w.u64(s.ffree);
    w.u32(s.bsize);
    w.u32(s.namelen);
    w.u32(s.frsize);
    // padding, spare: zero.
}

/// Writes a `u32` and 4 bytes of padding (`fuse_write_out`,
/// `fuse_getxattr_out`) into `out`.
pub fn write_u32_out(out: &mut [u8], v: u32) {
    let mut w = Out::new(out);
    w.u32(v);
    w.u32(0);
}

/// Writes a `u64` (`fuse_lseek_out`) into `out`.
pub fn write_u64_out(out: &mut [u8], v: u64) {
    Out::new(out).u64(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = InHeader {
            len: 52,
            opcode: opcode::LOOKUP,
            unique: 9,
            nodeid: 1,
            uid: 1000,
            gid: 100,
            pid: 42,
            total_extlen: 0,
        };
        assert_eq!(InHeader::parse(&h.to_bytes()), Ok(h));
        assert_eq!(
            InHeader::parse(&[0; 39]),
            Err(FuseError::HeaderTooShort { len: 39 })
        );
    }

    #[test]
    fn names_need_their_nul_and_nothing_after() {
        assert!(matches!(
            parse_request(opcode::LOOKUP, b"abc\0"),
            Ok(Request::Lookup { name }) if name.as_bytes() == b"abc"
        ));
        assert_eq!(
            parse_request(opcode::LOOKUP, b"abc"),
            Err(FuseError::MissingNul {
                opcode: opcode::LOOKUP
            })
        );
        assert!(matches!(
            parse_request(opcode::LOOKUP, b"abc\0d"),
            Err(FuseError::TrailingBytes { extra: 1, .. })
        ));
        for bad in [&b"..\0"[..], b".\0", b"a/b\0", b"\0"] {
            assert_eq!(
                parse_request(opcode::UNLINK, bad).map_err(|e| e.errno()),
                Err(Errno::INVAL),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn two_names_and_symlinks() {
        let mut args = [0u8; 8].to_vec();
        args[0] = 5;
        args.extend_from_slice(b"a\0b\0");
        assert!(matches!(
            parse_request(opcode::RENAME, &args),
            Ok(Request::Rename { new_parent: 5, flags: 0, name, new_name })
                if name.as_bytes() == b"a" && new_name.as_bytes() == b"b"
        ));
        assert!(matches!(
            parse_request(opcode::SYMLINK, b"l\0/etc/../x\0"),
            Ok(Request::Symlink {
                target: b"/etc/../x",
                ..
            })
        ));
        assert!(parse_request(opcode::SYMLINK, b"l\0").is_err());
    }

    #[test]
    fn write_data_must_match_its_size() {
        let mut args = [0u8; 40].to_vec();
        args[16..20].copy_from_slice(&3u32.to_le_bytes());
        args.extend_from_slice(b"xyz");
        assert!(matches!(
            parse_request(opcode::WRITE, &args),
            Ok(Request::Write { data: b"xyz", .. })
        ));
        args.push(0);
        assert_eq!(
            parse_request(opcode::WRITE, &args),
            Err(FuseError::WriteSizeMismatch { size: 3, data: 4 })
        );
    }

    #[test]
    fn setattr_maps_valid_bits() {
        let mut args = [0u8; 88];
        let valid = fattr::SIZE | fattr::MTIME | fattr::MTIME_NOW | fattr::ATIME | fattr::CTIME;
        args[0..4].copy_from_slice(&valid.to_le_bytes());
        args[16..24].copy_from_slice(&77u64.to_le_bytes());
        args[32..40].copy_from_slice(&5u64.to_le_bytes());
        args[56..60].copy_from_slice(&6u32.to_le_bytes());
        let Ok(Request::Setattr { attr }) = parse_request(opcode::SETATTR, &args) else {
            panic!("setattr did not parse");
        };
        assert_eq!(attr.size, Some(77));
        assert_eq!(attr.atime, Some(SetTime::At { secs: 5, nsecs: 6 }));
        assert_eq!(attr.mtime, Some(SetTime::Now));
        assert_eq!(
            (attr.mode, attr.handle, attr.kill_suidgid),
            (None, None, false)
        );
        assert!(parse_request(opcode::SETATTR, &args[..87]).is_err());
    }

    #[test]
    fn batch_forget_count_must_match() {
        let mut args = [0u8; 8 + 32];
        args[0] = 2;
        args[8] = 7;
        args[16] = 1;
        args[24] = 8;
        args[32] = 3;
        let Ok(Request::BatchForget { forgets }) = parse_request(opcode::BATCH_FORGET, &args)
        else {
            panic!("batch forget did not parse");
        };
        assert_eq!(
            forgets.iter().collect::<std::vec::Vec<_>>(),
            [(7, 1), (8, 3)]
        );
        args[0] = 3;
        assert!(parse_request(opcode::BATCH_FORGET, &args).is_err());
    }

    #[test]
    fn unknown_opcodes_are_unsupported() {
        for op in [
            opcode::GETLK,
            opcode::IOCTL,
            opcode::TMPFILE,
            0,
            4096,
            u32::MAX,
        ] {
            assert_eq!(
                parse_request(op, b"whatever"),
                Ok(Request::Unsupported { opcode: op })
            );
        }
    }
}
