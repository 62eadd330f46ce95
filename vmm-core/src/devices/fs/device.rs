//! The virtio-fs device: configuration space, the two queues, and the
//! FUSE request loop over a [`FileSystem`].

use core::time::Duration;

use super::backend::{Context, DirSink, Errno, FileSystem};
use super::fuse::{
    self, init_flags as ff, parse_request, FuseError, InHeader, InitOut, Request,
    FUSE_KERNEL_MINOR_VERSION, FUSE_KERNEL_VERSION, FUSE_MIN_MINOR_VERSION, IN_HEADER_SIZE,
    OUT_HEADER_SIZE,
};
use super::VIRTIO_ID_FS;
use crate::irq::IrqLine;
use crate::memory::{GuestMemory, MemoryError};
use crate::mmio::{read_config_window, DeviceError, VirtioContext, VirtioDevice};
use crate::queue::{
    copy_from_chain, copy_to_chain, drain_reporting, ChainError, Descriptor, DescriptorChain,
    Served, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of each of the two queues.
pub const FS_QUEUE_SIZE: u16 = 128;
/// Index of the high-priority queue (FORGET, BATCH_FORGET, INTERRUPT).
pub const HIPRIO_QUEUE: u16 = 0;
/// Index of the one request queue.
pub const REQUEST_QUEUE: u16 = 1;
/// Largest WRITE the device takes (`fuse_init_out.max_write`).
pub const MAX_WRITE: usize = 128 << 10;
/// Largest READ (and READDIR) reply the device gives.
pub const MAX_READ: usize = 128 << 10;
/// Most pages per request told to the driver: [`MAX_READ`] in 4 KiB pages.
pub const MAX_PAGES: u16 = (MAX_READ / 4096) as u16;
/// Size of the input bounce buffer: a WRITE of [`MAX_WRITE`] with its
/// headers, and more room than any other request needs.
pub const IN_BUF_SIZE: usize = MAX_WRITE + 4096;
/// Size of the output bounce buffer: a READ of [`MAX_READ`] with its
/// header.
pub const OUT_BUF_SIZE: usize = MAX_READ + 4096;
/// Most requests one notification serves: a full queue.
pub const MAX_CHAINS_PER_NOTIFY: u16 = FS_QUEUE_SIZE;
/// Length of the `tag` field of the configuration space.
pub const TAG_SIZE: usize = 36;
/// Size of the configuration space: `tag`, `num_request_queues`.
pub const CONFIG_SIZE: usize = TAG_SIZE + 4;
/// Buffers per chain: a request of [`MAX_PAGES`] pages either way, its
/// headers, and room to spare.
const CHAIN_CAPACITY: usize = 128;
/// Queue sizes, indexed like the queues.
const QUEUE_SIZES: [u16; 2] = [FS_QUEUE_SIZE; 2];
/// READLINK targets are at most this long (`PATH_MAX` less the NUL).
const READLINK_MAX: usize = 4095;

/// The capabilities the device takes when the driver offers them; see the
/// module documentation for why these.
pub const INIT_FLAGS: u32 = ff::ASYNC_READ
    | ff::BIG_WRITES
    | ff::AUTO_INVAL_DATA
    | ff::DO_READDIRPLUS
    | ff::READDIRPLUS_AUTO
    | ff::PARALLEL_DIROPS
    | ff::MAX_PAGES
    | ff::CACHE_SYMLINKS
    | ff::HANDLE_KILLPRIV_V2;

/// A tag the device cannot offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FsConfigError {
    /// The tag is empty, longer than [`TAG_SIZE`] bytes, or holds a NUL.
    #[error("virtio-fs tag of {len} bytes is empty, longer than 36 bytes, or holds a NUL")]
    InvalidTag {
        /// The tag's length.
        len: usize,
    },
    /// A request or reply buffer is smaller than [`IN_BUF_SIZE`] /
    /// [`OUT_BUF_SIZE`].
    #[error("virtio-fs buffer of {len} bytes is smaller than {need}")]
    BufferTooSmall {
        /// The buffer's length.
        len: usize,
        /// What the device needs.
        need: usize,
    },
}

