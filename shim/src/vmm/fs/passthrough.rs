//! [`Passthrough`]: the guest sees a host directory as it is.
//!
//! # Confinement
//!
//! [`Passthrough::new`] opens everything the backend will ever need while
//! the host's tree is still visible: the shared directory as an `O_PATH`
//! descriptor (node [`ROOT_INODE`]) and `/proc/self/fd` as a directory
//! descriptor. After that it resolves no host path but the share's own,
//! once per FUSE INIT (a jailed VMM's view of the share, which sees the
//! binds made under it later; see `init`), so it keeps working once the
//! VMM pivots or chroots away, and a guest cannot name anything outside
//! the share:
//!
//! - Every node the guest holds is an `O_PATH | O_NOFOLLOW` descriptor the
//!   backend opened; every operation is an `*at` call relative to such a
//!   descriptor with one [`Name`] (one component, never `.` or `..`), with
//!   `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW`. A symlink in the share is a node
//!   of its own: it is created and read, never followed, and using it as a
//!   directory fails (`ENOTDIR`).
//! - A node is opened for real I/O by re-opening its descriptor through
//!   `/proc/self/fd/<n>` (`openat(proc_self_fd, "<n>", flags)`), which
//!   names exactly the inode the descriptor holds, whatever was renamed
//!   meanwhile. Only regular files (`open`, `create`) and directories
//!   (`opendir`) are ever opened: a device node, FIFO or socket in the
//!   share is never opened by the VMM (the guest kernel serves those
//!   itself).
//! - A hard link can only be made to a node the backend handed out.
//! - Extended attributes go through a read-only re-open of a regular file
//!   or directory (`f*xattr`); on anything else they are `EOPNOTSUPP`.
//!   The guest may set any namespace the host lets root set (`trusted.*`,
//!   `security.*`): no mapping is done.
//!
//! # Nodes and handles
//!
//! Node ids are allocated here: monotonic, never reused, the root is
//! [`ROOT_INODE`]. A second lookup of the same host file (same `st_dev`,
//! `st_ino`) returns the same id with one more reference; [`forget`]
//! drops references and, at zero, the node and its descriptor (never the
//! root's). Holding the descriptor keeps the host inode alive, so its
//! `(st_dev, st_ino)` cannot be reused while the node exists. Open files
//! and directories are handles with monotonic ids. An unknown node id or
//! handle is `EBADF`.
//!
//! # Credentials
//!
//! Operations that create a file (create, mknod, mkdir, symlink, link) run
//! with the caller's fsuid and fsgid from the request's [`Context`], so the
//! new file belongs to the guest's user and the host checks the caller's
//! write permission on the directory. They are set with the raw
//! `setfsgid`/`setfsuid` system calls, which change the calling thread's
//! credentials only (glibc's wrappers would change every thread's), and
//! restored when the operation ends (a guard, also on errors). When the
//! process may not switch ids (no `CAP_SETUID`/`CAP_SETGID`, probed in
//! [`Passthrough::new`]) files are created as the VMM's own user.
//!
//! The guest's umask is applied here (`mode & !umask`): the device does
//! not negotiate `FUSE_DONT_MASK`. The process's own umask also applies at
//! creation; if it stripped permission bits the guest asked for, they are
//! put back with a `chmod` of the new node.
//!
//! # Errors
//!
//! A host error is the guest's error: Linux error numbers are the same on
//! both sides ([`Errno`]`(errno)`).
//!
//! [`forget`]: FileSystem::forget

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libc::c_int;
use vmm_core::devices::fs::{
    Attr, Context, DirEntry, DirSink, Entry, Errno, FileSystem, Handle, Inode, Name, Opened,
    SetAttr, SetTime, StatFs, ROOT_INODE,
};

/// The system calls [`Passthrough`] makes after [`Passthrough::new`] (as
/// `libc::SYS_<name>` on x86_64; the seccomp filter of the device thread
/// needs all of them). `fcntl` is only `F_DUPFD_CLOEXEC` (flush);
/// `newfstatat` is glibc's `fstatat` (checked with `strace` on glibc 2.3x,
/// x86_64); `close` also drops nodes and handles. Memory allocation
/// (`brk`/`mmap`/`munmap`) is not listed.
pub const SYSCALLS: &[&str] = &[
    "openat",
    "close",
    "newfstatat",
    "fstatfs",
    "readlinkat",
    "symlinkat",
    "mknodat",
    "mkdirat",
    "unlinkat",
    "renameat2",
    "linkat",
    "fchmod",
    "fchmodat",
    "fchownat",
    "ftruncate",
    "utimensat",
    "pread64",
    "pwrite64",
    "lseek",
    "getdents64",
    "fsync",
    "fdatasync",
    "fallocate",
    "fcntl",
    "fgetxattr",
    "fsetxattr",
    "flistxattr",
    "fremovexattr",
    "setfsuid",
    "setfsgid",
];

/// How long the guest may cache what it learned, and how it opens files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Cache nothing: names and attributes expire at once, and files are
    /// opened with `FOPEN_DIRECT_IO` (no guest page cache). For a share
    /// that the host changes under the guest.
    None,
    /// Names and attributes for a second; the guest's page cache as the
    /// guest kernel decides.
    #[default]
    Auto,
    /// Names and attributes for a day, files keep their cached pages
    /// (`FOPEN_KEEP_CACHE`) and directories their entries
    /// (`FOPEN_CACHE_DIR`). For a share only the guest changes.
    Always,
}

impl CacheMode {
    /// The entry and attribute timeout.
    fn timeout(self) -> Duration {
        match self {
            CacheMode::None => Duration::ZERO,
            CacheMode::Auto => Duration::from_secs(1),
            CacheMode::Always => Duration::from_secs(24 * 60 * 60),
        }
    }

    /// `FOPEN_*` flags of an opened file.
    fn file_flags(self) -> u32 {
        match self {
            CacheMode::None => Opened::DIRECT_IO,
            CacheMode::Auto => 0,
            CacheMode::Always => Opened::KEEP_CACHE,
        }
    }

    /// `FOPEN_*` flags of an opened directory.
    fn dir_flags(self) -> u32 {
        match self {
            CacheMode::None | CacheMode::Auto => 0,
            CacheMode::Always => Opened::CACHE_DIR,
        }
    }
}

