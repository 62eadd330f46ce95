//! Muxer tests over real unix sockets (no VM, no device).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::*;

/// A fresh directory for sockets, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "skiff-vsock-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls until the muxer reports an event (or fails after 5 s).
fn next(m: &mut Muxer) -> HostEvent {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(e) = m.next_event() {
            return e;
        }
        assert!(Instant::now() < deadline, "no muxer event");
        m.poll(50).unwrap();
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn connect_lines_parse() {
    assert_eq!(parse_connect(b"CONNECT 1024"), Ok(1024));
    assert_eq!(parse_connect(b"CONNECT 52\r"), Ok(52));
    assert_eq!(parse_connect(b"CONNECT  7 "), Ok(7));
    assert_eq!(parse_connect(b"CONNECT 4294967295"), Ok(u32::MAX));
    assert_eq!(parse_connect(b"connect 5"), Err(HandshakeError::NotConnect));
    assert_eq!(parse_connect(b"CONNECT"), Err(HandshakeError::NotConnect));
    assert_eq!(parse_connect(b"CONNECT "), Err(HandshakeError::NotConnect));
    assert_eq!(parse_connect(b"\xff\xfe"), Err(HandshakeError::NotConnect));
    for bad in [
        &b"CONNECT abc"[..],
        b"CONNECT -1",
        b"CONNECT +1",
        b"CONNECT 4294967296",
        b"CONNECT 5 6",
    ] {
        assert!(
            matches!(parse_connect(bad), Err(HandshakeError::BadPort(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn host_handshake_then_data() {
    let dir = TempDir::new();
    let path = dir.0.join("vm.sock");
    let mut m = Muxer::new(&path).unwrap();
    let mut client = UnixStream::connect(&path).unwrap();
    // The line arrives in pieces, with the first data right behind it.
    client.write_all(b"CONN").unwrap();
    m.poll(50).unwrap();
    client.write_all(b"ECT 52\nhello").unwrap();
    let HostEvent::Connect(key) = next(&mut m) else {
        panic!("expected a Connect");
    };
    assert_eq!(key.guest_port, 52);
    assert!(key.host_port >= FIRST_HOST_PORT);

    m.connected(key);
    assert_eq!(read_line(&mut client), format!("OK {}\n", key.host_port));
    let mut buf = [0u8; 64];
    assert_eq!(m.recv(key, &mut buf), Ok(Recv::Data(5)));
    assert_eq!(&buf[..5], b"hello");
    assert_eq!(m.recv(key, &mut buf), Ok(Recv::WouldBlock));
    client.write_all(b"more").unwrap();
    assert_eq!(next(&mut m), HostEvent::Readable(key));
    assert_eq!(m.recv(key, &mut buf), Ok(Recv::Data(4)));

    // Guest to host, then the guest shuts down its sending side.
    m.send(key, b"from guest").unwrap();
    m.shutdown(key, VIRTIO_VSOCK_SHUTDOWN_F_SEND);
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"from guest");

    // The client hangs up: the device reads the end of the stream.
    assert_eq!(m.recv(key, &mut buf), Ok(Recv::WouldBlock));
    drop(client);
    assert_eq!(next(&mut m), HostEvent::Readable(key));
    assert_eq!(m.recv(key, &mut buf), Ok(Recv::Eof));
    m.close(key);
    assert_eq!(m.stream_count(), 0);
}

#[test]
fn bad_handshakes_are_closed() {
    let dir = TempDir::new();
    let path = dir.0.join("vm.sock");
    let mut m = Muxer::new(&path).unwrap();
    let mut bad = UnixStream::connect(&path).unwrap();
    bad.write_all(b"HELLO 5\n").unwrap();
    let mut long = UnixStream::connect(&path).unwrap();
    long.write_all(&[b'1'; 40]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    m.poll(50).unwrap();
    while m.stream_count() != 0 {
        assert!(Instant::now() < deadline, "bad handshakes stay open");
        m.poll(50).unwrap();
    }
    // Closed without an OK (a reset if unread bytes were left behind).
    for mut s in [bad, long] {
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "no OK for a bad line"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
    assert!(m.next_event().is_none());
}

#[test]
fn refused_host_connection_gets_no_ok() {
    let dir = TempDir::new();
    let path = dir.0.join("vm.sock");
    let mut m = Muxer::new(&path).unwrap();
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 9\n").unwrap();
    let HostEvent::Connect(key) = next(&mut m) else {
        panic!("expected a Connect");
    };
    m.close(key);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn guest_connections_go_to_the_port_socket() {
    let dir = TempDir::new();
    let path = dir.0.join("vm.sock");
    let mut m = Muxer::new(&path).unwrap();
    let key = ConnKey {
        host_port: 2000,
        guest_port: 77,
    };
    assert_eq!(m.connect(key), Err(VsockBackendError::Refused));
    let listener = UnixListener::bind(dir.0.join("vm.sock_2000")).unwrap();
    m.connect(key).unwrap();
    let (mut host, _) = listener.accept().unwrap();
    m.send(key, b"ping").unwrap();
    let mut b = [0u8; 4];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
}

#[test]
fn guest_data_is_buffered_up_to_buf_alloc_and_never_lost() {
    let dir = TempDir::new();
    let path = dir.0.join("vm.sock");
    const ALLOC: u32 = 64 * 1024;
    let mut m = Muxer::with_buf_alloc(&path, ALLOC).unwrap();
    let listener = UnixListener::bind(dir.0.join("vm.sock_5")).unwrap();
    let key = ConnKey {
        host_port: 5,
        guest_port: 1,
    };
    m.connect(key).unwrap();
    let (mut host, _) = listener.accept().unwrap();

    // The host does not read: the socket fills, then our buffer.
    let mut sent: Vec<u8> = Vec::new();
    let mut i = 0u32;
    loop {
        let chunk: Vec<u8> = (0..4096u32).map(|j| (i * 7 + j) as u8).collect();
        if m.unsent(key) + 4096 > ALLOC {
            break;
        }
        m.send(key, &chunk).unwrap();
        sent.extend_from_slice(&chunk);
        i += 1;
        assert!(i < 10_000, "the socket never filled");
    }
    assert!(m.unsent(key) > 0);
    // Beyond buf_alloc is refused (the device never asks for it).
    assert_eq!(
        m.send(key, &vec![0; ALLOC as usize]),
        Err(VsockBackendError::Broken)
    );

    // The host reads everything; the muxer reports the progress.
    let total = sent.len();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; total];
        host.read_exact(&mut got).unwrap();
        got
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut drained = 0;
    while m.unsent(key) > 0 {
        assert!(Instant::now() < deadline, "output never drained");
        m.poll(50).unwrap();
        while let Some(e) = m.next_event() {
            assert_eq!(e, HostEvent::Drained(key));
            drained += 1;
        }
    }
    assert!(drained > 0);
    assert_eq!(reader.join().unwrap(), sent);
}

#[test]
fn close_delivers_buffered_bytes_first() {
    let dir = TempDir::new();
    let path = dir.0.join("vm.sock");
    let mut m = Muxer::new(&path).unwrap();
    let listener = UnixListener::bind(dir.0.join("vm.sock_6")).unwrap();
    let key = ConnKey {
        host_port: 6,
        guest_port: 1,
    };
    m.connect(key).unwrap();
    let (mut host, _) = listener.accept().unwrap();
    let data: Vec<u8> = (0..CONN_BUF_SIZE).map(|i| (i % 251) as u8).collect();
    m.send(key, &data).unwrap();
    assert!(m.unsent(key) > 0, "more than a socket buffer");
    m.close(key);
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        got
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.stream_count() > 0 {
        assert!(Instant::now() < deadline);
        m.poll(50).unwrap();
    }
    assert_eq!(reader.join().unwrap(), data);
    assert!(
        m.next_event().is_none(),
        "a closed connection reports nothing"
    );
}

#[test]
fn socket_file_is_removed_on_drop() {
    let dir = TempDir::new();
    let path = dir.0.join("vm.sock");
    let m = Muxer::new(&path).unwrap();
    assert!(path.exists());
    assert!(Muxer::new(&path).is_err(), "the path is taken");
    assert!(
        path.exists(),
        "a failed second bind leaves the first socket"
    );
    drop(m);
    assert!(!path.exists());
}

#[test]
fn socket_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    let path = dir.0.join("vm.sock");
    let _m = Muxer::new(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    // bind(2) gives 0777 less the umask; the muxer narrows it.
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}
