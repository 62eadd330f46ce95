//! virtio-blk device tests, driven through a mock driver.

use std::vec;
use std::vec::Vec;

use super::*;
use crate::devices::blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use crate::irq::CountingIrq;
use crate::memory::SliceMemory;
use crate::mmio::Interrupt;
use crate::queue::mock::MockSplitQueue;
use crate::queue::{Descriptor, Queue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

struct MemDisk {
    data: Vec<u8>,
    flushes: u32,
    fail: bool,
}

impl BlockBackend for MemDisk {
    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        if self.fail {
            return Err(BackendError { errno: 5 });
        }
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        if self.fail {
            return Err(BackendError { errno: 5 });
        }
        let o = offset as usize;
        self.data[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BackendError> {
        self.flushes += 1;
        Ok(())
    }
}

const HDR: u64 = 0x8000;
const DATA: u64 = 0x9000;
const STATUS: u64 = 0xc000;

fn disk(sectors: usize) -> MemDisk {
    MemDisk {
        data: vec![0; sectors * 512],
        flushes: 0,
        fail: false,
    }
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

struct Rig {
    bytes: Vec<u8>,
}

impl Rig {
    fn new() -> Self {
        Rig {
            bytes: vec![0; 0x10000],
        }
    }
}

/// Publishes `descs` (after writing a header of `ty`/`sector`), runs the
/// device, returns (status byte, used len, interrupts).
fn run(
    dev: &mut Block<MemDisk>,
    rig: &mut Rig,
    ty: u32,
    sector: u64,
    descs: &[Descriptor],
    prepare: impl FnOnce(&SliceMemory<'_>),
) -> (u8, u32, u32) {
    let mem = SliceMemory::new(GuestAddress(0), &mut rig.bytes);
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&ty.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write(GuestAddress(HDR), &hdr).unwrap();
    mem.write(GuestAddress(STATUS), &[0xaa]).unwrap();
    prepare(&mem);
    let mut drv = MockSplitQueue::new(&mem, GuestAddress(0x1000), 16).unwrap();
    drv.add_chain(descs).unwrap();
    let mut queues: [Queue; 1] = [drv.create_queue(0)];
    let mut interrupt = Interrupt::new(CountingIrq::default());
    let mut ctx = VirtioContext {
        mem: &mem,
        queues: &mut queues,
        interrupt: &mut interrupt,
        features: 0,
    };
    dev.activate(&mut ctx).unwrap();
    dev.queue_notify(0, &mut ctx).unwrap();
    let status = mem.read_u32(GuestAddress(STATUS)).unwrap() as u8;
    assert_eq!(drv.used_idx().unwrap(), 1, "every request is answered");
    let (_, len) = drv.used_elem(0).unwrap();
    (status, len, interrupt.line().count())
}

#[test]
fn write_then_read_back() {
    let mut dev = Block::new(disk(16), false, b"skiff-disk");
    let mut rig = Rig::new();
    let (s, len, irqs) = run(
        &mut dev,
        &mut rig,
        VIRTIO_BLK_T_OUT,
        2,
        &[
            rd(HDR, 16),
            rd(DATA, 512),
            rd(DATA + 512, 512),
            wr(STATUS, 1),
        ],
        |m| m.write(GuestAddress(DATA), &[0x5a; 1024]).unwrap(),
    );
    assert_eq!((s, len, irqs), (VIRTIO_BLK_S_OK, 1, 1));
    assert_eq!(&dev.backend().data[1024..2048], &[0x5a; 1024][..]);
    assert_eq!(dev.backend().data[1023], 0);

    let mut rig = Rig::new();
    let (s, len, _) = run(
        &mut dev,
        &mut rig,
        VIRTIO_BLK_T_IN,
        2,
        &[rd(HDR, 16), wr(DATA, 1024), wr(STATUS, 1)],
        |_| {},
    );
    assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1025));
    assert_eq!(
        &rig.bytes[DATA as usize..DATA as usize + 1024],
        &[0x5a; 1024][..]
    );
}

#[test]
fn flush_get_id_and_unsupported() {
    let mut dev = Block::new(disk(8), false, b"skiff-disk-0");
    let (s, len, _) = run(
        &mut dev,
        &mut Rig::new(),
        VIRTIO_BLK_T_FLUSH,
        0,
        &[rd(HDR, 16), wr(STATUS, 1)],
        |_| {},
    );
    assert_eq!((s, len), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(dev.backend().flushes, 1);

    let mut rig = Rig::new();
    let (s, len, _) = run(
        &mut dev,
        &mut rig,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[rd(HDR, 16), wr(DATA, 20), wr(STATUS, 1)],
        |_| {},
    );
    assert_eq!((s, len), (VIRTIO_BLK_S_OK, 21));
    assert_eq!(
        &rig.bytes[DATA as usize..DATA as usize + 12],
        b"skiff-disk-0"
    );
    assert_eq!(rig.bytes[DATA as usize + 12], 0);

    let (s, _, _) = run(
        &mut dev,
        &mut Rig::new(),
        99,
        0,
        &[rd(HDR, 16), wr(STATUS, 1)],
        |_| {},
    );
    assert_eq!(s, VIRTIO_BLK_S_UNSUPP);
    assert_eq!(dev.failed_requests(), 1);
}

#[test]
fn malformed_requests_get_ioerr() {
    let mut dev = Block::new(disk(8), false, b"");
    // Past the end of the disk.
    let (s, len, _) = run(
        &mut dev,
        &mut Rig::new(),
        VIRTIO_BLK_T_IN,
        7,
        &[rd(HDR, 16), wr(DATA, 1024), wr(STATUS, 1)],
        |_| {},
    );
    assert_eq!((s, len), (VIRTIO_BLK_S_IOERR, 1));
    // Sector number that overflows.
    let (s, _, _) = run(
        &mut dev,
        &mut Rig::new(),
        VIRTIO_BLK_T_IN,
        u64::MAX,
        &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)],
        |_| {},
    );
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    // Not a whole sector.
    let (s, _, _) = run(
        &mut dev,
        &mut Rig::new(),
        VIRTIO_BLK_T_IN,
        0,
        &[rd(HDR, 16), wr(DATA, 100), wr(STATUS, 1)],
        |_| {},
    );
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    // A read into a device-readable buffer.
    let (s, _, _) = run(
        &mut dev,
        &mut Rig::new(),
        VIRTIO_BLK_T_IN,
        0,
        &[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)],
        |_| {},
    );
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    // A short header.
    let (s, _, _) = run(
        &mut dev,
        &mut Rig::new(),
        VIRTIO_BLK_T_IN,
        0,
        &[rd(HDR, 8), wr(STATUS, 1)],
        |_| {},
    );
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    // GET_ID without a buffer.
    let (s, _, _) = run(
        &mut dev,
        &mut Rig::new(),
        VIRTIO_BLK_T_GET_ID,
        0,
        &[rd(HDR, 16), wr(STATUS, 1)],
        |_| {},
    );
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    assert_eq!(dev.failed_requests(), 6);
}

