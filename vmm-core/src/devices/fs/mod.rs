//! virtio-fs, the shared file system device (virtio 1.2, section 5.11):
//! FUSE requests from the guest, answered by a host [`FileSystem`].
//!
//! Two queues: [`HIPRIO_QUEUE`] (0), where the driver sends FORGET,
//! BATCH_FORGET and INTERRUPT, and one request queue, [`REQUEST_QUEUE`]
//! (1). No notification queue, no DAX window. The configuration space is
//! read-only: the `tag` the guest mounts (36 bytes, NUL padded) and
//! `num_request_queues` (1). The device offers the event index and
//! indirect descriptors; the transport adds `VERSION_1`.
//!
//! # Requests
//!
//! A request is one chain: device-readable buffers (the 40-byte
//! `fuse_in_header`, the opcode's arguments, a WRITE's data), then
//! device-writable ones (the 16-byte `fuse_out_header` and the reply). The
//! device copies the readable part into its input buffer ([`IN_BUF_SIZE`]),
//! parses it exactly ([`fuse::parse_request`]: fixed structures as long as
//! the kernel sends them, names NUL-terminated and checked as [`Name`]s, a
//! WRITE's data as long as it says), asks the [`FileSystem`], builds the
//! reply in its output buffer ([`OUT_BUF_SIZE`]) and copies it into the
//! writable part; the used length is the bytes written. Requests are
//! answered one at a time, within the notification that announced them.
//!
//! - FORGET, BATCH_FORGET and INTERRUPT (on either queue) get no reply:
//!   used length 0. Nothing is ever in flight, so INTERRUPT has nothing to
//!   do.
//! - Before INIT every request but INIT is answered `EIO` (a FORGET is
//!   dropped). DESTROY calls [`FileSystem::destroy`] and answers; a new
//!   INIT starts again (a second INIT without DESTROY destroys first). A
//!   device reset ends the session the same way.
//! - Not implemented, answered `ENOSYS` (the kernel then stops asking or
//!   falls back): GETLK/SETLK/SETLKW (no `POSIX_LOCKS`/`FLOCK_LOCKS`, so
//!   the guest keeps locks local), IOCTL, POLL, BMAP, NOTIFY_REPLY,
//!   SETUPMAPPING/REMOVEMAPPING (no DAX), COPY_FILE_RANGE, SYNCFS, TMPFILE,
//!   and any unknown opcode.
//! - READ and READDIR(PLUS) replies are capped at the size asked, at
//!   [`MAX_READ`] and at the writable space; GETXATTR/LISTXATTR with size
//!   0 answer the length, otherwise the value (`ERANGE` when longer than
//!   the size asked or the space).
//!
//! # INIT
//!
//! FUSE 7.31 to 7.38: major 7 is required (a larger major is answered
//! with our major alone, so the driver retries; a smaller one, or a minor
//! below 7.31, `EPROTO`); the reply's minor is the smaller of the driver's
//! and 38. `max_write` is [`MAX_WRITE`], `max_pages` [`MAX_PAGES`]
//! (assuming 4 KiB guest pages), `time_gran` 1 ns, `max_readahead` the
//! driver's capped at [`MAX_READ`], `max_background` 0 (the driver's
//! default). Of the capabilities the driver offers the device takes
//! [`INIT_FLAGS`]:
//!
//! - `ASYNC_READ`, `PARALLEL_DIROPS`, `BIG_WRITES`, `MAX_PAGES`: the
//!   device serves requests in order, one at a time, so nothing they allow
//!   can race.
//! - `DO_READDIRPLUS`, `READDIRPLUS_AUTO`: [`DirSink`] builds both forms.
//! - `CACHE_SYMLINKS`: link targets are cached like file data.
//! - `AUTO_INVAL_DATA`: the host may change shared files behind the
//!   guest's back; the guest drops cached pages when it sees a new mtime.
//!   (`EXPLICIT_INVAL_DATA` would need invalidation notifications, and
//!   there is no notification queue.)
//! - `HANDLE_KILLPRIV_V2`: [`SetAttr::kill_suidgid`] and WRITE's
//!   `kill_priv` reach the backend, which clears the set-id bits itself
//!   (a host process with `CAP_FSETID` would not).
//!
//! Not taken: `ATOMIC_O_TRUNC` (the guest truncates with a SETATTR
//! instead, so an O_TRUNC never depends on the backend's open, and
//! `FUSE_OPEN_KILL_SUIDGID` never comes), `EXPORT_SUPPORT` (no lookups of
//! `.`/`..` by node id), `POSIX_ACL`, `DONT_MASK` (the umask reaches the
//! backend in MKNOD/MKDIR/CREATE, which applies it), `WRITEBACK_CACHE`
//! (the host must see writes), `SETXATTR_EXT` (so `fuse_setxattr_in` is 8
//! bytes), `INIT_EXT` and everything in `flags2` (so requests carry no
//! extensions: a header with `total_extlen` is refused), the lock flags.
//!
//! # Faults and bounds
//!
//! Nothing the guest sends makes the device panic, allocate, or reach the
//! backend with an unchecked name: every fault is an [`FsError`], recorded
//! in [`Fs::last_error`] and counted in [`FsStats::faults`]. When the
//! writable part holds an out header the request is answered with an
//! error (unique 0 when the header itself could not be read):
//!
//! - a readable part shorter than the in header, a header `len` that is
//!   not the readable length, extensions, truncated or overlong arguments,
//!   a name missing its NUL, a bad name (`/`, `.`, `..`, empty: `EINVAL`;
//!   too long: `ENAMETOOLONG`), a WRITE or SETXATTR whose data does not
//!   match its size: `EINVAL`;
//! - a readable part longer than [`IN_BUF_SIZE`]: `EINVAL`;
//! - a fixed-size reply (an entry, attributes, ...) that does not fit the
//!   writable part: `EIO`, decided before the backend is asked, so a
//!   LOOKUP never takes a reference the guest cannot learn of. (`ERANGE`
//!   is left to GETXATTR/LISTXATTR, where it tells userspace to retry with
//!   a bigger buffer.)
//!
//! A chain that cannot be answered (malformed, a readable buffer after a
//! writable one, no room for an out header) is given back with 0 bytes,
//! counted in [`FsStats::rejected`], and the backend is not asked (a
//! FORGET, which takes no reply, is still served).
//!
//! A guest cannot make the host spin: a notification serves at most
//! [`MAX_CHAINS_PER_NOTIFY`] chains (a full queue) of at most
//! [`IN_BUF_SIZE`] bytes in and [`OUT_BUF_SIZE`] out; the rest wait for
//! the driver's next notification (the device never suppresses them) and
//! are counted in [`FsStats::budget_stops`].
//!
//! # What the host calls
//!
//! [`Fs::new`] with the tag and the [`FileSystem`], boxed (the two bounce
//! buffers make it over 256 KiB), behind an
//! [`MmioTransport`](crate::mmio::MmioTransport); the transport's queue
//! notifications do the rest ([`VirtioDevice::queue_notify`]). The
//! backend is called on the device's thread, one request at a time.
//!
//! # Snapshots
//!
//! As for virtio-rng, the device has no guest-visible state of its own
//! beyond its transport's
//! [`MmioTransportState`](crate::mmio::MmioTransportState): its
//! configuration space is fixed by the tag, and every request is answered
//! within its notification. The FUSE session is not saved: node ids and
//! handles live in the backend, which cannot be snapshotted. So a template
//! must be taken with no FUSE session mounted (the shim makes templates
//! before any mount); a restored device is [`Fs::new`] with the same tag,
//! and the guest mounts afterwards.
//!
//! [`VirtioDevice::queue_notify`]: crate::mmio::VirtioDevice::queue_notify

mod backend;
mod device;
pub mod fuse;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;

pub use backend::{
    Attr, Context, DirEntry, DirSink, Entry, Errno, FileSystem, Handle, Inode, Name, Opened,
    SetAttr, SetTime, StatFs, NAME_MAX, ROOT_INODE,
};
pub use device::{
    Fs, FsConfigError, FsError, FsStats, CONFIG_SIZE, FS_QUEUE_SIZE, HIPRIO_QUEUE, INIT_FLAGS,
    IN_BUF_SIZE, MAX_CHAINS_PER_NOTIFY, MAX_PAGES, MAX_READ, MAX_WRITE, OUT_BUF_SIZE,
    REQUEST_QUEUE, TAG_SIZE,
};
pub use fuse::{FuseError, Request};

/// virtio device ID of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
