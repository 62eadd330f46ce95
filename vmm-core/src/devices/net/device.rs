//! The virtio-net device: configuration space, features, the rx and tx
//! queues, and the backend trait the host implements.

use heapless::Vec;

use super::header::{NetHeader, HEADER_SIZE, NUM_BUFFERS_OFFSET};
use super::{
    CONFIG_MAC_OFFSET, CONFIG_MAX_VIRTQUEUE_PAIRS_OFFSET, CONFIG_MTU_OFFSET, CONFIG_SIZE,
    CONFIG_STATUS_OFFSET, RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use crate::irq::IrqLine;
use crate::memory::{GuestMemory, MemoryError};
use crate::mmio::{read_config_window, DeviceError, VirtioContext, VirtioDevice};
use crate::queue::{
    copy_from_chain, copy_to_chain, drain_reporting, ChainError, DescriptorChain, Queue,
    QueueError, Served, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of each of the two queues offered to the driver.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Largest Ethernet frame the device moves: an IP packet of 65535 bytes
/// (the most an IPv4 total length, a TCP segmentation offload, or a frame
/// the host's GRO merged can reach) behind an Ethernet header with one
/// 802.1Q tag (18 bytes).
pub const MAX_FRAME_SIZE: usize = 65535 + 18;
/// Largest packet, header included: the size of each bounce buffer (65565
/// bytes, a little over the 65562 the spec asks a driver's receive buffers
/// to hold when it takes segmentation offloads).
pub const MAX_PACKET_SIZE: usize = HEADER_SIZE + MAX_FRAME_SIZE;
/// Shortest frame the guest may send: an Ethernet header.
pub const MIN_FRAME_SIZE: usize = 14;
/// Most tx chains one call serves ([`Net::process_tx`], a tx notification):
/// at most 64 frames, 4 MiB.
pub const MAX_TX_CHAINS_PER_CALL: u32 = 64;
/// Most frames one call delivers or drops ([`Net::process_rx`], an rx
/// notification): at most 4 MiB.
pub const MAX_RX_FRAMES_PER_CALL: u32 = 64;
/// Most rx chains one call takes from the ring, good or bad. A frame takes
/// at most a ring's worth, so this lets at least four through.
pub const MAX_RX_CHAINS_PER_CALL: u32 = 4 * NET_QUEUE_SIZE as u32;
/// Buffers per chain the device accepts. Linux sends a header and up to
/// `MAX_SKB_FRAGS` (17, at most 45) fragments, and posts receive chains of
/// as many; a longer chain is refused.
const CHAIN_CAPACITY: usize = 64;
/// Queue sizes, indexed like the queues.
const QUEUE_SIZES: [u16; 2] = [NET_QUEUE_SIZE; 2];
/// The offload features [`NetConfig::offloads`] turns on.
const OFFLOAD_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6);

/// What the host gives a network device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The MAC address in the configuration space: the one the guest's
    /// driver starts with (a unicast address, not all zeros).
    pub mac: [u8; 6],
    /// The MTU in the configuration space (68 to 65535): the largest IP
    /// packet the guest should send without segmentation offload.
    pub mtu: u16,
    /// Whether to offer checksum and TCP segmentation offloads, both ways
    /// (`CSUM`, `GUEST_CSUM`, `HOST_TSO4/6`, `GUEST_TSO4/6`).
    pub offloads: bool,
}

/// A [`NetConfig`] the device cannot offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetConfigError {
    /// The MAC address is a multicast address or all zeros.
    #[error("MAC address {mac:02x?} is not a unicast address")]
    InvalidMac {
        /// The address.
        mac: [u8; 6],
    },
    /// The MTU is below 68 (virtio 1.2, 5.1.4.1: 68 to 65535).
    #[error("MTU {mtu} is below 68")]
    InvalidMtu {
        /// The MTU.
        mtu: u16,
    },
}

/// Why the backend could not take or give a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetBackendError {
    /// Not now: the tap's queue is full (send) or empty (recv).
    #[error("network backend would block")]
    WouldBlock,
    /// The backend failed.
    #[error("network backend failed (errno {errno})")]
    Io {
        /// The OS error number, for the log.
        errno: i32,
    },
}

