//! virtio-fs device tests, driven through a mock driver and the mock file
//! system.

use std::boxed::Box;
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::devices::fs::fuse::opcode as op;
use crate::devices::fs::mock::MockFs;
use crate::devices::fs::ROOT_INODE;
use crate::irq::CountingIrq;
use crate::memory::{GuestAddress, SliceMemory};
use crate::mmio::Interrupt;
use crate::queue::mock::MockSplitQueue;
use crate::queue::{Queue, VIRTQ_DESC_F_WRITE};

const MEM_SIZE: usize = 0x8_0000;
const HIPRIO_AT: GuestAddress = GuestAddress(0x1000);
const REQ_AT: GuestAddress = GuestAddress(0x4000);
const IN_AT: u64 = 0x1_0000;
const OUT_AT: u64 = 0x4_0000;
const OUT_LEN: u32 = 0x2_0000;

/// A driver: guest memory, the two queues, the device.
struct Driver {
    bytes: Vec<u8>,
    dev: Box<Fs<MockFs>>,
    queues: [Queue; 2],
    /// Chains published on each queue so far.
    sent: [u16; 2],
    unique: u64,
}

/// What came back.
#[derive(Debug)]
struct Reply {
    used: u32,
    len: u32,
    error: i32,
    unique: u64,
    body: Vec<u8>,
}

fn rd(addr: u64, len: u32) -> Descriptor {
    Descriptor {
        addr: GuestAddress(addr),
        len,
        flags: 0,
        next: 0,
    }
}

