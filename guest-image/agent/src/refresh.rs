//! `RefreshGuest`: what a guest restored from a VM snapshot must not share
//! with the template it was cloned from or with the other clones: the
//! entropy pool (and the CRNG state derived from it), the wall clock (the
//! snapshot's, stale by however long the snapshot sat on disk) and the
//! machine id.
//!
//! [`GuestRefresh::try_from_request`] checks a request (parse), then
//! [`GuestRefresh::apply`] changes the guest (execute): [`mix_entropy`]
//! (`RNDADDENTROPY` then `RNDRESEEDCRNG` on `/dev/urandom`),
//! [`set_wall_clock`] (`clock_settime(CLOCK_REALTIME)`) and
//! [`write_machine_id`] (`/etc/machine-id`, replaced atomically).
//!
//! Every one of these changes the whole system the agent runs on, so only
//! the guest init may make them: the agent also runs on the host as the
//! `linux` sandbox handler, where feeding the host's RNG, setting its clock
//! or its machine id would be a bug at best. [`refresh_guest`] refuses
//! ([`RefreshError::NotGuestInit`]) unless told it runs as the guest init,
//! before it looks at the request.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use skiff_agent_proto::agent as pb;
use skiff_agent_proto::{MACHINE_ID_LEN, REFRESH_ENTROPY_LEN};

/// Where the guest's machine id lives (machine-id(5)).
pub const MACHINE_ID_PATH: &str = "/etc/machine-id";
/// The random device the entropy ioctls go to.
const RANDOM_DEVICE: &str = "/dev/urandom";

/// The most entropy bytes one `RNDADDENTROPY` takes here.
const ENTROPY_MAX: usize = *REFRESH_ENTROPY_LEN.end();

/// `RNDADDENTROPY`, `_IOW('R', 0x03, int[2])`: adds bytes to the input pool
/// and credits them (needs `CAP_SYS_ADMIN`).
const RNDADDENTROPY: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[libc::c_int; 2]>());
/// `RNDRESEEDCRNG`, `_IO('R', 0x07)`: reseeds the CRNG now rather than at
/// its next interval (Linux 4.17+, needs `CAP_SYS_ADMIN`).
const RNDRESEEDCRNG: nix::sys::ioctl::ioctl_num_type = nix::request_code_none!(b'R', 0x07);

