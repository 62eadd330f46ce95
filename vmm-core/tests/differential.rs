//! Differential test of vmm-core's split queue against `virtio-queue` 0.18.
//!
//! Random descriptor tables (valid chains, loops, out-of-range indices,
//! indirect tables with good and bad lengths, nested indirect tables, buffers
//! in and out of guest memory, huge lengths) are laid out in one byte buffer.
//! vmm-core walks it through a [`SliceMemory`]; `virtio-queue` walks an
//! identical copy in a `vm-memory` `GuestMemoryMmap`. The two must agree:
//!
//! - `virtio-queue` truncates the walk (yields nothing, or its last descriptor
//!   still has `NEXT`): vmm-core reports an error.
//! - `virtio-queue` walks a complete chain: vmm-core returns exactly the same
//!   buffers, unless one of its stricter rules applies (a non-empty buffer
//!   outside guest memory, more buffers than the chain capacity, an indirect
//!   descriptor without the negotiated feature); then it reports that error.
//! - `avail.idx` more than the queue size ahead: both reject the ring.

use std::cell::Cell;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use virtio_queue::{Queue as VqQueue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress as VmAddress, GuestMemoryMmap};
use vmm_core::memory::{GuestAddress, SliceMemory};
use vmm_core::queue::{
    ChainError, DescriptorChain, Queue, QueueError, QueueState, VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};

/// First guest address.
const BASE: u64 = 0x1_0000;
/// Bytes of guest memory.
const MEM_SIZE: u64 = 0x4000;
/// Main descriptor table (at most 16 entries).
const DESC_TABLE: u64 = BASE;
/// Available ring.
const AVAIL_RING: u64 = BASE + 0x100;
/// Used ring.
const USED_RING: u64 = BASE + 0x200;
/// Indirect table `k` goes at `INDIRECT_AREA + 0x100 * k` (plus a skew).
const INDIRECT_AREA: u64 = BASE + 0x400;
/// Chain capacity of the queue-level pop: small, so it is exceeded often.
const POP_CAPACITY: usize = 4;
/// Chain capacity of the direct walks: large enough never to matter.
const WALK_CAPACITY: usize = 64;

/// How a descriptor's `next` (or the head index) relates to its table.
#[derive(Clone, Copy, Debug)]
enum Next {
    /// Inside the table.
    InRange(u16),
    /// Inside the table or just past its end.
    Near(u16),
    /// Any index.
    Any(u16),
}

impl Next {
    fn resolve(self, table_size: u16) -> u16 {
        match self {
            Next::InRange(r) => r % table_size,
            Next::Near(r) => r % (table_size + 2),
            Next::Any(r) => r,
        }
    }
}

/// Where an `INDIRECT` descriptor points.
#[derive(Clone, Copy, Debug)]
enum IndirectTarget {
    /// One of the generated indirect tables.
    Table(u8),
    /// The main descriptor table itself.
    MainTable,
    /// The random buffer address and length.
    Random,
}

/// The length of an `INDIRECT` descriptor, relative to its table.
#[derive(Clone, Copy, Debug)]
enum IndirectLen {
    Exact,
    Zero,
    Ragged(u8),
    Shorter,
    Longer(u8),
    Any(u32),
}

#[derive(Clone, Debug)]
struct DescGene {
    addr: u64,
    len: u32,
    next_flag: bool,
    write: bool,
    indirect: bool,
    junk_flags: u16,
    next: Next,
    target: IndirectTarget,
    indirect_len: IndirectLen,
}

#[derive(Clone, Copy, Debug)]
enum TablePlace {
    /// In the indirect area, skewed by this many bytes.
    Area(u8),
    /// The last `n` entries' worth of guest memory: later entries fall outside.
    StraddleEnd(u8),
    /// Any address (almost always outside guest memory).
    Anywhere(u64),
}

/// How the entries of a table link up.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// As generated.
    Random,
    /// Entry `i` links to `i + 1` where it has `NEXT`; the last one ends.
    Linear,
    /// Every entry links to `i + 1`, the last one ends: one long chain.
    Straight,
}

impl Shape {
    fn strategy() -> impl Strategy<Value = Shape> {
        prop_oneof![
            5 => Just(Shape::Random),
            3 => Just(Shape::Linear),
            2 => Just(Shape::Straight),
        ]
    }
}