/// The host end of a network device: the shim's is a tap opened with
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking, with a vnet header
/// size of [`HEADER_SIZE`].
///
/// Packets cross it as the guest lays them out: the 12-byte
/// `virtio_net_hdr_v1`, then the Ethernet frame. The device copies the
/// header through untouched, except that it sets `num_buffers` in what
/// goes to the guest.
///
/// The device calls it on its thread with its lock held, so no method may
/// block.
pub trait NetBackend {
    /// Sends one packet (header, then frame). [`NetBackendError::WouldBlock`]
    /// leaves the packet with the guest: the device gives it to `send`
    /// again once the host calls [`Net::process_tx`] (the tap became
    /// writable). Any other error loses the packet; the device goes on.
    fn send(&mut self, packet: &[u8]) -> Result<(), NetBackendError>;

    /// Reads one packet (header, then frame) into `buf`, which holds
    /// [`MAX_PACKET_SIZE`] bytes: its length, or `None` (or
    /// [`NetBackendError::WouldBlock`]) when there is none now. After
    /// another error, the device stops reading until the host calls again.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetBackendError>;

    /// The driver accepted `guest_features` (`VIRTIO_NET_F_*`): the offloads
    /// the backend may now hand to the guest are its `GUEST_*` bits (the
    /// tap's `TUNSETOFFLOAD`: `TUN_F_CSUM` for `GUEST_CSUM`, `TUN_F_TSO4`
    /// and `TUN_F_TSO6` for `GUEST_TSO4/6`, which the tap takes only with
    /// `TUN_F_CSUM`). Called on activation and by [`Net::resume`]. An error
    /// fails them, since a backend that may hand the guest offloads it did
    /// not accept must not be read.
    fn set_offloads(&mut self, guest_features: u64) -> Result<(), NetBackendError>;
}

/// A chain the device refused; it is given back with 0 bytes written. Every
/// variant is guest-triggerable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// A tx chain holds a device-writable buffer; a packet to send is
    /// device-readable buffers only.
    #[error("tx chain holds a device-writable buffer {addr:#x}+{len:#x}")]
    WritableBuffer {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// An rx chain holds a device-readable buffer; a receive buffer is
    /// device-writable buffers only.
    #[error("rx chain holds a device-readable buffer {addr:#x}+{len:#x}")]
    ReadableBuffer {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A buffer, or a descriptor, lies outside guest memory.
    #[error("chain reaches {addr:#x}+{len:#x}, outside guest memory")]
    OutsideGuestMemory {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// The chain is malformed (a loop, an index out of range, an indirect
    /// descriptor not negotiated, more than 64 buffers, ...).
    #[error("malformed chain")]
    Malformed(#[source] ChainError),
    /// A tx packet shorter than a header and an Ethernet header.
    #[error("tx packet of {len} bytes is shorter than a header and an Ethernet header")]
    PacketTooShort {
        /// The chain's length.
        len: u32,
    },
    /// A tx packet longer than [`MAX_PACKET_SIZE`].
    #[error("tx packet of {len} bytes is longer than {MAX_PACKET_SIZE}")]
    PacketTooLong {
        /// The chain's length.
        len: u32,
    },
    /// A tx header asks for an offload the driver did not accept (or a GSO
    /// type the spec does not define).
    #[error(
        "tx header asks for an offload not negotiated (flags {flags:#x}, GSO type {gso_type:#x})"
    )]
    OffloadNotNegotiated {
        /// The header's flags.
        flags: u8,
        /// The header's GSO type.
        gso_type: u8,
    },
    /// An rx chain too short for a header.
    #[error("rx chain of {len} bytes is shorter than a header")]
    BufferTooShort {
        /// The chain's length.
        len: u32,
    },
    /// A received packet did not fit the guest's buffers: without
    /// `MRG_RXBUF` the chain at the front of the ring, with it a whole
    /// ring of chains. The packet is dropped (counted in
    /// [`NetStats::rx_dropped`], not as a refused chain); the chains stay
    /// for the next.
    #[error("rx packet of {len} bytes does not fit the guest's {room}-byte buffers")]
    BuffersTooSmall {
        /// The packet's length, header included.
        len: u32,
        /// Bytes the buffers had room for.
        room: u32,
    },
    /// Copying to or from guest memory failed.
    #[error("cannot access guest memory")]
    Memory(#[source] MemoryError),
}

impl From<ChainError> for NetError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::Buffer { addr, len } => NetError::OutsideGuestMemory {
                addr,
                len: u64::from(len),
            },
            ChainError::Table(
                MemoryError::OutOfBounds { addr, len } | MemoryError::Overflow { addr, len },
            ) => NetError::OutsideGuestMemory { addr, len },
            other => NetError::Malformed(other),
        }
    }
}

