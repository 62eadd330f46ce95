//! The contract between the virtio-fs device and the host's file system:
//! [`FileSystem`], the typed operations the device calls once it has parsed
//! and checked a FUSE request, and the values they return.
//!
//! The device owns every byte the guest sends or receives: it parses the
//! request, validates names ([`Name`]), bounds buffers, and serializes the
//! reply. The host implements only the file system (the shim's passthrough
//! backend over a shared directory). A method's `Err(Errno)` becomes the
//! reply's error; `Errno::NOSYS` tells the guest kernel to stop asking.
//!
//! Everything here is `no_std` and allocation-free.

use core::time::Duration;

/// A FUSE node id. The device never interprets it except
/// [`ROOT_INODE`]; the backend hands them out in [`Entry::inode`] and is
/// told to drop them with [`FileSystem::forget`].
pub type Inode = u64;

/// A file or directory handle the backend handed out in [`Opened`].
pub type Handle = u64;

/// The node id of the shared directory itself.
pub const ROOT_INODE: Inode = 1;

/// Longest file name the device accepts (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// A positive Linux error number; the reply carries its negation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// Operation not permitted.
    pub const PERM: Errno = Errno(1);
    /// No such file or directory.
    pub const NOENT: Errno = Errno(2);
    /// I/O error.
    pub const IO: Errno = Errno(5);
    /// Bad file handle.
    pub const BADF: Errno = Errno(9);
    /// Permission denied.
    pub const ACCES: Errno = Errno(13);
    /// Cross-device link (a rename or link out of the share).
    pub const XDEV: Errno = Errno(18);
    /// Invalid argument.
    pub const INVAL: Errno = Errno(22);
    /// Result too large for the buffer given.
    pub const RANGE: Errno = Errno(34);
    /// File name too long.
    pub const NAMETOOLONG: Errno = Errno(36);
    /// Operation not implemented: the guest kernel falls back.
    pub const NOSYS: Errno = Errno(38);
    /// No data (no such extended attribute).
    pub const NODATA: Errno = Errno(61);
    /// Protocol error (a malformed request).
    pub const PROTO: Errno = Errno(71);
    /// Operation not supported.
    pub const OPNOTSUPP: Errno = Errno(95);
}

/// Who asks: the caller's ids from the FUSE request header, as the guest
/// kernel saw them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// The caller's file-system user id.
    pub uid: u32,
    /// The caller's file-system group id.
    pub gid: u32,
    /// The caller's thread group id (in the guest).
    pub pid: u32,
}

/// A validated file name: 1 to [`NAME_MAX`] bytes, no `/`, no NUL, and
/// neither `.` nor `..`. The device builds them; a backend can join one to
/// a directory it holds without resolving anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Name<'a>(&'a [u8]);

impl<'a> Name<'a> {
    /// Checks `bytes` (without its NUL terminator).
    pub fn new(bytes: &'a [u8]) -> Result<Name<'a>, Errno> {
        if bytes.is_empty() || bytes == b"." || bytes == b".." {
            return Err(Errno::INVAL);
        }
        if bytes.len() > NAME_MAX {
            return Err(Errno::NAMETOOLONG);
        }
        if bytes.iter().any(|&b| b == b'/' || b == 0) {
            return Err(Errno::INVAL);
        }
        Ok(Name(bytes))
    }

    /// The name's bytes, without a NUL.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }
}

/// A file's attributes as the guest sees them (FUSE `fuse_attr`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attr {
    /// Inode number (the host's `st_ino`; informational).
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Last access, seconds since the epoch.
    pub atime: u64,
    /// Last modification, seconds.
    pub mtime: u64,
    /// Last status change, seconds.
    pub ctime: u64,
    /// Nanoseconds of `atime`.
    pub atime_nsec: u32,
    /// Nanoseconds of `mtime`.
    pub mtime_nsec: u32,
    /// Nanoseconds of `ctime`.
    pub ctime_nsec: u32,
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of a device node.
    pub rdev: u32,
    /// Preferred I/O block size.
    pub blksize: u32,
}

/// A looked-up (or created) node: the guest kernel takes one reference to
/// `inode`, which it later drops with [`FileSystem::forget`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// The node id; 0 means "no such entry, cache that" (a negative entry,
    /// which takes no reference).
    pub inode: Inode,
    /// Generation of the node id (bumped when an id is reused).
    pub generation: u64,
    /// The node's attributes.
    pub attr: Attr,
    /// How long the guest may cache the name.
    pub entry_timeout: Duration,
    /// How long the guest may cache the attributes.
    pub attr_timeout: Duration,
}

