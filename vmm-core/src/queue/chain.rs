//! Descriptor chains: walking a chain through the descriptor table and
//! indirect tables, without allocation.

use heapless::Vec;

use crate::memory::{GuestAddress, GuestMemory, MemoryError};

/// The descriptor continues via the `next` field.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable (otherwise device-readable).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of indirect descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Size of one descriptor in guest memory.
pub const DESCRIPTOR_SIZE: u64 = 16;

/// One descriptor as the driver laid it out (virtio 1.2, 2.7.5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address of the buffer.
    pub addr: GuestAddress,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// `VIRTQ_DESC_F_*` flags.
    pub flags: u16,
    /// Index of the next descriptor, if `VIRTQ_DESC_F_NEXT` is set.
    pub next: u16,
}

impl Descriptor {
    /// Reads the descriptor at `addr`.
    #[inline]
    pub fn read_from<M: GuestMemory + ?Sized>(
        mem: &M,
        addr: GuestAddress,
    ) -> Result<Descriptor, MemoryError> {
        let mut b = [0u8; DESCRIPTOR_SIZE as usize];
        mem.read(addr, &mut b)?;
        Ok(Descriptor::from_bytes(&b))
    }

    /// Decodes the 16-byte little-endian wire form.
    pub fn from_bytes(b: &[u8; 16]) -> Descriptor {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = *b;
        Descriptor {
            addr: GuestAddress(u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7])),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }

    /// Encodes the 16-byte little-endian wire form.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.0.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    /// Whether the device may write the buffer.
    pub fn is_write_only(&self) -> bool {
        self.flags & VIRTQ_DESC_F_WRITE != 0
    }

    /// Whether the chain continues.
    pub fn has_next(&self) -> bool {
        self.flags & VIRTQ_DESC_F_NEXT != 0
    }

    /// Whether the buffer is an indirect descriptor table.
    pub fn is_indirect(&self) -> bool {
        self.flags & VIRTQ_DESC_F_INDIRECT != 0
    }
}

/// Faults in a descriptor chain. Every one of them is guest-triggerable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor index points past the end of its table.
    #[error("descriptor index {index} is outside a table of {table_size} entries")]
    IndexOutOfRange {
        /// The offending index.
        index: u16,
        /// Entries in the table it indexes.
        table_size: u16,
    },
    /// The chain revisits a descriptor: it has more links than its table has
    /// entries, which can only happen through a loop.
    #[error("descriptor chain loops (more than {table_size} links in its table)")]
    Loop {
        /// Entries in the table the loop is in.
        table_size: u16,
    },
    /// The chain holds more buffers than the device accepts.
    #[error("descriptor chain holds more than {capacity} buffers")]
    CapacityExceeded {
        /// The device's per-chain capacity.
        capacity: usize,
    },
    /// The buffers add up to more than 4 GiB.
    #[error("descriptor chain buffers add up to more than 4 GiB")]
    TooLarge,
    /// An indirect descriptor inside an indirect table.
    #[error("nested indirect descriptor")]
    NestedIndirect,
    /// An indirect descriptor although `VIRTIO_RING_F_INDIRECT_DESC` was not negotiated.
    #[error("indirect descriptor used without VIRTIO_RING_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    /// An indirect table whose length is zero, not a multiple of 16, or more
    /// than 65535 entries.
    #[error("indirect descriptor table has invalid length {len}")]
    BadIndirectLength {
        /// The table length in bytes.
        len: u32,
    },
    /// A descriptor or indirect table outside guest memory.
    #[error("descriptor table access failed")]
    Table(#[source] MemoryError),
    /// A buffer outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    Buffer {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
}

/// A fully walked and validated descriptor chain of at most `N` buffers.
///
/// Indirect tables are flattened: the chain holds only buffer descriptors,
/// each checked to lie inside guest memory.
#[derive(Clone, Debug)]
pub struct DescriptorChain<const N: usize> {
    head: u16,
    total_len: u32,
    descs: Vec<Descriptor, N>,
}

/// Where the walk currently reads descriptors from.
struct Table {
    addr: GuestAddress,
    size: u16,
    indirect: bool,
}

impl<const N: usize> DescriptorChain<N> {
    /// Walks the chain starting at `head` in the descriptor table at
    /// `desc_table` (of `queue_size` entries).
    // Inlined so the chain (up to `N` descriptors) is built in the caller's
    // frame: out of line, returning it through `Result`/`Option` costs
    // several memcpys of the whole fixed-capacity buffer per chain.
    #[inline]
    pub fn walk<M: GuestMemory + ?Sized>(
        mem: &M,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
        indirect_allowed: bool,
    ) -> Result<Self, ChainError> {
        let mut chain = DescriptorChain::new(head);
        chain.fill(mem, desc_table, queue_size, indirect_allowed)?;
        Ok(chain)
    }

    /// An empty chain with head `head`, for [`DescriptorChain::fill`].
    #[inline]
    pub(crate) fn new(head: u16) -> Self {
        DescriptorChain {
            head,
            total_len: 0,
            descs: Vec::new(),
        }
    }

