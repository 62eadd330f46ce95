//! A process's stdio as the agent holds it: output pipes (or a pty master)
//! drained by one thread each into a bounded [`OutputBuffer`] that
//! `ReadStdout`/`ReadStderr` long-poll, and a stdin writer.
//!
//! Backpressure: when a buffer is full its drain thread stops reading, the
//! pipe fills and the container's writes block. Nothing is dropped.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::reaper::lock;

/// How many bytes a stream buffers before its producer must wait.
pub const OUTPUT_BUFFER_CAPACITY: usize = 1 << 20;

/// Errors of stdio handling.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// Could not create a pipe for the process's stdio.
    #[error("cannot create a stdio pipe")]
    Pipe(#[source] nix::Error),
    /// Could not start a thread that drains the process's output.
    #[error("cannot start an output drain thread")]
    Thread(#[source] std::io::Error),
    /// Could not duplicate a file descriptor.
    #[error("cannot duplicate a stdio file descriptor")]
    Dup(#[source] std::io::Error),
}

#[derive(Debug, Default)]
struct BufferState {
    data: VecDeque<u8>,
    closed: bool,
}

/// A bounded byte queue between a drain thread and long-polling readers.
#[derive(Debug, Default)]
pub struct OutputBuffer {
    state: Mutex<BufferState>,
    readable: Condvar,
    writable: Condvar,
}

/// What a read from an [`OutputBuffer`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Some bytes (never empty).
    Data(Vec<u8>),
    /// The stream is closed and drained.
    Eof,
    /// Nothing arrived before the deadline.
    TimedOut,
}

impl OutputBuffer {
    /// An empty, open buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `bytes`, waiting while the buffer is full.
    pub fn push(&self, mut bytes: &[u8]) {
        let mut state = lock(&self.state);
        while !bytes.is_empty() {
            while state.data.len() >= OUTPUT_BUFFER_CAPACITY {
                state = self
                    .writable
                    .wait(state)
                    .unwrap_or_else(|poison| poison.into_inner());
            }
            let room = OUTPUT_BUFFER_CAPACITY - state.data.len();
            let take = room.min(bytes.len());
            state.data.extend(&bytes[..take]);
            bytes = &bytes[take..];
            self.readable.notify_all();
        }
    }

    /// Marks the end of the stream.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.readable.notify_all();
    }

    /// Takes up to `max_len` bytes, waiting for data, EOF or the deadline.
    pub fn read(&self, max_len: usize, timeout: Option<Duration>) -> ReadOutcome {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(&self.state);
        loop {
            if !state.data.is_empty() {
                let take = max_len.max(1).min(state.data.len());
                let out: Vec<u8> = state.data.drain(..take).collect();
                self.writable.notify_all();
                return ReadOutcome::Data(out);
            }
            if state.closed {
                return ReadOutcome::Eof;
            }
            match deadline {
                None => {
                    state = self
                        .readable
                        .wait(state)
                        .unwrap_or_else(|poison| poison.into_inner())
                }
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return ReadOutcome::TimedOut;
                    }
                    state = self
                        .readable
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(|poison| poison.into_inner())
                        .0;
                }
            }
        }
    }
}

/// Starts a thread that copies `source` into a new buffer until EOF.
///
/// A pty master reports EIO once every slave is closed; that counts as EOF.
pub fn drain(name: &str, source: OwnedFd) -> Result<Arc<OutputBuffer>, StdioError> {
    let buffer = Arc::new(OutputBuffer::new());
    let sink = Arc::clone(&buffer);
    let mut file = File::from(source);
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match file.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => sink.push(&chunk[..n]),
                    Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                    Err(err) => {
                        if err.raw_os_error() != Some(libc::EIO) {
                            log::warn!("reading process output failed: {err}");
                        }
                        break;
                    }
                }
            }
            sink.close();
        })
        .map_err(StdioError::Thread)?;
    Ok(buffer)
}

/// A pipe whose ends close on exec: `(read, write)`.
pub fn pipe() -> Result<(OwnedFd, OwnedFd), StdioError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(StdioError::Pipe)
}

/// Duplicates `fd` (close-on-exec).
pub fn dup(fd: &impl AsFd) -> Result<OwnedFd, StdioError> {
    fd.as_fd().try_clone_to_owned().map_err(StdioError::Dup)
}

/// Sets the window size of the pty whose master is `master`.
pub fn resize_pty(master: &impl AsRawFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points to
    // a live local for the duration of the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_returns_data_then_eof() {
        let buffer = OutputBuffer::new();
        buffer.push(b"hello");
        buffer.close();
        assert_eq!(buffer.read(3, None), ReadOutcome::Data(b"hel".to_vec()));
        assert_eq!(buffer.read(100, None), ReadOutcome::Data(b"lo".to_vec()));
        assert_eq!(buffer.read(100, None), ReadOutcome::Eof);
    }

    #[test]
    fn read_times_out_when_empty() {
        let buffer = OutputBuffer::new();
        let outcome = buffer.read(10, Some(Duration::from_millis(10)));
        assert_eq!(outcome, ReadOutcome::TimedOut);
    }

    #[test]
    fn full_buffer_blocks_the_producer_without_loss() {
        let buffer = Arc::new(OutputBuffer::new());
        let producer = {
            let buffer = Arc::clone(&buffer);
            std::thread::spawn(move || {
                let data: Vec<u8> = (0..3 * OUTPUT_BUFFER_CAPACITY).map(|i| i as u8).collect();
                buffer.push(&data);
                buffer.close();
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(lock(&buffer.state).data.len() <= OUTPUT_BUFFER_CAPACITY);
        let mut got = Vec::new();
        loop {
            match buffer.read(100_000, None) {
                ReadOutcome::Data(d) => got.extend(d),
                ReadOutcome::Eof => break,
                ReadOutcome::TimedOut => unreachable!(),
            }
        }
        producer.join().unwrap();
        assert_eq!(got.len(), 3 * OUTPUT_BUFFER_CAPACITY);
        assert!(got.iter().enumerate().all(|(i, b)| *b == i as u8));
    }
}
