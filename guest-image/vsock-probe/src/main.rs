//! `skiff-vsock-probe serve PORT`: a guest-side vsock peer for tests and
//! benchmarks. It listens on `AF_VSOCK` port PORT and serves each
//! connection on its own thread. The first line names the mode:
//!
//! - `ECHO\n`: every following byte is written back, until EOF.
//! - `SINK\n`: reads until EOF, then answers `<bytes> <sha256 hex>\n`.
//! - `SOURCE <n>\n`: writes `n` bytes of [`pattern`], then closes.
//!
//! Built static (`-C target-feature=+crt-static`) so it runs in any rootfs.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use anyhow::{bail, Context};
use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use sha2::{Digest, Sha256};

/// Bind to any local CID.
const VMADDR_CID_ANY: u32 = u32::MAX;
/// Buffer size for every copy.
const CHUNK: usize = 64 << 10;

/// The byte at `offset` of a SOURCE stream (the host test computes the same).
pub fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 9)) as u8
}

fn serve_one(stream: UnixStream) -> anyhow::Result<()> {
    let mut reader = BufReader::with_capacity(CHUNK, stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut buf = vec![0u8; CHUNK];
    match line
        .trim_end()
        .split_once(' ')
        .unwrap_or((line.trim_end(), ""))
    {
        ("ECHO", "") => loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            writer.write_all(&buf[..n])?;
        },
        ("SINK", "") => {
            let mut hash = Sha256::new();
            let mut total = 0u64;
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                total += n as u64;
            }
            let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
            writer.write_all(format!("{total} {hex}\n").as_bytes())?;
            Ok(())
        }
        ("SOURCE", n) => {
            let len: u64 = n.parse().context("SOURCE needs a byte count")?;
            let mut offset = 0u64;
            while offset < len {
                let n = (len - offset).min(CHUNK as u64) as usize;
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = pattern(offset + i as u64);
                }
                writer.write_all(&buf[..n])?;
                offset += n as u64;
            }
            Ok(())
        }
        _ => bail!("unknown mode {line:?}"),
    }
}

fn serve(port: u32) -> anyhow::Result<()> {
    let listener = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket(AF_VSOCK)")?;
    bind(listener.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))
        .with_context(|| format!("bind vsock port {port}"))?;
    listen(&listener, Backlog::new(64)?).context("listen")?;
    println!("listening on vsock port {port}");
    loop {
        let fd = accept(listener.as_raw_fd()).context("accept")?;
        // SAFETY: `accept` returned a new descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // A connected stream socket reads and writes like a UnixStream.
        let stream = UnixStream::from(owned);
        std::thread::spawn(move || {
            if let Err(err) = serve_one(stream) {
                eprintln!("connection: {err:#}");
            }
        });
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1..).unwrap_or_default() {
        [cmd, port] if cmd == "serve" => serve(port.parse().context("PORT")?),
        _ => bail!("usage: skiff-vsock-probe serve PORT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_over_a_socketpair() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_one(b));
        let mut a2 = a.try_clone().unwrap();
        a2.write_all(b"SOURCE 100000\n").unwrap();
        let mut got = Vec::new();
        a2.read_to_end(&mut got).unwrap();
        server.join().unwrap().unwrap();
        assert_eq!(got.len(), 100_000);
        assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i as u64)));

        let (mut a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_one(b));
        a.write_all(b"SINK\nhello").unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        a.read_to_string(&mut answer).unwrap();
        server.join().unwrap().unwrap();
        assert_eq!(
            answer,
            "5 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824\n"
        );

        let (mut a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_one(b));
        a.write_all(b"ECHO\nabc").unwrap();
        let mut three = [0u8; 3];
        a.read_exact(&mut three).unwrap();
        assert_eq!(&three, b"abc");
        a.shutdown(std::net::Shutdown::Write).unwrap();
        server.join().unwrap().unwrap();

        let (mut a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_one(b));
        a.write_all(b"BOGUS\n").unwrap();
        assert!(server.join().unwrap().is_err());
    }
}
