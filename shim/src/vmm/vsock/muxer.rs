//! The hybrid vsock muxer: the host end of the vsock device, over unix
//! sockets, as Firecracker and Cloud Hypervisor define it.
//!
//! - A host process connects to the VM's socket (`uds_path`), writes
//!   `CONNECT <port>\n` and, once the guest accepted, reads
//!   `OK <host_port>\n`; then the stream carries the connection's bytes.
//! - A guest connection to host port `P` is connected to the unix socket
//!   `<uds_path>_<P>`.
//!
//! Every socket is non-blocking and sits in the muxer's own epoll set, whose
//! fd the vsock device's thread watches ([`Muxer::as_raw_fd`]); that thread
//! calls [`Muxer::poll`] and then lets the device take the
//! [`HostEvent`]s. Backpressure: a socket is read only when the device asks
//! (which it does only while the guest has credit), and bytes from the
//! guest are buffered up to [`Muxer::buf_alloc`] per connection, the credit
//! the guest was given.

use std::collections::{HashMap, VecDeque};
use std::fs::Permissions;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_core::devices::vsock::{
    ConnKey, HostEvent, Recv, VsockBackend, VsockBackendError, VIRTIO_VSOCK_SHUTDOWN_F_SEND,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Per-connection buffer for bytes from the guest (the guest's credit).
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Host connections that have not finished their handshake (sent
/// `CONNECT`, or waiting for the guest to accept) at once; more are closed.
pub const MAX_HANDSHAKES: usize = 64;
/// Longest `CONNECT` line we wait for, newline included.
const MAX_LINE: usize = 32;
/// Lowest host port given to host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// Where a muxer starts handing out host ports: a random one from
/// [`FIRST_HOST_PORT`] up, so that a VM restored from a snapshot does
/// not connect from the port its snapshot's connection had (the guest may
/// not have released that socket yet when the new request arrives).
fn first_host_port() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: `bytes` is valid for writes of its length for the call.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), libc::GRND_NONBLOCK) };
    let random = if n == 4 { u32::from_le_bytes(bytes) } else { 0 };
    FIRST_HOST_PORT + random % (u32::MAX - 1 - FIRST_HOST_PORT)
}
/// The mode of the VM's socket: only its owner may connect (a process
/// that can connect can talk to the guest's agent).
const SOCKET_MODE: u32 = 0o600;
/// Epoll token of the listener.
const LISTENER: u64 = 0;
/// Readiness events taken per [`Muxer::poll`].
const EVENTS_PER_POLL: usize = 64;

/// Errors setting the muxer up.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The VM's socket could not be created.
    #[error("cannot listen on {}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The epoll set could not be created.
    #[error("cannot create the muxer's epoll set")]
    Epoll(#[source] io::Error),
}

/// A malformed handshake line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The line is not `CONNECT <port>`.
    #[error("expected `CONNECT <port>`")]
    NotConnect,
    /// The port is not a decimal u32.
    #[error("invalid port {0:?}")]
    BadPort(String),
}

/// Parses a `CONNECT <port>` line (without its newline; a trailing `\r` and
/// surrounding blanks are tolerated).
pub fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    let line = std::str::from_utf8(line).map_err(|_| HandshakeError::NotConnect)?;
    let rest = line
        .trim()
        .strip_prefix("CONNECT ")
        .ok_or(HandshakeError::NotConnect)?;
    let port = rest.trim();
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HandshakeError::BadPort(port.to_owned()));
    }
    port.parse()
        .map_err(|_| HandshakeError::BadPort(port.to_owned()))
}

/// Where a host connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading the `CONNECT` line.
    Handshake,
    /// Announced to the device; the guest has not accepted yet.
    AwaitingGuest,
    /// Bytes flow.
    Open,
    /// The device forgot it; delivering what is buffered, then closing.
    Closing,
}

/// One host-side unix stream.
struct HostConn {
    stream: UnixStream,
    key: Option<ConnKey>,
    phase: Phase,
    /// The handshake line so far, then bytes the client sent after it (for
    /// the guest, before anything read from the socket).
    inbuf: Vec<u8>,
    /// `OK <port>\n`, written before any data.
    reply: Vec<u8>,
    /// Bytes from the guest not yet written.
    out: VecDeque<u8>,
    /// Events we are registered for (`None`: not in the epoll set).
    interest: Option<EventSet>,
    /// Shut down our write side once `out` is empty.
    shut_write: bool,
    /// The socket failed or hung up; it is out of the epoll set.
    dead: bool,
}