/// A request the device could not serve as asked. Every variant is
/// guest-triggerable; each is answered with an error reply when the chain
/// has room for the out header, or given back with 0 bytes otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    /// A buffer, or a descriptor, lies outside guest memory.
    #[error("request reaches {addr:#x}+{len:#x}, outside guest memory")]
    OutsideGuestMemory {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// The chain is malformed (a loop, an index out of range, more than
    /// 128 buffers, ...).
    #[error("malformed request chain")]
    Malformed(#[source] ChainError),
    /// A device-readable buffer follows a device-writable one.
    #[error("request has a readable buffer {addr:#x}+{len:#x} after a writable one")]
    ReadableAfterWritable {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The readable part is longer than the input buffer; answered
    /// `EINVAL`.
    #[error("request of {len} bytes is longer than {IN_BUF_SIZE}")]
    RequestTooLong {
        /// The readable part's length.
        len: u32,
    },
    /// The writable part cannot hold the out header: nothing can be
    /// answered.
    #[error("writable part of {room} bytes cannot hold a FUSE out header")]
    NoRoomForHeader {
        /// The writable part's length.
        room: u32,
    },
    /// The writable part cannot hold the reply; answered `EIO` before the
    /// file system is asked.
    #[error("reply of {len} bytes does not fit the {room} writable bytes")]
    NoRoomForReply {
        /// The reply's length, header included.
        len: usize,
        /// The writable part's length.
        room: u32,
    },
    /// A malformed FUSE request; answered with [`FuseError::errno`].
    #[error("malformed FUSE request")]
    Protocol(#[source] FuseError),
    /// A request other than INIT before INIT; answered `EIO`.
    #[error("FUSE opcode {opcode} before INIT")]
    NotInitialized {
        /// The opcode.
        opcode: u32,
    },
    /// Copying to or from guest memory failed.
    #[error("cannot access guest memory")]
    Memory(#[source] MemoryError),
}

impl From<ChainError> for FsError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::Buffer { addr, len } => FsError::OutsideGuestMemory {
                addr,
                len: u64::from(len),
            },
            ChainError::Table(
                MemoryError::OutOfBounds { addr, len } | MemoryError::Overflow { addr, len },
            ) => FsError::OutsideGuestMemory { addr, len },
            other => FsError::Malformed(other),
        }
    }
}

/// What the device did so far, for the host's log and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    /// Chains taken from the high-priority queue.
    pub hiprio_chains: u64,
    /// Chains taken from the request queue.
    pub request_chains: u64,
    /// Requests answered with success.
    pub replies: u64,
    /// Requests answered with an error (from the file system, `ENOSYS`, or
    /// a fault of the guest's).
    pub error_replies: u64,
    /// Requests that take no reply (FORGET, BATCH_FORGET, INTERRUPT).
    pub no_reply: u64,
    /// Chains given back with 0 bytes, unanswered ([`FsError`]).
    pub rejected: u64,
    /// Faults of the guest's ([`FsError`]), answered or not.
    pub faults: u64,
    /// Notifications that stopped at [`MAX_CHAINS_PER_NOTIFY`] with
    /// requests left on the queue.
    pub budget_stops: u64,
}

/// How a request ends, before it is written back.
enum Outcome {
    /// No reply (FORGET and friends).
    None,
    /// Success, with this many bytes of reply after the out header.
    Ok(usize),
    /// An error reply.
    Err(Errno),
}

/// The two halves of a request chain.
struct Split<'c> {
    readable: &'c [Descriptor],
    writable: &'c [Descriptor],
    in_len: u32,
    room: u32,
}

/// The device's buffer type when it holds its buffers inline.
pub type InlineBuffer = [u8; IN_BUF_SIZE];