#[derive(Clone, Debug)]
struct TableGene {
    place: TablePlace,
    descs: Vec<DescGene>,
    shape: Shape,
}

/// How far `avail.idx` is ahead of the device's next entry.
#[derive(Clone, Copy, Debug)]
enum Delta {
    Zero,
    One,
    UpToSize(u16),
    BeyondSize(u16),
}

#[derive(Clone, Debug)]
struct Scenario {
    size_log2: u32,
    main: Vec<DescGene>,
    main_shape: Shape,
    /// Force every buffer inside guest memory.
    tidy: bool,
    tables: Vec<TableGene>,
    head: Next,
    next_avail: u16,
    delta: Delta,
    noise: Vec<(u16, u8)>,
}

fn buf_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => BASE..BASE + MEM_SIZE,
        2 => BASE + MEM_SIZE - 64..BASE + MEM_SIZE + 64,
        1 => 0..BASE,
        1 => u64::MAX - 0x1000..=u64::MAX,
        1 => any::<u64>(),
    ]
}

fn buf_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        10 => 0u32..=256,
        3 => Just(0u32),
        2 => 0u32..=MEM_SIZE as u32,
        2 => u32::MAX - 0x100..=u32::MAX,
        1 => any::<u32>(),
    ]
}

fn next_gene() -> impl Strategy<Value = Next> {
    prop_oneof![
        10 => any::<u16>().prop_map(Next::InRange),
        1 => any::<u16>().prop_map(Next::Near),
        1 => any::<u16>().prop_map(Next::Any),
    ]
}

fn indirect_target() -> impl Strategy<Value = IndirectTarget> {
    prop_oneof![
        8 => any::<u8>().prop_map(IndirectTarget::Table),
        1 => Just(IndirectTarget::MainTable),
        1 => Just(IndirectTarget::Random),
    ]
}

fn indirect_len() -> impl Strategy<Value = IndirectLen> {
    prop_oneof![
        10 => Just(IndirectLen::Exact),
        1 => Just(IndirectLen::Zero),
        1 => any::<u8>().prop_map(IndirectLen::Ragged),
        1 => Just(IndirectLen::Shorter),
        1 => any::<u8>().prop_map(IndirectLen::Longer),
        1 => any::<u32>().prop_map(IndirectLen::Any),
    ]
}

prop_compose! {
    fn desc_gene(indirect_weight: f64)(
        addr in buf_addr(),
        len in buf_len(),
        next_flag in prop::bool::weighted(0.6),
        write in any::<bool>(),
        indirect in prop::bool::weighted(indirect_weight),
        junk_flags in prop_oneof![15 => Just(0u16), 1 => any::<u16>()],
        next in next_gene(),
        target in indirect_target(),
        indirect_len in indirect_len(),
    ) -> DescGene {
        DescGene { addr, len, next_flag, write, indirect, junk_flags, next, target, indirect_len }
    }
}

fn table_place() -> impl Strategy<Value = TablePlace> {
    prop_oneof![
        6 => Just(TablePlace::Area(0)),
        2 => (1u8..16).prop_map(TablePlace::Area),
        2 => (1u8..=8).prop_map(TablePlace::StraddleEnd),
        2 => any::<u64>().prop_map(TablePlace::Anywhere),
    ]
}

prop_compose! {
    fn table_gene()(
        place in table_place(),
        descs in vec(desc_gene(0.05), 1..=8),
        shape in Shape::strategy(),
    ) -> TableGene {
        TableGene { place, descs, shape }
    }
}

fn delta_gene() -> impl Strategy<Value = Delta> {
    prop_oneof![
        1 => Just(Delta::Zero),
        12 => Just(Delta::One),
        2 => any::<u16>().prop_map(Delta::UpToSize),
        2 => any::<u16>().prop_map(Delta::BeyondSize),
    ]
}

prop_compose! {
    fn scenario()(
        size_log2 in 0u32..=4,
        main in vec(desc_gene(0.12), 16),
        main_shape in Shape::strategy(),
        tidy in prop::bool::weighted(0.3),
        tables in vec(table_gene(), 0..=3),
        head in next_gene(),
        next_avail in any::<u16>(),
        delta in delta_gene(),
        noise in vec((any::<u16>(), any::<u8>()), 0..=8),
    ) -> Scenario {
        Scenario { size_log2, main, main_shape, tidy, tables, head, next_avail, delta, noise }
    }
}