#[test]
fn no_status_byte_gets_zero_length_used_entry() {
    let mut dev = Block::new(disk(8), false, b"");
    let (s, len, _) = run(
        &mut dev,
        &mut Rig::new(),
        VIRTIO_BLK_T_IN,
        0,
        &[rd(HDR, 16), rd(STATUS, 1)],
        |_| {},
    );
    assert_eq!((s, len), (0xaa, 0), "status untouched, nothing written");
}

#[test]
fn invalid_chain_is_returned_not_panicked_on() {
    let mut dev = Block::new(disk(8), false, b"");
    let mut rig = Rig::new();
    let mem = SliceMemory::new(GuestAddress(0), &mut rig.bytes);
    let mut drv = MockSplitQueue::new(&mem, GuestAddress(0x1000), 16).unwrap();
    // A two-descriptor loop.
    drv.write_desc(
        0,
        Descriptor {
            addr: GuestAddress(HDR),
            len: 16,
            flags: VIRTQ_DESC_F_NEXT,
            next: 1,
        },
    )
    .unwrap();
    drv.write_desc(
        1,
        Descriptor {
            addr: GuestAddress(HDR),
            len: 16,
            flags: VIRTQ_DESC_F_NEXT,
            next: 0,
        },
    )
    .unwrap();
    drv.publish(0).unwrap();
    let mut queues = [drv.create_queue(0)];
    let mut interrupt = Interrupt::new(CountingIrq::default());
    let mut ctx = VirtioContext {
        mem: &mem,
        queues: &mut queues,
        interrupt: &mut interrupt,
        features: 0,
    };
    dev.queue_notify(0, &mut ctx).unwrap();
    assert_eq!(drv.used_idx().unwrap(), 1);
    assert_eq!(drv.used_elem(0).unwrap(), (0, 0));
    assert_eq!(dev.failed_requests(), 1);
}

