//! The VM's virtio-net NIC: `vmm-core`'s [`Net`] over a tap
//! ([`TapBackend`]), behind a virtio-mmio transport.
//!
//! The device's thread (`vmm-net`) serves the queues' ioeventfds and the
//! slot's own epoll ([`VirtioSlot::host_fd`]), which holds the tap and a
//! "come back" eventfd. After every call into the device the slot asks it
//! what to watch ([`Net::interest`]) and sets the tap's events to match:
//! readable while no received frame waits for guest buffers (otherwise the
//! guest's rx notification carries on), writable while a sent frame waits
//! for the tap; the eventfd when a call stopped at its budget with work
//! left. So neither side makes the other spin, and a guest that posts no
//! buffers only makes the tap's own queue fill and drop, as a slow NIC
//! would.
//!
//! One lock for the registers and the queues, as for vsock: nothing here
//! blocks (the tap is non-blocking) and a call serves a bounded amount.
//! The device has no state of its own to snapshot: the transport's is all
//! of it, and a restored device tells the new tap the offloads the guest
//! had accepted ([`Net::resume`]).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_core::devices::net::{
    Net, NetBackend, NetBackendError, NetConfig as DeviceConfig, NetConfigError, NetStats,
};
use vmm_core::mmio::{MmioError, MmioTransport, MmioTransportState};
use vmm_core::snapshot::{Persist, StateError, StateReader, StateWriter, SECTION_HEADER_LEN};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::config::NetConfig;
use super::error_chain;
use super::irq::IrqFd;
use super::platform::GuestRam;
use super::slot::VirtioSlot;
use super::tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};
use crate::sync::lock;

/// Queues of the virtio-net device: rx, tx.
pub const NET_QUEUES: usize = 2;

/// The NIC of one VM.
pub type NetDevice = Net<TapBackend>;

/// `VIRTIO_NET_F_GUEST_*` feature bits and the tap offloads they allow.
const GUEST_OFFLOADS: [(u32, u32); 4] = [
    (1, TUN_F_CSUM),    // GUEST_CSUM
    (7, TUN_F_TSO4),    // GUEST_TSO4
    (8, TUN_F_TSO6),    // GUEST_TSO6
    (9, TUN_F_TSO_ECN), // GUEST_ECN
];

/// Epoll tokens in the slot's own epoll.
const TAP_TOKEN: u64 = 0;
const AGAIN_TOKEN: u64 = 1;