/// Errors of `RefreshGuest`.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The agent is not the micro-VM's init (e.g. the host's `linux`
    /// sandbox handler), so it must not touch the system it runs on.
    #[error(
        "RefreshGuest is for the guest init only: this agent is not the micro-VM's PID 1 \
         and will not change its host's entropy pool, clock or machine id"
    )]
    NotGuestInit,
    /// The entropy is too short or too long.
    #[error(
        "entropy must be {min}..={max} bytes, got {0}",
        min = REFRESH_ENTROPY_LEN.start(),
        max = REFRESH_ENTROPY_LEN.end()
    )]
    EntropyLength(usize),
    /// The machine id is not 32 lowercase hex chars, or is all zeros.
    #[error("machine id {0:?} is not 32 lowercase hex chars (and not all zeros)")]
    MachineId(String),
    /// The wall clock is not after the Unix epoch.
    #[error("unix_time_ns must be > 0, got {0}")]
    Time(i64),
    /// The random device could not be opened.
    #[error("cannot open {RANDOM_DEVICE}")]
    OpenRandom(#[source] std::io::Error),
    /// `RNDADDENTROPY` failed.
    #[error("cannot add entropy to the kernel's pool (RNDADDENTROPY)")]
    AddEntropy(#[source] std::io::Error),
    /// `RNDRESEEDCRNG` failed.
    #[error("cannot reseed the kernel's CRNG (RNDRESEEDCRNG)")]
    Reseed(#[source] std::io::Error),
    /// `clock_settime(CLOCK_REALTIME)` failed.
    #[error("cannot set the wall clock (CLOCK_REALTIME)")]
    SetClock(#[source] std::io::Error),
    /// The machine id file could not be written or put in place.
    #[error("cannot write the machine id to {path:?}")]
    WriteMachineId {
        /// The file being written (the temporary one or the target).
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl RefreshError {
    /// True for the errors of a malformed request (as opposed to a refusal
    /// or a failure to apply a good one).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Self::EntropyLength(_) | Self::MachineId(_) | Self::Time(_)
        )
    }
}

/// A machine id: 32 lowercase hex chars, not all zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineId(String);

impl MachineId {
    /// Checks `text`'s shape.
    pub fn try_new(text: &str) -> Result<Self, RefreshError> {
        let hex = text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if text.len() != MACHINE_ID_LEN || !hex || text.bytes().all(|b| b == b'0') {
            return Err(RefreshError::MachineId(text.to_owned()));
        }
        Ok(Self(text.to_owned()))
    }

    /// The 32 hex chars.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A checked `RefreshGuestRequest`.
pub struct GuestRefresh {
    entropy: Vec<u8>,
    wall_clock: SystemTime,
    machine_id: Option<MachineId>,
}

impl std::fmt::Debug for GuestRefresh {
    // Never the entropy bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRefresh")
            .field("entropy_len", &self.entropy.len())
            .field("wall_clock", &self.wall_clock)
            .field("machine_id", &self.machine_id.is_some())
            .finish()
    }
}

impl GuestRefresh {
    /// Checks the request: entropy length in [`REFRESH_ENTROPY_LEN`], time
    /// after the epoch, machine id empty or well formed.
    pub fn try_from_request(req: &pb::RefreshGuestRequest) -> Result<Self, RefreshError> {
        if !REFRESH_ENTROPY_LEN.contains(&req.entropy.len()) {
            return Err(RefreshError::EntropyLength(req.entropy.len()));
        }
        let since_epoch = u64::try_from(req.unix_time_ns)
            .ok()
            .filter(|&ns| ns > 0)
            .map(Duration::from_nanos)
            .ok_or(RefreshError::Time(req.unix_time_ns))?;
        let machine_id = match req.machine_id.as_str() {
            "" => None,
            id => Some(MachineId::try_new(id)?),
        };
        Ok(Self {
            entropy: req.entropy.clone(),
            wall_clock: SystemTime::UNIX_EPOCH + since_epoch,
            machine_id,
        })
    }

    /// Mixes the entropy in and reseeds, sets the clock, writes the machine
    /// id (if any) to [`MACHINE_ID_PATH`], in that order, stopping at the
    /// first failure. Changes the whole system: call in the guest init only.
    /// Concurrent calls take turns.
    pub fn apply(&self) -> Result<(), RefreshError> {
        static APPLYING: Mutex<()> = Mutex::new(());
        let _turn = APPLYING.lock().unwrap_or_else(PoisonError::into_inner);
        mix_entropy(&self.entropy)?;
        set_wall_clock(self.wall_clock)?;
        if let Some(id) = &self.machine_id {
            write_machine_id(Path::new(MACHINE_ID_PATH), id)?;
        }
        let now = self
            .wall_clock
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        log::info!(
            "guest refreshed: {} bytes of host entropy mixed in and the CRNG reseeded, \
             wall clock set to {}.{:09} (Unix time), {}",
            self.entropy.len(),
            now.as_secs(),
            now.subsec_nanos(),
            if self.machine_id.is_some() {
                "new machine id written"
            } else {
                "machine id kept"
            }
        );
        Ok(())
    }
}

/// Serves one `RefreshGuest`: refuses unless `guest_init` (the agent is
/// the micro-VM's PID 1) before looking at the request, then checks and
/// applies it.
pub fn refresh_guest(guest_init: bool, req: &pb::RefreshGuestRequest) -> Result<(), RefreshError> {
    if !guest_init {
        return Err(RefreshError::NotGuestInit);
    }
    GuestRefresh::try_from_request(req)?.apply()
}

/// `struct rand_pool_info` of `<linux/random.h>` with room for
/// [`ENTROPY_MAX`] bytes; the kernel reads `buf_size` of them.
#[repr(C)]
struct RandPoolInfo {
    /// Bits to credit.
    entropy_count: libc::c_int,
    /// Bytes in `buf`.
    buf_size: libc::c_int,
    /// The bytes (`__u32 buf[]` in C; `c_int` alignment keeps it at offset 8).
    buf: [u8; ENTROPY_MAX],
}

/// Adds `entropy` (1..=512 bytes) to the kernel's input pool, crediting 8
/// bits a byte (`RNDADDENTROPY`), then reseeds the CRNG from it at once
/// (`RNDRESEEDCRNG`). Needs `CAP_SYS_ADMIN`; changes the system's RNG.
pub fn mix_entropy(entropy: &[u8]) -> Result<(), RefreshError> {
    if entropy.is_empty() || entropy.len() > ENTROPY_MAX {
        return Err(RefreshError::EntropyLength(entropy.len()));
    }
    let mut info = RandPoolInfo {
        entropy_count: (entropy.len() * 8) as libc::c_int,
        buf_size: entropy.len() as libc::c_int,
        buf: [0; ENTROPY_MAX],
    };
    info.buf[..entropy.len()].copy_from_slice(entropy);
    let random = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(RANDOM_DEVICE)
        .map_err(RefreshError::OpenRandom)?;
    // ioctl(2)'s request is an unsigned long in glibc and an int in musl.
    let (add, reseed) = (RNDADDENTROPY as libc::Ioctl, RNDRESEEDCRNG as libc::Ioctl);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info and `buf_size` bytes
    // after its header; `info` is one with `ENTROPY_MAX >= buf_size` bytes
    // of buffer and lives for the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), add, &info) } < 0 {
        return Err(RefreshError::AddEntropy(std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), reseed) } < 0 {
        return Err(RefreshError::Reseed(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets the system's wall clock (`CLOCK_REALTIME`) to `now`. Needs
/// `CAP_SYS_TIME`; changes the system's clock.
pub fn set_wall_clock(now: SystemTime) -> Result<(), RefreshError> {
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| RefreshError::SetClock(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    nix::time::clock_settime(
        nix::time::ClockId::CLOCK_REALTIME,
        nix::sys::time::TimeSpec::from_duration(since_epoch),
    )
    .map_err(|errno| RefreshError::SetClock(errno.into()))
}

/// Replaces the machine id file at `path` (normally [`MACHINE_ID_PATH`])
/// with `id` and a newline, mode 0444: written to a temporary file in the
/// same directory, synced, then renamed over `path`, so a reader sees the
/// old id or the new one, never a partial file.
pub fn write_machine_id(path: &Path, id: &MachineId) -> Result<(), RefreshError> {
    let line = format!("{}\n", id.as_str());
    crate::files::replace_file(path, line.as_bytes(), 0o444)
        .map_err(|(path, source)| RefreshError::WriteMachineId { path, source })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn request(entropy_len: usize, unix_time_ns: i64, machine_id: &str) -> pb::RefreshGuestRequest {
        pb::RefreshGuestRequest {
            entropy: vec![0x5a; entropy_len],
            unix_time_ns,
            machine_id: machine_id.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn ioctl_numbers_match_linux_random_h() {
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
        assert_eq!(std::mem::offset_of!(RandPoolInfo, buf), 8);
    }

    #[test]
    fn entropy_length_bounds() {
        for len in [32, 33, 64, 512] {
            let refresh = GuestRefresh::try_from_request(&request(len, 1, "")).unwrap();
            assert_eq!(refresh.entropy.len(), len);
        }
        for len in [0, 1, 31, 513, 4096] {
            let err = GuestRefresh::try_from_request(&request(len, 1, "")).unwrap_err();
            assert!(
                matches!(err, RefreshError::EntropyLength(n) if n == len),
                "{len}: {err:?}"
            );
            assert!(err.is_invalid_request());
            assert!(err.to_string().contains("32..=512"), "{err}");
        }
    }

    #[test]
    fn machine_id_shapes() {
        let refresh = GuestRefresh::try_from_request(&request(32, 1, ID)).unwrap();
        assert_eq!(refresh.machine_id.unwrap().as_str(), ID);
        assert!(GuestRefresh::try_from_request(&request(32, 1, ""))
            .unwrap()
            .machine_id
            .is_none());
        for bad in [
            "0123456789ABCDEF0123456789ABCDEF",     // upper case
            "0123456789abcdef0123456789abcde",      // 31
            "0123456789abcdef0123456789abcdef0",    // 33
            "0123456789abcdef-123456789abcdef",     // not hex
            "01234567-89ab-cdef-0123-456789abcdef", // UUID form
            "00000000000000000000000000000000",     // null id
            " 0123456789abcdef0123456789abcde",     // space
            "0123456789abcdef0123456789abcdeg",     // g
            "0123456789abcdef0123456789abcdé",      // non-ASCII, 32 bytes
        ] {
            let err = GuestRefresh::try_from_request(&request(32, 1, bad)).unwrap_err();
            assert!(matches!(err, RefreshError::MachineId(_)), "{bad}: {err:?}");
            assert!(err.is_invalid_request());
        }
    }

    #[test]
    fn time_must_be_after_the_epoch() {
        for bad in [0, -1, i64::MIN] {
            let err = GuestRefresh::try_from_request(&request(32, bad, "")).unwrap_err();
            assert!(matches!(err, RefreshError::Time(t) if t == bad), "{err:?}");
        }
        let ns = 1_700_000_000_123_456_789;
        let refresh = GuestRefresh::try_from_request(&request(32, ns, "")).unwrap();
        assert_eq!(
            refresh.wall_clock,
            SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
        );
    }

    #[test]
    fn debug_never_shows_the_entropy() {
        let refresh = GuestRefresh::try_from_request(&request(40, 1, ID)).unwrap();
        let text = format!("{refresh:?}");
        assert!(text.contains("entropy_len: 40"), "{text}");
        assert!(!text.contains("90, 90"), "{text}"); // 0x5a
        assert!(!text.contains(ID), "{text}");
    }

    #[test]
    fn refuses_outside_the_guest_init_before_anything_else() {
        // A valid request and a malformed one: both refused, nothing applied
        // (this test runs on the host, often as root).
        for req in [request(64, 1, ID), request(0, 0, "bad")] {
            let err = refresh_guest(false, &req).unwrap_err();
            assert!(matches!(err, RefreshError::NotGuestInit), "{err:?}");
            assert!(!err.is_invalid_request());
        }
    }

    #[test]
    fn mix_entropy_checks_its_length_first() {
        // Both fail before the device is opened.
        assert!(matches!(
            mix_entropy(&[]),
            Err(RefreshError::EntropyLength(0))
        ));
        assert!(matches!(
            mix_entropy(&[1; 513]),
            Err(RefreshError::EntropyLength(513))
        ));
    }

    #[test]
    fn set_wall_clock_refuses_times_before_the_epoch() {
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert!(matches!(
            set_wall_clock(before),
            Err(RefreshError::SetClock(_))
        ));
    }

    #[test]
    fn machine_id_file_is_replaced_whole_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine-id");
        std::fs::write(&path, "ffffffffffffffffffffffffffffffff\n").unwrap();
        // A leftover temporary file from an interrupted refresh.
        std::fs::write(dir.path().join("machine-id.skiff-new"), "junk").unwrap();

        let id = MachineId::try_new(ID).unwrap();
        write_machine_id(&path, &id).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{ID}\n"));
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o444);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["machine-id"]);

        // Again over the read-only file, and into a fresh directory.
        let other = MachineId::try_new("fedcba9876543210fedcba9876543210").unwrap();
        write_machine_id(&path, &other).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "fedcba9876543210fedcba9876543210\n"
        );
        let fresh = dir.path().join("new-machine-id");
        write_machine_id(&fresh, &id).unwrap();
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), format!("{ID}\n"));
    }

    #[test]
    fn machine_id_write_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/machine-id");
        let err = write_machine_id(&path, &MachineId::try_new(ID).unwrap()).unwrap_err();
        match err {
            RefreshError::WriteMachineId { path: p, .. } => {
                assert!(p.starts_with(dir.path().join("missing")), "{p:?}")
            }
            other => panic!("{other:?}"),
        }
    }
}