// One buffer type serves both directions.
const _: () = assert!(IN_BUF_SIZE == OUT_BUF_SIZE);

/// A virtio-fs device over file system `F`: one high-priority queue, one
/// request queue, no DAX window, no notification queue. Its request and
/// reply buffers are `B`s: inline arrays ([`Fs::new`]) or buffers the host
/// allocated ([`Fs::with_buffers`], e.g. boxed slices, so the device is
/// never built on a small stack).
pub struct Fs<F, B = InlineBuffer> {
    fs: F,
    config: [u8; CONFIG_SIZE],
    in_buf: B,
    out_buf: B,
    /// A FUSE session is up (INIT answered, no DESTROY or reset since).
    session: bool,
    /// Requests the current notification may still serve.
    chains_left: u16,
    /// The queue being served, for the counters.
    serving: u16,
    stats: FsStats,
    last_error: Option<FsError>,
}

impl<F: FileSystem> Fs<F> {
    /// A device named `tag` (what the guest mounts: 1 to 36 bytes, no NUL)
    /// over `fs`, its buffers inline. The device is large (two bounce
    /// buffers of over 128 KiB): put it on the heap, or use
    /// [`Fs::with_buffers`].
    pub fn new(tag: &str, fs: F) -> Result<Fs<F>, FsConfigError> {
        Fs::with_buffers(tag, fs, [0; IN_BUF_SIZE], [0; OUT_BUF_SIZE])
    }
}

impl<F: FileSystem, B: AsRef<[u8]> + AsMut<[u8]>> Fs<F, B> {
    /// A device named `tag` over `fs` with request buffer `in_buf` (at
    /// least [`IN_BUF_SIZE`] bytes) and reply buffer `out_buf` (at least
    /// [`OUT_BUF_SIZE`]).
    pub fn with_buffers(
        tag: &str,
        fs: F,
        in_buf: B,
        out_buf: B,
    ) -> Result<Fs<F, B>, FsConfigError> {
        for (buf, need) in [(&in_buf, IN_BUF_SIZE), (&out_buf, OUT_BUF_SIZE)] {
            let len = buf.as_ref().len();
            if len < need {
                return Err(FsConfigError::BufferTooSmall { len, need });
            }
        }
        let t = tag.as_bytes();
        if t.is_empty() || t.len() > TAG_SIZE || t.contains(&0) {
            return Err(FsConfigError::InvalidTag { len: t.len() });
        }
        let mut config = [0u8; CONFIG_SIZE];
        config[..t.len()].copy_from_slice(t);
        config[TAG_SIZE..].copy_from_slice(&1u32.to_le_bytes());
        Ok(Fs {
            fs,
            config,
            in_buf,
            out_buf,
            session: false,
            chains_left: 0,
            serving: 0,
            stats: FsStats::default(),
            last_error: None,
        })
    }

    /// The file system.
    pub fn fs(&self) -> &F {
        &self.fs
    }

    /// The file system, mutably.
    pub fn fs_mut(&mut self) -> &mut F {
        &mut self.fs
    }

    /// The counters.
    pub fn stats(&self) -> FsStats {
        self.stats
    }

    /// The guest's last fault.
    pub fn last_error(&self) -> Option<FsError> {
        self.last_error
    }

    /// Whether a FUSE session is up (INIT answered, no DESTROY or device
    /// reset since).
    pub fn session_active(&self) -> bool {
        self.session
    }

