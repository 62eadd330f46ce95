//! One stream connection between a guest port and a host port: its state
//! and its credit accounting (virtio 1.2, 5.10.6.3).

use core::num::Wrapping;

use super::{VIRTIO_VSOCK_SHUTDOWN_F_BOTH, VIRTIO_VSOCK_SHUTDOWN_F_SEND};

/// Names a connection: the host-side port and the guest-side port (the
/// CIDs are fixed: the host's and the guest's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// The port on the host side (CID 2).
    pub host_port: u32,
    /// The port on the guest side.
    pub guest_port: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// The host asked for it; REQUEST sent or to be sent, waiting for the
    /// guest's RESPONSE.
    Connecting,
    /// Data may flow.
    Established,
    /// Aborted or finished: an RST for the guest is pending, then the slot
    /// is freed. The backend has already been told.
    Closing,
}

/// Control packets waiting for an rx buffer (bit set).
pub(super) mod pending {
    pub const REQUEST: u8 = 1 << 0;
    pub const RESPONSE: u8 = 1 << 1;
    pub const SHUTDOWN: u8 = 1 << 2;
    pub const CREDIT_UPDATE: u8 = 1 << 3;
    pub const CREDIT_REQUEST: u8 = 1 << 4;
    pub const RST: u8 = 1 << 5;
}

/// A connection's state and counters.
#[derive(Clone, Debug)]
pub(super) struct Connection {
    pub key: ConnKey,
    pub state: State,
    /// Control packets to send.
    pub pending: u8,
    /// SHUTDOWN flags the guest sent.
    pub peer_shut: u32,
    /// SHUTDOWN flags we sent (or will send).
    pub local_shut: u32,
    /// The backend may have data for the guest (it has not said WouldBlock
    /// since it last reported the connection readable).
    pub host_readable: bool,
    /// We asked the guest for credit and have not heard from it since.
    pub credit_requested: bool,
    /// Our receive buffer (the backend's per-connection buffer).
    pub buf_alloc: u32,
    /// Payload bytes received from the guest.
    pub rx_cnt: Wrapping<u32>,
    /// Of those, bytes the host has taken.
    pub fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    pub last_fwd_cnt: Wrapping<u32>,
    /// The guest's receive buffer.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed.
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    pub tx_cnt: Wrapping<u32>,
}

impl Connection {
    pub fn new(key: ConnKey, state: State, buf_alloc: u32) -> Self {
        Connection {
            key,
            state,
            pending: 0,
            peer_shut: 0,
            local_shut: 0,
            host_readable: false,
            credit_requested: false,
            buf_alloc,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
        }
    }

    /// Records the credit every guest packet carries.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        if buf_alloc != self.peer_buf_alloc || Wrapping(fwd_cnt) != self.peer_fwd_cnt {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Bytes we may still send to the guest. A guest that shrinks its
    /// buffer or reports more consumed than we sent just gets less (or no)
    /// credit.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes the guest may still send us.
    pub fn local_free(&self) -> u32 {
        self.buf_alloc
            .saturating_sub((self.rx_cnt - self.fwd_cnt).0)
    }

    /// Records that the host has taken all but `unsent` of the bytes the
    /// guest sent; asks for a CREDIT_UPDATE if the guest's view of our free
    /// space has fallen below half the buffer and we can give it more.
    pub fn set_unsent(&mut self, unsent: u32) {
        let buffered = unsent.min((self.rx_cnt - self.fwd_cnt).0);
        self.fwd_cnt = self.rx_cnt - Wrapping(buffered);
        let guest_view = self
            .buf_alloc
            .saturating_sub((self.rx_cnt - self.last_fwd_cnt).0);
        if self.fwd_cnt != self.last_fwd_cnt && guest_view < self.buf_alloc / 2 {
            self.pending |= pending::CREDIT_UPDATE;
        }
    }

    /// Whether the host may be read for the guest: established, neither
    /// side shut that direction.
    pub fn may_read_host(&self) -> bool {
        self.state == State::Established
            && self.local_shut & VIRTIO_VSOCK_SHUTDOWN_F_SEND == 0
            && self.peer_shut & super::VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE == 0
    }

    /// Whether both directions are finished: the guest will send nothing
    /// more and neither will we (or the guest shut both ways).
    pub fn is_finished(&self) -> bool {
        self.peer_shut == VIRTIO_VSOCK_SHUTDOWN_F_BOTH
            || (self.peer_shut & VIRTIO_VSOCK_SHUTDOWN_F_SEND != 0
                && self.local_shut & VIRTIO_VSOCK_SHUTDOWN_F_SEND != 0)
    }

    /// Whether the connection has something for the rx queue.
    pub fn wants_rx(&self) -> bool {
        if self.pending != 0 {
            return true;
        }
        if !self.host_readable || !self.may_read_host() {
            return false;
        }
        self.peer_free() > 0 || !self.credit_requested
    }

    /// Ends the connection: only an RST for the guest remains.
    pub fn close(&mut self) {
        self.state = State::Closing;
        self.pending = pending::RST;
        self.host_readable = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let mut c = Connection::new(
            ConnKey {
                host_port: 1,
                guest_port: 2,
            },
            State::Established,
            1000,
        );
        c.update_peer_credit(500, 0);
        c
    }

    #[test]
    fn peer_credit_is_buf_alloc_minus_in_flight() {
        let mut c = conn();
        assert_eq!(c.peer_free(), 500);
        c.tx_cnt += 300;
        assert_eq!(c.peer_free(), 200);
        c.update_peer_credit(500, 300);
        assert_eq!(c.peer_free(), 500);
        // A guest that shrinks its buffer below what is in flight gets none.
        c.tx_cnt += 400;
        c.update_peer_credit(100, 300);
        assert_eq!(c.peer_free(), 0);
        // Counters wrap.
        c.tx_cnt = Wrapping(u32::MAX - 9);
        c.update_peer_credit(100, u32::MAX - 19);
        assert_eq!(c.peer_free(), 90);
    }

    #[test]
    fn credit_update_only_when_the_guest_view_runs_low() {
        let mut c = conn();
        c.rx_cnt += 400;
        c.set_unsent(0);
        assert_eq!(c.fwd_cnt.0, 400);
        assert_eq!(c.pending, 0, "guest still sees 600 free of 1000");
        c.rx_cnt += 200;
        c.set_unsent(100);
        assert_eq!(c.fwd_cnt.0, 500);
        assert_eq!(c.pending, pending::CREDIT_UPDATE);
        assert_eq!(c.local_free(), 900);
        // The backend can't report more unsent than was received.
        c.set_unsent(10_000);
        assert_eq!(c.fwd_cnt.0, 500);
    }

    #[test]
    fn shutdown_bookkeeping() {
        let mut c = conn();
        assert!(!c.is_finished());
        c.peer_shut = VIRTIO_VSOCK_SHUTDOWN_F_SEND;
        assert!(!c.is_finished());
        c.local_shut = VIRTIO_VSOCK_SHUTDOWN_F_SEND;
        assert!(c.is_finished());
        assert!(!c.may_read_host());
        c.close();
        assert!(c.wants_rx());
    }
}
