//! The VM's virtio-fs device: `vmm-core`'s [`Fs`] over the shim's
//! [`Passthrough`] backend, behind a virtio-mmio transport, served on its
//! own device thread (`vmm-fs`).
//!
//! One lock for the registers and the queues, as for the rng: the device
//! thread holds it while it serves a notification (a bounded batch of FUSE
//! requests, each a few system calls on the share), so a vCPU's register
//! access can wait for that batch. Splitting registers from I/O as the
//! disks do is the next step if that wait shows.
//!
//! The device has no state of its own to snapshot (see
//! [`vmm_core::devices::fs`]): templates are taken before the guest mounts
//! the share, and a restored device starts with no FUSE session.

use std::sync::Mutex;

use vmm_core::devices::fs::{Fs, FsStats, IN_BUF_SIZE, OUT_BUF_SIZE};
use vmm_core::mmio::{MmioTransport, MmioTransportState};
use vmm_core::snapshot::{Persist, StateError, StateReader, StateWriter, SECTION_HEADER_LEN};

use super::config::FsConfig;
use super::error_chain;
use super::fs::{Passthrough, PassthroughError};
use super::irq::IrqFd;
use super::platform::GuestRam;
use super::seccomp::ThreadKind;
use super::slot::VirtioSlot;
use crate::sync::lock;

/// Queues of the virtio-fs device: hiprio and one request queue.
pub const FS_QUEUES: usize = 2;

