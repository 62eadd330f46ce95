//! [`Passthrough`]: the guest sees a host directory as it is.
//!
//! # Confinement
//!
//! [`Passthrough::new`] opens everything the backend will ever need while
//! the host's tree is still visible: the shared directory as an `O_PATH`
//! descriptor (node [`ROOT_INODE`]) and `/proc/self/fd` as a directory
//! descriptor. After that it never resolves a host path again, so it keeps
//! working once the VMM pivots or chroots away, and a guest cannot name
//! anything outside the share:
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
/// needs all of them). `fcntl` is only `F_DUPFD_CLOEXEC` (flush) and
/// `F_GETFL`/`F_SETFL`; `newfstatat` is glibc's `fstatat`.
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
    pub fn counts(&self) -> (usize, usize) {
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
        let dir = self.node(parent)?.fd.try_clone().map_err(io_errno)?;
        self.lookup_at(dir.as_fd(), name)
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
    fn init(&mut self) -> Result<(), Errno> {
        self.destroy();
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

/// `open(path, flags | O_CLOEXEC)` of an absolute host path (only in
/// [`Passthrough::new`]).
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
mod tests {}