    /// Serves up to [`MAX_CHAINS_PER_NOTIFY`] requests on queue `index`.
    fn process<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        index: u16,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        let Some(queue) = ctx.queues.get_mut(usize::from(index)) else {
            return Err(DeviceError::QueueNotReady { index });
        };
        if !queue.ready() {
            return Ok(());
        }
        self.chains_left = MAX_CHAINS_PER_NOTIFY;
        self.serving = index;
        let notify = drain_reporting::<CHAIN_CAPACITY, M, Self>(
            queue,
            ctx.mem,
            self,
            |fs| fs.chains_left > 0,
            Self::malformed,
            Self::serve,
        )
        .map_err(|source| DeviceError::Queue { index, source })?;
        if self.chains_left == 0 && queue.pending(ctx.mem).is_ok_and(|n| n > 0) {
            self.stats.budget_stops += 1;
        }
        if notify {
            ctx.interrupt.signal_used_buffer();
        }
        Ok(())
    }

    fn count_chain(&mut self) {
        self.chains_left = self.chains_left.saturating_sub(1);
        if self.serving == HIPRIO_QUEUE {
            self.stats.hiprio_chains += 1;
        } else {
            self.stats.request_chains += 1;
        }
    }

    /// A chain the queue could not walk: given back with 0 bytes.
    fn malformed(&mut self, e: ChainError) {
        self.count_chain();
        self.fault(e.into());
        self.stats.rejected += 1;
    }

    fn fault(&mut self, e: FsError) {
        self.stats.faults += 1;
        self.last_error = Some(e);
    }

    /// Serves one chain: says how many bytes the device wrote into it.
    fn serve<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain<CHAIN_CAPACITY>,
    ) -> Served {
        self.count_chain();
        let split = match split(chain) {
            Ok(s) => s,
            Err(e) => {
                self.fault(e);
                self.stats.rejected += 1;
                return Served::Used(0);
            }
        };
        let faults = self.stats.faults;
        let (unique, outcome) = self.answer(mem, &split);
        let (errno, n) = match outcome {
            Outcome::None => {
                self.stats.no_reply += 1;
                return Served::Used(0);
            }
            Outcome::Ok(n) => (0, n),
            Outcome::Err(errno) => (errno.0, 0),
        };
        if (split.room as usize) < OUT_HEADER_SIZE {
            // Nothing can be answered; keep the first fault's reason.
            if self.stats.faults == faults {
                self.fault(FsError::NoRoomForHeader { room: split.room });
            }
            self.stats.rejected += 1;
            return Served::Used(0);
        }
        match self.reply(mem, &split, unique, errno, n) {
            Ok(used) => {
                // reply() turns a reply that does not fit into EIO.
                if errno == 0 && used as usize == OUT_HEADER_SIZE + n {
                    self.stats.replies += 1;
                } else {
                    self.stats.error_replies += 1;
                }
                Served::Used(used)
            }
            Err(e) => {
                self.fault(e);
                self.stats.rejected += 1;
                Served::Used(0)
            }
        }
    }

    /// Writes the out header (and `n` bytes of reply already in
    /// `out_buf` after it) into the writable part; returns the used
    /// length.
    fn reply<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        split: &Split<'_>,
        unique: u64,
        errno: i32,
        n: usize,
    ) -> Result<u32, FsError> {
        let total = OUT_HEADER_SIZE + n;
        let room = split.room as usize;
        if room < OUT_HEADER_SIZE {
            return Err(FsError::NoRoomForHeader { room: split.room });
        }
        // Replies are sized to the room before the file system is asked;
        // this only guards against a backend that says it wrote more.
        let (total, errno) = if total > room || total > OUT_BUF_SIZE {
            (OUT_HEADER_SIZE, Errno::IO.0)
        } else {
            (total, errno)
        };
        // total <= OUT_BUF_SIZE < u32::MAX.
        fuse::write_out_header(self.out_buf.as_mut(), total as u32, -errno, unique);
        let out = self.out_buf.as_ref().get(..total).unwrap_or_default();
        let n = copy_to_chain(mem, split.writable, 0, out).map_err(FsError::Memory)?;
        Ok(n as u32)
    }

    /// Reads, parses and runs the request; returns its id and outcome.
    fn answer<M: GuestMemory + ?Sized>(&mut self, mem: &M, split: &Split<'_>) -> (u64, Outcome) {
        let in_len = split.in_len as usize;
        if in_len < IN_HEADER_SIZE {
            self.fault(FsError::Protocol(FuseError::HeaderTooShort { len: in_len }));
            return (0, Outcome::Err(Errno::INVAL));
        }
        let too_long = in_len > IN_BUF_SIZE;
        let copy = if too_long { IN_HEADER_SIZE } else { in_len };
        let Some(buf) = self.in_buf.as_mut().get_mut(..copy) else {
            return (0, Outcome::Err(Errno::IO));
        };
        match copy_from_chain(mem, split.readable, 0, buf) {
            Ok(n) if n == copy => {}
            Ok(_) => return (0, Outcome::Err(Errno::IO)),
            Err(e) => {
                self.fault(FsError::Memory(e));
                return (0, Outcome::Err(Errno::IO));
            }
        }
        let header = match InHeader::parse(buf) {
            Ok(h) => h,
            Err(e) => {
                self.fault(FsError::Protocol(e));
                return (0, Outcome::Err(e.errno()));
            }
        };
        let unique = header.unique;
        if too_long {
            self.fault(FsError::RequestTooLong { len: split.in_len });
            return (unique, Outcome::Err(Errno::INVAL));
        }
        (unique, self.run(&header, split.in_len, split.room))
    }

    /// Checks the header against the request, parses the arguments, and
    /// asks the file system.
    fn run(&mut self, header: &InHeader, in_len: u32, room: u32) -> Outcome {
        if header.len != in_len {
            return self.protocol(FuseError::LengthMismatch {
                header: header.len,
                actual: in_len as usize,
            });
        }
        if header.total_extlen != 0 {
            return self.protocol(FuseError::Extensions {
                units: header.total_extlen,
            });
        }
        // in_len <= IN_BUF_SIZE: checked by the caller.
        let args = self
            .in_buf
            .as_ref()
            .get(IN_HEADER_SIZE..in_len as usize)
            .unwrap_or_default();
        let req = match parse_request(header.opcode, args) {
            Ok(r) => r,
            Err(e) => {
                self.stats.faults += 1;
                self.last_error = Some(FsError::Protocol(e));
                return Outcome::Err(e.errno());
            }
        };
        if !self.session && !matches!(req, Request::Init { .. }) {
            if req.is_noreply() {
                return Outcome::None;
            }
            self.stats.faults += 1;
            self.last_error = Some(FsError::NotInitialized {
                opcode: header.opcode,
            });
            return Outcome::Err(Errno::IO);
        }
        if !req.is_noreply() && (room as usize) < OUT_HEADER_SIZE {
            // Not asked: the answer could not reach the driver
            // (NoRoomForHeader, recorded by the caller).
            return Outcome::Err(Errno::IO);
        }
        // Room for the reply after the out header (0 if none).
        let room = (room as usize).saturating_sub(OUT_HEADER_SIZE);
        if !req.is_noreply() {
            if let Some(need) = req.fixed_reply_size() {
                if need > room {
                    self.stats.faults += 1;
                    self.last_error = Some(FsError::NoRoomForReply {
                        len: OUT_HEADER_SIZE + need,
                        room: (room + OUT_HEADER_SIZE) as u32,
                    });
                    return Outcome::Err(Errno::IO);
                }
            }
        }
        let ctx = Context {
            uid: header.uid,
            gid: header.gid,
            pid: header.pid,
        };
        let room = room.min(OUT_BUF_SIZE - OUT_HEADER_SIZE);
        // Split the borrows: the request borrows in_buf, replies go to
        // out_buf.
        let Fs {
            fs,
            out_buf,
            session,
            ..
        } = self;
        let out = out_buf
            .as_mut()
            .get_mut(OUT_HEADER_SIZE..OUT_HEADER_SIZE + room)
            .unwrap_or_default();
        dispatch(fs, session, &ctx, header.nodeid, req, out)
    }

    fn protocol(&mut self, e: FuseError) -> Outcome {
        self.fault(FsError::Protocol(e));
        Outcome::Err(e.errno())
    }
}