/// A descriptor as written to guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl RawDesc {
    fn encode(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> RawDesc {
        RawDesc {
            addr: u64::from_le_bytes(b[..8].try_into().unwrap()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            flags: u16::from_le_bytes(b[12..14].try_into().unwrap()),
            next: u16::from_le_bytes(b[14..16].try_into().unwrap()),
        }
    }
}

/// A buffer as both implementations report it: `NEXT` masked out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Buf {
    addr: u64,
    len: u32,
    flags: u16,
}

impl Buf {
    fn new(addr: u64, len: u32, flags: u16) -> Buf {
        Buf {
            addr,
            len,
            flags: flags & !VIRTQ_DESC_F_NEXT,
        }
    }

    fn in_memory(&self) -> bool {
        self.len == 0
            || (self.addr >= BASE
                && self
                    .addr
                    .checked_add(u64::from(self.len))
                    .is_some_and(|end| end <= BASE + MEM_SIZE))
    }
}

/// The laid-out guest memory and the facts the checks need.
struct Layout {
    bytes: Vec<u8>,
    qsize: u16,
    next_avail: u16,
    avail_idx: u16,
}

/// Writes the part of `data` at `addr` that falls inside guest memory.
fn put(bytes: &mut [u8], addr: u64, data: &[u8]) {
    for (i, b) in data.iter().enumerate() {
        let Some(a) = addr.checked_add(i as u64) else {
            return;
        };
        if (BASE..BASE + MEM_SIZE).contains(&a) {
            bytes[(a - BASE) as usize] = *b;
        }
    }
}

/// What descriptors may refer to.
struct Tables {
    /// Address and entry count of each indirect table.
    indirect: Vec<(u64, u16)>,
    qsize: u16,
    tidy: bool,
}

fn concretize(gene: &DescGene, index: u16, table_size: u16, shape: Shape, t: &Tables) -> RawDesc {
    let mut flags =
        gene.junk_flags & !(VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT);
    let (next, next_flag) = match shape {
        Shape::Random => (gene.next.resolve(table_size), gene.next_flag),
        Shape::Linear => (index + 1, gene.next_flag && index + 1 < table_size),
        Shape::Straight => (index + 1, index + 1 < table_size),
    };
    if next_flag {
        flags |= VIRTQ_DESC_F_NEXT;
    }
    if gene.write {
        flags |= VIRTQ_DESC_F_WRITE;
    }
    let (mut addr, mut len) = (gene.addr, gene.len);
    if t.tidy {
        addr = BASE + gene.addr % (MEM_SIZE - 0x100);
        len = gene.len % 0x100;
    }
    if gene.indirect {
        flags |= VIRTQ_DESC_F_INDIRECT;
        let target = match gene.target {
            IndirectTarget::Table(k) if !t.indirect.is_empty() => {
                Some(t.indirect[usize::from(k) % t.indirect.len()])
            }
            IndirectTarget::Table(_) | IndirectTarget::MainTable => Some((DESC_TABLE, t.qsize)),
            IndirectTarget::Random => None,
        };
        if let Some((table_addr, entries)) = target {
            let entries = u32::from(entries);
            addr = table_addr;
            len = match gene.indirect_len {
                IndirectLen::Exact => entries * 16,
                IndirectLen::Zero => 0,
                IndirectLen::Ragged(r) => entries * 16 + 1 + u32::from(r) % 15,
                IndirectLen::Shorter => (entries - 1) * 16,
                IndirectLen::Longer(m) => (entries + 1 + u32::from(m) % 4) * 16,
                IndirectLen::Any(v) => v,
            };
        }
    }
    RawDesc {
        addr,
        len,
        flags,
        next,
    }
}

