//! stdio bridging: containerd's FIFOs (or `file://` URIs) ↔ the agent's
//! stream RPCs, one thread per stream.
//!
//! - Output: a thread long-polls ReadStdout/ReadStderr and writes every
//!   byte to the destination until the agent reports EOF. It drains even
//!   without a destination, so a container never blocks on unread output.
//!   The waiter joins these threads (bounded) before publishing TaskExit,
//!   so containerd sees the output complete. A sandbox that ends takes
//!   the output with it: [`OutputLine::hang_up`] closes the destination at
//!   once (an agent that went silent would otherwise keep the FIFO open,
//!   and the reader waiting for EOF, for ever).
//! - Input: a thread reads the stdin FIFO and calls WriteStdin until it
//!   gets EOF, then CloseStdin.
//!
//! Output FIFOs are opened read-write: the open never blocks, and a reader
//! that goes away (ctr exiting) never turns writes into EPIPE.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ttrpc::Code;

use crate::agent_client::AgentClient;
use crate::sync::lock;
use crate::task::error::TaskError;

/// Where one output stream goes.
#[derive(Debug)]
pub enum Sink {
    /// Nowhere: drained and dropped.
    Discard,
    /// A FIFO or file.
    File(File),
}

/// Opens the destination for an output path containerd gave: a FIFO path,
/// `fifo://`/`file://` URI, or nothing.
pub fn open_output(path: &str) -> Result<Sink, TaskError> {
    if path.is_empty() {
        return Ok(Sink::Discard);
    }
    if let Some(rest) = path.strip_prefix("file://") {
        let file_path = Path::new(rest);
        if let Some(dir) = file_path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| TaskError::io(format!("cannot create {}", dir.display()), e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(file_path)
            .map_err(|e| TaskError::io(format!("cannot open log file {rest}"), e))?;
        return Ok(Sink::File(file));
    }
    if path.starts_with("binary://") {
        return Err(TaskError::InvalidArgument(format!(
            "stdio URI {path:?}: binary:// loggers are not supported by skiff"
        )));
    }
    let fifo = path.strip_prefix("fifo://").unwrap_or(path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fifo)
        .map_err(|e| TaskError::io(format!("cannot open output FIFO {fifo}"), e))?;
    Ok(Sink::File(file))
}

/// One output stream's destination, shared by its copier and whoever
/// may hang it up.
#[derive(Clone, Debug)]
pub struct OutputLine(Arc<Mutex<Option<Sink>>>);

impl OutputLine {
    fn new(sink: Sink) -> Self {
        Self(Arc::new(Mutex::new(Some(sink))))
    }

    /// Closes the destination now (a FIFO's reader sees EOF once the
    /// shim's descriptor is its last writer); the copier writes nothing
    /// more and stops after its current call.
    pub fn hang_up(&self) {
        drop(lock(&self.0).take());
    }

    /// Writes `data` unless hung up; false once hung up.
    fn write(&self, id: &str, exec_id: &str, data: &[u8]) -> bool {
        let mut sink = lock(&self.0);
        match sink.as_mut() {
            None => false,
            Some(Sink::File(file)) => {
                if let Err(err) = file.write_all(data) {
                    log::warn!("{id}/{exec_id}: output write failed, discarding: {err}");
                    *sink = Some(Sink::Discard);
                }
                true
            }
            Some(Sink::Discard) => true,
        }
    }

    fn hung_up(&self) -> bool {
        lock(&self.0).is_none()
    }
}

/// Counts finished copiers for a bounded join.
#[derive(Debug)]
pub struct CopierSet {
    done_rx: mpsc::Receiver<()>,
    done_tx: mpsc::Sender<()>,
    running: usize,
    lines: Vec<OutputLine>,
}

impl Default for CopierSet {
    fn default() -> Self {
        let (done_tx, done_rx) = mpsc::channel();
        Self {
            done_rx,
            done_tx,
            running: 0,
            lines: Vec::new(),
        }
    }
}

impl CopierSet {
    /// Starts a thread copying one output stream of `(id, exec_id)` into
    /// `sink`.
    pub fn spawn_output(
        &mut self,
        agent: AgentClient,
        id: &str,
        exec_id: &str,
        stderr: bool,
        sink: Sink,
    ) -> Result<(), TaskError> {
        let done = self.done_tx.clone();
        let (id, exec_id) = (id.to_owned(), exec_id.to_owned());
        let name = if stderr { "stderr" } else { "stdout" };
        let line = OutputLine::new(sink);
        let copier_line = line.clone();
        std::thread::Builder::new()
            .name(format!("{name}-copy"))
            .stack_size(crate::task::THREAD_STACK_SIZE)
            .spawn(move || {
                copy_output(&agent, &id, &exec_id, stderr, &copier_line);
                // The stream ended: close the destination now, so that a
                // FIFO's reader sees EOF while the process is still
                // listed (containerd's CRI ExecSync waits for that before
                // it deletes the exec).
                copier_line.hang_up();
                let _ = done.send(());
            })
            .map_err(|e| TaskError::io("cannot start an output thread", e))?;
        self.running += 1;
        self.lines.push(line);
        Ok(())
    }

    /// The destinations of the copiers started so far.
    pub fn lines(&self) -> Vec<OutputLine> {
        self.lines.clone()
    }

    /// Waits until every copier finished, at most `timeout`. Returns false
    /// if some are still running.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.running > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done_rx.recv_timeout(left) {
                Ok(()) => self.running -= 1,
                Err(_) => return false,
            }
        }
        true
    }
}