/// Splits a chain into its readable head and writable tail.
fn split<const N: usize>(chain: &DescriptorChain<N>) -> Result<Split<'_>, FsError> {
    let descs = chain.descriptors();
    let first_writable = descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(first_writable);
    if let Some(d) = writable.iter().find(|d| !d.is_write_only()) {
        return Err(FsError::ReadableAfterWritable {
            addr: d.addr.0,
            len: d.len,
        });
    }
    // The chain's total length fits u32, so each part does.
    let in_len = readable
        .iter()
        .map(|d| d.len)
        .fold(0u32, u32::saturating_add);
    let room = writable
        .iter()
        .map(|d| d.len)
        .fold(0u32, u32::saturating_add);
    Ok(Split {
        readable,
        writable,
        in_len,
        room,
    })
}

/// Bytes of `out` to use for a reply of at most `size` bytes.
fn capped(out: &mut [u8], size: usize) -> &mut [u8] {
    let n = size.min(out.len());
    out.get_mut(..n).unwrap_or_default()
}

/// A length the file system says it wrote into a buffer of `cap`: more is
/// a backend bug, answered `EIO`.
fn filled(n: usize, cap: usize) -> Outcome {
    if n <= cap {
        Outcome::Ok(n)
    } else {
        Outcome::Err(Errno::IO)
    }
}