/// What the device did so far, for the host's log and metrics. Byte counts
/// are Ethernet frame bytes, without the virtio-net header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the backend took from the guest.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Chains refused ([`NetError`]), given back with 0 bytes.
    pub rejected: u64,
    /// Guest frames lost because the backend failed to send them.
    pub tx_dropped: u64,
    /// Backend frames no guest buffer took: too large for the buffers
    /// ([`NetError::BuffersTooSmall`]), shorter than a header, or held at
    /// a device reset.
    pub rx_dropped: u64,
    /// Frames that waited for the guest to post receive buffers.
    pub held: u64,
    /// Times the backend could not take a frame
    /// ([`NetBackendError::WouldBlock`]), so tx waited for it.
    pub tx_blocked: u64,
    /// Calls that stopped at their budget with work left
    /// ([`NetInterest::again`]).
    pub budget_stops: u64,
    /// Backend calls that failed with [`NetBackendError::Io`].
    pub backend_errors: u64,
}

/// What the host should watch for the device, from [`Net::interest`]; valid
/// while the transport is live
/// ([`MmioTransport::is_live`](crate::mmio::MmioTransport::is_live)),
/// otherwise watch nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetInterest {
    /// Call [`Net::process_rx`] when the backend is readable. False while a
    /// packet waits for receive buffers: the guest's rx notification
    /// carries on then.
    pub readable: bool,
    /// Call [`Net::process_tx`] when the backend is writable: a packet
    /// waits for it.
    pub writable: bool,
    /// Call [`Net::process`] again without waiting for anything (after the
    /// other ready events): the last call stopped at its budget, and no
    /// event may come for what is left.
    pub again: bool,
}

/// How one frame went.
enum Delivery {
    /// In the guest's buffers, or dropped (counted).
    Done,
    /// Not enough receive buffers: the frame waits, and the driver was
    /// asked to notify when it posts more.
    Held,
    /// The call's chain budget ran out: the frame waits for the next call.
    OutOfBudget,
}

/// The next receive chain, from [`Net::next_rx_chain`].
// Matched as soon as it is returned, like the `Queue::pop` result it
// wraps; never stored.
#[allow(clippy::large_enum_variant)]
enum RxChain {
    /// A chain to fill.
    Ready(DescriptorChain<CHAIN_CAPACITY>),
    /// A refused chain, already given back.
    Refused,
    /// The ring is empty.
    Empty,
    /// The call's chain budget ran out.
    OutOfBudget,
}

/// A virtio-net device over backend `B`: one queue pair, no control queue.
pub struct Net<B> {
    backend: B,
    config: NetConfig,
    /// The features the driver accepted, as of the current call.
    features: u64,
    tx_bounce: [u8; MAX_PACKET_SIZE],
    rx_bounce: [u8; MAX_PACKET_SIZE],
    /// Length of the packet in `rx_bounce` that waits for receive buffers.
    held: Option<usize>,
    /// The backend said [`NetBackendError::WouldBlock`] to the last send.
    tx_blocked: bool,
    /// The last tx call stopped at its budget with chains left.
    tx_again: bool,
    /// The last rx call stopped at its chain budget with a frame held.
    rx_again: bool,
    /// Tx chains the current call may still serve.
    tx_chains_left: u32,
    /// Rx chains the current call may still take.
    rx_chains_left: u32,
    stats: NetStats,
    last_error: Option<NetError>,
    last_backend_error: Option<NetBackendError>,
}