impl HostConn {
    fn new(stream: UnixStream, phase: Phase, key: Option<ConnKey>) -> Self {
        HostConn {
            stream,
            key,
            phase,
            inbuf: Vec::new(),
            reply: Vec::new(),
            out: VecDeque::new(),
            interest: None,
            shut_write: false,
            dead: false,
        }
    }

    fn has_output(&self) -> bool {
        !self.reply.is_empty() || !self.out.is_empty()
    }

    /// Writes as much of `reply` and `out` as the socket takes; returns the
    /// bytes of `out` written.
    fn flush(&mut self) -> io::Result<usize> {
        while !self.reply.is_empty() {
            match self.stream.write(&self.reply) {
                Ok(n) => {
                    self.reply.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut written = 0;
        while !self.out.is_empty() {
            let (a, b) = self.out.as_slices();
            let bufs = [io::IoSlice::new(a), io::IoSlice::new(b)];
            match self.stream.write_vectored(&bufs) {
                Ok(n) => {
                    self.out.drain(..n);
                    written += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if !self.has_output() && self.shut_write {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.shut_write = false;
        }
        Ok(written)
    }
}

/// The host end of a vsock device over unix sockets.
pub struct Muxer {
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<u64, HostConn>,
    keys: HashMap<ConnKey, u64>,
    events: VecDeque<HostEvent>,
    next_token: u64,
    next_host_port: u32,
    buf_alloc: u32,
}

impl Muxer {
    /// Listens on `uds_path` (which must not exist; mode 0600 whatever the
    /// umask) for host connections; guest connections to port `P` go to
    /// `<uds_path>_<P>`.
    pub fn new(uds_path: &Path) -> Result<Self, MuxerError> {
        Self::with_buf_alloc(uds_path, CONN_BUF_SIZE)
    }

    /// Like [`Muxer::new`], with `buf_alloc` bytes of buffer per connection.
    pub fn with_buf_alloc(uds_path: &Path, buf_alloc: u32) -> Result<Self, MuxerError> {
        let listen_err = |source| MuxerError::Listen {
            path: uds_path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        if let Err(e) = std::fs::set_permissions(uds_path, Permissions::from_mode(SOCKET_MODE)) {
            let _ = std::fs::remove_file(uds_path);
            return Err(listen_err(e));
        }
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(MuxerError::Epoll)?;
        Ok(Muxer {
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            conns: HashMap::new(),
            keys: HashMap::new(),
            events: VecDeque::new(),
            next_token: LISTENER + 1,
            next_host_port: first_host_port(),
            buf_alloc,
        })
    }

    /// Host streams open (including those still flushing after the device
    /// forgot them).
    #[cfg(test)]
    pub fn stream_count(&self) -> usize {
        self.conns.len()
    }

    /// Serves the sockets that are ready, waiting at most `timeout_ms`
    /// (0: don't wait; -1: forever) for one: accepts and reads handshakes,
    /// flushes buffered output, and queues [`HostEvent`]s for the device.
    pub fn poll(&mut self, timeout_ms: i32) -> io::Result<()> {
        let mut ready = [EpollEvent::default(); EVENTS_PER_POLL];
        let n = match self.epoll.wait(timeout_ms, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        };
        for ev in &ready[..n] {
            let token = ev.data();
            if token == LISTENER {
                self.accept();
            } else {
                self.serve(token, ev.event_set());
            }
        }
        Ok(())
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != ErrorKind::WouldBlock {
                        log::warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    }
                    return;
                }
            };
            let handshakes = self
                .conns
                .values()
                .filter(|c| matches!(c.phase, Phase::Handshake | Phase::AwaitingGuest))
                .count();
            if handshakes >= MAX_HANDSHAKES {
                log::warn!("vsock: too many pending host connections; closing a new one");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.insert(HostConn::new(stream, Phase::Handshake, None));
            self.set_interest(token, true, false);
        }
    }

    fn insert(&mut self, conn: HostConn) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        if let Some(key) = conn.key {
            self.keys.insert(key, token);
        }
        self.conns.insert(token, conn);
        token
    }

    /// Registers the interest `want_in`/`want_out` for `token` (nothing for
    /// a dead socket).
    fn set_interest(&mut self, token: u64, want_in: bool, want_out: bool) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.dead {
            return;
        }
        let mut set = EventSet::empty();
        if want_in {
            set |= EventSet::IN;
        }
        if want_out {
            set |= EventSet::OUT;
        }
        if c.interest == Some(set) {
            return;
        }
        let op = if c.interest.is_some() {
            ControlOperation::Modify
        } else {
            ControlOperation::Add
        };
        match self
            .epoll
            .ctl(op, c.stream.as_raw_fd(), EpollEvent::new(set, token))
        {
            Ok(()) => c.interest = Some(set),
            Err(e) => {
                log::warn!("vsock: epoll_ctl failed: {e}");
                self.kill(token);
            }
        }
    }

    fn wants_in(&self, token: u64) -> bool {
        self.conns
            .get(&token)
            .and_then(|c| c.interest)
            .is_some_and(|s| s.contains(EventSet::IN))
    }

    /// Takes the socket out of the epoll set for good (it hung up or
    /// failed; epoll would report that forever).
    fn mark_dead(&mut self, token: u64) {
        if let Some(c) = self.conns.get_mut(&token) {
            if c.interest.take().is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            c.dead = true;
        }
    }

    /// Drops a stream (closing it).
    fn kill(&mut self, token: u64) {
        self.mark_dead(token);
        if let Some(c) = self.conns.remove(&token) {
            if let Some(key) = c.key {
                if self.keys.get(&key) == Some(&token) {
                    self.keys.remove(&key);
                }
            }
        }
    }

    /// A socket is ready.
    fn serve(&mut self, token: u64, set: EventSet) {
        let Some(c) = self.conns.get(&token) else {
            return;
        };
        let phase = c.phase;
        let key = c.key;
        let hup = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if phase == Phase::Handshake {
            self.read_handshake(token);
            return;
        }
        if set.contains(EventSet::OUT) || (hup && phase == Phase::Closing) {
            self.flush(token);
        }
        if hup {
            // Leave the epoll set: the device learns the end of the stream
            // (after any bytes still queued in the socket) when it reads,
            // and a failed write tells it the rest.
            self.mark_dead(token);
        }
        let Some(c) = self.conns.get(&token) else {
            return;
        };
        let readable = set.contains(EventSet::IN) || hup;
        if readable && c.phase == Phase::Open {
            let out = c.has_output();
            self.set_interest(token, false, out);
            if let Some(key) = key {
                self.events.push_back(HostEvent::Readable(key));
            }
        }
    }

    /// Reads the `CONNECT` line of a new host connection.
    fn read_handshake(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_LINE];
        let n = match c.stream.read(&mut buf) {
            Ok(0) => return self.kill(token),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
            Err(_) => return self.kill(token),
        };
        c.inbuf.extend_from_slice(&buf[..n]);
        let Some(nl) = c.inbuf.iter().position(|&b| b == b'\n') else {
            if c.inbuf.len() >= MAX_LINE {
                log::warn!("vsock: host handshake line too long");
                self.kill(token);
            }
            return;
        };
        let port = match parse_connect(&c.inbuf[..nl]) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("vsock: bad host handshake: {e}");
                return self.kill(token);
            }
        };
        // Bytes after the newline are the first data for the guest.
        c.inbuf.drain(..=nl);
        let Some(host_port) = self.allocate_host_port(port) else {
            return self.kill(token);
        };
        let key = ConnKey {
            host_port,
            guest_port: port,
        };
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.key = Some(key);
        c.phase = Phase::AwaitingGuest;
        self.keys.insert(key, token);
        // Nothing is read until the guest accepts.
        self.set_interest(token, false, false);
        self.events.push_back(HostEvent::Connect(key));
    }