/// Runs `req` against `fs`; the reply (after the out header) goes to
/// `out`, which is already cut to the room the chain has (and fixed-size
/// replies were checked to fit).
fn dispatch<F: FileSystem>(
    fs: &mut F,
    session: &mut bool,
    ctx: &Context,
    node: u64,
    req: Request<'_>,
    out: &mut [u8],
) -> Outcome {
    let res: Result<usize, Errno> = match req {
        Request::Init {
            major,
            minor,
            max_readahead,
            flags,
        } => return init(fs, session, major, minor, max_readahead, flags, out),
        Request::Destroy => {
            fs.destroy();
            *session = false;
            Ok(0)
        }
        Request::Lookup { name } => fs.lookup(ctx, node, name).map(|e| entry(out, &e)),
        Request::Forget { nlookup } => {
            fs.forget(node, nlookup);
            return Outcome::None;
        }
        Request::BatchForget { forgets } => {
            for (inode, n) in forgets.iter() {
                fs.forget(inode, n);
            }
            return Outcome::None;
        }
        Request::Interrupt { .. } => return Outcome::None,
        Request::Getattr { handle } => fs
            .getattr(ctx, node, handle)
            .map(|(a, valid)| attr(out, &a, valid)),
        Request::Setattr { attr: set } => fs
            .setattr(ctx, node, &set)
            .map(|(a, valid)| attr(out, &a, valid)),
        Request::Readlink => {
            let buf = capped(out, READLINK_MAX);
            let cap = buf.len();
            match fs.readlink(ctx, node, buf) {
                Ok(n) => return filled(n, cap),
                Err(e) => Err(e),
            }
        }
        Request::Symlink { name, target } => {
            fs.symlink(ctx, node, name, target).map(|e| entry(out, &e))
        }
        Request::Mknod {
            name,
            mode,
            rdev,
            umask,
        } => fs
            .mknod(ctx, node, name, mode, rdev, umask)
            .map(|e| entry(out, &e)),
        Request::Mkdir { name, mode, umask } => fs
            .mkdir(ctx, node, name, mode, umask)
            .map(|e| entry(out, &e)),
        Request::Unlink { name } => fs.unlink(ctx, node, name).map(|()| 0),
        Request::Rmdir { name } => fs.rmdir(ctx, node, name).map(|()| 0),
        Request::Rename {
            name,
            new_parent,
            new_name,
            flags,
        } => fs
            .rename(ctx, node, name, new_parent, new_name, flags)
            .map(|()| 0),
        Request::Link { inode, new_name } => {
            fs.link(ctx, inode, node, new_name).map(|e| entry(out, &e))
        }
        Request::Open { flags } => fs.open(ctx, node, flags).map(|o| open(out, &o)),
        Request::Opendir { flags } => fs.opendir(ctx, node, flags).map(|o| open(out, &o)),
        Request::Read {
            handle,
            offset,
            size,
        } => {
            let buf = capped(out, (size as usize).min(MAX_READ));
            let cap = buf.len();
            match fs.read(ctx, node, handle, offset, buf) {
                Ok(n) => return filled(n, cap),
                Err(e) => Err(e),
            }
        }
        Request::Write {
            handle,
            offset,
            data,
            kill_priv,
        } => match fs.write(ctx, node, handle, offset, data, kill_priv) {
            Ok(n) if n <= data.len() => {
                // n <= data.len() <= IN_BUF_SIZE.
                fuse::write_u32_out(out, n as u32);
                Ok(fuse::WRITE_OUT_SIZE)
            }
            Ok(_) => Err(Errno::IO),
            Err(e) => Err(e),
        },
        Request::Statfs => fs.statfs(ctx, node).map(|s| {
            fuse::write_statfs_out(out, &s);
            fuse::STATFS_OUT_SIZE
        }),
        Request::Release { handle } => fs.release(ctx, node, handle).map(|()| 0),
        Request::Fsync { handle, datasync } => fs.fsync(ctx, node, handle, datasync).map(|()| 0),
        Request::Flush { handle } => fs.flush(ctx, node, handle).map(|()| 0),
        Request::Setxattr { name, value, flags } => {
            if value.len() > fuse::XATTR_SIZE_MAX {
                Err(Errno(7)) // E2BIG
            } else {
                fs.setxattr(ctx, node, name, value, flags).map(|()| 0)
            }
        }
        Request::Getxattr { name, size } => {
            return xattr_reply(out, size, |buf| fs.getxattr(ctx, node, name, buf))
        }
        Request::Listxattr { size } => {
            return xattr_reply(out, size, |buf| fs.listxattr(ctx, node, buf))
        }
        Request::Removexattr { name } => fs.removexattr(ctx, node, name).map(|()| 0),
        Request::Readdir {
            handle,
            offset,
            size,
            plus,
        } => {
            let buf = capped(out, (size as usize).min(MAX_READ));
            let mut sink = DirSink::new(buf, plus);
            match fs.readdir(ctx, node, handle, offset, &mut sink) {
                Ok(()) => Ok(sink.len()),
                Err(e) => Err(e),
            }
        }
        Request::Releasedir { handle } => fs.releasedir(ctx, node, handle).map(|()| 0),
        Request::Fsyncdir { handle, datasync } => {
            fs.fsyncdir(ctx, node, handle, datasync).map(|()| 0)
        }
        Request::Access { mask } => fs.access(ctx, node, mask).map(|()| 0),
        Request::Create {
            name,
            mode,
            flags,
            umask,
        } => fs
            .create(ctx, node, name, mode, flags, umask)
            .map(|(e, o)| {
                let n = entry(out, &e);
                open(out.get_mut(n..).unwrap_or_default(), &o);
                fuse::CREATE_OUT_SIZE
            }),
        Request::Fallocate {
            handle,
            offset,
            length,
            mode,
        } => fs
            .fallocate(ctx, node, handle, offset, length, mode)
            .map(|()| 0),
        Request::Lseek {
            handle,
            offset,
            whence,
        } => fs.lseek(ctx, node, handle, offset, whence).map(|off| {
            fuse::write_u64_out(out, off);
            fuse::LSEEK_OUT_SIZE
        }),
        Request::Unsupported { .. } => Err(Errno::NOSYS),
    };
    match res {
        Ok(n) => Outcome::Ok(n),
        Err(e) => Outcome::Err(e),
    }
}