    /// Walks the chain starting at `self.head` into `self` (which must be
    /// empty). Filling a chain in place lets [`Queue::pop`](super::Queue::pop)
    /// build it where its caller keeps it; the descriptor buffer is then not
    /// copied on the way out.
    #[inline]
    pub(crate) fn fill<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        desc_table: GuestAddress,
        queue_size: u16,
        indirect_allowed: bool,
    ) -> Result<(), ChainError> {
        let chain = self;
        let head = chain.head;
        let mut table = Table {
            addr: desc_table,
            size: queue_size,
            indirect: false,
        };
        let mut index = head;
        // Links left before the walk must have ended; exhausting it means a loop.
        let mut ttl = queue_size;
        loop {
            if index >= table.size {
                return Err(ChainError::IndexOutOfRange {
                    index,
                    table_size: table.size,
                });
            }
            // Cannot overflow: index < 2^16 and the table was range-checked or
            // is read through the checked accessor.
            let addr = table
                .addr
                .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
                .ok_or(ChainError::Table(MemoryError::Overflow {
                    addr: table.addr.0,
                    len: u64::from(index) * DESCRIPTOR_SIZE,
                }))?;
            let desc = Descriptor::read_from(mem, addr).map_err(ChainError::Table)?;

            if desc.is_indirect() {
                if !indirect_allowed {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if table.indirect {
                    return Err(ChainError::NestedIndirect);
                }
                let entries = desc.len / DESCRIPTOR_SIZE as u32;
                if desc.len == 0 || desc.len % DESCRIPTOR_SIZE as u32 != 0 || entries > 0xffff {
                    return Err(ChainError::BadIndirectLength { len: desc.len });
                }
                // Entries are read (and bounds-checked) one by one as the walk
                // reaches them. The driver must not set NEXT on an indirect descriptor; like
                // other devices, we ignore it and continue in the table.
                table = Table {
                    addr: desc.addr,
                    size: entries as u16,
                    indirect: true,
                };
                index = 0;
                ttl = table.size;
                continue;
            }

            chain.total_len = chain
                .total_len
                .checked_add(desc.len)
                .ok_or(ChainError::TooLarge)?;
            if desc.len != 0 {
                mem.check_range(desc.addr, u64::from(desc.len))
                    .map_err(|_| ChainError::Buffer {
                        addr: desc.addr.0,
                        len: desc.len,
                    })?;
            }
            chain
                .descs
                .push(desc)
                .map_err(|_| ChainError::CapacityExceeded { capacity: N })?;

            if !desc.has_next() {
                return Ok(());
            }
            ttl -= 1;
            if ttl == 0 {
                return Err(ChainError::Loop {
                    table_size: table.size,
                });
            }
            index = desc.next;
        }
    }

    /// Index of the chain's head in the descriptor table: what goes back in
    /// the used ring.
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// Sum of all buffer lengths.
    pub fn total_len(&self) -> u32 {
        self.total_len
    }

    /// All buffers, in chain order.
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descs
    }

    /// Number of buffers.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// Whether the chain has no buffers (never true for a walked chain).
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Device-readable buffers.
    pub fn readable(&self) -> impl Iterator<Item = &Descriptor> + '_ {
        self.descs.iter().filter(|d| !d.is_write_only())
    }

    /// Device-writable buffers.
    pub fn writable(&self) -> impl Iterator<Item = &Descriptor> + '_ {
        self.descs.iter().filter(|d| d.is_write_only())
    }
}

/// Copies `buf.len()` bytes starting at byte `offset` of the concatenated
/// `descs` into `buf`. Returns how many bytes were copied (fewer if the
/// buffers end first).
pub(crate) fn copy_from_chain<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    offset: u32,
    buf: &mut [u8],
) -> Result<usize, MemoryError> {
    let mut done = 0usize;
    for_each_piece(descs, offset, buf.len(), |addr, at, n| {
        mem.read(addr, &mut buf[at..at + n])?;
        done += n;
        Ok(())
    })?;
    Ok(done)
}

/// Copies `data` to byte `offset` of the concatenated `descs`. Returns how
/// many bytes were copied (fewer if the buffers end first).
pub(crate) fn copy_to_chain<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    offset: u32,
    data: &[u8],
) -> Result<usize, MemoryError> {
    let mut done = 0usize;
    for_each_piece(descs, offset, data.len(), |addr, at, n| {
        mem.write(addr, &data[at..at + n])?;
        done += n;
        Ok(())
    })?;
    Ok(done)
}

/// Calls `f(address, position in the caller's buffer, length)` for each
/// piece of the byte range `[offset, offset + len)` of the concatenated
/// buffers `descs`.
fn for_each_piece(
    descs: &[Descriptor],
    offset: u32,
    len: usize,
    mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), MemoryError>,
) -> Result<(), MemoryError> {
    let mut skip = u64::from(offset);
    let mut at = 0usize;
    for d in descs {
        if at == len {
            break;
        }
        let dlen = u64::from(d.len);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        // Both fit in usize: dlen - skip < 2^32 and len is a slice length.
        let n = ((dlen - skip) as usize).min(len - at);
        // The chain walk checked that the whole buffer lies in guest memory.
        let addr = d.addr.checked_add(skip).ok_or(MemoryError::Overflow {
            addr: d.addr.0,
            len: skip,
        })?;
        f(addr, at, n)?;
        at += n;
        skip = 0;
    }
    Ok(())
}