    fn allocate_host_port(&mut self, guest_port: u32) -> Option<u32> {
        for _ in 0..1024 {
            let p = self.next_host_port;
            // u32::MAX is VMADDR_PORT_ANY: never hand it out.
            self.next_host_port = if p >= u32::MAX - 1 {
                FIRST_HOST_PORT
            } else {
                p + 1
            };
            let key = ConnKey {
                host_port: p,
                guest_port,
            };
            if !self.keys.contains_key(&key) {
                return Some(p);
            }
        }
        None
    }

    /// Writes buffered output of `token`, reporting progress to the device.
    fn flush(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let result = c.flush();
        let (phase, key, pending) = (c.phase, c.key, c.has_output());
        match result {
            Ok(written) => {
                if phase == Phase::Closing && !pending {
                    return self.kill(token);
                }
                if written > 0 && phase == Phase::Open {
                    if let Some(key) = key {
                        self.events.push_back(HostEvent::Drained(key));
                    }
                }
                let want_in = self.wants_in(token);
                self.set_interest(token, want_in, pending);
            }
            Err(_) => {
                if phase == Phase::Closing {
                    return self.kill(token);
                }
                self.mark_dead(token);
                if let Some(key) = key {
                    self.events.push_back(HostEvent::Closed(key));
                }
            }
        }
    }