fn entry(out: &mut [u8], e: &super::backend::Entry) -> usize {
    fuse::write_entry(out, e);
    super::backend::ENTRY_OUT_SIZE
}

fn attr(out: &mut [u8], a: &super::backend::Attr, valid: Duration) -> usize {
    fuse::write_attr_out(out, a, valid);
    fuse::ATTR_OUT_SIZE
}

fn open(out: &mut [u8], o: &super::backend::Opened) -> usize {
    fuse::write_open_out(out, o);
    fuse::OPEN_OUT_SIZE
}

/// GETXATTR / LISTXATTR: a size of 0 asks for the length
/// (`fuse_getxattr_out`), otherwise the value, `ERANGE` if it is longer
/// than the driver's buffer (or than the reply can carry).
fn xattr_reply(
    out: &mut [u8],
    size: u32,
    get: impl FnOnce(&mut [u8]) -> Result<usize, Errno>,
) -> Outcome {
    if size == 0 {
        return match get(&mut []) {
            Ok(n) => match u32::try_from(n) {
                Ok(n) => {
                    fuse::write_u32_out(out, n);
                    Outcome::Ok(fuse::GETXATTR_OUT_SIZE)
                }
                Err(_) => Outcome::Err(Errno::IO),
            },
            Err(e) => Outcome::Err(e),
        };
    }
    let buf = capped(out, size as usize);
    let cap = buf.len();
    match get(buf) {
        Ok(n) => filled(n, cap),
        Err(e) => Outcome::Err(e),
    }
}