#[test]
fn read_only_device_refuses_writes_and_says_so() {
    let mut dev = Block::new(disk(8), true, b"");
    assert_ne!(dev.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    let (s, _, _) = run(
        &mut dev,
        &mut Rig::new(),
        VIRTIO_BLK_T_OUT,
        0,
        &[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)],
        |m| m.write(GuestAddress(DATA), &[1; 512]).unwrap(),
    );
    assert_eq!(s, VIRTIO_BLK_S_IOERR);
    assert!(dev.backend().data.iter().all(|&b| b == 0));
    let rw = Block::new(disk(8), false, b"");
    assert_eq!(rw.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn backend_failure_is_ioerr() {
    let mut d = disk(8);
    d.fail = true;
    let mut dev = Block::new(d, false, b"");
    let (s, len, _) = run(
        &mut dev,
        &mut Rig::new(),
        VIRTIO_BLK_T_IN,
        0,
        &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)],
        |_| {},
    );
    assert_eq!((s, len), (VIRTIO_BLK_S_IOERR, 1));
}

#[test]
fn config_space_reports_capacity_and_seg_max() {
    let dev = Block::new(disk(4096), false, b"");
    assert_eq!(dev.device_type(), VIRTIO_ID_BLOCK);
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 4096);
    let mut b = [0u8; 4];
    dev.read_config(12, &mut b);
    assert_eq!(u32::from_le_bytes(b) as usize, SEG_MAX);
    let mut b = [0u8; 4];
    dev.read_config(1000, &mut b);
    assert_eq!(b, [0; 4]);
    dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
    assert_eq!(dev.queue_max_sizes(), &[BLOCK_QUEUE_SIZE]);
}

/// Reads sector `sector` (512 bytes) into DATA; returns (status, used len).
fn read_sector(dev: &mut Block<MemDisk>, rig: &mut Rig, sector: u64) -> (u8, u32) {
    let descs = [rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)];
    let (s, len, _) = run(dev, rig, VIRTIO_BLK_T_IN, sector, &descs, |_| {});
    (s, len)
}

#[test]
fn replaced_medium_changes_capacity_and_bounds() {
    let mut dev = Block::new(disk(0), false, b"");
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0, "an empty slot");
    let mut rig = Rig::new();
    // Nothing to read from an empty slot: out of bounds, IOERR.
    assert_eq!(read_sector(&mut dev, &mut rig, 0).0, VIRTIO_BLK_S_IOERR);

    let mut medium = disk(8);
    medium.data[512..516].copy_from_slice(b"skif");
    let old = dev.replace_backend(medium);
    assert_eq!(old.data.len(), 0);
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 8);
    assert_eq!(dev.capacity_sectors(), 8);
    assert_eq!(read_sector(&mut dev, &mut rig, 1), (VIRTIO_BLK_S_OK, 513));
    assert_eq!(&rig.bytes[DATA as usize..DATA as usize + 4], b"skif");

    // Taken out again: the old medium comes back with the guest's view of it.
    let back = dev.replace_backend(disk(0));
    assert_eq!(back.data.len(), 8 * 512);
    assert_eq!(read_sector(&mut dev, &mut rig, 1).0, VIRTIO_BLK_S_IOERR);
}

mod state {
    use std::string::ToString;

    use proptest::prelude::*;

    use super::*;
    use crate::snapshot::{Persist, StateError};