impl<B: NetBackend> Net<B> {
    /// A device with `config`, over `backend`.
    pub fn new(config: NetConfig, backend: B) -> Result<Self, NetConfigError> {
        let mac = config.mac;
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetConfigError::InvalidMac { mac });
        }
        if config.mtu < 68 {
            return Err(NetConfigError::InvalidMtu { mtu: config.mtu });
        }
        Ok(Net {
            backend,
            config,
            features: 0,
            tx_bounce: [0; MAX_PACKET_SIZE],
            rx_bounce: [0; MAX_PACKET_SIZE],
            held: None,
            tx_blocked: false,
            tx_again: false,
            rx_again: false,
            tx_chains_left: 0,
            rx_chains_left: 0,
            stats: NetStats::default(),
            last_error: None,
            last_backend_error: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> NetConfig {
        self.config
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Why the last refused chain was refused, or the last received packet
    /// dropped for want of room.
    pub fn last_error(&self) -> Option<NetError> {
        self.last_error
    }

    /// The backend's last failure.
    pub fn last_backend_error(&self) -> Option<NetBackendError> {
        self.last_backend_error
    }

    /// Length of the packet waiting for receive buffers, header included.
    pub fn held(&self) -> Option<usize> {
        self.held
    }

    /// What the host should watch for the device now; ask after every call
    /// into the device, register writes included (an activation or a reset
    /// changes it).
    pub fn interest(&self) -> NetInterest {
        NetInterest {
            readable: self.held.is_none(),
            writable: self.tx_blocked,
            again: self.tx_again || self.rx_again,
        }
    }

    /// After a snapshot restore, once the transport is restored too: tells
    /// the backend the offloads the driver accepted (activation did, in the
    /// saved VM) and serves both queues. Call it through
    /// [`MmioTransport::run_device`](crate::mmio::MmioTransport::run_device),
    /// which calls it only for a device that was live.
    pub fn resume<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        self.apply_offloads(ctx.features)?;
        self.process(ctx)
    }

    /// Serves both queues: [`Net::process_tx`], then [`Net::process_rx`].
    pub fn process<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        self.process_tx(ctx)?;
        self.process_rx(ctx)
    }

    /// Sends what the guest put on the tx queue, up to
    /// [`MAX_TX_CHAINS_PER_CALL`] chains: on a tx notification, and when
    /// the backend became writable after a
    /// [`NetBackendError::WouldBlock`].
    pub fn process_tx<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        self.features = ctx.features;
        let queue = ready_queue(ctx.queues, TX_QUEUE)?;
        self.tx_blocked = false;
        self.tx_chains_left = MAX_TX_CHAINS_PER_CALL;
        let notify = drain_reporting::<CHAIN_CAPACITY, M, Self>(
            queue,
            ctx.mem,
            self,
            |net| net.tx_chains_left > 0 && !net.tx_blocked,
            Self::tx_malformed,
            Self::serve_tx,
        )
        .map_err(queue_error(TX_QUEUE))?;
        // With event index, the driver does not notify again for chains it
        // already made available: the host must come back for them.
        self.tx_again = self.tx_chains_left == 0 && queue.pending(ctx.mem).is_ok_and(|n| n > 0);
        if self.tx_again {
            self.stats.budget_stops += 1;
        }
        if notify {
            ctx.interrupt.signal_used_buffer();
        }
        Ok(())
    }

    /// Delivers packets to the guest: the held one first, then what the
    /// backend has, up to [`MAX_RX_FRAMES_PER_CALL`] frames and
    /// [`MAX_RX_CHAINS_PER_CALL`] chains: when the backend is readable, and
    /// on an rx notification (the guest posted buffers).
    pub fn process_rx<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        self.features = ctx.features;
        let queue = ready_queue(ctx.queues, RX_QUEUE)?;
        let mut used = false;
        self.receive(queue, ctx.mem, &mut used)
            .map_err(queue_error(RX_QUEUE))?;
        if used
            && queue
                .needs_notification(ctx.mem)
                .map_err(queue_error(RX_QUEUE))?
        {
            ctx.interrupt.signal_used_buffer();
        }
        Ok(())
    }

    /// Tells the backend the accepted offloads.
    fn apply_offloads(&mut self, features: u64) -> Result<(), DeviceError> {
        self.backend.set_offloads(features).map_err(|e| {
            self.backend_failed(e);
            DeviceError::Backend {
                reason: "cannot set the backend's offloads",
            }
        })
    }

    fn reject(&mut self, e: NetError) {
        self.stats.rejected += 1;
        self.last_error = Some(e);
    }

    fn backend_failed(&mut self, e: NetBackendError) {
        self.stats.backend_errors += 1;
        self.last_backend_error = Some(e);
    }

    /// Counts a tx chain the queue could not walk.
    fn tx_malformed(&mut self, e: ChainError) {
        self.tx_chains_left = self.tx_chains_left.saturating_sub(1);
        self.reject(e.into());
    }

    /// Sends one tx chain's packet; never writes to the chain.
    fn serve_tx<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain<CHAIN_CAPACITY>,
    ) -> Served {
        self.tx_chains_left = self.tx_chains_left.saturating_sub(1);
        let len = match self.read_tx(mem, chain) {
            Ok(len) => len,
            Err(e) => {
                self.reject(e);
                return Served::Used(0);
            }
        };
        match self.backend.send(&self.tx_bounce[..len]) {
            Ok(()) => {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += (len - HEADER_SIZE) as u64;
            }
            Err(NetBackendError::WouldBlock) => {
                self.tx_blocked = true;
                self.stats.tx_blocked += 1;
                // Not served: it does not count against the budget.
                self.tx_chains_left += 1;
                return Served::Later;
            }
            Err(e) => {
                self.stats.tx_dropped += 1;
                self.backend_failed(e);
            }
        }
        Served::Used(0)
    }

    /// Checks a tx chain and copies its packet into the tx bounce buffer;
    /// returns the packet's length.
    fn read_tx<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain<CHAIN_CAPACITY>,
    ) -> Result<usize, NetError> {
        if let Some(d) = chain.writable().next() {
            return Err(NetError::WritableBuffer {
                addr: d.addr.0,
                len: d.len,
            });
        }
        let len = chain.total_len();
        if (len as usize) < HEADER_SIZE + MIN_FRAME_SIZE {
            return Err(NetError::PacketTooShort { len });
        }
        if len as usize > MAX_PACKET_SIZE {
            return Err(NetError::PacketTooLong { len });
        }
        let packet = &mut self.tx_bounce[..len as usize];
        copy_from_chain(mem, chain.descriptors(), 0, packet).map_err(NetError::Memory)?;
        let mut raw = [0u8; HEADER_SIZE];
        raw.copy_from_slice(&packet[..HEADER_SIZE]);
        let header = NetHeader::from_bytes(&raw);
        match header.tx_features() {
            Some(needed) if needed & !self.features == 0 => Ok(len as usize),
            _ => Err(NetError::OffloadNotNegotiated {
                flags: header.flags,
                gso_type: header.gso_type,
            }),
        }
    }

    /// The rx loop of one call; sets `used` if chains went back to the
    /// driver.
    fn receive<M: GuestMemory + ?Sized>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        used: &mut bool,
    ) -> Result<(), QueueError> {
        self.rx_again = false;
        self.rx_chains_left = MAX_RX_CHAINS_PER_CALL;
        let mut frames_left = MAX_RX_FRAMES_PER_CALL;
        while frames_left > 0 {
            frames_left -= 1;
            let was_held = self.held.is_some();
            let len = match self.held.take() {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_bounce) {
                    Ok(Some(len)) if (HEADER_SIZE..=MAX_PACKET_SIZE).contains(&len) => len,
                    Ok(Some(_)) => {
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    Ok(None) | Err(NetBackendError::WouldBlock) => break,
                    Err(e) => {
                        self.backend_failed(e);
                        break;
                    }
                },
            };
            match self.deliver(queue, mem, len, used)? {
                Delivery::Done => {}
                Delivery::Held => {
                    if !was_held {
                        self.stats.held += 1;
                    }
                    self.held = Some(len);
                    break;
                }
                Delivery::OutOfBudget => {
                    self.stats.budget_stops += 1;
                    self.rx_again = true;
                    self.held = Some(len);
                    break;
                }
            }
        }
        if self.held.is_none() {
            // Buffers the driver posts matter only to a held frame.
            queue.disable_notification(mem)?;
        }
        Ok(())
    }

    /// Puts the packet of `len` bytes in `rx_bounce` into the guest's
    /// receive chains: one, or with `MRG_RXBUF` as many as it takes, all
    /// given back at once.
    fn deliver<M: GuestMemory + ?Sized>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        len: usize,
        used: &mut bool,
    ) -> Result<Delivery, QueueError> {
        let mergeable = self.features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        'frame: loop {
            let first = match self.next_rx_chain(queue, mem, used)? {
                RxChain::Ready(chain) => chain,
                RxChain::Refused => continue 'frame,
                RxChain::Empty => {
                    if self.wait_for_buffers(queue, mem, 0)? {
                        continue 'frame;
                    }
                    return Ok(Delivery::Held);
                }
                RxChain::OutOfBudget => return Ok(Delivery::OutOfBudget),
            };
            let first_room = first.total_len() as usize;
            if !mergeable && first_room < len {
                queue.undo_pop();
                self.drop_rx(len, first_room);
                return Ok(Delivery::Done);
            }
            // (head, bytes written) of each chain the frame takes.
            let mut chains: Vec<(u16, u32), { NET_QUEUE_SIZE as usize }> = Vec::new();
            let first_len = first_room.min(len);
            // At most NET_QUEUE_SIZE pushes: the ring holds no more.
            let _ = chains.push((first.head_index(), first_len as u32));
            let mut placed = first_len;
            while placed < len {
                if chains.len() >= usize::from(queue.size()) || chains.is_full() {
                    // A whole ring of buffers is too small.
                    for _ in 0..chains.len() {
                        queue.undo_pop();
                    }
                    self.drop_rx(len, placed);
                    return Ok(Delivery::Done);
                }
                let chain = match self.next_rx_chain(queue, mem, used)? {
                    RxChain::Ready(chain) => chain,
                    RxChain::Refused => {
                        // The frame's chains so far are not contiguous with
                        // what follows: give them back empty and start over.
                        for &(head, _) in chains.iter() {
                            queue.add_used(mem, head, 0)?;
                        }
                        *used = true;
                        continue 'frame;
                    }
                    RxChain::Empty => {
                        if self.wait_for_buffers(queue, mem, chains.len())? {
                            continue 'frame;
                        }
                        return Ok(Delivery::Held);
                    }
                    RxChain::OutOfBudget => {
                        for _ in 0..chains.len() {
                            queue.undo_pop();
                        }
                        return Ok(Delivery::OutOfBudget);
                    }
                };
                let n = (chain.total_len() as usize).min(len - placed);
                let _ = chains.push((chain.head_index(), n as u32));
                if let Err(e) =
                    copy_to_chain(mem, chain.descriptors(), 0, &self.rx_bounce[placed..][..n])
                {
                    return self.give_back_failed(queue, mem, &chains, e, used);
                }
                placed += n;
            }
            let count = chains.len() as u16;
            self.rx_bounce[NUM_BUFFERS_OFFSET..HEADER_SIZE].copy_from_slice(&count.to_le_bytes());
            if let Err(e) = copy_to_chain(mem, first.descriptors(), 0, &self.rx_bounce[..first_len])
            {
                return self.give_back_failed(queue, mem, &chains, e, used);
            }
            queue.add_used_batch(mem, &chains)?;
            *used = true;
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += (len - HEADER_SIZE) as u64;
            return Ok(Delivery::Done);
        }
    }

    /// The next receive chain, checked; a bad one is refused and given
    /// back (counted against the call's budget like any other).
    // Inlined into the frame loop so the chain (up to 64 descriptors) is
    // built where the loop keeps it, not moved out through `RxChain`: 14%
    // of a 1514-byte packet's time in the net bench.
    #[inline(always)]
    fn next_rx_chain<M: GuestMemory + ?Sized>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        used: &mut bool,
    ) -> Result<RxChain, QueueError> {
        if self.rx_chains_left == 0 {
            return Ok(RxChain::OutOfBudget);
        }
        self.rx_chains_left -= 1;
        let (head, e) = match queue.pop::<CHAIN_CAPACITY, M>(mem) {
            Ok(Some(chain)) => {
                let readable = chain.readable().next().map(|d| (d.addr.0, d.len));
                let e = if let Some((addr, len)) = readable {
                    NetError::ReadableBuffer { addr, len }
                } else if (chain.total_len() as usize) < HEADER_SIZE {
                    NetError::BufferTooShort {
                        len: chain.total_len(),
                    }
                } else {
                    return Ok(RxChain::Ready(chain));
                };
                (chain.head_index(), e)
            }
            Ok(None) => return Ok(RxChain::Empty),
            Err(QueueError::InvalidChain { head, source }) => (head, source.into()),
            Err(e) => return Err(e),
        };
        self.reject(e);
        if head < queue.size() {
            queue.add_used(mem, head, 0)?;
            *used = true;
        }
        Ok(RxChain::Refused)
    }

    /// The ring ran empty after `popped` chains of a frame: puts them back
    /// and asks the driver to notify when it posts more. Returns whether
    /// buffers arrived meanwhile (then try again: no notification will come
    /// for them).
    fn wait_for_buffers<M: GuestMemory + ?Sized>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        popped: usize,
    ) -> Result<bool, QueueError> {
        // `pop` found the ring empty: avail.idx was where we are now.
        let empty_at = queue.next_avail();
        for _ in 0..popped {
            queue.undo_pop();
        }
        queue.watch_avail(mem)?;
        Ok(queue.avail_index(mem)? != empty_at)
    }

    /// Drops the received frame: it does not fit buffers of `room` bytes,
    /// which stay on the ring.
    fn drop_rx(&mut self, len: usize, room: usize) {
        self.stats.rx_dropped += 1;
        self.last_error = Some(NetError::BuffersTooSmall {
            len: len as u32,
            room: room as u32,
        });
    }

    /// Guest memory failed under a chain the walk had checked: gives back
    /// every chain the frame took, empty, and drops the frame.
    fn give_back_failed<M: GuestMemory + ?Sized>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        chains: &[(u16, u32)],
        e: MemoryError,
        used: &mut bool,
    ) -> Result<Delivery, QueueError> {
        for &(head, _) in chains {
            queue.add_used(mem, head, 0)?;
        }
        *used = true;
        self.stats.rx_dropped += 1;
        self.reject(NetError::Memory(e));
        Ok(Delivery::Done)
    }

    /// The configuration space (virtio 1.2, 5.1.4): `mac`, `status`,
    /// `max_virtqueue_pairs`, `mtu`.
    fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[CONFIG_MAC_OFFSET..][..6].copy_from_slice(&self.config.mac);
        c[CONFIG_STATUS_OFFSET..][..2].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[CONFIG_MAX_VIRTQUEUE_PAIRS_OFFSET..][..2].copy_from_slice(&1u16.to_le_bytes());
        c[CONFIG_MTU_OFFSET..][..2].copy_from_slice(&self.config.mtu.to_le_bytes());
        c
    }
}