/// An opened file or directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// The handle later requests name.
    pub handle: Handle,
    /// FUSE `FOPEN_*` flags for the guest (e.g. [`Opened::KEEP_CACHE`]).
    pub flags: u32,
}

impl Opened {
    /// `FOPEN_DIRECT_IO`: bypass the guest's page cache.
    pub const DIRECT_IO: u32 = 1 << 0;
    /// `FOPEN_KEEP_CACHE`: keep the guest's cached pages.
    pub const KEEP_CACHE: u32 = 1 << 1;
    /// `FOPEN_CACHE_DIR`: let the guest cache the directory's entries.
    pub const CACHE_DIR: u32 = 1 << 3;
}

/// A time to set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    /// The host's current time.
    Now,
    /// This time.
    At {
        /// Seconds since the epoch.
        secs: u64,
        /// Nanoseconds.
        nsecs: u32,
    },
}

/// What a SETATTR changes; `None` leaves a field as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// The open handle the request came through, if any.
    pub handle: Option<Handle>,
    /// New permission bits (the file-type bits are ignored).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate or extend).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<SetTime>,
    /// New modification time.
    pub mtime: Option<SetTime>,
    /// Clear set-user-ID/set-group-ID bits (`FATTR_KILL_SUIDGID`).
    pub kill_suidgid: bool,
}

/// File-system statistics (FUSE `fuse_kstatfs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatFs {
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Free blocks for unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

/// One directory entry for [`DirSink`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntry<'a> {
    /// The entry's inode number (the host's `d_ino`; informational).
    pub ino: u64,
    /// The offset cookie of the *next* entry: the guest passes it back as
    /// the READDIR offset to continue after this one.
    pub offset: u64,
    /// The file type, as `d_type` (`DT_DIR`, `DT_REG`, ...).
    pub kind: u32,
    /// The name; `.` and `..` are allowed here (and only here).
    pub name: &'a [u8],
}

/// Where a backend puts the entries of a READDIR or READDIRPLUS reply.
///
/// It writes FUSE `fuse_dirent`s (or `fuse_direntplus`es) into the reply
/// buffer until it is full. A READDIRPLUS backend asks [`Self::room_for`]
/// before it looks an entry up, so an entry whose reference it took always
/// fits; [`Self::add_plus`] after a `true` from `room_for` for the same
/// name length cannot fail.
pub struct DirSink<'a> {
    buf: &'a mut [u8],
    used: usize,
    plus: bool,
}

/// `fuse_dirent` without its name: ino, off, namelen, type.
const DIRENT_SIZE: usize = 24;
/// `fuse_entry_out`.
pub(crate) const ENTRY_OUT_SIZE: usize = 40 + ATTR_SIZE;
/// `fuse_attr`.
pub(crate) const ATTR_SIZE: usize = 88;

impl<'a> DirSink<'a> {
    /// A sink writing into `buf`; `plus` for READDIRPLUS.
    pub fn new(buf: &'a mut [u8], plus: bool) -> Self {
        DirSink { buf, used: 0, plus }
    }

