//! The virtio-vsock device: config space, features, the three queues, the
//! connection table, and the backend trait the host implements.

use heapless::{Deque, Vec};

use super::connection::{pending, ConnKey, Connection, State};
use super::packet::TxPacket;
use super::{
    Op, PacketHeader, EVENT_QUEUE, HEADER_SIZE, MAX_PAYLOAD, RX_QUEUE, TX_QUEUE, VIRTIO_ID_VSOCK,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, VIRTIO_VSOCK_F_STREAM, VIRTIO_VSOCK_HOST_CID,
    VIRTIO_VSOCK_SHUTDOWN_F_BOTH, VIRTIO_VSOCK_SHUTDOWN_F_SEND, VIRTIO_VSOCK_TYPE_STREAM,
};
use crate::irq::IrqLine;
use crate::memory::{GuestMemory, MemoryError};
use crate::mmio::{read_config_window, DeviceError, VirtioContext, VirtioDevice};
use crate::queue::{
    copy_from_chain, copy_to_chain, drain, Descriptor, DescriptorChain, Served,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::snapshot::{DeviceState, Persist, Reader, SectionKind, StateError, Writer};

/// Size of each of the three queues offered to the driver.
pub const VSOCK_QUEUE_SIZE: u16 = 256;
/// Buffers per chain the device accepts. Linux uses one or two, and up to
/// 18 (header plus `MAX_SKB_FRAGS`) for zero-copy sends; a longer chain is
/// returned unread.
const CHAIN_CAPACITY: usize = 64;
/// Bytes moved per backend call; also the largest rx payload.
const BOUNCE_SIZE: usize = MAX_PAYLOAD as usize;
/// RSTs for packets that belong to no connection, waiting for rx buffers.
/// When full, further ones are dropped (the guest is misbehaving anyway).
const RST_BACKLOG: usize = 64;
/// Queue sizes, indexed like the queues.
const QUEUE_SIZES: [u16; 3] = [VSOCK_QUEUE_SIZE; 3];

/// Why the host side of a connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VsockBackendError {
    /// Nothing listens on the host port, or the host refused the connection.
    #[error("connection refused by the host")]
    Refused,
    /// The host side of the connection is gone or failed.
    #[error("host side of the connection failed")]
    Broken,
}

/// What a non-blocking read from the host side returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recv {
    /// This many bytes were read into the buffer.
    Data(usize),
    /// Nothing to read now; the backend reports
    /// [`HostEvent::Readable`] when there is.
    WouldBlock,
    /// The host will send no more (end of stream).
    Eof,
}

/// Something that happened on the host side, reported by
/// [`VsockBackend::next_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// A host process wants a connection to `key.guest_port` in the guest,
    /// from `key.host_port` (which the backend picked). The device sends a
    /// REQUEST and later calls [`VsockBackend::connected`] or
    /// [`VsockBackend::close`].
    Connect(ConnKey),
    /// The host side may have data (or an end of stream) for the guest.
    Readable(ConnKey),
    /// The host took some of the bytes buffered for it
    /// ([`VsockBackend::unsent`] went down).
    Drained(ConnKey),
    /// The host side of the connection is gone; the guest gets an RST.
    Closed(ConnKey),
}

/// The host end of a vsock device: one byte stream per connection.
///
/// The device calls it on the thread that runs the device, so no method may
/// block. Every connection the device knows of was either accepted by
/// [`VsockBackend::connect`] or announced by [`HostEvent::Connect`]; the
/// device calls [`VsockBackend::close`] exactly once when it forgets one,
/// also after [`HostEvent::Closed`]. Events the backend queues while the
/// device calls it are taken before the device next fills rx buffers.
pub trait VsockBackend {
    /// The per-connection buffer for data from the guest, in bytes: the
    /// `buf_alloc` the guest is told. [`VsockBackend::send`] must accept up
    /// to this many unsent bytes per connection.
    fn buf_alloc(&self) -> u32;

    /// The guest asks for a connection to `key.host_port` (from
    /// `key.guest_port`). `Ok` means it is established.
    fn connect(&mut self, key: ConnKey) -> Result<(), VsockBackendError>;

    /// The guest accepted a connection announced by [`HostEvent::Connect`].
    fn connected(&mut self, key: ConnKey);