impl Scenario {
    fn lay_out(&self) -> Layout {
        let qsize = 1u16 << self.size_log2;
        let mut bytes = vec![0u8; MEM_SIZE as usize];
        for &(off, b) in &self.noise {
            bytes[usize::from(off) % MEM_SIZE as usize] = b;
        }
        let indirect: Vec<(u64, u16)> = self
            .tables
            .iter()
            .enumerate()
            .map(|(k, t)| {
                let addr = match t.place {
                    TablePlace::Area(skew) => INDIRECT_AREA + 0x100 * k as u64 + u64::from(skew),
                    TablePlace::StraddleEnd(n) => BASE + MEM_SIZE - 16 * u64::from(n),
                    TablePlace::Anywhere(a) => a,
                };
                (addr, t.descs.len() as u16)
            })
            .collect();
        let tables = Tables {
            indirect,
            qsize,
            tidy: self.tidy,
        };
        for (t, &(addr, entries)) in self.tables.iter().zip(&tables.indirect) {
            for (i, g) in t.descs.iter().enumerate() {
                let d = concretize(g, i as u16, entries, t.shape, &tables);
                put(&mut bytes, addr.wrapping_add(16 * i as u64), &d.encode());
            }
        }
        for (i, g) in self.main.iter().take(usize::from(qsize)).enumerate() {
            let d = concretize(g, i as u16, qsize, self.main_shape, &tables);
            put(&mut bytes, DESC_TABLE + 16 * i as u64, &d.encode());
        }
        let delta = match self.delta {
            Delta::Zero => 0,
            Delta::One => 1,
            Delta::UpToSize(r) => 1 + r % qsize,
            Delta::BeyondSize(r) => qsize + 1 + r % (u16::MAX - qsize),
        };
        let avail_idx = self.next_avail.wrapping_add(delta);
        let head = self.head.resolve(qsize);
        let slot = u64::from(self.next_avail % qsize);
        put(&mut bytes, AVAIL_RING, &0u16.to_le_bytes());
        put(&mut bytes, AVAIL_RING + 2, &avail_idx.to_le_bytes());
        put(&mut bytes, AVAIL_RING + 4 + 2 * slot, &head.to_le_bytes());
        Layout {
            bytes,
            qsize,
            next_avail: self.next_avail,
            avail_idx,
        }
    }
}

/// What `virtio-queue` made of the ring.
#[derive(Debug)]
enum Oracle {
    /// `iter` refused the available ring.
    AvailIndexError,
    /// Nothing available.
    Empty,
    /// The chain walk ended early.
    Truncated { head: u16 },
    /// A complete chain.
    Complete { head: u16, bufs: Vec<Buf> },
}

fn oracle(layout: &Layout) -> (Oracle, u16) {
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(VmAddress(BASE), MEM_SIZE as usize)]).unwrap();
    gm.write_slice(&layout.bytes, VmAddress(BASE)).unwrap();
    let mut q = VqQueue::new(layout.qsize).unwrap();
    q.try_set_desc_table_address(VmAddress(DESC_TABLE)).unwrap();
    q.try_set_avail_ring_address(VmAddress(AVAIL_RING)).unwrap();
    q.try_set_used_ring_address(VmAddress(USED_RING)).unwrap();
    q.set_next_avail(layout.next_avail);
    q.set_ready(true);
    let outcome = match q.iter(&gm) {
        Err(virtio_queue::Error::InvalidAvailRingIndex) => Oracle::AvailIndexError,
        Err(e) => panic!("unexpected virtio-queue error {e}"),
        Ok(mut iter) => match iter.next() {
            None => Oracle::Empty,
            Some(chain) => {
                let head = chain.head_index();
                let descs: Vec<_> = chain.collect();
                match descs.last() {
                    Some(last) if !last.has_next() => Oracle::Complete {
                        head,
                        bufs: descs
                            .iter()
                            .map(|d| Buf::new(d.addr().0, d.len(), d.flags()))
                            .collect(),
                    },
                    _ => Oracle::Truncated { head },
                }
            }
        },
    };
    (outcome, q.next_avail())
}

/// Position in a complete chain at which the walk met an `INDIRECT`
/// descriptor of the main table, found by retracing the main-table links.
fn indirect_position(layout: &Layout, head: u16, bufs: &[Buf]) -> Option<usize> {
    let mut index = head;
    for (p, buf) in bufs.iter().enumerate() {
        let off = (DESC_TABLE - BASE) as usize + 16 * usize::from(index);
        let d = RawDesc::decode(&layout.bytes[off..off + 16]);
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Some(p);
        }
        assert_eq!(Buf::new(d.addr, d.len, d.flags), *buf, "retrace diverged");
        index = d.next;
    }
    None
}