/// Errors setting the NIC up.
#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    /// The fd is not a usable tap.
    #[error("the NIC's fd is not a usable tap")]
    Tap(#[from] TapError),
    /// The MAC or MTU cannot be offered.
    #[error("the NIC's configuration")]
    Config(#[from] NetConfigError),
    /// The transport refused the device.
    #[error("the NIC's transport")]
    Transport(#[from] MmioError),
    /// The slot's epoll or eventfd could not be made.
    #[error("the NIC's event loop")]
    Events(#[source] std::io::Error),
}

/// The tap as the device's backend.
pub struct TapBackend {
    tap: Tap,
}

fn errno(e: &std::io::Error) -> NetBackendError {
    NetBackendError::Io {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    }
}

impl NetBackend for TapBackend {
    fn send(&mut self, packet: &[u8]) -> Result<(), NetBackendError> {
        match self.tap.write(packet) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(NetBackendError::WouldBlock),
            Err(e) => Err(errno(&e)),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetBackendError> {
        self.tap.read(buf).map_err(|e| errno(&e))
    }

    fn set_offloads(&mut self, guest_features: u64) -> Result<(), NetBackendError> {
        let mut flags = 0;
        for (bit, flag) in GUEST_OFFLOADS {
            if guest_features & (1 << bit) != 0 {
                flags |= flag;
            }
        }
        // The tap takes segmentation offloads only with checksum offload.
        if flags & TUN_F_CSUM == 0 {
            flags = 0;
        }
        self.tap.set_offloads(flags).map_err(|e| match e {
            TapError::Ioctl { source, .. } => errno(&source),
            _ => NetBackendError::Io { errno: libc::EIO },
        })
    }
}

/// What the slot's epoll watches the tap for now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Watch {
    readable: bool,
    writable: bool,
}

/// The NIC behind its transport, as its thread and the vCPUs see it.
pub struct NetSlot {
    transport: Mutex<Box<MmioTransport<NetDevice, IrqFd, NET_QUEUES>>>,
    epoll: Epoll,
    again: EventFd,
    tap_fd: RawFd,
    watch: Mutex<Watch>,
    /// The tap failed when it was ready: it is watched no more (a tap
    /// whose link is gone stays ready and fails every read, and the
    /// device's thread must not spin on it).
    failed: AtomicBool,
}

impl NetSlot {
    /// The NIC `config` describes, raising interrupts on `irq`.
    pub fn new(config: &NetConfig, irq: IrqFd) -> Result<Self, NetSetupError> {
        let fd = config.tap.try_clone().map_err(NetSetupError::Events)?;
        let tap = Tap::try_from(fd)?;
        let tap_fd = tap.as_raw_fd();
        let device = Net::new(
            DeviceConfig {
                mac: config.mac,
                mtu: config.mtu,
                offloads: true,
            },
            TapBackend { tap },
        )?;
        let transport = Box::new(MmioTransport::new(device, irq)?);
        let epoll = Epoll::new().map_err(NetSetupError::Events)?;
        let again = EventFd::new(libc::EFD_NONBLOCK).map_err(NetSetupError::Events)?;
        epoll
            .ctl(
                ControlOperation::Add,
                tap_fd,
                EpollEvent::new(EventSet::empty(), TAP_TOKEN),
            )
            .map_err(NetSetupError::Events)?;
        epoll
            .ctl(
                ControlOperation::Add,
                again.as_raw_fd(),
                EpollEvent::new(EventSet::IN, AGAIN_TOKEN),
            )
            .map_err(NetSetupError::Events)?;
        Ok(NetSlot {
            transport: Mutex::new(transport),
            epoll,
            again,
            tap_fd,
            watch: Mutex::new(Watch::default()),
            failed: AtomicBool::new(false),
        })
    }

    /// The transport's state, for a snapshot: all the device's state.
    pub fn transport_state(&self) -> MmioTransportState<NET_QUEUES> {
        lock(&self.transport).state()
    }

    #[cfg(test)]
    /// The device's counters.
    pub fn stats(&self) -> NetStats {
        lock(&self.transport).device().stats()
    }

    /// Sets the tap's events to what the device asks for now; asks to be
    /// called again when it stopped at its budget.
    fn update(&self, t: &MmioTransport<NetDevice, IrqFd, NET_QUEUES>) {
        let interest = if t.is_live() && !self.failed.load(Ordering::Relaxed) {
            t.device().interest()
        } else {
            Default::default()
        };
        let want = Watch {
            readable: interest.readable,
            writable: interest.writable,
        };
        let mut watch = lock(&self.watch);
        if *watch != want {
            let mut events = EventSet::empty();
            if want.readable {
                events |= EventSet::IN;
            }
            if want.writable {
                events |= EventSet::OUT;
            }
            match self.epoll.ctl(
                ControlOperation::Modify,
                self.tap_fd,
                EpollEvent::new(events, TAP_TOKEN),
            ) {
                Ok(()) => *watch = want,
                Err(e) => log::warn!("virtio-net: cannot watch the tap: {e}"),
            }
        }
        if interest.again {
            let _ = self.again.write(1);
        }
    }
}

/// Logs what went wrong since `before`: the first refused chain and the
/// first backend failure as warnings, later ones at debug level (a guest
/// can send garbage at will, and must not flood the log).
fn report(before: NetStats, device: &NetDevice) {
    let after = device.stats();
    let level = super::first_warn;
    if after.rejected > before.rejected {
        if let Some(e) = device.last_error() {
            log::log!(
                level(before.rejected),
                "virtio-net: refused {} chain(s), {} so far: {}",
                after.rejected - before.rejected,
                after.rejected,
                error_chain(&e)
            );
        }
    }
    if after.backend_errors > before.backend_errors {
        if let Some(e) = device.last_backend_error() {
            log::log!(
                level(before.backend_errors),
                "virtio-net: the tap failed {} time(s), {} so far: {e}",
                after.backend_errors - before.backend_errors,
                after.backend_errors
            );
        }
    }
}

impl VirtioSlot for NetSlot {
    fn read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.transport).read(offset, data)
    }

    fn write(&self, mem: &GuestRam, offset: u64, data: &[u8]) {
        let mut transport = lock(&self.transport);
        let before = transport.device().stats();
        if let Err(e) = transport.write(mem, offset, data) {
            log::warn!("virtio-net: {}", error_chain(&e));
        }
        report(before, transport.device());
        self.update(&transport);
    }

    fn notify(&self, mem: &GuestRam, queue: u16) {
        let mut transport = lock(&self.transport);
        let before = transport.device().stats();
        if let Err(e) = transport.notify(mem, queue) {
            log::warn!("virtio-net: {}", error_chain(&e));
        }
        report(before, transport.device());
        self.update(&transport);
    }

    fn queue_count(&self) -> usize {
        NET_QUEUES
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn host_ready(&self, mem: &GuestRam) {
        // The tap is level-triggered; the "come back" eventfd is cleared
        // here. The device is served both ways, bounded, whichever fired.
        let _ = self.again.read();
        let mut transport = lock(&self.transport);
        let before = transport.device().stats();
        if let Err(e) = transport.run_device(mem, |net, ctx| net.process(ctx)) {
            log::warn!("virtio-net: {}", error_chain(&e));
        }
        report(before, transport.device());
        if transport.device().stats().backend_errors > before.backend_errors {
            log::warn!("virtio-net: the tap fails when ready; the NIC no longer watches it");
            self.failed.store(true, Ordering::Relaxed);
        }
        self.update(&transport);
    }

    fn state_len(&self) -> usize {
        SECTION_HEADER_LEN + <MmioTransportState<NET_QUEUES> as Persist>::MAX_LEN
    }

    fn state_sections(&self) -> usize {
        1
    }

    fn save(&self, w: &mut StateWriter<'_>, index: u16) -> Result<(), StateError> {
        w.add(index, &self.transport_state())
    }

    /// The transport only; then the new tap gets the offloads the guest
    /// accepted, and both queues are served.
    fn restore(&self, r: &StateReader<'_>, index: u16, mem: &GuestRam) -> Result<(), StateError> {
        let state: MmioTransportState<NET_QUEUES> = r.load(index)?;
        let mut t = lock(&self.transport);
        t.restore(&state, mem)?;
        if let Err(e) = t.run_device(mem, |net, ctx| net.resume(ctx)) {
            log::warn!("virtio-net: after restore: {}", error_chain(&e));
        }
        self.update(&t);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    use vmm_core::devices::net::VIRTIO_ID_NET;
    use vmm_core::mmio::{CONFIG_OFFSET, DEVICE_ID_OFFSET};

    use super::*;
    use crate::podnet::run_in_netns;
    use crate::podnet::testing::{skip_reason, TestNetns};
    use crate::vmm::blk::testing::read32;

    #[test]
    fn the_nic_offers_its_mac_and_mtu_and_watches_nothing_before_activation() {
        if let Some(reason) = skip_reason() {
            eprintln!("skipped: {reason}");
            return;
        }
        let ns = TestNetns::new().unwrap();
        let tap = run_in_netns(ns.path(), || Tap::create("tap-t0"))
            .unwrap()
            .unwrap();
        let config = NetConfig {
            tap: Arc::new(OwnedFd::from(tap)),
            mac: [0x02, 0x11, 0x22, 0x33, 0x44, 0x55],
            mtu: 1400,
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let slot = NetSlot::new(&config, IrqFd(irq)).unwrap();
        assert_eq!(read32(&slot, DEVICE_ID_OFFSET), VIRTIO_ID_NET);
        assert_eq!(slot.queue_count(), NET_QUEUES);
        let mut mac = [0; 6];
        slot.read(CONFIG_OFFSET, &mut mac[..4]);
        slot.read(CONFIG_OFFSET + 4, &mut mac[4..]);
        assert_eq!(mac, config.mac);
        // mac, status, max_virtqueue_pairs, then mtu.
        let mut mtu = [0; 2];
        slot.read(CONFIG_OFFSET + 10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 1400);
        // Not live: the tap is not watched, so a frame waiting there
        // cannot make the device thread spin.
        assert_eq!(*lock(&slot.watch), Watch::default());
        let mut events = [EpollEvent::default(); 2];
        assert_eq!(slot.epoll.wait(0, &mut events).unwrap(), 0);
        assert_eq!(slot.stats(), NetStats::default());
        // Not a tap: refused.
        let bad = NetConfig {
            tap: Arc::new(std::fs::File::open("/dev/null").unwrap().into()),
            ..config
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(matches!(
            NetSlot::new(&bad, IrqFd(irq)),
            Err(NetSetupError::Tap(_))
        ));
    }
}