fn wr(addr: u64, len: u32) -> Descriptor {
    Descriptor {
        addr: GuestAddress(addr),
        len,
        flags: VIRTQ_DESC_F_WRITE,
        next: 0,
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl Driver {
    fn new() -> Self {
        let mut bytes = vec![0u8; MEM_SIZE];
        let queues = {
            let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
            let h = MockSplitQueue::new(&mem, HIPRIO_AT, FS_QUEUE_SIZE).unwrap();
            let r = MockSplitQueue::new(&mem, REQ_AT, FS_QUEUE_SIZE).unwrap();
            [h.create_queue(0), r.create_queue(0)]
        };
        Driver {
            bytes,
            dev: Box::new(Fs::new("share", MockFs::new()).unwrap()),
            queues,
            sent: [0; 2],
            unique: 0,
        }
    }

    /// A request's readable bytes: header (len from the args) and `args`.
    fn request(&mut self, opcode: u32, nodeid: u64, args: &[u8]) -> Vec<u8> {
        self.unique += 1;
        let h = fuse::InHeader {
            len: (IN_HEADER_SIZE + args.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            uid: 1000,
            gid: 1000,
            pid: 7,
            total_extlen: 0,
        };
        let mut b = h.to_bytes().to_vec();
        b.extend_from_slice(args);
        b
    }

    /// Sends `readable` with `room` writable bytes on `queue`; returns the
    /// used length and what the device wrote.
    fn send_raw(&mut self, queue: u16, readable: &[u8], room: u32) -> (u32, Vec<u8>) {
        let q = usize::from(queue);
        let at = if queue == HIPRIO_QUEUE {
            HIPRIO_AT
        } else {
            REQ_AT
        };
        let mem = SliceMemory::new(GuestAddress(0), &mut self.bytes);
        mem.write(GuestAddress(IN_AT), readable).unwrap();
        mem.write(GuestAddress(OUT_AT), &vec![0xee; room as usize])
            .unwrap();
        let mut drv = MockSplitQueue::new(&mem, at, FS_QUEUE_SIZE).unwrap();
        drv.set_avail_idx(self.sent[q]).unwrap();
        let mut descs = vec![];
        if !readable.is_empty() {
            descs.push(rd(IN_AT, readable.len() as u32));
        }
        if room > 0 {
            descs.push(wr(OUT_AT, room));
        }
        drv.add_chain(&descs).unwrap();
        self.sent[q] = self.sent[q].wrapping_add(1);
        let mut interrupt = Interrupt::new(CountingIrq::default());
        let mut ctx = VirtioContext {
            mem: &mem,
            queues: &mut self.queues,
            interrupt: &mut interrupt,
            features: 0,
        };
        self.dev.queue_notify(queue, &mut ctx).unwrap();
        assert_eq!(
            drv.used_idx().unwrap(),
            self.sent[q],
            "every chain comes back"
        );
        let (_, used) = drv.used_elem(self.sent[q].wrapping_sub(1)).unwrap();
        let mut out = vec![0u8; used as usize];
        mem.read(GuestAddress(OUT_AT), &mut out).unwrap();
        (used, out)
    }

    fn send(&mut self, opcode: u32, nodeid: u64, args: &[u8]) -> Reply {
        let req = self.request(opcode, nodeid, args);
        self.send_bytes(&req, OUT_LEN)
    }

    fn send_bytes(&mut self, req: &[u8], room: u32) -> Reply {
        let (used, out) = self.send_raw(REQUEST_QUEUE, req, room);
        assert!(used as usize >= OUT_HEADER_SIZE, "a reply: {used}");
        let r = Reply {
            used,
            len: u32_at(&out, 0),
            error: u32_at(&out, 4) as i32,
            unique: u64_at(&out, 8),
            body: out[OUT_HEADER_SIZE..].to_vec(),
        };
        assert_eq!(r.len, used, "out header len is the used length");
        r
    }

    fn init(&mut self) -> Reply {
        let r = self.send(op::INIT, 0, &init_args(7, 38, INIT_FLAGS | ff::POSIX_ACL));
        assert_eq!(r.error, 0);
        r
    }

    fn calls(&self) -> usize {
        self.dev.fs().calls.len()
    }
}

fn init_args(major: u32, minor: u32, flags: u32) -> Vec<u8> {
    let mut a = vec![];
    for v in [major, minor, 0x2_0000 * 2, flags] {
        a.extend_from_slice(&v.to_le_bytes());
    }
    a.extend_from_slice(&[0; 48]);
    a
}

fn name(s: &[u8]) -> Vec<u8> {
    let mut v = s.to_vec();
    v.push(0);
    v
}

fn read_args(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut a = vec![0u8; 40];
    a[0..8].copy_from_slice(&fh.to_le_bytes());
    a[8..16].copy_from_slice(&offset.to_le_bytes());
    a[16..20].copy_from_slice(&size.to_le_bytes());
    a
}

/// LOOKUPs `n` in the root; returns the node id.
fn lookup(d: &mut Driver, n: &[u8]) -> u64 {
    let r = d.send(op::LOOKUP, ROOT_INODE, &name(n));
    assert_eq!(r.error, 0);
    assert_eq!(r.body.len(), super::super::backend::ENTRY_OUT_SIZE);
    u64_at(&r.body, 0)
}

#[test]
fn config_space_holds_tag_and_one_queue() {
    let dev = Fs::new("share", MockFs::new()).unwrap();
    let mut tag = [0u8; 36];
    for (i, b) in tag.iter_mut().enumerate() {
        dev.read_config(i as u64, core::slice::from_mut(b));
    }
    assert_eq!(&tag[..6], b"share\0");
    let mut n = [0u8; 4];
    dev.read_config(36, &mut n);
    assert_eq!(u32::from_le_bytes(n), 1);
    assert_eq!(dev.device_type(), 26);
    assert_eq!(dev.queue_max_sizes().len(), 2);
    for bad in ["", "a\0b", "0123456789012345678901234567890123456"] {
        assert!(Fs::new(bad, MockFs::new()).is_err(), "{bad:?}");
    }
    assert!(Fs::new("012345678901234567890123456789012345", MockFs::new()).is_ok());
}

#[test]
fn init_handshake() {
    let mut d = Driver::new();
    let r = d.init();
    assert_eq!(r.body.len(), fuse::INIT_OUT_SIZE);
    assert_eq!(u32_at(&r.body, 0), 7);
    assert_eq!(u32_at(&r.body, 4), 38);
    assert_eq!(u32_at(&r.body, 8), MAX_READ as u32, "readahead capped");
    assert_eq!(u32_at(&r.body, 12), INIT_FLAGS, "POSIX_ACL not taken");
    assert_eq!(u32_at(&r.body, 20), MAX_WRITE as u32);
    assert_eq!(u16::from_le_bytes([r.body[28], r.body[29]]), MAX_PAGES);
    assert!(d.dev.session_active());
    assert!(d.dev.fs().called("init"));

    // An older minor with the 16-byte fuse_init_in.
    let mut d = Driver::new();
    let r = d.send(op::INIT, 0, &init_args(7, 31, 0)[..16]);
    assert_eq!(
        (r.error, u32_at(&r.body, 4), u32_at(&r.body, 12)),
        (0, 31, 0)
    );

    // Too old, wrong major.
    let mut d = Driver::new();
    assert_eq!(d.send(op::INIT, 0, &init_args(7, 30, 0)).error, -71);
    assert_eq!(d.send(op::INIT, 0, &init_args(6, 40, 0)).error, -71);
    let r = d.send(op::INIT, 0, &init_args(8, 0, 0));
    assert_eq!((r.error, u32_at(&r.body, 0)), (0, 7));
    assert!(!d.dev.session_active());
    assert!(!d.dev.fs().called("init"));

    // init() failing is the reply's error.
    let mut d = Driver::new();
    d.dev.fs_mut().fail_init = Some(Errno::ACCES);
    assert_eq!(d.send(op::INIT, 0, &init_args(7, 38, 0)).error, -13);
    assert!(!d.dev.session_active());
}

#[test]
fn requests_before_init_are_eio_and_destroy_ends_the_session() {
    let mut d = Driver::new();
    let r = d.send(op::GETATTR, ROOT_INODE, &[0; 16]);
    assert_eq!(r.error, -5);
    assert_eq!(r.unique, d.unique);
    assert_eq!(d.calls(), 0);
    d.init();
    assert_eq!(d.send(op::GETATTR, ROOT_INODE, &[0; 16]).error, 0);
    assert_eq!(d.send(op::DESTROY, 0, &[]).error, 0);
    assert!(d.dev.fs().called("destroy"));
    assert_eq!(d.send(op::GETATTR, ROOT_INODE, &[0; 16]).error, -5);
    d.init();
    assert_eq!(d.send(op::GETATTR, ROOT_INODE, &[0; 16]).error, 0);
    d.dev.reset();
    assert!(!d.dev.session_active());
}

#[test]
fn lookup_getattr_read_write_round_trip() {
    let mut d = Driver::new();
    d.init();
    let hello = lookup(&mut d, b"hello");
    assert_eq!(d.dev.fs().node(hello).unwrap().lookups, 1);

    let r = d.send(op::GETATTR, hello, &[0; 16]);
    assert_eq!(r.error, 0);
    assert_eq!(r.body.len(), fuse::ATTR_OUT_SIZE);
    assert_eq!(u64_at(&r.body, 16 + 8), 13, "size");

    let r = d.send(op::OPEN, hello, &[0; 8]);
    assert_eq!(r.error, 0);
    let fh = u64_at(&r.body, 0);

    let r = d.send(op::READ, hello, &read_args(fh, 7, 4096));
    assert_eq!((r.error, &r.body[..]), (0, &b"world\n"[..]));

    let mut w = read_args(fh, 0, 5);
    w.extend_from_slice(b"HELLO");
    let r = d.send(op::WRITE, hello, &w);
    assert_eq!((r.error, u32_at(&r.body, 0)), (0, 5));
    let r = d.send(op::READ, hello, &read_args(fh, 0, 5));
    assert_eq!(&r.body[..], b"HELLO");

    // A READ is capped at the writable space.
    let req = d.request(op::READ, hello, &read_args(fh, 0, 4096));
    let r = d.send_bytes(&req, 16 + 3);
    assert_eq!((r.error, &r.body[..]), (0, &b"HEL"[..]));

    assert_eq!(d.send(op::FLUSH, hello, &[0; 24]).error, 0);
    assert_eq!(d.send(op::RELEASE, hello, &[0; 24]).error, 0);
    let r = d.send(op::STATFS, hello, &[]);
    assert_eq!((r.error, r.body.len()), (0, fuse::STATFS_OUT_SIZE));
    let r = d.send(
        op::CREATE,
        ROOT_INODE,
        &[&[0u8; 16][..], &name(b"new")].concat(),
    );
    assert_eq!((r.error, r.body.len()), (0, fuse::CREATE_OUT_SIZE));
    let r = d.send(
        op::MKDIR,
        ROOT_INODE,
        &[&[0u8; 8][..], &name(b"sub")].concat(),
    );
    assert_eq!(r.error, 0);
    assert_eq!(d.send(op::RMDIR, ROOT_INODE, &name(b"sub")).error, 0);
    assert_eq!(d.send(op::LOOKUP, ROOT_INODE, &name(b"sub")).error, -2);
}

#[test]
fn forget_gets_no_reply() {
    let mut d = Driver::new();
    d.init();
    let hello = lookup(&mut d, b"hello");
    let req = d.request(op::FORGET, hello, &1u64.to_le_bytes());
    assert_eq!(d.send_raw(HIPRIO_QUEUE, &req, 0).0, 0);
    assert_eq!(d.dev.fs().node(hello).unwrap().lookups, 0);
    // On the request queue, with room to spare: still no reply.
    let mut batch = vec![1, 0, 0, 0, 0, 0, 0, 0];
    batch.extend_from_slice(&hello.to_le_bytes());
    batch.extend_from_slice(&1u64.to_le_bytes());
    let req = d.request(op::BATCH_FORGET, 0, &batch);
    assert_eq!(d.send_raw(REQUEST_QUEUE, &req, 64).0, 0);
    let req = d.request(op::INTERRUPT, 0, &5u64.to_le_bytes());
    assert_eq!(d.send_raw(HIPRIO_QUEUE, &req, 0).0, 0);
    let s = d.dev.stats();
    assert_eq!((s.no_reply, s.rejected, s.faults), (3, 0, 0));
    assert_eq!((s.hiprio_chains, s.request_chains), (2, 3));
}

#[test]
fn readdir_and_readdirplus() {
    let mut d = Driver::new();
    d.init();
    let r = d.send(op::OPENDIR, ROOT_INODE, &[0; 8]);
    let fh = u64_at(&r.body, 0);
    let r = d.send(op::READDIR, ROOT_INODE, &read_args(fh, 0, 4096));
    assert_eq!(r.error, 0);
    // ".", "..", "hello", "dir": 24-byte dirents padded to 8.
    assert_eq!(r.body.len(), 32 + 32 + 32 + 32);
    assert_eq!(&r.body[64 + 24..64 + 29], b"hello");
    // Capped at the size asked: one entry.
    let r = d.send(op::READDIR, ROOT_INODE, &read_args(fh, 2, 40));
    assert_eq!(r.body.len(), 32);
    assert_eq!(&r.body[24..29], b"hello");

    let r = d.send(op::READDIRPLUS, ROOT_INODE, &read_args(fh, 2, 4096));
    assert_eq!(r.error, 0);
    let one = (super::super::backend::ENTRY_OUT_SIZE + 24 + 5 + 7) & !7;
    assert!(r.body.len() > one);
    let hello = u64_at(&r.body, 0);
    assert_eq!(d.dev.fs().node(hello).unwrap().lookups, 1);
    assert!(d.dev.fs().called("readdirplus"));
    assert_eq!(d.send(op::RELEASEDIR, ROOT_INODE, &[0; 24]).error, 0);
}

#[test]
fn xattrs_answer_size_value_or_erange() {
    let mut d = Driver::new();
    d.init();
    let args = |size: u32| [&size.to_le_bytes()[..], &[0; 4], &name(b"user.mock")].concat();
    let r = d.send(op::GETXATTR, ROOT_INODE, &args(0));
    assert_eq!((r.error, u32_at(&r.body, 0), r.body.len()), (0, 5, 8));
    let r = d.send(op::GETXATTR, ROOT_INODE, &args(64));
    assert_eq!((r.error, &r.body[..]), (0, &b"value"[..]));
    assert_eq!(d.send(op::GETXATTR, ROOT_INODE, &args(2)).error, -34);
    let r = d.send(op::LISTXATTR, ROOT_INODE, &[0; 8]);
    assert_eq!((r.error, u32_at(&r.body, 0)), (0, 10));
    let mut s = vec![3, 0, 0, 0, 0, 0, 0, 0];
    s.extend_from_slice(b"user.x\0abc");
    assert_eq!(d.send(op::SETXATTR, ROOT_INODE, &s).error, -95);
    s.push(b'd');
    assert_eq!(d.send(op::SETXATTR, ROOT_INODE, &s).error, -22);
}

#[test]
fn bad_names_never_reach_the_backend() {
    let mut d = Driver::new();
    d.init();
    let before = d.calls();
    for n in [&b".."[..], b".", b"a/b", b"/", b""] {
        assert_eq!(d.send(op::LOOKUP, ROOT_INODE, &name(n)).error, -22, "{n:?}");
        assert_eq!(d.send(op::UNLINK, ROOT_INODE, &name(n)).error, -22);
        let mut rename = 1u64.to_le_bytes().to_vec();
        rename.extend_from_slice(b"hello\0");
        rename.extend_from_slice(&name(n));
        assert_eq!(d.send(op::RENAME, ROOT_INODE, &rename).error, -22);
    }
    let long = vec![b'x'; 256];
    assert_eq!(d.send(op::LOOKUP, ROOT_INODE, &name(&long)).error, -36);
    // No NUL, an embedded NUL.
    assert_eq!(d.send(op::LOOKUP, ROOT_INODE, b"hello").error, -22);
    assert_eq!(d.send(op::LOOKUP, ROOT_INODE, b"he\0llo\0").error, -22);
    assert_eq!(d.calls(), before, "the backend was never asked");
    assert!(matches!(
        d.dev.last_error(),
        Some(FsError::Protocol(FuseError::TrailingBytes { .. }))
    ));
}

#[test]
fn unsupported_opcodes_are_enosys() {
    let mut d = Driver::new();
    d.init();
    for o in [
        op::GETLK,
        op::SETLK,
        op::SETLKW,
        op::IOCTL,
        op::POLL,
        op::BMAP,
        op::NOTIFY_REPLY,
        op::SETUPMAPPING,
        op::REMOVEMAPPING,
        op::COPY_FILE_RANGE,
        op::SYNCFS,
        op::TMPFILE,
        7,
        19,
        9999,
    ] {
        let r = d.send(o, ROOT_INODE, &[1, 2, 3]);
        assert_eq!((r.error, r.used), (-38, 16), "opcode {o}");
    }
}

#[test]
fn truncated_args_are_einval_for_every_opcode() {
    let mut d = Driver::new();
    d.init();
    let before = d.calls();
    // Opcodes with a fixed structure, and its size.
    for (o, size) in [
        (op::GETATTR, 16),
        (op::SETATTR, 88),
        (op::MKNOD, 16),
        (op::MKDIR, 8),
        (op::RENAME, 8),
        (op::RENAME2, 16),
        (op::LINK, 8),
        (op::OPEN, 8),
        (op::READ, 40),
        (op::WRITE, 40),
        (op::RELEASE, 24),
        (op::FSYNC, 16),
        (op::FLUSH, 24),
        (op::SETXATTR, 8),
        (op::GETXATTR, 8),
        (op::LISTXATTR, 8),
        (op::OPENDIR, 8),
        (op::READDIR, 40),
        (op::READDIRPLUS, 40),
        (op::RELEASEDIR, 24),
        (op::FSYNCDIR, 16),
        (op::ACCESS, 8),
        (op::CREATE, 16),
        (op::FALLOCATE, 32),
        (op::LSEEK, 24),
        (op::BATCH_FORGET, 8),
    ] {
        let r = d.send(o, ROOT_INODE, &vec![0u8; size - 1]);
        assert_eq!(r.error, -22, "opcode {o}");
    }
    // Fixed-only structures, one byte too many.
    for (o, size) in [
        (op::GETATTR, 16),
        (op::OPEN, 8),
        (op::ACCESS, 8),
        (op::LSEEK, 24),
    ] {
        let r = d.send(o, ROOT_INODE, &vec![0u8; size + 1]);
        assert_eq!(r.error, -22, "opcode {o}");
    }
    assert_eq!(d.send(op::STATFS, ROOT_INODE, &[0]).error, -22);
    assert_eq!(d.calls(), before);
    // The device goes on.
    assert_eq!(d.send(op::GETATTR, ROOT_INODE, &[0; 16]).error, 0);
}

#[test]
fn header_faults() {
    let mut d = Driver::new();
    d.init();
    // Header len not the readable length.
    let mut req = d.request(op::GETATTR, ROOT_INODE, &[0; 16]);
    req[0] += 1;
    let r = d.send_bytes(&req, 256);
    assert_eq!((r.error, r.unique), (-22, d.unique));
    assert!(matches!(
        d.dev.last_error(),
        Some(FsError::Protocol(FuseError::LengthMismatch { .. }))
    ));
    // Shorter than a header: answered with unique 0.
    let r = d.send_bytes(&[0; 20], 256);
    assert_eq!((r.error, r.unique), (-22, 0));
    // Extensions.
    let mut req = d.request(op::GETATTR, ROOT_INODE, &[0; 16]);
    req[36] = 1;
    assert_eq!(d.send_bytes(&req, 256).error, -22);
    // Too long for the input buffer.
    let mut w = read_args(0, 0, IN_BUF_SIZE as u32);
    w.resize(40 + IN_BUF_SIZE, 0);
    let req = d.request(op::WRITE, 2, &w);
    let r = d.send_bytes(&req, 256);
    assert_eq!((r.error, r.unique), (-22, d.unique));
    assert!(matches!(
        d.dev.last_error(),
        Some(FsError::RequestTooLong { .. })
    ));
    assert_eq!(d.send(op::GETATTR, ROOT_INODE, &[0; 16]).error, 0);
}

#[test]
fn writable_space_too_small() {
    let mut d = Driver::new();
    d.init();
    let before = d.calls();
    // No room for the out header: given back with 0, backend not asked.
    let req = d.request(op::LOOKUP, ROOT_INODE, &name(b"hello"));
    assert_eq!(d.send_raw(REQUEST_QUEUE, &req, 8).0, 0);
    assert_eq!(d.send_raw(REQUEST_QUEUE, &req, 0).0, 0);
    assert_eq!(
        d.dev.last_error(),
        Some(FsError::NoRoomForHeader { room: 0 })
    );
    assert_eq!(d.dev.stats().rejected, 2);
    // Room for the header but not the entry: EIO, no reference taken.
    let r = d.send_bytes(&req, 100);
    assert_eq!((r.error, r.used), (-5, 16));
    assert_eq!(d.calls(), before);
    assert!(matches!(
        d.dev.last_error(),
        Some(FsError::NoRoomForReply { .. })
    ));
}

#[test]
fn readable_after_writable_is_refused() {
    let mut d = Driver::new();
    d.init();
    let req = d.request(op::GETATTR, ROOT_INODE, &[0; 16]);
    let mut bytes = core::mem::take(&mut d.bytes);
    {
        let mem = SliceMemory::new(GuestAddress(0), &mut bytes);
        mem.write(GuestAddress(IN_AT), &req).unwrap();
        let mut drv = MockSplitQueue::new(&mem, REQ_AT, FS_QUEUE_SIZE).unwrap();
        drv.set_avail_idx(d.sent[1]).unwrap();
        drv.add_chain(&[rd(IN_AT, 40), wr(OUT_AT, 256), rd(IN_AT + 40, 16)])
            .unwrap();
        d.sent[1] += 1;
        let mut interrupt = Interrupt::new(CountingIrq::default());
        let mut ctx = VirtioContext {
            mem: &mem,
            queues: &mut d.queues,
            interrupt: &mut interrupt,
            features: 0,
        };
        d.dev.queue_notify(REQUEST_QUEUE, &mut ctx).unwrap();
        assert_eq!(drv.used_elem(d.sent[1] - 1).unwrap().1, 0);
    }
    d.bytes = bytes;
    assert!(matches!(
        d.dev.last_error(),
        Some(FsError::ReadableAfterWritable { .. })
    ));
    assert_eq!(d.send(op::GETATTR, ROOT_INODE, &[0; 16]).error, 0);
}

/// A reply is well formed: the header's len is the used length, and an
/// error reply is a bare header with a negative errno.
fn check_reply(used: u32, out: &[u8]) -> Result<(), TestCaseError> {
    if used == 0 {
        return Ok(());
    }
    prop_assert!(used as usize >= OUT_HEADER_SIZE);
    prop_assert_eq!(u32_at(out, 0), used);
    let error = u32_at(out, 4) as i32;
    prop_assert!(error <= 0 && error > -4096);
    if error != 0 {
        prop_assert_eq!(used as usize, OUT_HEADER_SIZE);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes as the readable part: an error reply or a valid
    /// one, never a panic, and the next request is served.
    #[test]
    fn arbitrary_requests_never_panic(
        raw in proptest::collection::vec(any::<u8>(), 0..200),
        room in 0u32..512,
        init in any::<bool>(),
    ) {
        let mut d = Driver::new();
        if init {
            d.init();
        }
        let (used, out) = d.send_raw(REQUEST_QUEUE, &raw, room);
        check_reply(used, &out)?;
        let (used, out) = d.send_raw(HIPRIO_QUEUE, &raw, room);
        check_reply(used, &out)?;
        d.init();
        prop_assert_eq!(d.send(op::GETATTR, ROOT_INODE, &[0; 16]).error, 0);
    }

    /// Arbitrary opcodes with arbitrary arguments behind a valid header.
    #[test]
    fn arbitrary_opcodes_and_args_never_panic(
        opcode in prop_oneof![0u32..60, any::<u32>()],
        nodeid in prop_oneof![0u64..8, any::<u64>()],
        args in proptest::collection::vec(any::<u8>(), 0..160),
        room in prop_oneof![Just(OUT_LEN), 0u32..300],
    ) {
        let mut d = Driver::new();
        d.init();
        let req = d.request(opcode, nodeid, &args);
        let (used, out) = d.send_raw(REQUEST_QUEUE, &req, room);
        check_reply(used, &out)?;
        if used > 0 {
            prop_assert_eq!(u64_at(&out, 8), d.unique);
        }
        // Unless it ended the session, the device serves on.
        if opcode == op::DESTROY || opcode == op::INIT {
            d.init();
        }
        prop_assert_eq!(d.send(op::GETATTR, ROOT_INODE, &[0; 16]).error, 0);
    }
}