/// Why a [`Passthrough`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    /// The shared directory could not be opened (or is not a directory).
    #[error("cannot open the shared directory {path}")]
    OpenRoot {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The shared directory's path holds a NUL byte.
    #[error("the shared directory's path {path:?} holds a NUL byte")]
    NulInPath {
        /// The path.
        path: PathBuf,
    },
    /// The shared directory could not be examined.
    #[error("cannot stat the shared directory {path}")]
    StatRoot {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `/proc/self/fd` could not be opened, or is not procfs.
    #[error("cannot open /proc/self/fd (is /proc mounted?)")]
    OpenProc(#[source] io::Error),
}

/// A node the guest holds.
struct Node {
    /// `O_PATH | O_NOFOLLOW`.
    fd: OwnedFd,
    /// The host's `(st_dev, st_ino)`.
    key: (u64, u64),
    /// The guest's lookup references.
    refs: u64,
    /// The file type (`st_mode & S_IFMT`).
    kind: u32,
}

/// An open file or directory.
struct OpenFile {
    /// Opened with real flags (not `O_PATH`).
    fd: OwnedFd,
    /// The node it was opened from.
    inode: Inode,
}

/// The passthrough file system over one shared host directory; see the
/// [module documentation](self).
pub struct Passthrough {
    /// The shared directory's path, opened again at each INIT.
    root_path: CString,
    /// `/proc/self/fd`, to re-open `O_PATH` descriptors.
    proc_self_fd: OwnedFd,
    nodes: HashMap<Inode, Node>,
    /// `(st_dev, st_ino)` to node id.
    keys: HashMap<(u64, u64), Inode>,
    handles: HashMap<Handle, OpenFile>,
    next_inode: Inode,
    next_handle: Handle,
    cache: CacheMode,
    /// Whether this process may switch its fsuid/fsgid.
    switch_creds: bool,
}

impl std::fmt::Debug for Passthrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passthrough")
            .field("nodes", &self.nodes.len())
            .field("handles", &self.handles.len())
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// `PROC_SUPER_MAGIC`.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

impl Passthrough {
    /// Opens `root` (following symlinks in this host path, which the host
    /// chose) and `/proc/self/fd`. Everything later is relative to these.
    pub fn new(root: &Path, cache: CacheMode) -> Result<Passthrough, PassthroughError> {
        let croot =
            CString::new(root.as_os_str().as_bytes()).map_err(|_| PassthroughError::NulInPath {
                path: root.to_path_buf(),
            })?;
        let root_fd = open_abs(&croot, libc::O_PATH | libc::O_DIRECTORY).map_err(|source| {
            PassthroughError::OpenRoot {
                path: root.to_path_buf(),
                source,
            }
        })?;
        let st = stat_fd(root_fd.as_fd()).map_err(|e| PassthroughError::StatRoot {
            path: root.to_path_buf(),
            source: io::Error::from_raw_os_error(e.0),
        })?;
        let proc_self_fd = open_abs(c"/proc/self/fd", libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(PassthroughError::OpenProc)?;
        let fs_type = statfs_fd(proc_self_fd.as_fd())
            .map_err(|e| PassthroughError::OpenProc(io::Error::from_raw_os_error(e.0)))?
            .f_type;
        #[allow(clippy::unnecessary_cast)] // f_type's type differs between targets.
        if fs_type as i64 != PROC_SUPER_MAGIC {
            return Err(PassthroughError::OpenProc(io::Error::other(
                "/proc/self/fd is not on procfs",
            )));
        }
        let key = (st.st_dev, st.st_ino);
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_INODE,
            Node {
                fd: root_fd,
                key,
                refs: 1,
                kind: st.st_mode & libc::S_IFMT,
            },
        );
        let mut keys = HashMap::new();
        keys.insert(key, ROOT_INODE);
        Ok(Passthrough {
            root_path: croot,
            proc_self_fd,
            nodes,
            keys,
            handles: HashMap::new(),
            next_inode: ROOT_INODE + 1,
            next_handle: 1,
            cache,
            switch_creds: can_switch_creds(),
        })
    }

    /// How many nodes (the root included) and handles are held.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        (self.nodes.len(), self.handles.len())
    }

    fn node(&self, inode: Inode) -> Result<&Node, Errno> {
        self.nodes.get(&inode).ok_or(Errno::BADF)
    }

    fn open_file(&self, inode: Inode, handle: Handle) -> Result<&OpenFile, Errno> {
        match self.handles.get(&handle) {
            Some(f) if f.inode == inode => Ok(f),
            _ => Err(Errno::BADF),
        }
    }

    fn entry(&self, inode: Inode, st: &libc::stat) -> Entry {
        let t = self.cache.timeout();
        Entry {
            inode,
            generation: 0,
            attr: to_attr(st),
            entry_timeout: t,
            attr_timeout: t,
        }
    }

    /// Re-opens `fd` (any descriptor, `O_PATH` included) with `flags`
    /// through `/proc/self/fd`: the same inode, whatever its name now.
    fn reopen(&self, fd: BorrowedFd<'_>, flags: c_int) -> Result<OwnedFd, Errno> {
        let name = fd_name(fd);
        openat(
            self.proc_self_fd.as_fd(),
            &name,
            flags & !(libc::O_NOFOLLOW | libc::O_CREAT | libc::O_EXCL),
            0,
        )
    }

    /// Takes a node for `fd` (an `O_PATH` descriptor): the existing one of
    /// the same host file with one more reference, or a new one.
    fn add_node(&mut self, fd: OwnedFd) -> Result<Entry, Errno> {
        let st = stat_fd(fd.as_fd())?;
        let key = (st.st_dev, st.st_ino);
        if let Some(&inode) = self.keys.get(&key) {
            if let Some(node) = self.nodes.get_mut(&inode) {
                node.refs = node.refs.saturating_add(1);
                return Ok(self.entry(inode, &st));
            }
        }
        let inode = self.next_inode;
        self.next_inode = self.next_inode.checked_add(1).ok_or(Errno::NOSYS)?;
        self.nodes.insert(
            inode,
            Node {
                fd,
                key,
                refs: 1,
                kind: st.st_mode & libc::S_IFMT,
            },
        );
        self.keys.insert(key, inode);
        Ok(self.entry(inode, &st))
    }

    /// Looks `name` up in the directory `dir` (a descriptor of a node or
    /// of an open directory) and takes a reference.
    fn lookup_at(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> Result<Entry, Errno> {
        let fd = openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        self.add_node(fd)
    }

    /// Looks up `name` in node `parent`.
    fn lookup_node(&mut self, parent: Inode, name: &CStr) -> Result<Entry, Errno> {
        let dir = self.node(parent)?.fd.as_fd();
        let fd = openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        self.add_node(fd)
    }

    fn add_handle(&mut self, inode: Inode, fd: OwnedFd) -> Result<Handle, Errno> {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.checked_add(1).ok_or(Errno::NOSYS)?;
        self.handles.insert(handle, OpenFile { fd, inode });
        Ok(handle)
    }

    /// Switches to the caller's fsuid/fsgid until the guard drops.
    fn creds(&self, ctx: &Context) -> Result<Option<FsCreds>, Errno> {
        if self.switch_creds {
            FsCreds::switch(ctx.uid, ctx.gid).map(Some)
        } else {
            Ok(None)
        }
    }

    /// After creating `inode` with permission bits `want` (the guest's
    /// mode less its umask): puts back bits the process's umask removed.
    fn fix_mode(&mut self, entry: &mut Entry, want: u32) -> Result<(), Errno> {
        let got = entry.attr.mode & 0o777;
        let want = want & 0o777;
        if got == want || got & !want != 0 || entry.attr.mode & libc::S_IFMT == libc::S_IFLNK {
            return Ok(());
        }
        let node = self.node(entry.inode)?;
        let mode = (entry.attr.mode & 0o7000) | want;
        chmod_proc(self.proc_self_fd.as_fd(), node.fd.as_fd(), mode)?;
        entry.attr = to_attr(&stat_fd(node.fd.as_fd())?);
        Ok(())
    }

    /// Creates with `make` in `parent` under the caller's credentials,
    /// then looks the new name up.
    fn make_node(
        &mut self,
        ctx: &Context,
        parent: Inode,
        name: Name<'_>,
        want: Option<u32>,
        make: impl FnOnce(BorrowedFd<'_>, &CStr) -> Result<(), Errno>,
    ) -> Result<Entry, Errno> {
        let cname = cname(name.as_bytes())?;
        let dir = self.node(parent)?.fd.as_fd();
        {
            let _creds = self.creds(ctx)?;
            make(dir, &cname)?;
        }
        let mut entry = self.lookup_node(parent, &cname)?;
        if let Some(want) = want {
            if let Err(e) = self.fix_mode(&mut entry, want) {
                self.forget(entry.inode, 1);
                return Err(e);
            }
        }
        Ok(entry)
    }

    /// READDIR from `dir` (an open directory of node `inode`).
    fn readdir_from(
        &mut self,
        ctx: &Context,
        dir: BorrowedFd<'_>,
        offset: u64,
        sink: &mut DirSink<'_>,
    ) -> Result<(), Errno> {
        let offset = i64::try_from(offset).map_err(|_| Errno::INVAL)?;
        lseek(dir, offset, libc::SEEK_SET)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = getdents64(dir, &mut buf)?;
            if n == 0 {
                return Ok(());
            }
            let mut at = 0;
            while at < n {
                let Some(d) = parse_dirent(&buf[at..n]) else {
                    return Err(Errno::IO);
                };
                at += d.reclen;
                if !sink.room_for(d.name.len()) {
                    return Ok(());
                }
                let e = DirEntry {
                    ino: d.ino,
                    offset: d.off,
                    kind: u32::from(d.kind),
                    name: d.name,
                };
                if !sink.is_plus() {
                    if !sink.add(&e) {
                        return Ok(());
                    }
                    continue;
                }
                let entry = self.plus_entry(ctx, dir, &d);
                if !sink.add_plus(&e, &entry) {
                    if entry.inode != 0 {
                        self.forget(entry.inode, 1);
                    }
                    return Ok(());
                }
            }
        }
    }

    /// The lookup of one READDIRPLUS entry: none (inode 0) for `.`, `..`,
    /// and a name that vanished meanwhile.
    fn plus_entry(&mut self, _ctx: &Context, dir: BorrowedFd<'_>, d: &Dirent<'_>) -> Entry {
        let none = Entry {
            attr: Attr {
                ino: d.ino,
                mode: u32::from(d.kind) << 12,
                ..Attr::default()
            },
            ..Entry::default()
        };
        if Name::new(d.name).is_err() {
            return none;
        }
        match cname(d.name).and_then(|n| self.lookup_at(dir, &n)) {
            Ok(entry) => entry,
            Err(_) => none,
        }
    }
}

impl FileSystem for Passthrough {
    /// Drops every node and handle but the root, and opens the root again
    /// by its path: a jailed VMM built this backend before it pivoted into
    /// its jail, and the share's mounts made since (a container's rootfs,
    /// its volumes) reach the jail only through the jail's own view of the
    /// directory (a relative path, resolved from the jail's root). If that
    /// fails, the root opened at construction stays.
    fn init(&mut self) -> Result<(), Errno> {
        self.destroy();
        match open_abs(&self.root_path, libc::O_PATH | libc::O_DIRECTORY) {
            Ok(fd) => match stat_fd(fd.as_fd()) {
                Ok(st) => {
                    let key = (st.st_dev, st.st_ino);
                    self.keys.retain(|_, &mut inode| inode != ROOT_INODE);
                    self.keys.insert(key, ROOT_INODE);
                    if let Some(root) = self.nodes.get_mut(&ROOT_INODE) {
                        root.fd = fd;
                        root.key = key;
                    }
                }
                Err(e) => log::warn!("virtio-fs: cannot stat the share again: errno {}", e.0),
            },
            Err(e) => log::warn!("virtio-fs: cannot open the share again: {e}"),
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.handles.clear();
        self.nodes.retain(|&inode, _| inode == ROOT_INODE);
        self.keys.retain(|_, &mut inode| inode == ROOT_INODE);
    }

    fn lookup(&mut self, _ctx: &Context, parent: Inode, name: Name<'_>) -> Result<Entry, Errno> {
        let cname = cname(name.as_bytes())?;
        self.lookup_node(parent, &cname)
    }

    fn forget(&mut self, inode: Inode, count: u64) {
        if inode == ROOT_INODE {
            return;
        }
        let Some(node) = self.nodes.get_mut(&inode) else {
            return;
        };
        node.refs = node.refs.saturating_sub(count);
        if node.refs == 0 {
            let key = node.key;
            self.nodes.remove(&inode);
            if self.keys.get(&key) == Some(&inode) {
                self.keys.remove(&key);
            }
        }
    }

    fn getattr(
        &mut self,
        _ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> Result<(Attr, Duration), Errno> {
        let st = match handle {
            Some(h) => stat_fd(self.open_file(inode, h)?.fd.as_fd())?,
            None => stat_fd(self.node(inode)?.fd.as_fd())?,
        };
        Ok((to_attr(&st), self.cache.timeout()))
    }

    fn setattr(
        &mut self,
        _ctx: &Context,
        inode: Inode,
        attr: &SetAttr,
    ) -> Result<(Attr, Duration), Errno> {
        let node = self.node(inode)?;
        let open = match attr.handle {
            Some(h) => Some(self.open_file(inode, h)?.fd.as_fd()),
            None => None,
        };
        let proc_fd = self.proc_self_fd.as_fd();
        // The descriptor for the `*at(fd, "", AT_EMPTY_PATH)` calls.
        let any = open.unwrap_or(node.fd.as_fd());
        let symlink = node.kind == libc::S_IFLNK;

        if let Some(mode) = attr.mode {
            let mode = mode & 0o7777;
            match open {
                Some(fd) => fchmod(fd, mode)?,
                None if symlink => return Err(Errno::OPNOTSUPP),
                None => chmod_proc(proc_fd, node.fd.as_fd(), mode)?,
            }
        }
        if attr.uid.is_some() || attr.gid.is_some() {
            fchown_empty(
                any,
                attr.uid.unwrap_or(u32::MAX),
                attr.gid.unwrap_or(u32::MAX),
            )?;
        }
        if let Some(size) = attr.size {
            let size = i64::try_from(size).map_err(|_| Errno::INVAL)?;
            match open {
                Some(fd) => ftruncate(fd, size)?,
                None => match node.kind {
                    libc::S_IFREG => {
                        let f = self.reopen(node.fd.as_fd(), libc::O_WRONLY)?;
                        ftruncate(f.as_fd(), size)?;
                    }
                    libc::S_IFDIR => return Err(Errno(libc::EISDIR)),
                    _ => return Err(Errno::INVAL),
                },
            }
        }
        if attr.atime.is_some() || attr.mtime.is_some() {
            let times = [to_timespec(attr.atime), to_timespec(attr.mtime)];
            utimens_empty(any, &times)?;
        }
        if attr.kill_suidgid && attr.mode.is_none() && !symlink {
            let mode = stat_fd(any)?.st_mode;
            let kill = suidgid_bits(mode);
            if kill != 0 {
                match open {
                    Some(fd) => fchmod(fd, mode & 0o7777 & !kill)?,
                    None => chmod_proc(proc_fd, node.fd.as_fd(), mode & 0o7777 & !kill)?,
                }
            }
        }
        Ok((to_attr(&stat_fd(any)?), self.cache.timeout()))
    }

    fn readlink(&mut self, _ctx: &Context, inode: Inode, buf: &mut [u8]) -> Result<usize, Errno> {
        let node = self.node(inode)?;
        if node.kind != libc::S_IFLNK {
            return Err(Errno::INVAL);
        }
        let mut target = [0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: `target` is valid for writes of its length, the path is
        // a NUL-terminated literal, and the descriptor is ours.
        let n = unsafe {
            libc::readlinkat(
                node.fd.as_raw_fd(),
                c"".as_ptr(),
                target.as_mut_ptr().cast(),
                target.len(),
            )
        };
        let n = usize::try_from(n).map_err(|_| last_errno())?;
        let target = target.get(..n).ok_or(Errno::NAMETOOLONG)?;
        let out = buf.get_mut(..n).ok_or(Errno::NAMETOOLONG)?;
        out.copy_from_slice(target);
        Ok(n)
    }

    fn symlink(
        &mut self,
        ctx: &Context,
        parent: Inode,
        name: Name<'_>,
        target: &[u8],
    ) -> Result<Entry, Errno> {
        let target = cname(target)?;
        self.make_node(ctx, parent, name, None, |dir, name| {
            // SAFETY: both strings are NUL-terminated and live for the
            // call; the descriptor is ours.
            let r = unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) };
            check(r).map(drop)
        })
    }

    fn mknod(
        &mut self,
        ctx: &Context,
        parent: Inode,
        name: Name<'_>,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> Result<Entry, Errno> {
        let perm = mode & 0o7777 & !umask;
        let mode = (mode & libc::S_IFMT) | perm;
        self.make_node(ctx, parent, name, Some(perm), |dir, name| {
            // SAFETY: the name is NUL-terminated and lives for the call;
            // the descriptor is ours.
            let r = unsafe {
                libc::mknodat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    mode,
                    libc::dev_t::from(rdev),
                )
            };
            check(r).map(drop)
        })
    }

    fn mkdir(
        &mut self,
        ctx: &Context,
        parent: Inode,
        name: Name<'_>,
        mode: u32,
        umask: u32,
    ) -> Result<Entry, Errno> {
        let perm = mode & 0o7777 & !umask;
        self.make_node(ctx, parent, name, Some(perm), |dir, name| {
            // SAFETY: the name is NUL-terminated and lives for the call;
            // the descriptor is ours.
            let r = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), perm) };
            check(r).map(drop)
        })
    }

    fn unlink(&mut self, _ctx: &Context, parent: Inode, name: Name<'_>) -> Result<(), Errno> {
        unlinkat(self.node(parent)?.fd.as_fd(), &cname(name.as_bytes())?, 0)
    }

    fn rmdir(&mut self, _ctx: &Context, parent: Inode, name: Name<'_>) -> Result<(), Errno> {
        unlinkat(
            self.node(parent)?.fd.as_fd(),
            &cname(name.as_bytes())?,
            libc::AT_REMOVEDIR,
        )
    }

    fn rename(
        &mut self,
        _ctx: &Context,
        parent: Inode,
        name: Name<'_>,
        new_parent: Inode,
        new_name: Name<'_>,
        flags: u32,
    ) -> Result<(), Errno> {
        let old_dir = self.node(parent)?.fd.as_raw_fd();
        let new_dir = self.node(new_parent)?.fd.as_raw_fd();
        let old = cname(name.as_bytes())?;
        let new = cname(new_name.as_bytes())?;
        // SAFETY: both names are NUL-terminated and live for the call;
        // both descriptors are ours and open (held by `self.nodes`).
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                old_dir,
                old.as_ptr(),
                new_dir,
                new.as_ptr(),
                flags,
            )
        };
        if r < 0 {
            return Err(last_errno());
        }
        Ok(())
    }

    fn link(
        &mut self,
        ctx: &Context,
        inode: Inode,
        new_parent: Inode,
        new_name: Name<'_>,
    ) -> Result<Entry, Errno> {
        let source = fd_name(self.node(inode)?.fd.as_fd());
        let dir = self.node(new_parent)?.fd.as_raw_fd();
        let name = cname(new_name.as_bytes())?;
        {
            let _creds = self.creds(ctx)?;
            // SAFETY: both names are NUL-terminated and live for the call;
            // both descriptors are ours. `/proc/self/fd/<n>` with
            // AT_SYMLINK_FOLLOW names the inode the node holds (a symlink
            // node: the symlink itself).
            let r = unsafe {
                libc::linkat(
                    self.proc_self_fd.as_raw_fd(),
                    source.as_ptr(),
                    dir,
                    name.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            check(r)?;
        }
        let node = self.nodes.get_mut(&inode).ok_or(Errno::BADF)?;
        node.refs = node.refs.saturating_add(1);
        let st = stat_fd(node.fd.as_fd())?;
        Ok(self.entry(inode, &st))
    }

    fn open(&mut self, _ctx: &Context, inode: Inode, flags: u32) -> Result<Opened, Errno> {
        let node = self.node(inode)?;
        match node.kind {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(Errno(libc::EISDIR)),
            _ => return Err(Errno(libc::ENXIO)),
        }
        let fd = self.reopen(node.fd.as_fd(), open_flags(flags))?;
        let handle = self.add_handle(inode, fd)?;
        Ok(Opened {
            handle,
            flags: self.cache.file_flags(),
        })
    }

    fn read(
        &mut self,
        _ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        let fd = self.open_file(inode, handle)?.fd.as_raw_fd();
        let offset = i64::try_from(offset).map_err(|_| Errno::INVAL)?;
        // SAFETY: `buf` is valid for writes of its length; the descriptor
        // is ours.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), offset) };
        usize::try_from(n).map_err(|_| last_errno())
    }

    fn write(
        &mut self,
        _ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        data: &[u8],
        kill_priv: bool,
    ) -> Result<usize, Errno> {
        let fd = self.open_file(inode, handle)?.fd.as_fd();
        let offset = i64::try_from(offset).map_err(|_| Errno::INVAL)?;
        if kill_priv {
            // The VMM has CAP_FSETID, so the host kernel keeps the bits a
            // guest writer without it would lose.
            let mode = stat_fd(fd)?.st_mode;
            let kill = suidgid_bits(mode);
            if kill != 0 {
                fchmod(fd, mode & 0o7777 & !kill)?;
            }
        }
        // SAFETY: `data` is valid for reads of its length; the descriptor
        // is ours.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), offset) };
        usize::try_from(n).map_err(|_| last_errno())
    }

    fn statfs(&mut self, _ctx: &Context, inode: Inode) -> Result<StatFs, Errno> {
        let s = statfs_fd(self.node(inode)?.fd.as_fd())?;
        // The field types differ between targets; the values fit.
        #[allow(clippy::unnecessary_cast)]
        Ok(StatFs {
            blocks: s.f_blocks as u64,
            bfree: s.f_bfree as u64,
            bavail: s.f_bavail as u64,
            files: s.f_files as u64,
            ffree: s.f_ffree as u64,
            bsize: s.f_bsize as u32,
            namelen: s.f_namelen as u32,
            frsize: s.f_frsize as u32,
        })
    }

    fn release(&mut self, _ctx: &Context, inode: Inode, handle: Handle) -> Result<(), Errno> {
        self.open_file(inode, handle)?;
        self.handles.remove(&handle);
        Ok(())
    }

    fn fsync(
        &mut self,
        _ctx: &Context,
        inode: Inode,
        handle: Handle,
        datasync: bool,
    ) -> Result<(), Errno> {
        fsync(self.open_file(inode, handle)?.fd.as_fd(), datasync)
    }

    fn flush(&mut self, _ctx: &Context, inode: Inode, handle: Handle) -> Result<(), Errno> {
        // As close(2) of one of the guest's descriptors: close a duplicate,
        // which drops the POSIX locks of the file and reports the errors a
        // close would (e.g. of a network file system).
        let fd = self.open_file(inode, handle)?.fd.as_raw_fd();
        // SAFETY: F_DUPFD_CLOEXEC takes an integer and touches no memory;
        // the descriptor is ours.
        let dup = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
        // SAFETY: `dup` was just made here and nothing else owns it.
        check(unsafe { libc::close(dup) }).map(drop)
    }

    fn setxattr(
        &mut self,
        _ctx: &Context,
        inode: Inode,
        name: &[u8],
        value: &[u8],
        flags: u32,
    ) -> Result<(), Errno> {
        let name = cname(name)?;
        let fd = self.xattr_fd(inode)?;
        let flags = c_int::try_from(flags).map_err(|_| Errno::INVAL)?;
        // SAFETY: the name is NUL-terminated, `value` is valid for reads
        // of its length, the descriptor is ours.
        let r = unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        };
        check(r).map(drop)
    }

    fn getxattr(
        &mut self,
        _ctx: &Context,
        inode: Inode,
        name: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        let name = cname(name)?;
        let fd = self.xattr_fd(inode)?;
        // SAFETY: the name is NUL-terminated, `buf` is valid for writes of
        // its length (0: only the size is asked), the descriptor is ours.
        let n = unsafe {
            libc::fgetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        usize::try_from(n).map_err(|_| last_errno())
    }

    fn listxattr(&mut self, _ctx: &Context, inode: Inode, buf: &mut [u8]) -> Result<usize, Errno> {
        let fd = self.xattr_fd(inode)?;
        // SAFETY: `buf` is valid for writes of its length (0: only the
        // size is asked), the descriptor is ours.
        let n = unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| last_errno())
    }

    fn removexattr(&mut self, _ctx: &Context, inode: Inode, name: &[u8]) -> Result<(), Errno> {
        let name = cname(name)?;
        let fd = self.xattr_fd(inode)?;
        // SAFETY: the name is NUL-terminated, the descriptor is ours.
        check(unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) }).map(drop)
    }

    fn opendir(&mut self, _ctx: &Context, inode: Inode, _flags: u32) -> Result<Opened, Errno> {
        let node = self.node(inode)?;
        if node.kind != libc::S_IFDIR {
            return Err(Errno(libc::ENOTDIR));
        }
        let fd = self.reopen(node.fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        let handle = self.add_handle(inode, fd)?;
        Ok(Opened {
            handle,
            flags: self.cache.dir_flags(),
        })
    }

    fn readdir(
        &mut self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        sink: &mut DirSink<'_>,
    ) -> Result<(), Errno> {
        self.open_file(inode, handle)?;
        // Out of the table while READDIRPLUS looks entries up (`&mut self`).
        let Some(dir) = self.handles.remove(&handle) else {
            return Err(Errno::BADF);
        };
        let r = self.readdir_from(ctx, dir.fd.as_fd(), offset, sink);
        self.handles.insert(handle, dir);
        r
    }

    fn releasedir(&mut self, ctx: &Context, inode: Inode, handle: Handle) -> Result<(), Errno> {
        self.release(ctx, inode, handle)
    }

    fn fsyncdir(
        &mut self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        datasync: bool,
    ) -> Result<(), Errno> {
        self.fsync(ctx, inode, handle, datasync)
    }

    fn access(&mut self, ctx: &Context, inode: Inode, mask: u32) -> Result<(), Errno> {
        let st = stat_fd(self.node(inode)?.fd.as_fd())?;
        access_ok(ctx, &st, mask)
    }

    fn create(
        &mut self,
        ctx: &Context,
        parent: Inode,
        name: Name<'_>,
        mode: u32,
        flags: u32,
        umask: u32,
    ) -> Result<(Entry, Opened), Errno> {
        let cname = cname(name.as_bytes())?;
        let dir = self.node(parent)?.fd.as_fd();
        let perm = mode & 0o7777 & !umask;
        let oflags = open_flags(flags);
        let made = {
            let _creds = self.creds(ctx)?;
            openat(
                dir,
                &cname,
                oflags | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                perm,
            )
        };
        let (file, fresh) = match made {
            Ok(file) => (file, true),
            // The guest did not ask for O_EXCL: open what is there, if it
            // is a regular file (never a device, FIFO or directory).
            Err(e) if e.0 == libc::EEXIST && flags & libc::O_EXCL as u32 == 0 => {
                let path = openat(dir, &cname, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                match stat_fd(path.as_fd())?.st_mode & libc::S_IFMT {
                    libc::S_IFREG => {}
                    libc::S_IFDIR => return Err(Errno(libc::EISDIR)),
                    _ => return Err(Errno(libc::EEXIST)),
                }
                // As the caller: the guest kernel checked no permission
                // on a file it did not know existed.
                let _creds = self.creds(ctx)?;
                (self.reopen(path.as_fd(), oflags)?, false)
            }
            Err(e) => return Err(e),
        };
        // The node of the very file opened, whatever its name is now.
        let path = self.reopen(file.as_fd(), libc::O_PATH)?;
        let mut entry = self.add_node(path)?;
        if fresh {
            if let Err(e) = self.fix_mode(&mut entry, perm) {
                self.forget(entry.inode, 1);
                return Err(e);
            }
        }
        let handle = match self.add_handle(entry.inode, file) {
            Ok(h) => h,
            Err(e) => {
                self.forget(entry.inode, 1);
                return Err(e);
            }
        };
        Ok((
            entry,
            Opened {
                handle,
                flags: self.cache.file_flags(),
            },
        ))
    }

    fn fallocate(
        &mut self,
        _ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        length: u64,
        mode: u32,
    ) -> Result<(), Errno> {
        let fd = self.open_file(inode, handle)?.fd.as_raw_fd();
        let offset = i64::try_from(offset).map_err(|_| Errno::INVAL)?;
        let length = i64::try_from(length).map_err(|_| Errno::INVAL)?;
        let mode = c_int::try_from(mode).map_err(|_| Errno::INVAL)?;
        // SAFETY: integers only; the descriptor is ours.
        check(unsafe { libc::fallocate(fd, mode, offset, length) }).map(drop)
    }

    fn lseek(
        &mut self,
        _ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> Result<u64, Errno> {
        let fd = self.open_file(inode, handle)?.fd.as_fd();
        let offset = i64::try_from(offset).map_err(|_| Errno::INVAL)?;
        let whence = c_int::try_from(whence).map_err(|_| Errno::INVAL)?;
        lseek(fd, offset, whence)
    }
}

impl Passthrough {
    /// A descriptor to change extended attributes through: regular files
    /// and directories are re-opened read-only; anything else (symlinks,
    /// device nodes, FIFOs, sockets) is never opened: `EOPNOTSUPP`.
    fn xattr_fd(&self, inode: Inode) -> Result<OwnedFd, Errno> {
        let node = self.node(inode)?;
        let flags = match node.kind {
            libc::S_IFREG => libc::O_RDONLY | libc::O_NONBLOCK,
            libc::S_IFDIR => libc::O_RDONLY | libc::O_DIRECTORY,
            _ => return Err(Errno::OPNOTSUPP),
        };
        self.reopen(node.fd.as_fd(), flags)
    }
}

/// The guest's open(2) flags the backend passes on: the access mode and
/// the flags with meaning for a regular file. `O_CREAT`/`O_EXCL` (only
/// [`FileSystem::create`] creates), `O_NOFOLLOW` (the node is already
/// resolved), `O_DIRECT` (buffers need not be aligned), `O_PATH`,
/// `O_NOATIME` and the rest are dropped.
fn open_flags(flags: u32) -> c_int {
    let keep = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_TRUNC
        | libc::O_SYNC
        | libc::O_DSYNC
        | libc::O_NONBLOCK;
    // Flags are bits; the guest's u32 is the host's int.
    (flags as c_int) & keep
}

/// `S_ISUID`, and `S_ISGID` when group-executable (otherwise it marks
/// mandatory locking), of `mode`: what a write or truncate by an
/// unprivileged caller clears.
fn suidgid_bits(mode: u32) -> u32 {
    let mut kill = mode & libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && mode & libc::S_IXGRP != 0 {
        kill |= libc::S_ISGID;
    }
    kill
}

/// ACCESS from the mode bits, for the caller's uid and (primary) gid.
fn access_ok(ctx: &Context, st: &libc::stat, mask: u32) -> Result<(), Errno> {
    let (r, w, x) = (libc::R_OK as u32, libc::W_OK as u32, libc::X_OK as u32);
    if mask & !(r | w | x) != 0 {
        return Err(Errno::INVAL);
    }
    let mode = st.st_mode;
    if ctx.uid == 0 {
        let dir = mode & libc::S_IFMT == libc::S_IFDIR;
        if mask & x != 0 && !dir && mode & 0o111 == 0 {
            return Err(Errno::ACCES);
        }
        return Ok(());
    }
    let bits = if ctx.uid == st.st_uid {
        (mode >> 6) & 7
    } else if ctx.gid == st.st_gid {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    if mask & !bits != 0 {
        return Err(Errno::ACCES);
    }
    Ok(())
}

/// The caller's fsuid/fsgid on this thread until dropped.
struct FsCreds {
    uid: u32,
    gid: u32,
}

/// `setfsuid(2)`, the raw system call: this thread only. Returns the
/// previous fsuid; `u32::MAX` only asks.
fn setfsuid(uid: u32) -> u32 {
    // SAFETY: an integer argument, no memory; changes this thread's
    // credentials, which the callers restore.
    let prev = unsafe { libc::syscall(libc::SYS_setfsuid, uid) };
    prev as u32
}

/// `setfsgid(2)`, the raw system call: this thread only.
fn setfsgid(gid: u32) -> u32 {
    // SAFETY: as `setfsuid`.
    let prev = unsafe { libc::syscall(libc::SYS_setfsgid, gid) };
    prev as u32
}

impl FsCreds {
    fn switch(uid: u32, gid: u32) -> Result<FsCreds, Errno> {
        // The group first: once the fsuid is not 0 the thread may lose
        // what it needs to change it.
        let old_gid = setfsgid(gid);
        let old_uid = setfsuid(uid);
        let guard = FsCreds {
            uid: old_uid,
            gid: old_gid,
        };
        // Neither call reports failure but by not changing anything.
        if setfsgid(u32::MAX) != gid || setfsuid(u32::MAX) != uid {
            return Err(Errno::PERM);
        }
        Ok(guard)
    }
}

impl Drop for FsCreds {
    fn drop(&mut self) {
        setfsuid(self.uid);
        setfsgid(self.gid);
    }
}

/// Whether this thread may switch its fsuid and fsgid to another id.
fn can_switch_creds() -> bool {
    let uid = setfsuid(u32::MAX);
    let gid = setfsgid(u32::MAX);
    let other_uid = if uid == 0 { 1 } else { 0 };
    let other_gid = if gid == 0 { 1 } else { 0 };
    let ok = FsCreds::switch(other_uid, other_gid).is_ok();
    // The guard restored both.
    ok && setfsuid(u32::MAX) == uid && setfsgid(u32::MAX) == gid
}

fn last_errno() -> Errno {
    io_errno(io::Error::last_os_error())
}

fn io_errno(e: io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

fn check(r: c_int) -> Result<c_int, Errno> {
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(r)
    }
}

/// `bytes` with a NUL; one inside is `EINVAL`.
fn cname(bytes: &[u8]) -> Result<CString, Errno> {
    CString::new(bytes).map_err(|_| Errno::INVAL)
}

/// `"<n>"`: the name of `fd` in `/proc/self/fd`.
fn fd_name(fd: BorrowedFd<'_>) -> CString {
    // Decimal digits hold no NUL.
    CString::new(fd.as_raw_fd().to_string()).unwrap_or_default()
}

/// `open(path, flags | O_CLOEXEC)` of the share's own path (only in
/// [`Passthrough::new`] and at INIT; relative to the working directory
/// if relative).
fn open_abs(path: &CStr, flags: c_int) -> io::Result<OwnedFd> {
    // SAFETY: the path is NUL-terminated and lives for the call.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `open` just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`.
fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: c_int, mode: u32) -> Result<OwnedFd, Errno> {
    // SAFETY: the name is NUL-terminated and lives for the call; the
    // descriptor is borrowed for it.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    let fd = check(fd)?;
    // SAFETY: `openat` just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: the file `fd`
/// holds (an `O_PATH` one too), never what a symlink points to.
fn stat_fd(fd: BorrowedFd<'_>) -> Result<libc::stat, Errno> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is valid for writes of a `stat`; the path is a
    // NUL-terminated literal; the descriptor is borrowed for the call.
    let r = unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(r)?;
    // SAFETY: zero-initialized (a valid `stat`) and filled by the kernel.
    Ok(unsafe { st.assume_init() })
}

/// `fstatfs(fd)` (`O_PATH` descriptors too).
fn statfs_fd(fd: BorrowedFd<'_>) -> Result<libc::statfs, Errno> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `st` is valid for writes of a `statfs`; the descriptor is
    // borrowed for the call.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: zero-initialized (a valid `statfs`) and filled by the kernel.
    Ok(unsafe { st.assume_init() })
}

/// `chmod` of the inode an `O_PATH` descriptor holds, through
/// `/proc/self/fd/<n>` (not for symlinks: the kernel refuses).
fn chmod_proc(proc_fd: BorrowedFd<'_>, fd: BorrowedFd<'_>, mode: u32) -> Result<(), Errno> {
    let name = fd_name(fd);
    // SAFETY: the name is NUL-terminated and lives for the call; the
    // descriptor is borrowed for it.
    check(unsafe { libc::fchmodat(proc_fd.as_raw_fd(), name.as_ptr(), mode, 0) }).map(drop)
}

fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> Result<(), Errno> {
    // SAFETY: integers only; the descriptor is borrowed for the call.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// `fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`;
/// `u32::MAX` leaves an id as it is.
fn fchown_empty(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> Result<(), Errno> {
    // SAFETY: the path is a NUL-terminated literal; the descriptor is
    // borrowed for the call.
    let r = unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(r).map(drop)
}

fn ftruncate(fd: BorrowedFd<'_>, size: i64) -> Result<(), Errno> {
    // SAFETY: integers only; the descriptor is borrowed for the call.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }).map(drop)
}

/// `utimensat(fd, "", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`.
fn utimens_empty(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> Result<(), Errno> {
    // SAFETY: `times` is valid for reads of two `timespec`s; the path is
    // a NUL-terminated literal; the descriptor is borrowed for the call.
    let r = unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(r).map(drop)
}

fn to_timespec(t: Option<SetTime>) -> libc::timespec {
    let (tv_sec, tv_nsec) = match t {
        None => (0, libc::UTIME_OMIT),
        Some(SetTime::Now) => (0, libc::UTIME_NOW),
        // The wire's u64 is the kernel's signed time.
        Some(SetTime::At { secs, nsecs }) => (secs as libc::time_t, libc::c_long::from(nsecs)),
    };
    libc::timespec { tv_sec, tv_nsec }
}

fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: c_int) -> Result<(), Errno> {
    // SAFETY: the name is NUL-terminated and lives for the call; the
    // descriptor is borrowed for it.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: c_int) -> Result<u64, Errno> {
    // SAFETY: integers only; the descriptor is borrowed for the call.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    u64::try_from(r).map_err(|_| last_errno())
}

fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> Result<(), Errno> {
    let r = if datasync {
        // SAFETY: an integer only; the descriptor is borrowed for the call.
        unsafe { libc::fdatasync(fd.as_raw_fd()) }
    } else {
        // SAFETY: as above.
        unsafe { libc::fsync(fd.as_raw_fd()) }
    };
    check(r).map(drop)
}

/// `getdents64(fd, buf)`: bytes of `linux_dirent64`s read, 0 at the end.
fn getdents64(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is valid for writes of its length; the descriptor is
    // borrowed for the call.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    usize::try_from(n).map_err(|_| last_errno())
}

/// One `linux_dirent64`.
struct Dirent<'a> {
    ino: u64,
    /// The cookie of the next entry.
    off: u64,
    kind: u8,
    name: &'a [u8],
    /// Bytes of the record.
    reclen: usize,
}

/// Parses the `linux_dirent64` at the start of `buf` (`d_ino` u64, `d_off`
/// i64, `d_reclen` u16, `d_type` u8, NUL-terminated name); `None` if it is
/// cut short.
fn parse_dirent(buf: &[u8]) -> Option<Dirent<'_>> {
    const NAME_AT: usize = 19;
    let ino = u64::from_ne_bytes(buf.get(0..8)?.try_into().ok()?);
    let off = u64::from_ne_bytes(buf.get(8..16)?.try_into().ok()?);
    let reclen = usize::from(u16::from_ne_bytes(buf.get(16..18)?.try_into().ok()?));
    let kind = *buf.get(18)?;
    let name = buf.get(NAME_AT..reclen)?;
    let len = name.iter().position(|&b| b == 0)?;
    Some(Dirent {
        ino,
        off,
        kind,
        name: &name[..len],
        reclen,
    })
}

/// FUSE attributes from a host `stat`.
// The field types differ between targets; the casts keep the bits (the
// wire's unsigned times are the kernel's signed ones).
#[allow(clippy::unnecessary_cast)]
fn to_attr(st: &libc::stat) -> Attr {
    Attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as u64,
        mtime: st.st_mtime as u64,
        ctime: st.st_ctime as u64,
        atime_nsec: st.st_atime_nsec as u32,
        mtime_nsec: st.st_mtime_nsec as u32,
        ctime_nsec: st.st_ctime_nsec as u32,
        mode: st.st_mode,
        nlink: st.st_nlink.min(u32::MAX as _) as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const ROOT: Context = Context {
        uid: 0,
        gid: 0,
        pid: 1,
    };
    const USER: Context = Context {
        uid: 1000,
        gid: 1000,
        pid: 2,
    };
    /// `fuse_entry_out` in a READDIRPLUS record.
    const ENTRY_OUT: usize = 128;

    fn n(s: &str) -> Name<'_> {
        Name::new(s.as_bytes()).unwrap()
    }

    /// A share and, beside it, what must never change: `outside/` with a
    /// sentinel file.
    struct Setup {
        tmp: tempfile::TempDir,
        share: PathBuf,
        fs: Passthrough,
        before: String,
    }

    impl Setup {
        fn new() -> Setup {
            Setup::with_cache(CacheMode::Auto)
        }

        fn with_cache(cache: CacheMode) -> Setup {
            // /var/tmp is on the root file system (user.* xattrs) where
            // /tmp may be a tmpfs.
            let base = Path::new("/var/tmp");
            let tmp = if base.is_dir() {
                tempfile::tempdir_in(base).unwrap()
            } else {
                tempfile::tempdir().unwrap()
            };
            let share = tmp.path().join("share");
            fs::create_dir(&share).unwrap();
            fs::set_permissions(&share, fs::Permissions::from_mode(0o777)).unwrap();
            fs::create_dir(tmp.path().join("outside")).unwrap();
            fs::write(tmp.path().join("outside/sentinel"), b"keep me").unwrap();
            let fs = Passthrough::new(&share, cache).unwrap();
            let mut s = Setup {
                tmp,
                share,
                fs,
                before: String::new(),
            };
            s.before = s.outside();
            s
        }

        /// Everything outside the share that an escape could change.
        fn outside(&self) -> String {
            let list = |p: &Path| {
                let mut v: Vec<_> = fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                v.sort();
                v
            };
            let sentinel = self.tmp.path().join("outside/sentinel");
            let md = fs::symlink_metadata(&sentinel).unwrap();
            format!(
                "{:?} {:?} {:?} {:?} {} {} {} {} {}",
                list(self.tmp.path()),
                list(&self.tmp.path().join("outside")),
                list(Path::new("/")),
                fs::read(&sentinel).unwrap(),
                md.mtime(),
                md.mtime_nsec(),
                md.nlink(),
                md.uid(),
                md.mode(),
            )
        }

        fn assert_outside_unchanged(&self) {
            assert_eq!(self.outside(), self.before);
        }

        fn host(&self, rel: &str) -> PathBuf {
            self.share.join(rel)
        }

        fn create(&mut self, parent: Inode, name: &str) -> (Entry, Opened) {
            self.fs
                .create(&ROOT, parent, n(name), 0o100644, libc::O_RDWR as u32, 0o022)
                .unwrap()
        }
    }

    fn fsuid() -> u32 {
        setfsuid(u32::MAX)
    }

    fn fsgid() -> u32 {
        setfsgid(u32::MAX)
    }

    /// `(name, next offset, node id)` of each record of a READDIR(PLUS)
    /// reply.
    fn dirents(buf: &[u8], plus: bool) -> Vec<(String, u64, u64)> {
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
        let mut out = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let (nodeid, d) = if plus {
                (u64_at(at), at + ENTRY_OUT)
            } else {
                (0, at)
            };
            let off = u64_at(d + 8);
            let len = u32::from_le_bytes(buf[d + 16..d + 20].try_into().unwrap()) as usize;
            let name = String::from_utf8(buf[d + 24..d + 24 + len].to_vec()).unwrap();
            out.push((name, off, nodeid));
            at = (d + 24 + len + 7) & !7;
        }
        out
    }

    #[test]
    fn lookup_getattr_and_forget_refcounts() {
        let mut s = Setup::new();
        fs::write(s.host("f"), b"12345").unwrap();
        let e = s.fs.lookup(&ROOT, ROOT_INODE, n("f")).unwrap();
        assert!(e.inode > ROOT_INODE);
        assert_eq!(e.attr.size, 5);
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFREG);
        assert_eq!(e.attr.ino, fs::metadata(s.host("f")).unwrap().ino());
        assert_eq!(e.entry_timeout, Duration::from_secs(1));
        let (attr, _) = s.fs.getattr(&ROOT, e.inode, None).unwrap();
        assert_eq!(attr, e.attr);
        let (root, _) = s.fs.getattr(&ROOT, ROOT_INODE, None).unwrap();
        assert_eq!(root.mode & libc::S_IFMT, libc::S_IFDIR);

        // Same host file, same node id, one more reference.
        let again = s.fs.lookup(&ROOT, ROOT_INODE, n("f")).unwrap();
        assert_eq!(again.inode, e.inode);
        assert_eq!(s.fs.counts(), (2, 0));
        s.fs.forget(e.inode, 1);
        assert!(s.fs.getattr(&ROOT, e.inode, None).is_ok());
        s.fs.forget(e.inode, 1);
        assert_eq!(s.fs.getattr(&ROOT, e.inode, None), Err(Errno::BADF));
        assert_eq!(s.fs.counts(), (1, 0));
        // A new lookup is a new id (ids are never reused).
        let third = s.fs.lookup(&ROOT, ROOT_INODE, n("f")).unwrap();
        assert!(third.inode > e.inode);

        // The root is never forgotten; unknown ids are BADF.
        s.fs.forget(ROOT_INODE, u64::MAX);
        assert!(s.fs.getattr(&ROOT, ROOT_INODE, None).is_ok());
        s.fs.forget(12345, 1);
        assert_eq!(s.fs.getattr(&ROOT, 12345, None), Err(Errno::BADF));
        assert_eq!(
            s.fs.lookup(&ROOT, 12345, n("f")).map(|e| e.inode),
            Err(Errno::BADF)
        );
        assert_eq!(
            s.fs.lookup(&ROOT, ROOT_INODE, n("nope")).map(|e| e.inode),
            Err(Errno::NOENT)
        );
        // A file is no directory.
        assert_eq!(
            s.fs.lookup(&ROOT, third.inode, n("x")).map(|e| e.inode),
            Err(Errno(libc::ENOTDIR))
        );

        // INIT / DESTROY drop everything but the root.
        s.fs.init().unwrap();
        assert_eq!(s.fs.counts(), (1, 0));
        assert_eq!(s.fs.getattr(&ROOT, third.inode, None), Err(Errno::BADF));
        s.assert_outside_unchanged();
    }

    #[test]
    fn create_write_read_release() {
        let mut s = Setup::new();
        let (e, o) =
            s.fs.create(
                &ROOT,
                ROOT_INODE,
                n("f"),
                0o100664,
                libc::O_RDWR as u32,
                0o002,
            )
            .unwrap();
        // The guest's umask, not the process's (022).
        assert_eq!(e.attr.mode, 0o100664);
        assert_eq!(fs::metadata(s.host("f")).unwrap().mode(), 0o100664);
        assert_eq!(o.flags, 0);
        assert_eq!(
            s.fs.write(&ROOT, e.inode, o.handle, 0, b"hello world", false),
            Ok(11)
        );
        let mut buf = [0u8; 64];
        let got = s.fs.read(&ROOT, e.inode, o.handle, 6, &mut buf).unwrap();
        assert_eq!(&buf[..got], b"world");
        assert_eq!(s.fs.read(&ROOT, e.inode, o.handle, 100, &mut buf), Ok(0));
        assert_eq!(
            s.fs.read(&ROOT, e.inode, o.handle, u64::MAX, &mut buf),
            Err(Errno::INVAL)
        );
        let (attr, _) = s.fs.getattr(&ROOT, e.inode, Some(o.handle)).unwrap();
        assert_eq!(attr.size, 11);
        // The handle belongs to its node.
        assert_eq!(
            s.fs.read(&ROOT, ROOT_INODE, o.handle, 0, &mut buf),
            Err(Errno::BADF)
        );
        s.fs.flush(&ROOT, e.inode, o.handle).unwrap();
        s.fs.fsync(&ROOT, e.inode, o.handle, false).unwrap();
        s.fs.fsync(&ROOT, e.inode, o.handle, true).unwrap();
        s.fs.release(&ROOT, e.inode, o.handle).unwrap();
        assert_eq!(
            s.fs.read(&ROOT, e.inode, o.handle, 0, &mut buf),
            Err(Errno::BADF)
        );
        assert_eq!(s.fs.release(&ROOT, e.inode, o.handle), Err(Errno::BADF));
        assert_eq!(s.fs.flush(&ROOT, e.inode, o.handle), Err(Errno::BADF));
        assert_eq!(fs::read(s.host("f")).unwrap(), b"hello world");

        // O_APPEND is honoured whatever the offset.
        let a =
            s.fs.open(&ROOT, e.inode, (libc::O_WRONLY | libc::O_APPEND) as u32)
                .unwrap();
        s.fs.write(&ROOT, e.inode, a.handle, 0, b"!", false)
            .unwrap();
        s.fs.release(&ROOT, e.inode, a.handle).unwrap();
        assert_eq!(fs::read(s.host("f")).unwrap(), b"hello world!");

        // O_EXCL: exists. Without it: the same file, opened (O_TRUNC too).
        assert_eq!(
            s.fs.create(
                &ROOT,
                ROOT_INODE,
                n("f"),
                0o100644,
                (libc::O_RDWR | libc::O_CREAT | libc::O_EXCL) as u32,
                0
            )
            .map(|_| ()),
            Err(Errno(libc::EEXIST))
        );
        let (e2, o2) =
            s.fs.create(
                &ROOT,
                ROOT_INODE,
                n("f"),
                0o100600,
                (libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u32,
                0,
            )
            .unwrap();
        assert_eq!(e2.inode, e.inode);
        assert_eq!(e2.attr.mode, 0o100664, "an existing file keeps its mode");
        assert_eq!(e2.attr.size, 0);
        s.fs.release(&ROOT, e2.inode, o2.handle).unwrap();

        // OPEN never creates, and opens no directory.
        let o3 =
            s.fs.open(&ROOT, e.inode, (libc::O_RDONLY | libc::O_CREAT) as u32)
                .unwrap();
        s.fs.release(&ROOT, e.inode, o3.handle).unwrap();
        assert_eq!(
            s.fs.open(&ROOT, ROOT_INODE, 0).map(|_| ()),
            Err(Errno(libc::EISDIR))
        );
        assert_eq!(s.fs.open(&ROOT, 999, 0).map(|_| ()), Err(Errno::BADF));
        assert_eq!(s.fs.counts().1, 0);
        s.assert_outside_unchanged();
    }

    #[test]
    fn cache_modes() {
        let mut s = Setup::with_cache(CacheMode::None);
        let (e, o) = s.create(ROOT_INODE, "f");
        assert_eq!(e.entry_timeout, Duration::ZERO);
        assert_eq!(e.attr_timeout, Duration::ZERO);
        assert_eq!(o.flags, Opened::DIRECT_IO);
        assert_eq!(s.fs.opendir(&ROOT, ROOT_INODE, 0).unwrap().flags, 0);
        let mut s = Setup::with_cache(CacheMode::Always);
        let (e, o) = s.create(ROOT_INODE, "f");
        assert_eq!(e.attr_timeout, Duration::from_secs(86400));
        assert_eq!(o.flags, Opened::KEEP_CACHE);
        let d = s.fs.opendir(&ROOT, ROOT_INODE, 0).unwrap();
        assert_eq!(d.flags, Opened::CACHE_DIR);
        assert_eq!(CacheMode::default(), CacheMode::Auto);
        #[derive(serde::Deserialize)]
        struct C {
            cache: CacheMode,
        }
        for (text, mode) in [
            ("none", CacheMode::None),
            ("auto", CacheMode::Auto),
            ("always", CacheMode::Always),
        ] {
            let c: C = toml::from_str(&format!("cache = {text:?}")).unwrap();
            assert_eq!(c.cache, mode);
        }
        assert!(toml::from_str::<C>("cache = \"Always\"").is_err());
    }

    #[test]
    fn mkdir_readdir_and_readdirplus() {
        let mut s = Setup::new();
        let d =
            s.fs.mkdir(&ROOT, ROOT_INODE, n("d"), 0o40775, 0o002)
                .unwrap();
        assert_eq!(d.attr.mode, 0o40775);
        assert!(fs::metadata(s.host("d")).unwrap().is_dir());
        for name in ["a", "b", "c"] {
            let (e, o) = s.create(d.inode, name);
            s.fs.release(&ROOT, e.inode, o.handle).unwrap();
            s.fs.forget(e.inode, 1);
        }
        let (nodes, _) = s.fs.counts();
        let h = s.fs.opendir(&ROOT, d.inode, 0).unwrap().handle;

        let mut buf = vec![0u8; 4096];
        let mut sink = DirSink::new(&mut buf, false);
        s.fs.readdir(&ROOT, d.inode, h, 0, &mut sink).unwrap();
        let len = sink.len();
        let all = dirents(&buf[..len], false);
        let mut names: Vec<_> = all.iter().map(|e| e.0.clone()).collect();
        names.sort();
        assert_eq!(names, [".", "..", "a", "b", "c"]);

        // Continue after the second entry: the rest.
        let mut sink = DirSink::new(&mut buf, false);
        s.fs.readdir(&ROOT, d.inode, h, all[1].1, &mut sink)
            .unwrap();
        let len = sink.len();
        let rest: Vec<_> = dirents(&buf[..len], false)
            .into_iter()
            .map(|e| e.0)
            .collect();
        let want: Vec<_> = all[2..].iter().map(|e| e.0.clone()).collect();
        assert_eq!(rest, want);

        // One entry a time through a small buffer.
        let mut paged = Vec::new();
        let mut off = 0;
        loop {
            let mut small = [0u8; 32];
            let mut sink = DirSink::new(&mut small, false);
            s.fs.readdir(&ROOT, d.inode, h, off, &mut sink).unwrap();
            let len = sink.len();
            if len == 0 {
                break;
            }
            let got = dirents(&small[..len], false);
            assert_eq!(got.len(), 1);
            off = got[0].1;
            paged.push(got[0].0.clone());
        }
        assert_eq!(paged.len(), 5);

        // READDIRPLUS: . and .. take no reference, the others one each.
        let mut sink = DirSink::new(&mut buf, true);
        s.fs.readdir(&ROOT, d.inode, h, 0, &mut sink).unwrap();
        let len = sink.len();
        let plus = dirents(&buf[..len], true);
        assert_eq!(plus.len(), 5);
        for (name, _, nodeid) in &plus {
            if name == "." || name == ".." {
                assert_eq!(*nodeid, 0, "{name}");
            } else {
                assert!(*nodeid > ROOT_INODE, "{name}");
                let (attr, _) = s.fs.getattr(&ROOT, *nodeid, None).unwrap();
                assert_eq!(attr.mode & libc::S_IFMT, libc::S_IFREG);
            }
        }
        assert_eq!(s.fs.counts().0, nodes + 3);
        // A READDIRPLUS that has room for two records takes two refs only.
        let mut two = vec![0u8; 2 * 160];
        let mut sink = DirSink::new(&mut two, true);
        s.fs.readdir(&ROOT, d.inode, h, 0, &mut sink).unwrap();
        let len = sink.len();
        let got = dirents(&two[..len], true);
        assert_eq!(got.len(), 2);
        for (_, _, nodeid) in plus.iter().chain(&got) {
            if *nodeid != 0 {
                s.fs.forget(*nodeid, 1);
            }
        }
        assert_eq!(s.fs.counts().0, nodes);

        s.fs.fsyncdir(&ROOT, d.inode, h, false).unwrap();
        s.fs.releasedir(&ROOT, d.inode, h).unwrap();
        let mut sink = DirSink::new(&mut buf, false);
        assert_eq!(
            s.fs.readdir(&ROOT, d.inode, h, 0, &mut sink),
            Err(Errno::BADF)
        );
        // Not a directory.
        let f = s.fs.lookup(&ROOT, d.inode, n("a")).unwrap();
        assert_eq!(
            s.fs.opendir(&ROOT, f.inode, 0).map(|_| ()),
            Err(Errno(libc::ENOTDIR))
        );
        assert_eq!(
            s.fs.mkdir(&ROOT, ROOT_INODE, n("d"), 0o755, 0).map(|_| ()),
            Err(Errno(libc::EEXIST))
        );
        s.assert_outside_unchanged();
    }

    #[test]
    fn rename_noreplace_exchange() {
        let mut s = Setup::new();
        fs::write(s.host("a"), b"A").unwrap();
        fs::write(s.host("b"), b"B").unwrap();
        let d = s.fs.mkdir(&ROOT, ROOT_INODE, n("d"), 0o755, 0).unwrap();
        s.fs.rename(&ROOT, ROOT_INODE, n("a"), d.inode, n("a2"), 0)
            .unwrap();
        assert_eq!(fs::read(s.host("d/a2")).unwrap(), b"A");
        assert!(!s.host("a").exists());
        assert_eq!(
            s.fs.rename(
                &ROOT,
                d.inode,
                n("a2"),
                ROOT_INODE,
                n("b"),
                libc::RENAME_NOREPLACE
            ),
            Err(Errno(libc::EEXIST))
        );
        s.fs.rename(
            &ROOT,
            d.inode,
            n("a2"),
            ROOT_INODE,
            n("b"),
            libc::RENAME_EXCHANGE,
        )
        .unwrap();
        assert_eq!(fs::read(s.host("b")).unwrap(), b"A");
        assert_eq!(fs::read(s.host("d/a2")).unwrap(), b"B");
        s.fs.rename(&ROOT, ROOT_INODE, n("b"), ROOT_INODE, n("c"), 0)
            .unwrap();
        assert_eq!(fs::read(s.host("c")).unwrap(), b"A");
        assert_eq!(
            s.fs.rename(&ROOT, ROOT_INODE, n("zz"), ROOT_INODE, n("c"), 0),
            Err(Errno::NOENT)
        );
        assert_eq!(
            s.fs.rename(&ROOT, 777, n("c"), ROOT_INODE, n("x"), 0),
            Err(Errno::BADF)
        );
        s.assert_outside_unchanged();
    }

    #[test]
    fn link_unlink_rmdir() {
        let mut s = Setup::new();
        let (e, o) = s.create(ROOT_INODE, "f");
        s.fs.release(&ROOT, e.inode, o.handle).unwrap();
        let d = s.fs.mkdir(&ROOT, ROOT_INODE, n("d"), 0o755, 0).unwrap();
        let l = s.fs.link(&ROOT, e.inode, d.inode, n("g")).unwrap();
        assert_eq!(l.inode, e.inode);
        assert_eq!(l.attr.nlink, 2);
        assert_eq!(fs::metadata(s.host("d/g")).unwrap().nlink(), 2);
        assert_eq!(
            fs::metadata(s.host("d/g")).unwrap().ino(),
            fs::metadata(s.host("f")).unwrap().ino()
        );
        // The link took a reference: two forgets to drop the node.
        s.fs.forget(e.inode, 1);
        assert!(s.fs.getattr(&ROOT, e.inode, None).is_ok());

        s.fs.unlink(&ROOT, ROOT_INODE, n("f")).unwrap();
        assert!(!s.host("f").exists());
        let (attr, _) = s.fs.getattr(&ROOT, e.inode, None).unwrap();
        assert_eq!(attr.nlink, 1);
        assert_eq!(
            s.fs.rmdir(&ROOT, ROOT_INODE, n("d")),
            Err(Errno(libc::ENOTEMPTY))
        );
        assert_eq!(
            s.fs.unlink(&ROOT, ROOT_INODE, n("d")),
            Err(Errno(libc::EISDIR))
        );
        s.fs.unlink(&ROOT, d.inode, n("g")).unwrap();
        s.fs.rmdir(&ROOT, ROOT_INODE, n("d")).unwrap();
        assert!(!s.host("d").exists());
        assert_eq!(s.fs.unlink(&ROOT, ROOT_INODE, n("f")), Err(Errno::NOENT));
        // The unlinked file's node still answers until forgotten.
        let (attr, _) = s.fs.getattr(&ROOT, e.inode, None).unwrap();
        assert_eq!(attr.nlink, 0);
        s.fs.forget(e.inode, 1);
        assert_eq!(s.fs.counts(), (2, 0)); // root and d
        s.fs.forget(d.inode, 1);
        assert_eq!(s.fs.counts(), (1, 0));
        s.assert_outside_unchanged();
    }

    #[test]
    fn symlink_readlink_mknod() {
        let mut s = Setup::new();
        let l =
            s.fs.symlink(&ROOT, ROOT_INODE, n("l"), b"../outside/sentinel")
                .unwrap();
        assert_eq!(l.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(
            fs::read_link(s.host("l")).unwrap(),
            Path::new("../outside/sentinel")
        );
        let mut buf = [0u8; 64];
        let len = s.fs.readlink(&ROOT, l.inode, &mut buf).unwrap();
        assert_eq!(&buf[..len], b"../outside/sentinel");
        assert_eq!(
            s.fs.readlink(&ROOT, l.inode, &mut buf[..5]),
            Err(Errno::NAMETOOLONG)
        );
        assert_eq!(
            s.fs.readlink(&ROOT, ROOT_INODE, &mut buf),
            Err(Errno::INVAL)
        );
        assert_eq!(
            s.fs.symlink(&ROOT, ROOT_INODE, n("bad"), b"a\0b")
                .map(|_| ()),
            Err(Errno::INVAL)
        );

        let p =
            s.fs.mknod(&ROOT, ROOT_INODE, n("p"), libc::S_IFIFO | 0o666, 0, 0o022)
                .unwrap();
        assert_eq!(p.attr.mode, libc::S_IFIFO | 0o644);
        assert!(fs::symlink_metadata(s.host("p"))
            .unwrap()
            .file_type()
            .is_fifo());
        // The VMM never opens a FIFO (it would block) or a device.
        assert_eq!(
            s.fs.open(&ROOT, p.inode, libc::O_RDONLY as u32).map(|_| ()),
            Err(Errno(libc::ENXIO))
        );
        assert_eq!(
            s.fs.getxattr(&ROOT, p.inode, b"user.x", &mut buf),
            Err(Errno::OPNOTSUPP)
        );
        let r =
            s.fs.mknod(&ROOT, ROOT_INODE, n("r"), libc::S_IFREG | 0o600, 0, 0)
                .unwrap();
        assert_eq!(r.attr.mode, libc::S_IFREG | 0o600);
        s.assert_outside_unchanged();
    }

    #[test]
    fn setattr_truncate_chmod_chown_utimens() {
        let mut s = Setup::new();
        let (e, o) = s.create(ROOT_INODE, "f");
        s.fs.write(&ROOT, e.inode, o.handle, 0, b"0123456789", false)
            .unwrap();
        let set = |a: SetAttr| a;
        // Truncate through the node (no handle), then the handle.
        let (attr, _) =
            s.fs.setattr(
                &ROOT,
                e.inode,
                &set(SetAttr {
                    size: Some(4),
                    ..SetAttr::default()
                }),
            )
            .unwrap();
        assert_eq!(attr.size, 4);
        assert_eq!(fs::read(s.host("f")).unwrap(), b"0123");
        let (attr, _) =
            s.fs.setattr(
                &ROOT,
                e.inode,
                &SetAttr {
                    handle: Some(o.handle),
                    size: Some(2),
                    ..SetAttr::default()
                },
            )
            .unwrap();
        assert_eq!(attr.size, 2);
        // chmod, chown, times.
        let (attr, _) =
            s.fs.setattr(
                &ROOT,
                e.inode,
                &SetAttr {
                    mode: Some(0o100600),
                    uid: Some(1000),
                    gid: Some(1001),
                    atime: Some(SetTime::Now),
                    mtime: Some(SetTime::At {
                        secs: 1_000_000,
                        nsecs: 5,
                    }),
                    ..SetAttr::default()
                },
            )
            .unwrap();
        assert_eq!(attr.mode, 0o100600);
        assert_eq!((attr.uid, attr.gid), (1000, 1001));
        assert_eq!((attr.mtime, attr.mtime_nsec), (1_000_000, 5));
        let md = fs::metadata(s.host("f")).unwrap();
        assert_eq!(md.mode(), 0o100600);
        assert_eq!((md.uid(), md.gid()), (1000, 1001));
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_000_000, 5));
        assert!(md.atime() > 1_000_000);
        // Through the handle.
        let (attr, _) =
            s.fs.setattr(
                &ROOT,
                e.inode,
                &SetAttr {
                    handle: Some(o.handle),
                    mode: Some(0o4755),
                    ..SetAttr::default()
                },
            )
            .unwrap();
        assert_eq!(attr.mode, 0o104755);
        // kill_suidgid, and a write that kills privileges.
        let (attr, _) =
            s.fs.setattr(
                &ROOT,
                e.inode,
                &SetAttr {
                    kill_suidgid: true,
                    size: Some(0),
                    ..SetAttr::default()
                },
            )
            .unwrap();
        assert_eq!(attr.mode, 0o100755);
        fs::set_permissions(s.host("f"), fs::Permissions::from_mode(0o6755)).unwrap();
        s.fs.write(&ROOT, e.inode, o.handle, 0, b"x", true).unwrap();
        assert_eq!(fs::metadata(s.host("f")).unwrap().mode(), 0o100755);

        // A symlink: owner and times of the link itself; no mode.
        let l =
            s.fs.symlink(&ROOT, ROOT_INODE, n("l"), b"../outside/sentinel")
                .unwrap();
        let (attr, _) =
            s.fs.setattr(
                &ROOT,
                l.inode,
                &SetAttr {
                    uid: Some(1000),
                    mtime: Some(SetTime::At { secs: 7, nsecs: 0 }),
                    ..SetAttr::default()
                },
            )
            .unwrap();
        assert_eq!((attr.uid, attr.mtime), (1000, 7));
        assert_eq!(
            s.fs.setattr(
                &ROOT,
                l.inode,
                &SetAttr {
                    mode: Some(0o777),
                    ..SetAttr::default()
                }
            )
            .map(|_| ()),
            Err(Errno::OPNOTSUPP)
        );
        assert_eq!(
            s.fs.setattr(
                &ROOT,
                l.inode,
                &SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                }
            )
            .map(|_| ()),
            Err(Errno::INVAL)
        );
        assert_eq!(
            s.fs.setattr(
                &ROOT,
                e.inode,
                &SetAttr {
                    handle: Some(4242),
                    ..SetAttr::default()
                }
            )
            .map(|_| ()),
            Err(Errno::BADF)
        );
        s.assert_outside_unchanged();
    }

    #[test]
    fn xattrs() {
        let mut s = Setup::new();
        let (e, _) = s.create(ROOT_INODE, "f");
        for inode in [e.inode, ROOT_INODE] {
            s.fs.setxattr(&ROOT, inode, b"user.test", b"value", 0)
                .unwrap();
            assert_eq!(
                s.fs.setxattr(&ROOT, inode, b"user.test", b"v", libc::XATTR_CREATE as u32),
                Err(Errno(libc::EEXIST))
            );
            assert_eq!(s.fs.getxattr(&ROOT, inode, b"user.test", &mut []), Ok(5));
            let mut buf = [0u8; 16];
            let len = s.fs.getxattr(&ROOT, inode, b"user.test", &mut buf).unwrap();
            assert_eq!(&buf[..len], b"value");
            assert_eq!(
                s.fs.getxattr(&ROOT, inode, b"user.test", &mut buf[..2]),
                Err(Errno::RANGE)
            );
            let mut list = [0u8; 256];
            let len = s.fs.listxattr(&ROOT, inode, &mut list).unwrap();
            assert!(list[..len]
                .split(|&b| b == 0)
                .any(|name| name == b"user.test"));
            assert!(s.fs.listxattr(&ROOT, inode, &mut []).unwrap() >= 10);
            s.fs.removexattr(&ROOT, inode, b"user.test").unwrap();
            assert_eq!(
                s.fs.getxattr(&ROOT, inode, b"user.test", &mut buf),
                Err(Errno::NODATA)
            );
            assert_eq!(
                s.fs.removexattr(&ROOT, inode, b"user.test"),
                Err(Errno::NODATA)
            );
        }
        assert_eq!(
            s.fs.getxattr(&ROOT, e.inode, b"user.a\0b", &mut []),
            Err(Errno::INVAL)
        );
        s.assert_outside_unchanged();
    }

    #[test]
    fn statfs_fallocate_lseek_access() {
        let mut s = Setup::new();
        let st = s.fs.statfs(&ROOT, ROOT_INODE).unwrap();
        assert!(st.blocks > 0 && st.bsize > 0);
        assert_eq!(st.namelen, 255);
        let (e, o) = s.create(ROOT_INODE, "f");
        s.fs.fallocate(&ROOT, e.inode, o.handle, 0, 65536, 0)
            .unwrap();
        assert_eq!(fs::metadata(s.host("f")).unwrap().len(), 65536);
        // KEEP_SIZE: blocks, no size.
        s.fs.fallocate(
            &ROOT,
            e.inode,
            o.handle,
            65536,
            65536,
            libc::FALLOC_FL_KEEP_SIZE as u32,
        )
        .unwrap();
        assert_eq!(fs::metadata(s.host("f")).unwrap().len(), 65536);

        // Data at 1 MiB, a hole before it.
        let (g, h) = s.create(ROOT_INODE, "g");
        s.fs.write(&ROOT, g.inode, h.handle, 1 << 20, &[1u8; 4096], false)
            .unwrap();
        let data =
            s.fs.lseek(&ROOT, g.inode, h.handle, 0, libc::SEEK_DATA as u32)
                .unwrap();
        assert_eq!(data, 1 << 20);
        let hole =
            s.fs.lseek(&ROOT, g.inode, h.handle, 0, libc::SEEK_HOLE as u32)
                .unwrap();
        assert_eq!(hole, 0);
        assert_eq!(
            s.fs.lseek(&ROOT, g.inode, h.handle, 2 << 20, libc::SEEK_DATA as u32),
            Err(Errno(libc::ENXIO))
        );
        assert_eq!(
            s.fs.lseek(&ROOT, g.inode, h.handle, 0, 99),
            Err(Errno::INVAL)
        );

        // ACCESS from the mode bits.
        fs::set_permissions(s.host("g"), fs::Permissions::from_mode(0o640)).unwrap();
        let (r, w, x) = (libc::R_OK as u32, libc::W_OK as u32, libc::X_OK as u32);
        assert_eq!(s.fs.access(&ROOT, g.inode, r | w), Ok(()));
        assert_eq!(s.fs.access(&ROOT, g.inode, x), Err(Errno::ACCES));
        assert_eq!(s.fs.access(&ROOT, ROOT_INODE, x), Ok(()));
        let group = Context {
            uid: 1000,
            gid: 0,
            pid: 3,
        };
        assert_eq!(s.fs.access(&group, g.inode, r), Ok(()));
        assert_eq!(s.fs.access(&group, g.inode, w), Err(Errno::ACCES));
        assert_eq!(s.fs.access(&USER, g.inode, r), Err(Errno::ACCES));
        assert_eq!(s.fs.access(&USER, g.inode, 0), Ok(()));
        assert_eq!(s.fs.access(&USER, g.inode, 64), Err(Errno::INVAL));
        assert_eq!(s.fs.access(&USER, 4711, 0), Err(Errno::BADF));
        s.assert_outside_unchanged();
    }

    #[test]
    fn symlinks_are_never_followed() {
        let mut s = Setup::new();
        std::os::unix::fs::symlink("/", s.host("to_root")).unwrap();
        std::os::unix::fs::symlink("../outside", s.host("to_outside")).unwrap();
        std::os::unix::fs::symlink("../outside/sentinel", s.host("to_sentinel")).unwrap();
        std::os::unix::fs::symlink("../outside/new", s.host("dangling")).unwrap();
        for name in ["to_root", "to_outside", "to_sentinel", "dangling"] {
            let l = s.fs.lookup(&ROOT, ROOT_INODE, n(name)).unwrap();
            // The symlink itself, not its target.
            assert_eq!(l.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
            let notdir = Err(Errno(libc::ENOTDIR));
            assert_eq!(s.fs.lookup(&ROOT, l.inode, n("etc")).map(|_| ()), notdir);
            assert_eq!(
                s.fs.lookup(&ROOT, l.inode, n("sentinel")).map(|_| ()),
                notdir
            );
            assert_eq!(
                s.fs.create(&ROOT, l.inode, n("evil"), 0o644, 2, 0)
                    .map(|_| ()),
                notdir
            );
            assert_eq!(
                s.fs.mkdir(&ROOT, l.inode, n("evil"), 0o755, 0).map(|_| ()),
                notdir
            );
            assert_eq!(
                s.fs.mknod(&ROOT, l.inode, n("evil"), libc::S_IFREG | 0o644, 0, 0)
                    .map(|_| ()),
                notdir
            );
            assert_eq!(
                s.fs.symlink(&ROOT, l.inode, n("evil"), b"x").map(|_| ()),
                notdir
            );
            assert_eq!(
                s.fs.rename(&ROOT, ROOT_INODE, n("to_root"), l.inode, n("evil"), 0),
                notdir
            );
            assert_eq!(s.fs.unlink(&ROOT, l.inode, n("sentinel")), notdir);
            assert_eq!(s.fs.opendir(&ROOT, l.inode, 0).map(|_| ()), notdir);
            assert_eq!(
                s.fs.open(&ROOT, l.inode, libc::O_RDWR as u32).map(|_| ()),
                Err(Errno(libc::ENXIO))
            );
            // Through the symlink's name: never its target.
            let created = s.fs.create(
                &ROOT,
                ROOT_INODE,
                n(name),
                0o644,
                (libc::O_WRONLY | libc::O_TRUNC) as u32,
                0,
            );
            assert_eq!(created.map(|_| ()), Err(Errno(libc::EEXIST)), "{name}");
            assert_eq!(
                s.fs.setattr(
                    &ROOT,
                    l.inode,
                    &SetAttr {
                        size: Some(0),
                        ..SetAttr::default()
                    }
                )
                .map(|_| ()),
                Err(Errno::INVAL)
            );
            assert_eq!(
                s.fs.setxattr(&ROOT, l.inode, b"user.x", b"1", 0),
                Err(Errno::OPNOTSUPP)
            );
            // chown/utimens change the link only.
            s.fs.setattr(
                &ROOT,
                l.inode,
                &SetAttr {
                    uid: Some(1234),
                    atime: Some(SetTime::Now),
                    mtime: Some(SetTime::Now),
                    ..SetAttr::default()
                },
            )
            .unwrap();
            assert_eq!(fs::symlink_metadata(s.host(name)).unwrap().uid(), 1234);
            // A hard link of the symlink node is a link to the symlink.
            let hl = format!("{name}.hl");
            let e = s.fs.link(&ROOT, l.inode, ROOT_INODE, n(&hl)).unwrap();
            assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK);
            assert!(fs::symlink_metadata(s.host(&hl))
                .unwrap()
                .file_type()
                .is_symlink());
        }
        // Hard links name only nodes the backend handed out.
        assert_eq!(
            s.fs.link(&ROOT, 999_999, ROOT_INODE, n("x")).map(|_| ()),
            Err(Errno::BADF)
        );
        // No `..`: the device refuses the name (and nothing else reaches here).
        assert!(Name::new(b"..").is_err());
        assert!(Name::new(b"../outside").is_err());
        s.assert_outside_unchanged();
    }

    #[test]
    fn rename_race_keeps_creates_inside() {
        let mut s = Setup::new();
        fs::create_dir(s.host("d")).unwrap();
        std::os::unix::fs::symlink("../outside", s.host("l")).unwrap();
        let d = s.fs.lookup(&ROOT, ROOT_INODE, n("d")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = {
            let stop = Arc::clone(&stop);
            let a = CString::new(s.host("d").as_os_str().as_bytes()).unwrap();
            let b = CString::new(s.host("l").as_os_str().as_bytes()).unwrap();
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: both paths are NUL-terminated and live for
                    // the call.
                    let r = unsafe {
                        libc::syscall(
                            libc::SYS_renameat2,
                            libc::AT_FDCWD,
                            a.as_ptr(),
                            libc::AT_FDCWD,
                            b.as_ptr(),
                            libc::RENAME_EXCHANGE,
                        )
                    };
                    assert_eq!(r, 0);
                    swaps += 1;
                }
                swaps
            })
        };
        let mut made = 0;
        for i in 0..300 {
            // Through the held node: always the real directory.
            let (e, o) = s.create(d.inode, &format!("f{i}"));
            s.fs.release(&ROOT, e.inode, o.handle).unwrap();
            s.fs.forget(e.inode, 1);
            made += 1;
            // Through a fresh lookup of "d": the directory or the symlink.
            if let Ok(e) = s.fs.lookup(&ROOT, ROOT_INODE, n("d")) {
                match s.fs.mkdir(&ROOT, e.inode, n(&format!("m{i}")), 0o755, 0) {
                    Ok(m) => {
                        assert_eq!(e.inode, d.inode);
                        s.fs.forget(m.inode, 1);
                        made += 1;
                    }
                    Err(err) => assert_eq!(err, Errno(libc::ENOTDIR)),
                }
                s.fs.forget(e.inode, 1);
            }
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swaps.join().unwrap();
        assert!(swaps > 0);
        let real = if fs::symlink_metadata(s.host("d")).unwrap().is_dir() {
            s.host("d")
        } else {
            s.host("l")
        };
        assert_eq!(fs::read_dir(real).unwrap().count(), made);
        s.assert_outside_unchanged();
    }

    #[test]
    fn creates_run_as_the_caller() {
        let mut s = Setup::new();
        let (e, o) =
            s.fs.create(&USER, ROOT_INODE, n("f"), 0o100644, libc::O_RDWR as u32, 0)
                .unwrap();
        assert_eq!((e.attr.uid, e.attr.gid), (1000, 1000));
        assert_eq!((fsuid(), fsgid()), (0, 0));
        s.fs.release(&ROOT, e.inode, o.handle).unwrap();
        let d = s.fs.mkdir(&USER, ROOT_INODE, n("d"), 0o755, 0).unwrap();
        let l = s.fs.symlink(&USER, d.inode, n("l"), b"f").unwrap();
        let p =
            s.fs.mknod(&USER, d.inode, n("p"), libc::S_IFIFO | 0o600, 0, 0)
                .unwrap();
        let h = s.fs.link(&USER, e.inode, d.inode, n("h")).unwrap();
        for (entry, path) in [(d, "d"), (l, "d/l"), (p, "d/p"), (h, "d/h")] {
            assert_eq!((entry.attr.uid, entry.attr.gid), (1000, 1000), "{path}");
            let md = fs::symlink_metadata(s.host(path)).unwrap();
            assert_eq!((md.uid(), md.gid()), (1000, 1000), "{path}");
        }
        assert_eq!((fsuid(), fsgid()), (0, 0));
        // The host checks the caller's permission: a root-owned 0755
        // directory refuses uid 1000.
        let r = s.fs.mkdir(&ROOT, ROOT_INODE, n("r"), 0o755, 0).unwrap();
        assert_eq!(
            s.fs.create(&USER, r.inode, n("f"), 0o644, 2, 0).map(|_| ()),
            Err(Errno::ACCES)
        );
        assert_eq!(
            s.fs.mkdir(&USER, r.inode, n("f"), 0o755, 0).map(|_| ()),
            Err(Errno::ACCES)
        );
        assert_eq!((fsuid(), fsgid()), (0, 0));
        assert!(!s.host("r/f").exists());
        s.assert_outside_unchanged();
    }

    #[test]
    fn an_existing_file_is_opened_as_the_caller() {
        let mut s = Setup::new();
        fs::write(s.host("secret"), b"root only").unwrap();
        fs::set_permissions(s.host("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        // The guest believed the name was free: no O_EXCL, and it checked
        // nothing on the host's file.
        let flags = (libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u32;
        assert_eq!(
            s.fs.create(&USER, ROOT_INODE, n("secret"), 0o644, flags, 0)
                .map(|_| ()),
            Err(Errno::ACCES)
        );
        assert_eq!(fs::read(s.host("secret")).unwrap(), b"root only");
        assert_eq!((fsuid(), fsgid()), (0, 0));
        assert_eq!(s.fs.counts(), (1, 0));
    }

    #[test]
    fn the_backend_moves_to_the_device_thread() {
        fn send<T: Send>() {}
        send::<Passthrough>();
    }

    #[test]
    fn no_panic_on_nonsense() {
        let mut s = Setup::new();
        let (e, o) = s.create(ROOT_INODE, "f");
        let mut buf = [0u8; 64];
        for inode in [0, ROOT_INODE, e.inode, 2_000_000, u64::MAX] {
            for handle in [0, o.handle, 77, u64::MAX] {
                let _ = s.fs.getattr(&ROOT, inode, Some(handle));
                let _ = s.fs.read(&ROOT, inode, handle, u64::MAX, &mut buf);
                let _ = s.fs.write(&ROOT, inode, handle, u64::MAX, b"x", true);
                let _ =
                    s.fs.fallocate(&ROOT, inode, handle, u64::MAX, u64::MAX, u32::MAX);
                let _ = s.fs.lseek(&ROOT, inode, handle, u64::MAX, u32::MAX);
                let _ = s.fs.fsync(&ROOT, inode, handle, true);
                let mut sink = DirSink::new(&mut buf, true);
                let _ = s.fs.readdir(&ROOT, inode, handle, u64::MAX, &mut sink);
                let _ = s.fs.setattr(
                    &ROOT,
                    inode,
                    &SetAttr {
                        handle: Some(handle),
                        size: Some(u64::MAX),
                        mtime: Some(SetTime::At {
                            secs: u64::MAX,
                            nsecs: u32::MAX,
                        }),
                        ..SetAttr::default()
                    },
                );
            }
            let _ = s.fs.access(&ROOT, inode, u32::MAX);
            let _ = s.fs.readlink(&ROOT, inode, &mut []);
            let _ = s.fs.setxattr(&ROOT, inode, b"", b"", u32::MAX);
            let _ = s.fs.getxattr(&ROOT, inode, b"", &mut []);
            let _ =
                s.fs.mknod(&ROOT, inode, n("m"), u32::MAX, u32::MAX, u32::MAX);
            let _ = s.fs.rename(&ROOT, inode, n("a"), inode, n("b"), u32::MAX);
            let _ = s.fs.statfs(&ROOT, inode);
            s.fs.forget(inode, 0);
        }
        // The sentinel sits outside; the share is what it was plus "m".
        s.assert_outside_unchanged();
    }
}