    /// Whether this is a READDIRPLUS (entries need [`Self::add_plus`]).
    pub fn is_plus(&self) -> bool {
        self.plus
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.used
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Bytes one entry with a name of `name_len` takes, padded to 8.
    fn entry_size(&self, name_len: usize) -> usize {
        let base = if self.plus { ENTRY_OUT_SIZE } else { 0 } + DIRENT_SIZE + name_len;
        (base + 7) & !7
    }

    /// Whether an entry with a name of `name_len` bytes still fits.
    pub fn room_for(&self, name_len: usize) -> bool {
        name_len <= NAME_MAX && self.buf.len() - self.used >= self.entry_size(name_len)
    }

    /// Adds a READDIR entry; `false` (nothing written) when it does not
    /// fit or the sink is a READDIRPLUS one.
    pub fn add(&mut self, e: &DirEntry<'_>) -> bool {
        if self.plus || !self.room_for(e.name.len()) {
            return false;
        }
        let size = self.entry_size(e.name.len());
        let out = &mut self.buf[self.used..self.used + size];
        write_dirent(out, e);
        self.used += size;
        true
    }

    /// Adds a READDIRPLUS entry with its lookup (`entry.inode` 0 for `.`
    /// and `..`, which take no reference); `false` (nothing written) when
    /// it does not fit or the sink is a READDIR one.
    pub fn add_plus(&mut self, e: &DirEntry<'_>, entry: &Entry) -> bool {
        if !self.plus || !self.room_for(e.name.len()) {
            return false;
        }
        let size = self.entry_size(e.name.len());
        let out = &mut self.buf[self.used..self.used + size];
        let (head, rest) = out.split_at_mut(ENTRY_OUT_SIZE);
        write_entry_out(head, entry);
        write_dirent(rest, e);
        self.used += size;
        true
    }
}

/// Writes `fuse_dirent` plus name and zero padding into `out` (exactly
/// the padded size).
fn write_dirent(out: &mut [u8], e: &DirEntry<'_>) {
    out.fill(0);
    out[0..8].copy_from_slice(&e.ino.to_le_bytes());
    out[8..16].copy_from_slice(&e.offset.to_le_bytes());
    // The name is at most NAME_MAX bytes (room_for checked).
    out[16..20].copy_from_slice(&(e.name.len() as u32).to_le_bytes());
    out[20..24].copy_from_slice(&e.kind.to_le_bytes());
    out[DIRENT_SIZE..DIRENT_SIZE + e.name.len()].copy_from_slice(e.name);
}

/// Writes `fuse_attr` into `out` (exactly [`ATTR_SIZE`] bytes).
pub(crate) fn write_attr(out: &mut [u8], a: &Attr) {
    let mut w = Writer { out, at: 0 };
    w.u64(a.ino);
    w.u64(a.size);
    w.u64(a.blocks);
    w.u64(a.atime);
    w.u64(a.mtime);
    w.u64(a.ctime);
    w.u32(a.atime_nsec);
    w.u32(a.mtime_nsec);
    w.u32(a.ctime_nsec);
    w.u32(a.mode);
    w.u32(a.nlink);
    w.u32(a.uid);
    w.u32(a.gid);
    w.u32(a.rdev);
    w.u32(a.blksize);
    w.u32(0); // flags
}

/// Writes `fuse_entry_out` into `out` (exactly [`ENTRY_OUT_SIZE`] bytes).
pub(crate) fn write_entry_out(out: &mut [u8], e: &Entry) {
    let (head, attr) = out.split_at_mut(40);
    let mut w = Writer { out: head, at: 0 };
    w.u64(e.inode);
    w.u64(e.generation);
    w.u64(e.entry_timeout.as_secs());
    w.u64(e.attr_timeout.as_secs());
    w.u32(e.entry_timeout.subsec_nanos());
    w.u32(e.attr_timeout.subsec_nanos());
    write_attr(attr, &e.attr);
}

/// Little-endian writes into a slice the caller sized exactly.
struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn u64(&mut self, v: u64) {
        self.out[self.at..self.at + 8].copy_from_slice(&v.to_le_bytes());
        self.at += 8;
    }
    fn u32(&mut self, v: u32) {
        self.out[self.at..self.at + 4].copy_from_slice(&v.to_le_bytes());
        self.at += 4;
    }
}

/// The host's file system behind a virtio-fs device.
///
/// The device calls these on its own thread, one request at a time, after
/// it parsed and checked the request; every name is a [`Name`]. Node ids
/// and handles are the backend's: the device passes back whatever the
/// guest names, so a backend must treat an unknown id as `Errno::BADF` (or
/// `NOENT`), never trust it. Nothing here may panic on any input.
///
/// Buffers: `buf` arguments are the device's reply buffer, already capped
/// at what the guest asked for and what the reply can carry.
pub trait FileSystem {
    /// INIT: the session starts (or restarts: drop every node and handle
    /// but the root).
    fn init(&mut self) -> Result<(), Errno>;

    /// DESTROY: the session ends; drop every node and handle but the root.
    fn destroy(&mut self);