    fn encode(state: &BlockState) -> Vec<u8> {
        let mut out = vec![0u8; BlockState::MAX_LEN];
        let len = state.save(&mut out).unwrap();
        out.truncate(len);
        out
    }

    /// Everything the driver can read of a device: features and config.
    fn guest_view(dev: &Block<MemDisk>) -> (u64, Vec<u8>) {
        let mut config = vec![0u8; 24];
        for (i, b) in config.iter_mut().enumerate() {
            dev.read_config(i as u64, core::slice::from_mut(b));
        }
        (dev.avail_features(), config)
    }

    #[test]
    fn encoding_is_fixed() {
        let dev = Block::new(disk(0x0102), true, b"serial-1");
        let state = dev.state();
        let mut expected = vec![0x02, 0x01, 0, 0, 0, 0, 0, 0, 1];
        expected.extend_from_slice(b"serial-1\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(encode(&state), expected);
        assert_eq!(encode(&state).len(), BlockState::MAX_LEN);
        assert_eq!(BlockState::load(&expected), Ok(state));
        let mut bad = expected.clone();
        bad[8] = 7;
        assert_eq!(
            BlockState::load(&bad),
            Err(StateError::InvalidValue {
                field: "read-only flag",
                value: 7
            })
        );
        assert!(matches!(
            BlockState::load(&expected[..28]),
            Err(StateError::TooShort { .. })
        ));
    }

    #[test]
    fn a_restored_device_looks_and_serves_the_same() {
        let mut dev = Block::new(disk(16), true, b"skiff-vda");
        let state = BlockState::load(&encode(&dev.state())).unwrap();
        let mut r = Block::from_state(&state, disk(16)).unwrap();
        assert_eq!(r.state(), dev.state());
        assert_eq!(guest_view(&r), guest_view(&dev));

        let mut rig = Rig::new();
        let descs = [rd(HDR, 16), wr(DATA, 20), wr(STATUS, 1)];
        let (s, len, _) = run(&mut r, &mut rig, VIRTIO_BLK_T_GET_ID, 0, &descs, |_| {});
        assert_eq!((s, len), (VIRTIO_BLK_S_OK, 21));
        assert_eq!(
            &rig.bytes[DATA as usize..DATA as usize + 10],
            b"skiff-vda\0"
        );
        // Still read-only.
        let descs = [rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)];
        let (s, _, _) = run(&mut r, &mut Rig::new(), VIRTIO_BLK_T_OUT, 0, &descs, |_| {});
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
        let (s, _, _) = run(
            &mut dev,
            &mut Rig::new(),
            VIRTIO_BLK_T_OUT,
            0,
            &descs,
            |_| {},
        );
        assert_eq!(s, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn a_disk_of_another_size_is_refused() {
        let state = Block::new(disk(16), false, b"").state();
        assert_eq!(
            Block::from_state(&state, disk(15))
                .err()
                .map(|e| e.to_string()),
            Some("saved disk capacity in sectors 0x10 does not match the device's 0xf".to_string())
        );
        // To change the medium, restore, then swap it.
        let mut dev = Block::from_state(&state, disk(16)).unwrap();
        dev.replace_backend(disk(32));
        assert_eq!(dev.state().capacity_sectors, 32);
    }

    proptest! {
        /// Loading arbitrary bytes never panics; what loads re-encodes to
        /// the same bytes; every state round-trips.
        #[test]
        fn arbitrary_bytes_and_states(
            bytes in proptest::collection::vec(any::<u8>(), 0..32),
            capacity_sectors in any::<u64>(),
            read_only in any::<bool>(),
            id in any::<[u8; VIRTIO_BLK_ID_BYTES]>(),
        ) {
            if let Ok(state) = BlockState::load(&bytes) {
                prop_assert_eq!(encode(&state), bytes);
            }
            let state = BlockState { capacity_sectors, read_only, id };
            prop_assert_eq!(BlockState::load(&encode(&state)), Ok(state));
            let sectors = capacity_sectors % 64;
            let state = BlockState { capacity_sectors: sectors, ..state };
            let dev = Block::from_state(&state, disk(sectors as usize)).unwrap();
            prop_assert_eq!(dev.state(), state);
        }
    }
}