    /// Data from the guest. The device never lets the bytes buffered for a
    /// connection ([`VsockBackend::unsent`]) exceed
    /// [`VsockBackend::buf_alloc`]; an error resets the connection.
    fn send(&mut self, key: ConnKey, data: &[u8]) -> Result<(), VsockBackendError>;

    /// Bytes from [`VsockBackend::send`] not yet taken by the host.
    fn unsent(&self, key: ConnKey) -> u32;

    /// Reads data for the guest into `buf` (never more than the guest has
    /// credit for). An error resets the connection.
    fn recv(&mut self, key: ConnKey, buf: &mut [u8]) -> Result<Recv, VsockBackendError>;

    /// The guest shut down the directions in `flags`
    /// (`VIRTIO_VSOCK_SHUTDOWN_F_*`, cumulative). After `F_SEND`, the
    /// backend should end the host's stream once the buffered bytes are out.
    fn shutdown(&mut self, key: ConnKey, flags: u32);

    /// The device forgot the connection (RST from either side, both sides
    /// finished, device or transport reset). The backend should still
    /// deliver bytes it buffered, then close the host side.
    fn close(&mut self, key: ConnKey);

    /// The next host event, or `None` when there is none now.
    fn next_event(&mut self) -> Option<HostEvent>;
}

/// Counters for the host's log and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// Malformed packets from the guest (dropped or answered with RST).
    pub malformed: u64,
    /// Connections refused: nothing on the host port, or the table was full.
    pub refused: u64,
    /// RST packets sent to the guest.
    pub rst_sent: u64,
    /// RST packets dropped because the backlog was full.
    pub rst_dropped: u64,
}

/// The guest's CID is one the spec reserves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest CID {cid} is reserved (use 3 to 0xfffffffe)")]
pub struct ReservedCidError {
    /// The CID.
    pub cid: u64,
}

/// A snapshot of a [`Vsock`] device's state, from [`Vsock::state`].
///
/// Connections are not part of it: their host sides (sockets) cannot be
/// carried into another VMM. A device restored with [`Vsock::from_state`]
/// has none, and owes the guest a `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`
/// (virtio 1.2, 5.10.6.7) whenever the saved device had connections, or
/// had such an event still to deliver; the guest's driver then resets
/// every socket it has.
///
/// Encoding (9 bytes): `guest_cid` (`u64`, 3 to 0xfffffffe),
/// `transport_reset_pending` (`u8`, 0 or 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsockState {
    /// The guest's CID: the configuration space.
    pub guest_cid: u64,
    /// Whether the restored device must send the guest a transport reset
    /// event.
    pub transport_reset_pending: bool,
}

impl Persist for VsockState {
    const MAX_LEN: usize = 9;

    fn write_to(&self, w: &mut Writer<'_>) -> Result<(), StateError> {
        w.u64(self.guest_cid)?;
        w.bool(self.transport_reset_pending)
    }

    fn read_from(r: &mut Reader<'_>) -> Result<Self, StateError> {
        let guest_cid = r.u64()?;
        check_cid(guest_cid).map_err(reserved_cid)?;
        Ok(VsockState {
            guest_cid,
            transport_reset_pending: r.bool("transport reset flag")?,
        })
    }
}

impl DeviceState for VsockState {
    const KIND: SectionKind = SectionKind::Vsock;
}

/// Checks that `cid` is one a guest may have.
fn check_cid(cid: u64) -> Result<(), ReservedCidError> {
    if !(3..0xffff_ffff).contains(&cid) {
        return Err(ReservedCidError { cid });
    }
    Ok(())
}

fn reserved_cid(e: ReservedCidError) -> StateError {
    StateError::InvalidValue {
        field: "guest CID",
        value: e.cid,
    }
}

/// A virtio-vsock device for a guest with CID `guest_cid`, connecting it to
/// the host through backend `B`, with room for `C` connections.
pub struct Vsock<B, const C: usize> {
    backend: B,
    guest_cid: u64,
    conns: Vec<Connection, C>,
    rsts: Deque<PacketHeader, RST_BACKLOG>,
    event_pending: bool,
    /// A transport reset was delivered and the guest has not yet posted a
    /// new event buffer, which its driver does only once it has reset its
    /// sockets: host connections wait until then, so that a connection
    /// made after a restore is not dropped by the reset of the one before.
    reset_unacked: bool,
    /// The event queue's available index when the reset went out: the
    /// guest has handled it once the index moves on.
    reset_avail_idx: Option<u16>,
    /// Where the next round-robin pass over connections starts.
    cursor: usize,
    bounce: [u8; BOUNCE_SIZE],
    stats: VsockStats,
}