    /// LOOKUP `name` in directory `parent`.
    fn lookup(&mut self, ctx: &Context, parent: Inode, name: Name<'_>) -> Result<Entry, Errno>;

    /// FORGET / BATCH_FORGET: the guest drops `count` references to `inode`.
    fn forget(&mut self, inode: Inode, count: u64);

    /// GETATTR, through `handle` when the guest named one. Returns the
    /// attributes and how long the guest may cache them.
    fn getattr(
        &mut self,
        ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> Result<(Attr, Duration), Errno>;

    /// SETATTR: changes what `attr` names, returns the new attributes.
    fn setattr(
        &mut self,
        ctx: &Context,
        inode: Inode,
        attr: &SetAttr,
    ) -> Result<(Attr, Duration), Errno>;

    /// READLINK into `buf`; returns the target's length. A target longer
    /// than `buf` is `Errno::NAMETOOLONG`.
    fn readlink(&mut self, ctx: &Context, inode: Inode, buf: &mut [u8]) -> Result<usize, Errno>;

    /// SYMLINK: `parent/name` → `target` (any bytes but NUL, not resolved).
    fn symlink(
        &mut self,
        ctx: &Context,
        parent: Inode,
        name: Name<'_>,
        target: &[u8],
    ) -> Result<Entry, Errno>;

    /// MKNOD (regular files, FIFOs, sockets, device nodes).
    fn mknod(
        &mut self,
        ctx: &Context,
        parent: Inode,
        name: Name<'_>,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> Result<Entry, Errno>;

    /// MKDIR.
    fn mkdir(
        &mut self,
        ctx: &Context,
        parent: Inode,
        name: Name<'_>,
        mode: u32,
        umask: u32,
    ) -> Result<Entry, Errno>;

    /// UNLINK.
    fn unlink(&mut self, ctx: &Context, parent: Inode, name: Name<'_>) -> Result<(), Errno>;

    /// RMDIR.
    fn rmdir(&mut self, ctx: &Context, parent: Inode, name: Name<'_>) -> Result<(), Errno>;

    /// RENAME / RENAME2 (`flags`: `RENAME_NOREPLACE`, `RENAME_EXCHANGE`,
    /// `RENAME_WHITEOUT`; 0 for RENAME).
    fn rename(
        &mut self,
        ctx: &Context,
        parent: Inode,
        name: Name<'_>,
        new_parent: Inode,
        new_name: Name<'_>,
        flags: u32,
    ) -> Result<(), Errno>;

    /// LINK: a new name `new_parent/new_name` for `inode`.
    fn link(
        &mut self,
        ctx: &Context,
        inode: Inode,
        new_parent: Inode,
        new_name: Name<'_>,
    ) -> Result<Entry, Errno>;

    /// OPEN with the guest's `open(2)` flags.
    fn open(&mut self, ctx: &Context, inode: Inode, flags: u32) -> Result<Opened, Errno>;

    /// READ up to `buf.len()` bytes at `offset`; returns how many (0 at
    /// the end of the file).
    fn read(
        &mut self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Errno>;

    /// WRITE `data` at `offset`; returns how many bytes were written.
    /// `kill_priv`: clear set-user-ID/set-group-ID bits
    /// (`FUSE_WRITE_KILL_SUIDGID`).
    fn write(
        &mut self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        data: &[u8],
        kill_priv: bool,
    ) -> Result<usize, Errno>;

    /// STATFS of the file system holding `inode`.
    fn statfs(&mut self, ctx: &Context, inode: Inode) -> Result<StatFs, Errno>;

    /// RELEASE: the last reference to an open file is gone.
    fn release(&mut self, ctx: &Context, inode: Inode, handle: Handle) -> Result<(), Errno>;

    /// FSYNC (`datasync`: data only).
    fn fsync(
        &mut self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        datasync: bool,
    ) -> Result<(), Errno>;

    /// FLUSH: a `close(2)` of one descriptor of an open file.
    fn flush(&mut self, ctx: &Context, inode: Inode, handle: Handle) -> Result<(), Errno>;

    /// SETXATTR (`flags`: `XATTR_CREATE`, `XATTR_REPLACE`).
    fn setxattr(
        &mut self,
        ctx: &Context,
        inode: Inode,
        name: &[u8],
        value: &[u8],
        flags: u32,
    ) -> Result<(), Errno>;

    /// GETXATTR into `buf`; returns the value's length. With an empty
    /// `buf` it only returns the length; a value longer than a non-empty
    /// `buf` is `Errno::RANGE`.
    fn getxattr(
        &mut self,
        ctx: &Context,
        inode: Inode,
        name: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, Errno>;

    /// LISTXATTR (NUL-separated names) into `buf`, as [`Self::getxattr`].
    fn listxattr(&mut self, ctx: &Context, inode: Inode, buf: &mut [u8]) -> Result<usize, Errno>;

    /// REMOVEXATTR.
    fn removexattr(&mut self, ctx: &Context, inode: Inode, name: &[u8]) -> Result<(), Errno>;

    /// OPENDIR.
    fn opendir(&mut self, ctx: &Context, inode: Inode, flags: u32) -> Result<Opened, Errno>;

    /// READDIR (or, when [`DirSink::is_plus`], READDIRPLUS) from the
    /// entry after the one whose cookie is `offset` (0: from the start),
    /// until the sink is full or the directory ends.
    fn readdir(
        &mut self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        sink: &mut DirSink<'_>,
    ) -> Result<(), Errno>;

    /// RELEASEDIR.
    fn releasedir(&mut self, ctx: &Context, inode: Inode, handle: Handle) -> Result<(), Errno>;

    /// FSYNCDIR.
    fn fsyncdir(
        &mut self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        datasync: bool,
    ) -> Result<(), Errno>;

    /// ACCESS (`mask`: `R_OK | W_OK | X_OK`, or `F_OK`).
    fn access(&mut self, ctx: &Context, inode: Inode, mask: u32) -> Result<(), Errno>;

    /// CREATE and open a regular file.
    fn create(
        &mut self,
        ctx: &Context,
        parent: Inode,
        name: Name<'_>,
        mode: u32,
        flags: u32,
        umask: u32,
    ) -> Result<(Entry, Opened), Errno>;

    /// FALLOCATE (`mode`: `fallocate(2)` flags).
    fn fallocate(
        &mut self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        length: u64,
        mode: u32,
    ) -> Result<(), Errno>;

    /// LSEEK (`whence`: `SEEK_DATA`, `SEEK_HOLE`, ...); returns the new
    /// offset.
    fn lseek(
        &mut self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> Result<u64, Errno>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert_eq!(Name::new(b"a").map(|n| n.as_bytes()), Ok(&b"a"[..]));
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
            assert!(Name::new(bad).is_err(), "{bad:?}");
        }
        let long = [b'x'; NAME_MAX + 1];
        assert_eq!(Name::new(&long), Err(Errno::NAMETOOLONG));
        assert!(Name::new(&long[..NAME_MAX]).is_ok());
        assert!(Name::new(b"...").is_ok());
    }

    #[test]
    fn dirents_are_padded_and_bounded() {
        let mut buf = [0xffu8; 64];
        let mut sink = DirSink::new(&mut buf, false);
        let e = DirEntry {
            ino: 7,
            offset: 1,
            kind: 4,
            name: b"abc",
        };
        assert!(sink.add(&e));
        assert_eq!(sink.len(), 32);
        assert!(sink.add(&e));
        assert_eq!(sink.len(), 64);
        assert!(!sink.room_for(1));
        assert!(!sink.add(&e));
        assert!(!sink.add_plus(&e, &Entry::default()));
        assert_eq!(&buf[0..8], &7u64.to_le_bytes());
        assert_eq!(&buf[16..20], &3u32.to_le_bytes());
        assert_eq!(&buf[24..27], b"abc");
        assert_eq!(&buf[27..32], &[0; 5]);
    }

    #[test]
    fn direntplus_carries_the_entry() {
        let mut buf = [0u8; 256];
        let mut sink = DirSink::new(&mut buf, true);
        let entry = Entry {
            inode: 42,
            attr: Attr {
                mode: 0o40755,
                ..Attr::default()
            },
            entry_timeout: Duration::from_millis(1500),
            ..Entry::default()
        };
        let e = DirEntry {
            ino: 9,
            offset: 3,
            kind: 4,
            name: b"d",
        };
        assert!(!sink.add(&e));
        assert!(sink.add_plus(&e, &entry));
        assert_eq!(sink.len(), (ENTRY_OUT_SIZE + DIRENT_SIZE + 1 + 7) & !7);
        assert_eq!(&buf[0..8], &42u64.to_le_bytes());
        assert_eq!(&buf[16..24], &1u64.to_le_bytes());
        assert_eq!(&buf[32..36], &500_000_000u32.to_le_bytes());
        // fuse_attr.mode sits 60 bytes into the attr.
        assert_eq!(&buf[40 + 60..40 + 64], &0o40755u32.to_le_bytes());
        assert_eq!(
            &buf[ENTRY_OUT_SIZE..ENTRY_OUT_SIZE + 8],
            &9u64.to_le_bytes()
        );
    }
}