fn copy_output(agent: &AgentClient, id: &str, exec_id: &str, stderr: bool, line: &OutputLine) {
    let mut failures = 0;
    loop {
        let read = agent.read_stream(id, exec_id, stderr);
        if line.hung_up() {
            log::debug!("{id}/{exec_id}: output hung up");
            return;
        }
        match read {
            Ok(chunk) => {
                failures = 0;
                if !chunk.data.is_empty() && !line.write(id, exec_id, &chunk.data) {
                    return;
                }
                if chunk.eof {
                    return;
                }
            }
            Err(err) if err.is_timeout() => {}
            Err(err) if matches!(err.code(), Code::NOT_FOUND | Code::FAILED_PRECONDITION) => {
                log::debug!("{id}/{exec_id}: output stream gone: {err}");
                return;
            }
            Err(err) => {
                failures += 1;
                if failures > 20 {
                    log::warn!("{id}/{exec_id}: giving up on output: {err}");
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The stdin bridge of one process.
#[derive(Debug)]
pub struct StdinBridge {
    path: PathBuf,
}

impl StdinBridge {
    /// Starts a thread forwarding the FIFO at `path` to the process's stdin.
    pub fn spawn(
        agent: AgentClient,
        id: &str,
        exec_id: &str,
        path: &str,
    ) -> Result<Self, TaskError> {
        let fifo = PathBuf::from(path.strip_prefix("fifo://").unwrap_or(path));
        let (id, exec_id) = (id.to_owned(), exec_id.to_owned());
        let thread_path = fifo.clone();
        std::thread::Builder::new()
            .name("stdin-copy".into())
            .stack_size(crate::task::THREAD_STACK_SIZE)
            .spawn(move || copy_input(&agent, &id, &exec_id, &thread_path))
            .map_err(|e| TaskError::io("cannot start the stdin thread", e))?;
        Ok(Self { path: fifo })
    }

    /// Unblocks the thread if it still waits for a writer: opens and closes
    /// the FIFO's write side, so its open returns and its read sees EOF.
    pub fn poke(&self) {
        let _ = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path);
    }
}

fn copy_input(agent: &AgentClient, id: &str, exec_id: &str, path: &Path) {
    let mut fifo = match File::open(path) {
        Ok(f) => f,
        Err(err) => {
            log::warn!(
                "{id}/{exec_id}: cannot open stdin FIFO {}: {err}",
                path.display()
            );
            let _ = agent.close_stdin(id, exec_id);
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match fifo.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                log::warn!("{id}/{exec_id}: stdin read failed: {err}");
                break;
            }
        };
        let mut sent = 0;
        while sent < n {
            match agent.write_stdin(id, exec_id, &buf[sent..n]) {
                Ok(0) => std::thread::sleep(Duration::from_millis(1)),
                Ok(m) => sent += m,
                Err(err) => {
                    log::debug!("{id}/{exec_id}: stdin closed: {err}");
                    return;
                }
            }
        }
    }
    if let Err(err) = agent.close_stdin(id, exec_id) {
        log::debug!("{id}/{exec_id}: CloseStdin: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_destinations() {
        assert!(matches!(open_output("").unwrap(), Sink::Discard));
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sub/out.log");
        let uri = format!("file://{}", log.display());
        match open_output(&uri).unwrap() {
            Sink::File(mut f) => f.write_all(b"hi").unwrap(),
            Sink::Discard => panic!("expected a file"),
        }
        assert_eq!(std::fs::read(&log).unwrap(), b"hi");
        let err = open_output("binary:///usr/bin/logger").unwrap_err();
        assert!(err.to_string().contains("binary://"), "{err}");
        let err = open_output("/nonexistent/fifo").unwrap_err().to_string();
        assert!(
            err.contains("cannot open output FIFO /nonexistent/fifo"),
            "{err}"
        );
    }

    #[test]
    fn a_hung_up_line_closes_its_fifo_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("out");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let line = OutputLine::new(open_output(fifo.to_str().unwrap()).unwrap());
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        assert!(line.write("c", "e", b"before"));
        line.hang_up();
        assert!(line.hung_up());
        assert!(!line.write("c", "e", b"after"));
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"before", "EOF after what came before the hang-up");
    }

    #[test]
    fn empty_copier_set_waits_for_nothing() {
        assert!(CopierSet::default().wait(Duration::from_millis(1)));
    }
}
