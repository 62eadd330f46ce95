//! Snapshots of a VM: what KVM holds (each vCPU, the irqchip, PIT and
//! clock; [`platform::snapshot`]), the devices' state (`vmm-core`'s
//! checksummed container) and guest memory, written to a directory; and a
//! VM restored from one, its memory the snapshot's file mapped copy on
//! write.
//!
//! A snapshot directory holds two files: [`STATE_FILE`] (a header — magic,
//! format version, payload length, CRC-32C of the payload — then the
//! payload, JSON) and [`MEMORY_FILE`] (guest RAM, region after region).
//!
//! A jailed VMM opens no file by path: the shim opens both files and
//! passes them ([`write_files`], [`read_file`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm_core::snapshot::{crc32c, StateError};

use super::platform;
use super::platform::snapshot::{VcpuState, VmState};

/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
/// The guest memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The state file's first bytes.
const MAGIC: &[u8; 8] = b"SKIFFVM\0";
/// The state file's format version.
pub const FORMAT_VERSION: u32 = 1;
/// Magic, version, payload length, checksum.
const FILE_HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// The most a state file may hold (vCPU states are a few KiB each).
const MAX_STATE_BYTES: u64 = 16 << 20;

/// Errors taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot could not be read or written.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// KVM could not save or restore part of the VM's state.
    #[error("KVM state")]
    Kvm(#[from] platform::SnapshotError),
    /// Guest memory could not be saved or mapped.
    #[error("guest memory")]
    Memory(#[from] platform::MemoryLayoutError),
    /// The devices' state could not be encoded or decoded.
    #[error("device state")]
    Devices(#[from] StateError),
    /// The vCPUs or the device threads did not pause in time.
    #[error("the {what} did not pause within {timeout:?}")]
    PauseTimeout {
        /// Which threads.
        what: &'static str,
        /// How long they were given.
        timeout: std::time::Duration,
    },
    /// A vCPU could not save its state.
    #[error("vCPU {id} could not save its state: {reason}")]
    VcpuSave {
        /// The vCPU.
        id: usize,
        /// Why.
        reason: String,
    },
    /// The state file is not a skiff VM state file.
    #[error("{} is not a skiff VM state file", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// The state file is of a format this skiff cannot read.
    #[error("{} has format version {found}; this skiff reads {FORMAT_VERSION}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The state file is truncated, too large or fails its checksum.
    #[error("{} is corrupt: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
    /// The payload does not decode.
    #[error("{} does not decode", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The snapshot does not fit the VM config it is restored with.
    #[error("the snapshot has {what} {saved}, the config {config}")]
    Mismatch {
        /// Which setting.
        what: &'static str,
        /// The snapshot's value.
        saved: u64,
        /// The config's value.
        config: u64,
    },
}

/// What a state file holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// The VM's irqchip, PIT and clock.
    pub vm: VmState,
    /// Each vCPU's state, by id.
    pub vcpus: Vec<VcpuState>,
    /// The devices' state: `vmm-core`'s container (UART, i8042, each
    /// virtio device's transport and device).
    pub devices: Vec<u8>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `snapshot` and the guest memory `mem` into `dir` (made if
/// missing); each file is written aside and renamed into place, the state
/// file last.
pub fn write(
    dir: &Path,
    snapshot: &VmSnapshot,
    mem: &vm_memory::GuestMemoryMmap,
) -> Result<(), SnapshotError> {
    write_with(dir, |state, memory| {
        write_files(state, memory, snapshot, mem)
    })
}

/// Makes `dir` if missing, has `fill` write the state and memory files
/// (open, empty, beside their final names), then renames them into place,
/// the state file last: a directory with a state file has its memory.
pub fn write_with<E: From<SnapshotError>>(
    dir: &Path,
    fill: impl FnOnce(&mut std::fs::File, &mut std::fs::File) -> Result<(), E>,
) -> Result<(), E> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp_state = dir.join(format!("{STATE_FILE}.tmp"));
    let tmp_memory = dir.join(format!("{MEMORY_FILE}.tmp"));
    let mut state = std::fs::File::create(&tmp_state).map_err(io(&tmp_state))?;
    let mut memory = std::fs::File::create(&tmp_memory).map_err(io(&tmp_memory))?;
    fill(&mut state, &mut memory)?;
    let path = dir.join(MEMORY_FILE);
    std::fs::rename(&tmp_memory, &path).map_err(io(&path))?;
    let path = dir.join(STATE_FILE);
    std::fs::rename(&tmp_state, &path).map_err(io(&path))?;
    Ok(())
}

/// The open state and memory files of snapshot `dir`, and the state
/// file's path (for errors).
pub fn open(dir: &Path) -> Result<(std::fs::File, std::fs::File, PathBuf), SnapshotError> {
    let open = |name: &str| {
        let path = dir.join(name);
        std::fs::File::open(&path).map_err(io(&path))
    };
    Ok((open(STATE_FILE)?, open(MEMORY_FILE)?, dir.join(STATE_FILE)))
}

/// Writes `snapshot` into the open, empty file `state` and guest memory
/// `mem` into `memory`, and syncs both (what a jailed VMM does with the
/// files the shim passed it).
pub fn write_files(
    state: &mut std::fs::File,
    memory: &mut std::fs::File,
    snapshot: &VmSnapshot,
    mem: &vm_memory::GuestMemoryMmap,
) -> Result<(), SnapshotError> {
    let passed = Path::new(STATE_FILE);
    platform::memory::save_guest_memory(mem, memory)?;
    memory.sync_all().map_err(io(Path::new(MEMORY_FILE)))?;
    let payload = serde_json::to_vec(snapshot).map_err(|source| SnapshotError::Decode {
        path: passed.to_owned(),
        source,
    })?;
    let mut bytes = Vec::with_capacity(FILE_HEADER_LEN + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32c(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    state.write_all(&bytes).map_err(io(passed))?;
    state.sync_all().map_err(io(passed))?;
    Ok(())
}

/// Reads and checks the state file of snapshot `dir`.
pub fn read(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let file = std::fs::File::open(&path).map_err(io(&path))?;
    read_file(file, &path)
}

/// Reads and checks the open state file `file` (`path`, for errors).
pub fn read_file(file: std::fs::File, path: &Path) -> Result<VmSnapshot, SnapshotError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    file.take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(SnapshotError::Corrupt {
            path: path.to_owned(),
            what: "larger than any state file",
        });
    }
    decode(path, &bytes)
}

/// What [`probe`] found: this host's KVM saves and restores a running
/// guest, and the restored guest runs on.
#[derive(Debug, Clone, Copy)]
pub struct ProbeReport {
    /// Writing the snapshot (32 MiB guest).
    pub snapshot: std::time::Duration,
    /// Building the VM from it, without guest work.
    pub restore: std::time::Duration,
    /// Whether the guest TSC was put back (`false` on PVM, where the guest
    /// reads the host's TSC: the kvmclock is moved on instead).
    pub tsc_restored: bool,
}

/// Whether this host can snapshot and restore a VM: boots a tiny real-mode
/// guest that prints a dot now and then, snapshots it into a temporary
/// directory, restores it into a second VM and waits for that one's first
/// dot. The error says which step failed (which KVM state could not be
/// saved or restored).
pub fn probe() -> Result<ProbeReport, super::VmmError> {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::{BootProtocol, BootSource, SerialOutput, Vm, VmConfig, VmmError};

    // mov dx, 0x3f8; l: mov al, '.'; out dx, al; mov cx, 0x4000;
    // w: loop w; jmp l
    let code = vec![
        0xba, 0xf8, 0x03, 0xb0, 0x2e, 0xee, 0xb9, 0x00, 0x40, 0xe2, 0xfe, 0xeb, 0xf6,
    ];
    let config = |out: &Arc<Mutex<Vec<u8>>>| VmConfig {
        vcpus: 1,
        mem_mib: 32,
        boot: BootSource::Raw {
            image: code.clone(),
            load_addr: 0x1000,
            protocol: BootProtocol::RealMode,
        },
        disks: Vec::new(),
        vsock: None,
        cpu_template: super::CpuTemplate::default(),
        serial: SerialOutput::Buffer(out.clone()),
        epoch: Instant::now(),
        rng: false,
        net: None,
        fs: None,
        seccomp: true,
    };
    let dots = |out: &Arc<Mutex<Vec<u8>>>| crate::sync::lock(out).len();
    let wait_for_dot = |out: &Arc<Mutex<Vec<u8>>>, what: &'static str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while dots(out) == 0 {
            if Instant::now() > deadline {
                return Err(VmmError::Config(format!(
                    "the {what} guest printed nothing in 10 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    };
    /// The probe's snapshot directory, removed when done.
    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir =
        TempDir(std::env::temp_dir().join(format!("skiff-restore-probe-{}", std::process::id())));
    let first = Arc::new(Mutex::new(Vec::new()));
    let vm = Vm::start(config(&first))?;
    wait_for_dot(&first, "booted")?;
    let t = Instant::now();
    let taken = vm.snapshot(&dir.0);
    let snapshot = t.elapsed();
    vm.stop();
    let _ = vm.wait();
    taken?;
    let second = Arc::new(Mutex::new(Vec::new()));
    let t = Instant::now();
    let built = Vm::restore(config(&second), &dir.0)?;
    let restore = t.elapsed();
    let tsc_restored = built.tsc_lag().is_none();
    let vm = built.start()?;
    let ran = wait_for_dot(&second, "restored");
    vm.stop();
    let _ = vm.wait();
    ran?;
    Ok(ProbeReport {
        snapshot,
        restore,
        tsc_restored,
    })
}

fn decode(path: &Path, bytes: &[u8]) -> Result<VmSnapshot, SnapshotError> {
    let corrupt = |what| SnapshotError::Corrupt {
        path: path.to_owned(),
        what,
    };
    if bytes.len() < FILE_HEADER_LEN {
        return Err(corrupt("shorter than its header"));
    }
    if &bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic {
            path: path.to_owned(),
        });
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
    let found = u32_at(8);
    if found != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_owned(),
            found,
        });
    }
    let payload_len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or([0; 8]));
    let payload = &bytes[FILE_HEADER_LEN..];
    if payload.len() as u64 != payload_len {
        return Err(corrupt("its length does not match its header"));
    }
    if crc32c(payload) != u32_at(20) {
        return Err(corrupt("its checksum does not match"));
    }
    serde_json::from_slice(payload).map_err(|source| SnapshotError::Decode {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_state_file_is_a_typed_error() {
        let path = Path::new("/snap/vm.state");
        let payload = br#"{"mem_size":1}"#;
        let mut good = Vec::new();
        good.extend_from_slice(MAGIC);
        good.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        good.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        good.extend_from_slice(&crc32c(payload).to_le_bytes());
        good.extend_from_slice(payload);
        // Valid framing, but not a whole snapshot: a decode error.
        assert!(matches!(
            decode(path, &good),
            Err(SnapshotError::Decode { .. })
        ));
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x20;
        assert!(matches!(
            decode(path, &flipped),
            Err(SnapshotError::Corrupt { .. })
        ));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(matches!(
            decode(path, &magic),
            Err(SnapshotError::BadMagic { .. })
        ));
        let mut version = good.clone();
        version[8] = 9;
        assert!(matches!(
            decode(path, &version),
            Err(SnapshotError::Version { found: 9, .. })
        ));
        assert!(matches!(
            decode(path, &good[..good.len() - 1]),
            Err(SnapshotError::Corrupt { .. })
        ));
        assert!(matches!(
            decode(path, &good[..5]),
            Err(SnapshotError::Corrupt { .. })
        ));
    }
}