fn bufs_of<const N: usize>(chain: &DescriptorChain<N>) -> Vec<Buf> {
    chain
        .descriptors()
        .iter()
        .map(|d| Buf::new(d.addr.0, d.len, d.flags))
        .collect()
}

/// Counts of outcomes, to show the generator reaches every case.
#[derive(Default)]
struct Coverage {
    avail_error: Cell<u32>,
    empty: Cell<u32>,
    ok: Cell<u32>,
    truncated: Cell<u32>,
    strict_buffer: Cell<u32>,
    strict_capacity: Cell<u32>,
    strict_indirect: Cell<u32>,
    ok_with_indirect: Cell<u32>,
    index_out_of_range: Cell<u32>,
    loops: Cell<u32>,
    nested_indirect: Cell<u32>,
    bad_indirect_len: Cell<u32>,
    table: Cell<u32>,
    too_large: Cell<u32>,
}

fn bump(c: &Cell<u32>) {
    c.set(c.get() + 1);
}

impl Coverage {
    fn record_truncation(&self, e: &ChainError) {
        match e {
            ChainError::IndexOutOfRange { .. } => bump(&self.index_out_of_range),
            ChainError::Loop { .. } => bump(&self.loops),
            ChainError::NestedIndirect => bump(&self.nested_indirect),
            ChainError::BadIndirectLength { .. } => bump(&self.bad_indirect_len),
            ChainError::Table(_) => bump(&self.table),
            ChainError::TooLarge => bump(&self.too_large),
            _ => {}
        }
    }
}

/// Checks a vmm-core walk of a chain `virtio-queue` walked completely.
///
/// `indirect_at` is where the walk met an indirect descriptor; it matters
/// only when `indirect_allowed` is false.
fn check_complete<const N: usize>(
    got: Result<DescriptorChain<N>, ChainError>,
    head: u16,
    bufs: &[Buf],
    indirect_at: Option<usize>,
    indirect_allowed: bool,
    cov: &Coverage,
) -> Result<(), TestCaseError> {
    // The part of the chain vmm-core gets to see, and the stricter errors it
    // may report instead of the chain.
    let (seen, indirect_refused) = match indirect_at {
        Some(p) if !indirect_allowed => (&bufs[..p], true),
        _ => (bufs, false),
    };
    let mut allowed: Vec<ChainError> = seen
        .iter()
        .filter(|b| !b.in_memory())
        .map(|b| ChainError::Buffer {
            addr: b.addr,
            len: b.len,
        })
        .collect();
    if seen.len() > N {
        allowed.push(ChainError::CapacityExceeded { capacity: N });
    }
    if indirect_refused {
        allowed.push(ChainError::IndirectNotNegotiated);
    }
    match got {
        Ok(chain) => {
            prop_assert!(
                allowed.is_empty(),
                "vmm-core accepted a chain it must refuse with one of {:?}",
                allowed
            );
            prop_assert_eq!(chain.head_index(), head);
            prop_assert_eq!(bufs_of(&chain), bufs.to_vec());
            let total: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
            prop_assert_eq!(u64::from(chain.total_len()), total);
            bump(&cov.ok);
            if indirect_at.is_some() {
                bump(&cov.ok_with_indirect);
            }
        }
        Err(e) => {
            prop_assert!(
                allowed.contains(&e),
                "vmm-core refused a complete chain with {:?}; allowed: {:?}",
                e,
                allowed
            );
            match e {
                ChainError::Buffer { .. } => bump(&cov.strict_buffer),
                ChainError::CapacityExceeded { .. } => bump(&cov.strict_capacity),
                ChainError::IndirectNotNegotiated => bump(&cov.strict_indirect),
                _ => {}
            }
        }
    }
    Ok(())
}