    fn token(&self, key: ConnKey) -> Option<u64> {
        self.keys.get(&key).copied()
    }
}

impl AsRawFd for Muxer {
    /// The epoll set: readable when [`Muxer::poll`] has work.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VsockBackend for Muxer {
    fn buf_alloc(&self) -> u32 {
        self.buf_alloc
    }

    fn connect(&mut self, key: ConnKey) -> Result<(), VsockBackendError> {
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.host_port));
        let stream = connect_nonblocking(Path::new(&path)).map_err(|e| {
            log::debug!("vsock: guest connection to {path:?} refused: {e}");
            VsockBackendError::Refused
        })?;
        if let Some(old) = self.token(key) {
            self.kill(old);
        }
        self.insert(HostConn::new(stream, Phase::Open, Some(key)));
        Ok(())
    }

    fn connected(&mut self, key: ConnKey) {
        let Some(token) = self.token(key) else {
            return;
        };
        if let Some(c) = self.conns.get_mut(&token) {
            c.phase = Phase::Open;
            c.reply = format!("OK {}\n", key.host_port).into_bytes();
        }
        self.flush(token);
    }

    fn send(&mut self, key: ConnKey, data: &[u8]) -> Result<(), VsockBackendError> {
        let token = self.token(key).ok_or(VsockBackendError::Broken)?;
        let c = self
            .conns
            .get_mut(&token)
            .ok_or(VsockBackendError::Broken)?;
        if c.dead || c.phase != Phase::Open {
            return Err(VsockBackendError::Broken);
        }
        if c.out.len() + data.len() > self.buf_alloc as usize {
            return Err(VsockBackendError::Broken);
        }
        let mut rest = data;
        if !c.has_output() {
            loop {
                match c.stream.write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return Err(VsockBackendError::Broken),
                }
                if rest.is_empty() {
                    break;
                }
            }
        }
        if !rest.is_empty() {
            c.out.extend(rest);
            let want_in = self.wants_in(token);
            self.set_interest(token, want_in, true);
        }
        Ok(())
    }

    fn unsent(&self, key: ConnKey) -> u32 {
        self.token(key)
            .and_then(|t| self.conns.get(&t))
            .map_or(0, |c| c.out.len() as u32)
    }

    fn recv(&mut self, key: ConnKey, buf: &mut [u8]) -> Result<Recv, VsockBackendError> {
        let token = self.token(key).ok_or(VsockBackendError::Broken)?;
        let c = self
            .conns
            .get_mut(&token)
            .ok_or(VsockBackendError::Broken)?;
        if !c.inbuf.is_empty() {
            let n = buf.len().min(c.inbuf.len());
            buf[..n].copy_from_slice(&c.inbuf[..n]);
            c.inbuf.drain(..n);
            return Ok(Recv::Data(n));
        }
        loop {
            match c.stream.read(buf) {
                Ok(0) => return Ok(Recv::Eof),
                Ok(n) => return Ok(Recv::Data(n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let out = c.has_output();
                    self.set_interest(token, true, out);
                    return Ok(Recv::WouldBlock);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(VsockBackendError::Broken),
            }
        }
    }

    fn shutdown(&mut self, key: ConnKey, flags: u32) {
        if flags & VIRTIO_VSOCK_SHUTDOWN_F_SEND == 0 {
            return;
        }
        let Some(token) = self.token(key) else {
            return;
        };
        if let Some(c) = self.conns.get_mut(&token) {
            c.shut_write = true;
        }
        self.flush(token);
    }

    fn close(&mut self, key: ConnKey) {
        let Some(token) = self.keys.remove(&key) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.dead || c.phase != Phase::Open || !c.has_output() {
            return self.kill(token);
        }
        // Deliver what the guest sent before it went away, then close.
        c.phase = Phase::Closing;
        c.shut_write = true;
        self.set_interest(token, false, true);
    }

    fn next_event(&mut self) -> Option<HostEvent> {
        self.events.pop_front()
    }
}

/// Connects to the unix socket at `path` without blocking (a full backlog
/// is an error, not a wait).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and own exclusively.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid, initialised sockaddr_un that outlives the
    // call, and `len` does not exceed its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
pub(super) mod tests;