/// INIT: negotiates the version and capabilities, then starts the
/// session.
fn init<F: FileSystem>(
    fs: &mut F,
    session: &mut bool,
    major: u32,
    minor: u32,
    max_readahead: u32,
    flags: u32,
    out: &mut [u8],
) -> Outcome {
    if major > FUSE_KERNEL_VERSION {
        // The driver retries with our major (the FUSE rule).
        InitOut {
            major: FUSE_KERNEL_VERSION,
            minor: FUSE_KERNEL_MINOR_VERSION,
            ..InitOut::default()
        }
        .write(out);
        return Outcome::Ok(fuse::INIT_OUT_SIZE);
    }
    if major < FUSE_KERNEL_VERSION || minor < FUSE_MIN_MINOR_VERSION {
        return Outcome::Err(Errno::PROTO);
    }
    if *session {
        // A second INIT restarts the session.
        fs.destroy();
        *session = false;
    }
    if let Err(e) = fs.init() {
        return Outcome::Err(e);
    }
    *session = true;
    InitOut {
        major: FUSE_KERNEL_VERSION,
        minor: minor.min(FUSE_KERNEL_MINOR_VERSION),
        max_readahead: max_readahead.min(MAX_READ as u32),
        flags: flags & INIT_FLAGS,
        max_background: 0,
        congestion_threshold: 0,
        max_write: MAX_WRITE as u32,
        time_gran: 1,
        max_pages: MAX_PAGES,
    }
    .write(out);
    Outcome::Ok(fuse::INIT_OUT_SIZE)
}

impl<F: FileSystem, B: AsRef<[u8]> + AsMut<[u8]>> VirtioDevice for Fs<F, B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn avail_features(&self) -> u64 {
        // No device features (no notification queue); the transport adds
        // VERSION_1.
        (1u64 << VIRTIO_RING_F_EVENT_IDX) | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_window(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only.
    }

    fn activate<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        match ctx.queues.get(usize::from(REQUEST_QUEUE)) {
            Some(q) if q.ready() => Ok(()),
            _ => Err(DeviceError::QueueNotReady {
                index: REQUEST_QUEUE,
            }),
        }
    }

    fn queue_notify<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        queue: u16,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        match queue {
            HIPRIO_QUEUE | REQUEST_QUEUE => self.process(queue, ctx),
            _ => Ok(()),
        }
    }

    fn reset(&mut self) {
        // The driver is gone: so is its session, and every node and handle
        // it held.
        if self.session {
            self.fs.destroy();
            self.session = false;
        }
    }
}

#[cfg(test)]
mod tests;