fn check(s: &Scenario, cov: &Coverage) -> Result<(), TestCaseError> {
    let layout = s.lay_out();
    let (expected, vq_next_avail) = oracle(&layout);

    let mut bytes = layout.bytes.clone();
    let mem = SliceMemory::new(GuestAddress(BASE), &mut bytes);
    let mut q = Queue::from_state(&QueueState {
        max_size: layout.qsize,
        size: layout.qsize,
        ready: true,
        desc_table: DESC_TABLE,
        avail_ring: AVAIL_RING,
        used_ring: USED_RING,
        next_avail: layout.next_avail,
        next_used: 0,
        event_idx: false,
        indirect: true,
    })
    .unwrap();
    prop_assert!(q.validate(&mem).is_ok());
    let got = q.pop::<POP_CAPACITY, _>(&mem);
    prop_assert_eq!(q.next_avail(), vq_next_avail, "consumed entries differ");

    let walk = |head: u16, indirect: bool| {
        DescriptorChain::<WALK_CAPACITY>::walk(
            &mem,
            GuestAddress(DESC_TABLE),
            layout.qsize,
            head,
            indirect,
        )
    };

    match expected {
        Oracle::AvailIndexError => {
            bump(&cov.avail_error);
            prop_assert_eq!(
                got.map(|c| c.map(|c| bufs_of(&c))),
                Err(QueueError::InvalidAvailIndex {
                    avail_idx: layout.avail_idx,
                    next_avail: layout.next_avail,
                })
            );
        }
        Oracle::Empty => {
            bump(&cov.empty);
            prop_assert!(matches!(got, Ok(None)), "expected an empty ring: {:?}", got);
        }
        Oracle::Truncated { head } => {
            bump(&cov.truncated);
            match got {
                Err(QueueError::InvalidChain { head: h, source }) => {
                    prop_assert_eq!(h, head);
                    cov.record_truncation(&source);
                }
                other => prop_assert!(
                    false,
                    "virtio-queue truncated the chain at head {}, vmm-core gave {:?}",
                    head,
                    other.map(|c| c.map(|c| bufs_of(&c)))
                ),
            }
            for indirect in [true, false] {
                let w = walk(head, indirect);
                prop_assert!(
                    w.is_err(),
                    "walk (indirect {}) accepted a truncated chain: {:?}",
                    indirect,
                    w.map(|c| bufs_of(&c))
                );
            }
        }
        Oracle::Complete { head, bufs } => {
            let pop_chain = match got {
                Ok(Some(c)) => Ok(c),
                Err(QueueError::InvalidChain { head: h, source }) => {
                    prop_assert_eq!(h, head);
                    Err(source)
                }
                other => {
                    return Err(TestCaseError::fail(format!(
                        "virtio-queue walked a complete chain at head {head}, \
                         vmm-core gave {:?}",
                        other.map(|c| c.map(|c| bufs_of(&c)))
                    )));
                }
            };
            let indirect_at = indirect_position(&layout, head, &bufs);
            check_complete(pop_chain, head, &bufs, indirect_at, true, cov)?;
            check_complete(walk(head, true), head, &bufs, indirect_at, true, cov)?;
            check_complete(walk(head, false), head, &bufs, indirect_at, false, cov)?;
        }
    }
    Ok(())
}

#[test]
fn vmm_core_agrees_with_virtio_queue() {
    let cov = Coverage::default();
    let config = ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::with_cases(3000)
    };
    proptest!(config, |(s in scenario())| {
        check(&s, &cov)?;
    });
    let counts = [
        ("complete chain accepted", cov.ok.get()),
        (
            "  of which through an indirect table",
            cov.ok_with_indirect.get(),
        ),
        ("truncated by virtio-queue", cov.truncated.get()),
        ("  index out of range", cov.index_out_of_range.get()),
        ("  loop", cov.loops.get()),
        ("  nested indirect", cov.nested_indirect.get()),
        ("  bad indirect length", cov.bad_indirect_len.get()),
        ("  table outside memory", cov.table.get()),
        ("  more than 4 GiB", cov.too_large.get()),
        ("stricter: buffer outside memory", cov.strict_buffer.get()),
        ("stricter: capacity exceeded", cov.strict_capacity.get()),
        (
            "stricter: indirect not negotiated",
            cov.strict_indirect.get(),
        ),
        ("avail index too far ahead", cov.avail_error.get()),
        ("empty ring", cov.empty.get()),
    ];
    for (what, n) in counts {
        eprintln!("{what:40} {n}");
    }
    for (what, n) in counts {
        assert!(n > 0, "the generator never produced: {what}");
    }
}