impl<B: VsockBackend, const C: usize> Vsock<B, C> {
    /// A device for the guest with CID `guest_cid` (3 to 0xfffffffe).
    pub fn new(guest_cid: u64, backend: B) -> Result<Self, ReservedCidError> {
        check_cid(guest_cid)?;
        Ok(Vsock {
            backend,
            guest_cid,
            conns: Vec::new(),
            rsts: Deque::new(),
            event_pending: false,
            reset_unacked: false,
            reset_avail_idx: None,
            cursor: 0,
            bounce: [0; BOUNCE_SIZE],
            stats: VsockStats::default(),
        })
    }

    /// A snapshot of the device's state (see [`VsockState`] for what is
    /// left out).
    pub fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            transport_reset_pending: self.event_pending || !self.conns.is_empty(),
        }
    }

    /// A device restored from `state`, over `backend`, with no
    /// connections and zeroed [`VsockStats`].
    ///
    /// If `state.transport_reset_pending`, the device sends
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` the next time it works its
    /// queues and the guest has an event buffer. Once the transport is
    /// restored too, call [`Vsock::process_host_events`] through
    /// [`MmioTransport::run_device`](crate::mmio::MmioTransport::run_device)
    /// so the event goes out without waiting for the guest.
    pub fn from_state(state: &VsockState, backend: B) -> Result<Self, StateError> {
        let mut dev = Self::new(state.guest_cid, backend).map_err(reserved_cid)?;
        dev.event_pending = state.transport_reset_pending;
        Ok(dev)
    }

    /// Puts this device, built for the same guest CID over a fresh
    /// backend, back into `state`: like [`Vsock::from_state`], in place.
    /// Its connections are forgotten; a saved CID other than the device's
    /// is a [`StateError::Mismatch`] and changes nothing.
    pub fn restore(&mut self, state: &VsockState) -> Result<(), StateError> {
        check_cid(state.guest_cid).map_err(reserved_cid)?;
        if state.guest_cid != self.guest_cid {
            return Err(StateError::Mismatch {
                field: "guest CID",
                saved: state.guest_cid,
                device: self.guest_cid,
            });
        }
        self.forget_all();
        self.event_pending = state.transport_reset_pending;
        self.reset_unacked = false;
        self.reset_avail_idx = None;
        Ok(())
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (for the host's own polling).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Counters.
    pub fn stats(&self) -> VsockStats {
        self.stats
    }

    /// Connections in the table (including those waiting to send an RST).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Serves the backend's events, then moves whatever can move. Call it
    /// when the backend has something (its fds are ready), only while the
    /// transport is activated.
    pub fn process_host_events<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        self.run(ctx)
    }

    fn drain_host_events(&mut self) {
        if self.reset_unacked {
            // The backend keeps them (connects, the only events without
            // connections) until the guest has handled the reset.
            return;
        }
        while let Some(event) = self.backend.next_event() {
            self.host_event(event);
        }
    }

    /// Resets the transport, as after a snapshot restore: forgets every
    /// connection (closing their host sides) and tells the guest with
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue.
    pub fn transport_reset<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        self.forget_all();
        self.event_pending = true;
        self.run(ctx)
    }

    fn forget_all(&mut self) {
        for c in self.conns.iter() {
            if c.state != State::Closing {
                self.backend.close(c.key);
            }
        }
        self.conns.clear();
        self.rsts.clear();
        self.cursor = 0;
    }

    fn find(&self, key: ConnKey) -> Option<usize> {
        self.conns.iter().position(|c| c.key == key)
    }

    fn host_event(&mut self, event: HostEvent) {
        match event {
            HostEvent::Connect(key) => {
                if self.find(key).is_some() || self.conns.is_full() {
                    self.stats.refused += 1;
                    self.backend.close(key);
                    return;
                }
                let mut c = Connection::new(key, State::Connecting, self.backend.buf_alloc());
                c.pending = pending::REQUEST;
                if self.conns.push(c).is_err() {
                    self.backend.close(key);
                }
            }
            HostEvent::Readable(key) => {
                if let Some(c) = self.find(key).and_then(|i| self.conns.get_mut(i)) {
                    if c.state != State::Closing {
                        c.host_readable = true;
                    }
                }
            }
            HostEvent::Drained(key) => {
                if let Some(c) = self.find(key).and_then(|i| self.conns.get_mut(i)) {
                    if c.state == State::Established {
                        c.set_unsent(self.backend.unsent(key));
                    }
                }
            }
            HostEvent::Closed(key) => {
                let Some(i) = self.find(key) else {
                    return;
                };
                let unannounced = self
                    .conns
                    .get(i)
                    .is_some_and(|c| c.pending & pending::REQUEST != 0);
                if unannounced {
                    // The guest never heard of it: no RST needed.
                    self.conns.swap_remove(i);
                    self.backend.close(key);
                } else {
                    self.reset_conn(i);
                }
            }
        }
    }

    /// Takes the backend's events and works all three queues; raises one
    /// interrupt if the driver wants one.
    fn run<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        let mut notify = false;
        // A second pass only if the guest turns out to have handled a
        // transport reset meanwhile: the connections held for it go out.
        for _ in 0..2 {
            notify |= self.run_queues(ctx)?;
            if !self.reset_unacked {
                break;
            }
            let queue = match ctx.queues.get_mut(usize::from(EVENT_QUEUE)) {
                Some(q) if q.ready() => q,
                _ => break,
            };
            let queue_error = |source| DeviceError::Queue {
                index: EVENT_QUEUE,
                source,
            };
            match self.reset_avail_idx {
                // Just delivered: ask for the driver's kick when it posts
                // the buffer again (with event-index it kicks only past
                // `avail_event`, and other event buffers are available).
                None => {
                    self.reset_avail_idx = Some(queue.watch_avail(ctx.mem).map_err(queue_error)?);
                    break;
                }
                Some(idx) if queue.avail_index(ctx.mem).map_err(queue_error)? != idx => {
                    self.reset_unacked = false;
                    self.reset_avail_idx = None;
                }
                Some(_) => break,
            }
        }
        if notify {
            ctx.interrupt.signal_used_buffer();
        }
        Ok(())
    }

    /// One pass over the backend's events and the three queues; whether
    /// the driver wants an interrupt.
    fn run_queues<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<bool, DeviceError> {
        let mem = ctx.mem;
        let mut notify = false;
        self.drain_host_events();
        for index in [TX_QUEUE, RX_QUEUE, EVENT_QUEUE] {
            if index == RX_QUEUE {
                // Calls made for tx packets may have produced events.
                self.drain_host_events();
            }
            let Some(queue) = ctx.queues.get_mut(usize::from(index)) else {
                continue;
            };
            if !queue.ready() {
                continue;
            }
            notify |= match index {
                TX_QUEUE => drain(queue, mem, self, |_| true, Self::malformed, Self::serve_tx),
                RX_QUEUE => drain(
                    queue,
                    mem,
                    self,
                    Self::has_rx_work,
                    Self::malformed,
                    Self::serve_rx,
                ),
                _ => drain(
                    queue,
                    mem,
                    self,
                    |v| v.event_pending,
                    |_| {},
                    Self::serve_event,
                ),
            }
            .map_err(|source| DeviceError::Queue { index, source })?;
        }
        Ok(notify)
    }

    /// Counts a malformed chain from the guest.
    fn malformed(&mut self) {
        self.stats.malformed += 1;
    }

    /// Takes one packet the guest sent.
    fn serve_tx<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain<CHAIN_CAPACITY>,
    ) -> Served {
        self.handle_packet(mem, chain);
        Served::Used(0)
    }

    /// Queues an RST answering `hdr` (a packet that belongs to no
    /// connection); never answers an RST.
    fn reply_rst(&mut self, hdr: &PacketHeader) {
        if hdr.op == Op::Rst.raw() {
            return;
        }
        let rst = PacketHeader {
            src_cid: hdr.dst_cid,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: hdr.type_,
            op: Op::Rst.raw(),
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        if self.rsts.push_back(rst).is_err() {
            self.stats.rst_dropped += 1;
        }
    }

    fn handle_packet<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain<CHAIN_CAPACITY>,
    ) {
        let hdr = match TxPacket::parse(chain, mem) {
            Ok(p) => p.header,
            Err(e) => {
                self.stats.malformed += 1;
                if let Some(h) = e.header() {
                    if h.src_cid == self.guest_cid {
                        self.reply_rst(&h);
                    }
                }
                return;
            }
        };
        if hdr.src_cid != self.guest_cid {
            // Spoofed source: nobody to answer.
            self.stats.malformed += 1;
            return;
        }
        let Some(op) = hdr.operation() else {
            self.stats.malformed += 1;
            self.reply_rst(&hdr);
            return;
        };
        if hdr.dst_cid != VIRTIO_VSOCK_HOST_CID || hdr.type_ != VIRTIO_VSOCK_TYPE_STREAM {
            // Another VM, or a socket type we don't implement.
            self.stats.refused += 1;
            self.reply_rst(&hdr);
            return;
        }
        let key = ConnKey {
            host_port: hdr.dst_port,
            guest_port: hdr.src_port,
        };
        match (op, self.find(key)) {
            (Op::Rst, None) => {}
            (Op::Rst, Some(i)) => {
                let c = self.conns.swap_remove(i);
                if c.state != State::Closing {
                    self.backend.close(key);
                }
            }
            (Op::Request, Some(i)) => {
                // A second REQUEST for a live connection: both are void.
                self.stats.malformed += 1;
                self.reset_conn(i);
            }
            (Op::Request, None) => self.accept(&hdr, key),
            (_, None) => {
                self.stats.malformed += 1;
                self.reply_rst(&hdr);
            }
            (op, Some(i)) => self.on_packet(i, op, &hdr, mem, chain.descriptors()),
        }
    }

    /// Closes the host side of connection `i` and queues an RST for the
    /// guest.
    fn reset_conn(&mut self, i: usize) {
        if let Some(c) = self.conns.get_mut(i) {
            if c.state != State::Closing {
                self.backend.close(c.key);
                c.close();
            }
        }
    }

    /// A guest REQUEST for a new connection.
    fn accept(&mut self, hdr: &PacketHeader, key: ConnKey) {
        if self.conns.is_full() {
            self.stats.refused += 1;
            self.reply_rst(hdr);
            return;
        }
        if self.backend.connect(key).is_err() {
            self.stats.refused += 1;
            self.reply_rst(hdr);
            return;
        }
        let mut c = Connection::new(key, State::Established, self.backend.buf_alloc());
        c.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        c.pending = pending::RESPONSE;
        c.host_readable = true;
        if self.conns.push(c).is_err() {
            self.backend.close(key);
            self.reply_rst(hdr);
        }
    }

    /// A guest packet other than REQUEST/RST for live connection `i`.
    fn on_packet<M: GuestMemory + ?Sized>(
        &mut self,
        i: usize,
        op: Op,
        hdr: &PacketHeader,
        mem: &M,
        descs: &[Descriptor],
    ) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        if c.state == State::Closing {
            // Its RST is on the way; the guest will stop.
            return;
        }
        c.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        let key = c.key;
        match op {
            Op::Response => {
                if c.state != State::Connecting {
                    self.stats.malformed += 1;
                    self.reset_conn(i);
                    return;
                }
                c.state = State::Established;
                c.host_readable = true;
                self.backend.connected(key);
            }
            Op::Rw => {
                if c.state != State::Established
                    || c.peer_shut & VIRTIO_VSOCK_SHUTDOWN_F_SEND != 0
                    || hdr.len > c.local_free()
                {
                    // Data before the handshake, after SHUTDOWN, or beyond
                    // the credit we gave.
                    self.stats.malformed += 1;
                    self.reset_conn(i);
                    return;
                }
                if self.forward(key, hdr.len, mem, descs).is_err() {
                    self.reset_conn(i);
                    return;
                }
                let unsent = self.backend.unsent(key);
                if let Some(c) = self.conns.get_mut(i) {
                    c.rx_cnt += hdr.len;
                    c.set_unsent(unsent);
                }
            }
            Op::Shutdown => {
                if c.state != State::Established {
                    self.stats.malformed += 1;
                    self.reset_conn(i);
                    return;
                }
                let flags = hdr.flags & VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
                let new = flags & !c.peer_shut;
                c.peer_shut |= flags;
                let all = c.peer_shut;
                let finished = c.is_finished();
                if new != 0 {
                    self.backend.shutdown(key, all);
                }
                if finished {
                    self.reset_conn(i);
                }
            }
            Op::CreditUpdate => {}
            Op::CreditRequest => c.pending |= pending::CREDIT_UPDATE,
            // Dispatched before we get here.
            Op::Request | Op::Rst => {}
        }
    }

    /// Hands `len` payload bytes from the chain to the backend.
    fn forward<M: GuestMemory + ?Sized>(
        &mut self,
        key: ConnKey,
        len: u32,
        mem: &M,
        descs: &[Descriptor],
    ) -> Result<(), VsockBackendError> {
        let mut off = 0u32;
        while off < len {
            let n = ((len - off) as usize).min(BOUNCE_SIZE);
            let buf = &mut self.bounce[..n];
            // Parsing checked the chain holds the whole payload.
            let got = copy_from_chain(mem, descs, HEADER_SIZE as u32 + off, buf)
                .map_err(|_| VsockBackendError::Broken)?;
            if got != n {
                return Err(VsockBackendError::Broken);
            }
            self.backend.send(key, buf)?;
            off += n as u32;
        }
        Ok(())
    }

    fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || self.conns.iter().any(Connection::wants_rx)
    }

    /// Fills one rx buffer with a control packet or host data, round robin
    /// over connections; the buffer waits if there is nothing to send.
    fn serve_rx<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain<CHAIN_CAPACITY>,
    ) -> Served {
        let room = chain.total_len();
        if chain.readable().next().is_some() || (room as usize) < HEADER_SIZE {
            self.stats.malformed += 1;
            return Served::Used(0);
        }
        match self.fill_rx(mem, chain.descriptors(), room) {
            Some(written) => Served::Used(written),
            None => Served::Later,
        }
    }

    /// Writes the next packet for the guest into an rx chain of `room`
    /// bytes; returns its length, or `None` if there is nothing to send.
    fn fill_rx<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        descs: &[Descriptor],
        room: u32,
    ) -> Option<u32> {
        if let Some(rst) = self.rsts.pop_front() {
            self.stats.rst_sent += 1;
            return Some(write_packet(mem, descs, &rst, &[]));
        }
        let n = self.conns.len();
        for k in 0..n {
            let i = (self.cursor + k) % n;
            if let Some(written) = self.conn_rx(i, mem, descs, room) {
                self.cursor = i + 1;
                if self
                    .conns
                    .get(i)
                    .is_some_and(|c| c.state == State::Closing && c.pending == 0)
                {
                    self.conns.swap_remove(i);
                }
                return Some(written);
            }
        }
        None
    }

    /// The next packet of connection `i`, if it has one.
    fn conn_rx<M: GuestMemory + ?Sized>(
        &mut self,
        i: usize,
        mem: &M,
        descs: &[Descriptor],
        room: u32,
    ) -> Option<u32> {
        let guest_cid = self.guest_cid;
        let c = self.conns.get_mut(i)?;
        let key = c.key;
        if c.pending & pending::RST == 0 {
            if c.pending & pending::REQUEST != 0 {
                c.pending &= !pending::REQUEST;
                let h = header(c, guest_cid, Op::Request, 0, 0);
                return Some(write_packet(mem, descs, &h, &[]));
            }
            if c.pending & pending::RESPONSE != 0 {
                c.pending &= !pending::RESPONSE;
                let h = header(c, guest_cid, Op::Response, 0, 0);
                return Some(write_packet(mem, descs, &h, &[]));
            }
            if c.host_readable && c.may_read_host() {
                let credit = c.peer_free();
                let max = credit
                    .min(room - HEADER_SIZE as u32)
                    .min(BOUNCE_SIZE as u32) as usize;
                if credit == 0 {
                    if !c.credit_requested {
                        c.credit_requested = true;
                        c.pending |= pending::CREDIT_REQUEST;
                    }
                } else if max > 0 {
                    match self.backend.recv(key, &mut self.bounce[..max]) {
                        Ok(Recv::Data(got)) if got > 0 => {
                            let got = got.min(max);
                            c.tx_cnt += got as u32;
                            let h = header(c, guest_cid, Op::Rw, got as u32, 0);
                            return Some(write_packet(mem, descs, &h, &self.bounce[..got]));
                        }
                        Ok(Recv::Data(_)) | Ok(Recv::WouldBlock) => c.host_readable = false,
                        Ok(Recv::Eof) => {
                            c.host_readable = false;
                            c.local_shut |= VIRTIO_VSOCK_SHUTDOWN_F_SEND;
                            c.pending |= pending::SHUTDOWN;
                        }
                        Err(_) => {
                            self.backend.close(key);
                            c.close();
                        }
                    }
                }
            }
        }
        if c.pending & pending::RST != 0 {
            c.pending = 0;
            self.stats.rst_sent += 1;
            let h = header(c, guest_cid, Op::Rst, 0, 0);
            return Some(write_packet(mem, descs, &h, &[]));
        }
        if c.pending & pending::SHUTDOWN != 0 {
            c.pending &= !pending::SHUTDOWN;
            let h = header(c, guest_cid, Op::Shutdown, 0, c.local_shut);
            if c.is_finished() {
                self.backend.close(key);
                c.close();
            }
            return Some(write_packet(mem, descs, &h, &[]));
        }
        if c.pending & pending::CREDIT_UPDATE != 0 {
            let h = header(c, guest_cid, Op::CreditUpdate, 0, 0);
            return Some(write_packet(mem, descs, &h, &[]));
        }
        if c.pending & pending::CREDIT_REQUEST != 0 {
            c.pending &= !pending::CREDIT_REQUEST;
            let h = header(c, guest_cid, Op::CreditRequest, 0, 0);
            return Some(write_packet(mem, descs, &h, &[]));
        }
        None
    }

    /// Delivers the pending transport-reset event into one event buffer.
    fn serve_event<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain<CHAIN_CAPACITY>,
    ) -> Served {
        let id = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        if chain.readable().next().is_some() || chain.total_len() < 4 {
            return Served::Used(0);
        }
        match copy_to_chain(mem, chain.descriptors(), 0, &id) {
            Ok(4) => {
                self.event_pending = false;
                self.reset_unacked = true;
                self.reset_avail_idx = None;
                Served::Used(4)
            }
            _ => Served::Used(0),
        }
    }
}

/// A header from the host side of connection `c`, carrying our current
/// credit (which the guest now knows, so no separate update is due).
fn header(c: &mut Connection, guest_cid: u64, op: Op, len: u32, flags: u32) -> PacketHeader {
    c.last_fwd_cnt = c.fwd_cnt;
    c.pending &= !pending::CREDIT_UPDATE;
    PacketHeader {
        src_cid: VIRTIO_VSOCK_HOST_CID,
        dst_cid: guest_cid,
        src_port: c.key.host_port,
        dst_port: c.key.guest_port,
        len,
        type_: VIRTIO_VSOCK_TYPE_STREAM,
        op: op.raw(),
        flags,
        buf_alloc: c.buf_alloc,
        fwd_cnt: c.fwd_cnt.0,
    }
}

/// Writes header and payload into an rx chain already checked to be
/// writable and large enough; returns the bytes written (0 if guest memory
/// failed, which a validated chain cannot).
fn write_packet<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    hdr: &PacketHeader,
    payload: &[u8],
) -> u32 {
    let write = || -> Result<usize, MemoryError> {
        let a = copy_to_chain(mem, descs, 0, &hdr.to_bytes())?;
        let b = copy_to_chain(mem, descs, HEADER_SIZE as u32, payload)?;
        Ok(a + b)
    };
    match write() {
        Ok(n) => n as u32,
        Err(_) => 0,
    }
}

impl<B: VsockBackend, const C: usize> VirtioDevice for Vsock<B, C> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_VSOCK_F_STREAM)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_window(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }

    fn activate<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        for index in [RX_QUEUE, TX_QUEUE] {
            match ctx.queues.get(usize::from(index)) {
                Some(q) if q.ready() => {}
                _ => return Err(DeviceError::QueueNotReady { index }),
            }
        }
        Ok(())
    }

    fn queue_notify<M: GuestMemory + ?Sized, I: IrqLine>(
        &mut self,
        _queue: u16,
        ctx: &mut VirtioContext<'_, M, I>,
    ) -> Result<(), DeviceError> {
        // An event-queue kick after a transport reset is the driver
        // posting its buffer again: `run` sees the index move.
        self.run(ctx)
    }

    fn reset(&mut self) {
        self.forget_all();
        self.event_pending = false;
        self.reset_unacked = false;
        self.reset_avail_idx = None;
    }
}

#[cfg(test)]
mod tests;