/// Why the share's device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FsSetupError {
    /// The backend could not open the share.
    #[error(transparent)]
    Backend(#[from] PassthroughError),
    /// The tag is not 1 to 36 bytes.
    #[error("virtio-fs tag {0:?} is invalid")]
    Tag(String),
    /// The transport refused the device.
    #[error("virtio-fs transport")]
    Transport(#[source] vmm_core::mmio::MmioError),
}

/// The device, its 132 KiB request and reply buffers on the heap.
pub type FsDevice = Fs<Passthrough, Box<[u8]>>;

/// The share's device behind its transport.
pub struct FsSlot {
    transport: Mutex<MmioTransport<FsDevice, IrqFd, FS_QUEUES>>,
}

impl FsSlot {
    /// The device for `config`, raising interrupts on `irq`; the backend
    /// opens the share now (and again at each FUSE INIT).
    pub fn new(config: &FsConfig, irq: IrqFd) -> Result<Self, FsSetupError> {
        let backend = Passthrough::new(&config.dir, config.cache)?;
        let buffer = |len| vec![0u8; len].into_boxed_slice();
        let device = Fs::with_buffers(
            &config.tag,
            backend,
            buffer(IN_BUF_SIZE),
            buffer(OUT_BUF_SIZE),
        )
        .map_err(|_| FsSetupError::Tag(config.tag.clone()))?;
        let transport = MmioTransport::new(device, irq).map_err(FsSetupError::Transport)?;
        Ok(FsSlot {
            transport: Mutex::new(transport),
        })
    }

    /// The device's counters.
    #[cfg(test)]
    pub fn stats(&self) -> FsStats {
        lock(&self.transport).device().stats()
    }
}

/// Logs what the guest got wrong since `before`: the first fault as a
/// warning, later ones at debug level.
fn report(before: FsStats, device: &FsDevice) {
    let after = device.stats();
    let faults = |s: &FsStats| s.rejected + s.faults;
    if faults(&after) > faults(&before) {
        if let Some(e) = device.last_error() {
            log::log!(
                super::first_warn(faults(&before)),
                "virtio-fs: {} faulty request(s), {} so far: {}",
                faults(&after) - faults(&before),
                faults(&after),
                error_chain(&e)
            );
        }
    }
}

impl VirtioSlot for FsSlot {
    fn read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.transport).read(offset, data)
    }

    fn write(&self, mem: &GuestRam, offset: u64, data: &[u8]) {
        let mut transport = lock(&self.transport);
        let before = transport.device().stats();
        if let Err(e) = transport.write(mem, offset, data) {
            log::warn!("virtio-fs: {}", error_chain(&e));
        }
        report(before, transport.device());
    }

    fn notify(&self, mem: &GuestRam, queue: u16) {
        let mut transport = lock(&self.transport);
        let before = transport.device().stats();
        if let Err(e) = transport.notify(mem, queue) {
            log::warn!("virtio-fs: {}", error_chain(&e));
        }
        report(before, transport.device());
    }

    fn queue_count(&self) -> usize {
        FS_QUEUES
    }

    fn thread_kind(&self) -> ThreadKind {
        ThreadKind::FsServer
    }

    fn state_len(&self) -> usize {
        SECTION_HEADER_LEN + <MmioTransportState<FS_QUEUES> as Persist>::MAX_LEN
    }

    fn state_sections(&self) -> usize {
        1
    }

    fn save(&self, w: &mut StateWriter<'_>, index: u16) -> Result<(), StateError> {
        w.add(index, &lock(&self.transport).state())
    }

    /// The transport only: the template had no FUSE session, so neither
    /// has the restored device until the guest mounts the share.
    fn restore(&self, r: &StateReader<'_>, index: u16, mem: &GuestRam) -> Result<(), StateError> {
        let state: MmioTransportState<FS_QUEUES> = r.load(index)?;
        lock(&self.transport).restore(&state, mem)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use vmm_core::devices::fs::VIRTIO_ID_FS;
    use vmm_core::memory::{GuestAddress, GuestMemory};
    use vmm_core::mmio::DEVICE_ID_OFFSET;
    use vmm_core::queue::{Descriptor, VIRTQ_DESC_F_WRITE};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::vmm::blk::testing::{guest_ram, read32, Driver};
    use crate::vmm::fs::CacheMode;

    const QUEUE_AT: u64 = 0x10_0000;
    const REQ: u64 = 0x20_0000;
    const REPLY: u64 = 0x30_0000;

    fn in_header(len: u32, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&opcode.to_le_bytes());
        h.extend_from_slice(&unique.to_le_bytes());
        h.extend_from_slice(&nodeid.to_le_bytes());
        h.extend_from_slice(&[0; 16]); // uid gid pid extlen padding
        h
    }

    /// Sends one request (`opcode`, `args`) and returns the reply bytes.
    fn call(
        slot: &FsSlot,
        mem: &GuestRam,
        driver: &mut Driver<'_>,
        opcode: u32,
        nodeid: u64,
        args: &[u8],
    ) -> Vec<u8> {
        let mut req = in_header(40 + args.len() as u32, opcode, 7, nodeid);
        req.extend_from_slice(args);
        mem.write(GuestAddress(REQ), &req).unwrap();
        let used_before = driver.used();
        driver.add_chain(&[
            Descriptor {
                addr: GuestAddress(REQ),
                len: req.len() as u32,
                flags: 0,
                next: 0,
            },
            Descriptor {
                addr: GuestAddress(REPLY),
                len: 4096,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            },
        ]);
        slot.notify(mem, 1);
        assert_eq!(driver.used(), used_before + 1);
        let len = driver.used_elem(used_before).1 as usize;
        let mut reply = vec![0; len];
        mem.read(GuestAddress(REPLY), &mut reply).unwrap();
        reply
    }

    /// A guest's FUSE session over a real host directory, through the
    /// transport: INIT, LOOKUP of a host file, READ of its bytes.
    #[test]
    fn a_guest_reads_a_host_file_through_the_share() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello"), b"from the host").unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let config = FsConfig {
            dir: dir.path().to_owned(),
            tag: "skiff".into(),
            cache: CacheMode::Auto,
        };
        let slot = FsSlot::new(&config, IrqFd(irq.try_clone().unwrap())).unwrap();
        assert_eq!(read32(&slot, DEVICE_ID_OFFSET), VIRTIO_ID_FS);
        assert_eq!(slot.queue_count(), 2);
        let mem = guest_ram();
        let mut driver = Driver::activate_queue(&slot, &mem, QUEUE_AT, 1);

        // INIT 7.38, no flags.
        let mut init = Vec::new();
        for v in [7u32, 38, 0x20000, 0] {
            init.extend_from_slice(&v.to_le_bytes());
        }
        init.extend_from_slice(&[0; 48]); // flags2 and unused
        let reply = call(&slot, &mem, &mut driver, 26, 0, &init);
        assert_eq!(&reply[4..8], &0i32.to_le_bytes(), "INIT succeeds");
        assert_eq!(&reply[16..20], &7u32.to_le_bytes());

        // LOOKUP "hello" in the root.
        let reply = call(&slot, &mem, &mut driver, 1, 1, b"hello\0");
        assert_eq!(&reply[4..8], &0i32.to_le_bytes(), "LOOKUP succeeds");
        let nodeid = u64::from_le_bytes(reply[16..24].try_into().unwrap());
        let ino = u64::from_le_bytes(reply[56..64].try_into().unwrap());
        let host = std::fs::metadata(dir.path().join("hello")).unwrap();
        assert_eq!(ino, host.ino());
        // An escape by name is refused before the backend.
        let reply = call(&slot, &mem, &mut driver, 1, 1, b"..\0");
        assert_eq!(&reply[4..8], &(-libc::EINVAL).to_le_bytes());

        // OPEN read-only, READ 64 bytes at 0.
        let mut open = Vec::new();
        open.extend_from_slice(&(libc::O_RDONLY as u32).to_le_bytes());
        open.extend_from_slice(&0u32.to_le_bytes());
        let reply = call(&slot, &mem, &mut driver, 14, nodeid, &open);
        assert_eq!(&reply[4..8], &0i32.to_le_bytes(), "OPEN succeeds");
        let fh = u64::from_le_bytes(reply[16..24].try_into().unwrap());
        let mut read = Vec::new();
        read.extend_from_slice(&fh.to_le_bytes());
        read.extend_from_slice(&0u64.to_le_bytes()); // offset
        read.extend_from_slice(&64u32.to_le_bytes()); // size
        read.extend_from_slice(&[0; 20]); // read_flags lock_owner flags padding
        let reply = call(&slot, &mem, &mut driver, 15, nodeid, &read);
        assert_eq!(&reply[4..8], &0i32.to_le_bytes(), "READ succeeds");
        assert_eq!(&reply[16..], b"from the host");
        assert!(irq.read().is_ok(), "the interrupt line fired");
        let stats = slot.stats();
        assert_eq!(stats.error_replies, 1);

        let state = lock(&slot.transport).state();
        assert_eq!(state.device_type, VIRTIO_ID_FS);
        assert_eq!(state.queues.len(), FS_QUEUES);
    }

    #[test]
    fn a_share_that_is_not_there_fails_the_build() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let config = FsConfig {
            dir: "/nonexistent/share".into(),
            tag: "skiff".into(),
            cache: CacheMode::Auto,
        };
        let err = FsSlot::new(&config, IrqFd(irq)).map(drop).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/share"), "{err}");
    }
}