/// Queue `index`, which the driver must have made ready.
fn ready_queue(queues: &mut [Queue], index: u16) -> Result<&mut Queue, DeviceError> {
    match queues.get_mut(usize::from(index)) {
        Some(q) if q.ready() => Ok(q),
        _ => Err(DeviceError::QueueNotReady { index }),
    }
}

fn queue_error(index: u16) -> impl Fn(QueueError) -> DeviceError {
    move |source| DeviceError::Queue { index, source }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn avail_features(&self) -> u64 {
        let mut f = (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_MTU)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC);
        if self.config.offloads {
            f |= OFFLOAD_FEATURES;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_window(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only.
    }

    fn activate<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        for index in [RX_QUEUE, TX_QUEUE] {
            ready_queue(ctx.queues, index)?;
        }
        self.features = ctx.features;
        self.apply_offloads(ctx.features)
    }

    fn queue_notify<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        queue: u16,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        match queue {
            RX_QUEUE => self.process_rx(ctx),
            TX_QUEUE => self.process_tx(ctx),
            _ => Ok(()),
        }
    }

    fn reset(&mut self) {
        if self.held.take().is_some() {
            self.stats.rx_dropped += 1;
        }
        self.features = 0;
        self.tx_blocked = false;
        self.tx_again = false;
        self.rx_again = false;
    }
}

#[cfg(test)]
mod tests;
