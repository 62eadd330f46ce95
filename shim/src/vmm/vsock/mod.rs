//! The VM's virtio-vsock device: `vmm-core`'s [`Vsock`] behind a
//! virtio-mmio transport, with the hybrid unix-socket [`Muxer`] as its
//! backend.
//!
//! The vsock device's own thread (`vmm-vsock`) watches the muxer's epoll fd
//! ([`VirtioSlot::host_fd`]) next to the device's queue ioeventfds; when it
//! is ready it calls [`VirtioSlot::host_ready`], which polls the sockets
//! and lets the device move bytes. Other than the vCPUs' register accesses,
//! no other thread is involved, and no disk's I/O runs on this thread.

mod muxer;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use vmm_core::devices::vsock::{ReservedCidError, Vsock, VsockState};
use vmm_core::mmio::{MmioTransport, MmioTransportState};
use vmm_core::snapshot::{Persist, StateError, StateReader, StateWriter, SECTION_HEADER_LEN};

pub use muxer::{Muxer, MuxerError};

use super::config::VsockConfig;
use super::irq::IrqFd;
use super::platform::GuestRam;
use super::slot::VirtioSlot;
use crate::sync::lock;

/// Connections one VM's vsock device holds at once.
pub const MAX_CONNECTIONS: usize = 256;

/// The vsock device of one VM.
pub type VsockDevice = Vsock<Muxer, MAX_CONNECTIONS>;

/// Errors setting the vsock device up.
#[derive(Debug, thiserror::Error)]
pub enum VsockSetupError {
    /// The guest CID is reserved.
    #[error("invalid vsock configuration")]
    Cid(#[from] ReservedCidError),
    /// The muxer could not be set up.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    /// The transport could not be built.
    #[error("cannot build the vsock transport")]
    Transport(#[from] vmm_core::mmio::MmioError),
}

/// Connects a host process to guest port `port` through the VM's hybrid
/// vsock socket `uds`: `CONNECT <port>\n`, then `OK <host_port>\n` within
/// `timeout` (the muxer stays silent while nothing in the guest listens).
/// The returned stream carries the connection's bytes, in blocking mode.
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    stream.set_read_timeout(Some(timeout))?;
    // One byte at a time: what follows the newline is the connection's.
    let mut reader = BufReader::with_capacity(1, &stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("OK ") {
        return Err(std::io::Error::other(format!(
            "the vsock muxer answered {line:?} to CONNECT {port}"
        )));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// Queues of the vsock device (rx, tx, event).
pub const VSOCK_QUEUES: usize = 3;

/// The vsock device behind its transport, as its thread and the vCPUs see
/// it: one lock for the registers and the queues, since nothing here
/// blocks (the muxer's sockets are non-blocking).
pub struct VsockSlot {
    transport: Mutex<MmioTransport<VsockDevice, IrqFd, VSOCK_QUEUES>>,
    /// The muxer's epoll fd (fixed for the device's life).
    host_fd: RawFd,
}

impl VsockSlot {
    /// Listens on `config.uds_path` and builds the device for
    /// `config.guest_cid`, raising interrupts on `irq`.
    pub fn new(config: &VsockConfig, irq: IrqFd) -> Result<Self, VsockSetupError> {
        let muxer = Muxer::new(&config.uds_path)?;
        let host_fd = muxer.as_raw_fd();
        let device = Vsock::new(config.guest_cid, muxer)?;
        Ok(VsockSlot {
            transport: Mutex::new(MmioTransport::new(device, irq)?),
            host_fd,
        })
    }
}

impl VirtioSlot for VsockSlot {
    fn read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.transport).read(offset, data)
    }

    fn write(&self, mem: &GuestRam, offset: u64, data: &[u8]) {
        if let Err(e) = lock(&self.transport).write(mem, offset, data) {
            log::warn!("virtio-vsock: {e}");
        }
    }

    fn notify(&self, mem: &GuestRam, queue: u16) {
        if let Err(e) = lock(&self.transport).notify(mem, queue) {
            log::warn!("virtio-vsock: {e}");
        }
    }

    fn queue_count(&self) -> usize {
        lock(&self.transport).queues().len()
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.host_fd)
    }

    fn state_len(&self) -> usize {
        2 * SECTION_HEADER_LEN
            + <MmioTransportState<VSOCK_QUEUES> as Persist>::MAX_LEN
            + VsockState::MAX_LEN
    }

    fn save(&self, w: &mut StateWriter<'_>, index: u16) -> Result<(), StateError> {
        let t = lock(&self.transport);
        w.add(index, &t.state())?;
        w.add(index, &t.device().state())
    }

    /// The muxer starts with no connections: if the saved device had any,
    /// the guest is sent `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` now (it
    /// drops its sockets; a listening agent goes on listening), and the
    /// host reconnects.
    fn restore(&self, r: &StateReader<'_>, index: u16, mem: &GuestRam) -> Result<(), StateError> {
        let transport: MmioTransportState<VSOCK_QUEUES> = r.load(index)?;
        let device: VsockState = r.load(index)?;
        let mut t = lock(&self.transport);
        if device.guest_cid != t.device().guest_cid() {
            return Err(StateError::Mismatch {
                field: "guest CID",
                saved: device.guest_cid,
                device: t.device().guest_cid(),
            });
        }
        t.restore(&transport, mem)?;
        t.device_mut().restore(&device)?;
        if let Err(e) = t.run_device(mem, |device, ctx| device.process_host_events(ctx)) {
            log::warn!("virtio-vsock: after restore: {e}");
        }
        Ok(())
    }

    fn host_ready(&self, mem: &GuestRam) {
        let mut transport = lock(&self.transport);
        if let Err(e) = transport.device_mut().backend_mut().poll(0) {
            log::warn!("vsock: polling the host sockets failed: {e}");
            return;
        }
        // Before DRIVER_OK the events wait in the muxer (bounded: handshakes
        // are capped, and no socket is read).
        let served = transport.run_device(mem, |device, ctx| device.process_host_events(ctx));
        if let Err(e) = served {
            log::warn!("virtio-vsock: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
