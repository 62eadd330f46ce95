//! The `vm` sandbox handler: `skiff-agent` as PID 1 of a skiff micro-VM
//! that runs in the shim's own process.
//!
//! Start: the container's rootfs directory becomes an ext4 image
//! (`mkfs.ext4 -d`) in the sandbox's state dir, attached as the guest's
//! `/dev/vda`; the VM boots the configured kernel and agent initramfs with
//! a hybrid vsock device whose unix socket is in the state dir; the handler
//! then retries the `CONNECT 1024` handshake until the agent answers Health
//! or the bound from the config runs out, and wraps the connected stream in
//! an [`AgentClient`]. Stop: DestroySandbox (the agent resets the VM), wait
//! for the VM to end, force it off if it doesn't.
//!
//! Containers of one pod share the VM. The VM boots with `vm_disks`
//! virtio-blk slots: the first holds the first container's rootfs image
//! ([`SandboxRequest::rootfs`]), the others are empty (capacity 0). Each
//! later container's rootfs image goes into a free slot while the VM runs
//! ([`RunningVm::set_disk`]: the guest driver sees a configuration change
//! and the new capacity) and leaves it when the container is deleted, so
//! `vm_disks` bounds the containers a pod holds at once. Slot `i` is
//! `/dev/vd{a+i}` in the guest: Linux names virtio-blk disks in probe
//! order, which is slot order, and each answers GET_ID with its name
//! (`skiff-vdX`, `/sys/block/vdX/serial`), which the agent checks.
//!
//! This is the only module of `task` that depends on the VMM.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::agent_client::AgentClient;
use crate::sync::lock;
use crate::task::config::Config;
use crate::task::sandbox::{Sandbox, SandboxError, SandboxHandler, SandboxRequest};
use crate::vmm::{
    self, BootSource, DiskConfig, ExitReason, KernelSpec, RunningVm, SerialOutput, VmConfig,
    VmReport, VsockConfig,
};

pub use skiff_agent_proto::AGENT_VSOCK_PORT;

/// The guest's vsock CID.
const GUEST_CID: u64 = 3;
const VSOCK_NAME: &str = "vsock.sock";
const SERIAL_NAME: &str = "serial.log";
/// Smallest rootfs image.
const MIN_IMAGE_BYTES: u64 = 16 << 20;
/// Free space added to the rootfs's size (plus a quarter of it) for the
/// container's writes. The image is sparse: only written blocks take host
/// disk (about 2 MiB of metadata for an empty GiB).
const IMAGE_MARGIN_BYTES: u64 = 1 << 30;
/// Bound on one handshake's answer; the muxer stays silent while the guest
/// does not listen yet.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between handshake attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Bound on the agent's first Health answer over a connected stream.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the `vm` handler.
#[derive(Debug, thiserror::Error)]
pub enum VmSandboxError {
    /// The config lacks the guest kernel or initramfs.
    #[error("handler = \"vm\" needs `{key}` in the skiff config (build it with {hint})")]
    MissingArtifact {
        /// `kernel` or `initrd`.
        key: &'static str,
        /// The script that builds it.
        hint: &'static str,
    },
    /// A configured guest artifact does not exist.
    #[error("the configured {key} {path} does not exist")]
    ArtifactNotFound {
        /// `kernel` or `initrd`.
        key: &'static str,
        /// The configured path.
        path: PathBuf,
    },
    /// `mkfs.ext4` is not installed.
    #[error("mkfs.ext4 was not found (looked in $PATH, /sbin, /usr/sbin); install e2fsprogs")]
    NoMkfs,
    /// Building the rootfs image failed.
    #[error("cannot build the rootfs image {image} from {rootfs}: {detail}")]
    Image {
        /// The source directory.
        rootfs: PathBuf,
        /// The image.
        image: PathBuf,
        /// What failed (command output).
        detail: String,
    },
    /// The VMM refused to start the VM.
    #[error("cannot start the VM")]
    Start(#[source] vmm::VmmError),
    /// The VM ended before the agent answered.
    #[error("the VM ended ({exit:?}) after {elapsed:?}, before its agent answered; serial log: {serial}")]
    EndedEarly {
        /// Why it ended.
        exit: ExitReason,
        /// Time since boot.
        elapsed: Duration,
        /// The serial log's tail.
        serial: String,
    },
    /// Every disk slot holds a container rootfs or volume.
    #[error(
        "cannot share {path} into the VM: all {slots} disk slots are in use (one per container rootfs or volume directory; raise vm_disks in the skiff config)"
    )]
    NoFreeDisk {
        /// The requested path.
        path: PathBuf,
        /// The VM's slots.
        slots: usize,
    },
    /// A bind mount of the spec cannot be given to the VM.
    #[error("cannot bind-mount {} at {destination} in the VM: {reason}", host.display())]
    Volume {
        /// The host path.
        host: PathBuf,
        /// Where the container wanted it.
        destination: String,
        /// Why not.
        reason: String,
    },
    /// The VM is stopped.
    #[error("the VM is not running")]
    NotRunning,
    /// The VMM refused to put a disk into a slot or take it out.
    #[error("cannot change the VM's disks")]
    Disk(#[source] vmm::VmmError),
}

impl From<VmSandboxError> for SandboxError {
    fn from(err: VmSandboxError) -> Self {
        SandboxError::Vm(err)
    }
}

/// Boots one micro-VM per sandbox, with the first container's rootfs as
/// its disk.
#[derive(Debug, Default, Clone, Copy)]
pub struct VmHandler;

impl VmHandler {
    /// Starts a sandbox (see the module docs); the concrete type, for
    /// callers that want the VM's report on stop. The bound on boot plus
    /// the agent's first answer is the config's `vm_ready_timeout_secs`
    /// (default 300 s), not `req.ready_timeout`, which is sized for a host
    /// process.
    pub fn start_vm(&self, req: &SandboxRequest<'_>) -> Result<VmSandbox, SandboxError> {
        let rootfs = req.rootfs.to_owned();
        let (kernel, initrd) = artifacts(req.config)?;
        std::fs::create_dir_all(req.state_dir).map_err(|e| {
            SandboxError::io(
                format!(
                    "cannot create the sandbox state dir {}",
                    req.state_dir.display()
                ),
                e,
            )
        })?;
        let image = image_path(req.state_dir, 0);
        let t = Instant::now();
        let image_bytes = build_image(&rootfs, &image)?;
        log::info!(
            "sandbox {}: rootfs image {} ({} MiB) built in {:?}",
            req.id,
            image.display(),
            image_bytes >> 20,
            t.elapsed()
        );

        let uds = req.state_dir.join(VSOCK_NAME);
        let serial = req.state_dir.join(SERIAL_NAME);
        let _ = std::fs::remove_file(&uds);
        let host = crate::check::detect();
        let mut cmdline = host.cmdline();
        if !req.config.kernel_params.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(req.config.kernel_params.trim());
        }
        let config = VmConfig {
            vcpus: u8::try_from(req.config.vcpus).unwrap_or(u8::MAX),
            mem_mib: u64::from(req.config.memory_mib),
            boot: BootSource::Kernel(KernelSpec {
                kernel,
                initrd: Some(initrd),
                cmdline,
            }),
            disks: std::iter::once(DiskConfig::file(&image))
                .chain((1..req.config.vm_disks).map(|_| DiskConfig::empty()))
                .collect(),
            vsock: Some(VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: uds.clone(),
            }),
            cpu_template: match &req.config.cpu_template {
                // Validated by `Config`; an unknown name falls back to the host's.
                Some(name) => name.parse().unwrap_or(host.template),
                None => host.template,
            },
            serial: SerialOutput::File(serial.clone()),
            epoch: Instant::now(),
        };
        let booted = Instant::now();
        let vm = vmm::Vm::start(config).map_err(VmSandboxError::Start)?;
        let timeout = req.config.vm_ready_timeout();
        let client = match connect_agent(&vm, &uds, &serial, timeout) {
            Ok(client) => client,
            Err(err) => {
                vm.stop();
                let _ = vm.wait();
                return Err(err);
            }
        };
        let ready_after = booted.elapsed();
        log::info!(
            "sandbox {}: VM agent answered {:?} after boot (bound {:?})",
            req.id,
            ready_after,
            timeout
        );
        let mut disks: Vec<Option<SlotUse>> =
            (0..req.config.vm_disks.max(1)).map(|_| None).collect();
        disks[0] = Some(SlotUse {
            host: rootfs,
            users: 0,
        });
        let sandbox = VmSandbox {
            state_dir: req.state_dir.to_owned(),
            disks: Mutex::new(disks),
            client,
            vm: Mutex::new(Some(vm)),
            ready_after,
        };
        if let Err(err) = sandbox.client.create_sandbox(req.hostname) {
            let _ = sandbox.stop_vm(Duration::from_secs(5));
            return Err(SandboxError::Agent(err));
        }
        Ok(sandbox)
    }
}

/// The guest kernel and initramfs from the config.
fn artifacts(config: &Config) -> Result<(PathBuf, PathBuf), VmSandboxError> {
    let kernel = config
        .kernel
        .clone()
        .ok_or(VmSandboxError::MissingArtifact {
            key: "kernel",
            hint: "guest-image/kernel/build.sh",
        })?;
    let initrd = config
        .initrd
        .clone()
        .ok_or(VmSandboxError::MissingArtifact {
            key: "initrd",
            hint: "guest-image/initramfs/agent-build.sh",
        })?;
    for (key, path) in [("kernel", &kernel), ("initrd", &initrd)] {
        if !path.is_file() {
            return Err(VmSandboxError::ArtifactNotFound {
                key,
                path: path.clone(),
            });
        }
    }
    Ok((kernel, initrd))
}

fn find_mkfs() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/sbin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("mkfs.ext4"))
        .find(|p| p.is_file())
}

/// The image of disk slot `slot`.
fn image_path(state_dir: &Path, slot: usize) -> PathBuf {
    state_dir.join(format!("disk-{slot}.ext4"))
}

/// The guest's device for disk slot `slot`: `/dev/vda`, `/dev/vdb`, ...
pub fn guest_disk(slot: usize) -> String {
    let id = vmm::disk_id(slot);
    format!("/dev/{}", id.strip_prefix("skiff-").unwrap_or(&id))
}

/// The image size for a rootfs of `used` bytes.
fn image_size(used: u64) -> u64 {
    let size = used + used / 4 + IMAGE_MARGIN_BYTES;
    // mkfs.ext4 sizes in whole 1 KiB blocks; round up to a MiB.
    size.max(MIN_IMAGE_BYTES).div_ceil(1 << 20) << 20
}

/// Builds `image` (ext4) from the directory `rootfs`; returns its size.
fn build_image(rootfs: &Path, image: &Path) -> Result<u64, VmSandboxError> {
    let fail = |detail: String| VmSandboxError::Image {
        rootfs: rootfs.to_owned(),
        image: image.to_owned(),
        detail,
    };
    if !rootfs.is_dir() {
        return Err(fail("the rootfs is not a directory".into()));
    }
    let mkfs = find_mkfs().ok_or(VmSandboxError::NoMkfs)?;
    let du = Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(rootfs)
        .output()
        .map_err(|e| fail(format!("cannot run du: {e}")))?;
    if !du.status.success() {
        return Err(fail(format!(
            "du failed: {}",
            String::from_utf8_lossy(&du.stderr).trim()
        )));
    }
    let used: u64 = String::from_utf8_lossy(&du.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| fail("cannot parse du's output".into()))?;
    let size = image_size(used);
    let _ = std::fs::remove_file(image);
    let out = Command::new(&mkfs)
        // No journal: the image lives as long as the container, and a
        // journal would cost 32 MiB of writes per GiB at every start.
        .args(["-q", "-F", "-O", "^has_journal", "-d"])
        .arg(rootfs)
        .arg(image)
        .arg(format!("{}k", size >> 10))
        .output()
        .map_err(|e| fail(format!("cannot run {}: {e}", mkfs.display())))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{} exited with {}: {}",
            mkfs.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // mke2fs may drop a last, too small block group: report what it made.
    std::fs::metadata(image)
        .map(|m| m.len())
        .map_err(|e| fail(format!("the image is missing after mkfs: {e}")))
}

/// Lines of the guest's serial log where its kernel reports a process
/// killed by a fault (so a container that died of one is explained in the
/// shim's log).
fn guest_faults(serial: &Path) -> Vec<String> {
    std::fs::read(serial)
        .map(|bytes| {
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|l| {
                    l.contains("traps:")
                        || l.contains("segfault at")
                        || l.contains("unexpected fatal signal")
                })
                .map(|l| l.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The last `max` bytes of a file, on one line.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim().replace('\n', " | ")
}

/// Retries the handshake and a first Health until `timeout` has passed
/// since the call, the agent answers, or the VM ends.
fn connect_agent(
    vm: &RunningVm,
    uds: &Path,
    serial: &Path,
    timeout: Duration,
) -> Result<AgentClient, SandboxError> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        if vm.has_exited() {
            return Err(VmSandboxError::EndedEarly {
                exit: ExitReason::Stopped,
                elapsed: start.elapsed(),
                serial: tail(serial, 2048),
            }
            .into());
        }
        attempts += 1;
        let last = match vmm::vsock_connect(uds, AGENT_VSOCK_PORT, HANDSHAKE_TIMEOUT) {
            Ok(stream) => match AgentClient::from_stream(stream, HEALTH_TIMEOUT) {
                Ok(client) => {
                    log::debug!(
                        "agent reached after {attempts} attempts, {:?}",
                        start.elapsed()
                    );
                    return Ok(client);
                }
                Err(err) => format!("Health failed: {err}"),
            },
            Err(err) => format!("handshake: {err}"),
        };
        if start.elapsed() >= timeout {
            return Err(SandboxError::NotReady {
                timeout,
                detail: format!(
                    "{attempts} attempts in {:?}, last: {last}; serial log: {}",
                    start.elapsed(),
                    tail(serial, 2048)
                ),
            });
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

impl SandboxHandler for VmHandler {
    fn start(&self, req: &SandboxRequest<'_>) -> Result<Box<dyn Sandbox>, SandboxError> {
        Ok(Box::new(self.start_vm(req)?))
    }

    fn check_mounts(&self, spec: &serde_json::Value) -> Result<(), SandboxError> {
        for mount in spec["mounts"].as_array().into_iter().flatten() {
            ro_bind(mount)?;
        }
        Ok(())
    }

    fn cleanup(&self, state_dir: &Path, _config: &Config) -> Result<(), SandboxError> {
        // The VM lived in the dead shim's process and died with it; only
        // its files (image, socket, serial log) are left.
        match std::fs::remove_dir_all(state_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(SandboxError::io(
                format!("cannot remove {}", state_dir.display()),
                e,
            )),
            _ => Ok(()),
        }
    }
}

/// A disk slot's use.
#[derive(Debug)]
struct SlotUse {
    /// The directory the image was built from.
    host: PathBuf,
    /// Containers using it: the slot is emptied when the last one goes.
    users: usize,
}

/// Options of a bind mount that carry over to its disk's mount.
const KEPT_MOUNT_OPTIONS: [&str; 5] = ["nosuid", "nodev", "noexec", "noatime", "relatime"];

/// A read-only bind mount in `mount` (an OCI spec mount), as (source,
/// destination); `None` for other mounts. Read-write or non-directory
/// binds are errors: the VM gets a copy of the source, and writes to a
/// copy would not reach the host.
fn ro_bind(mount: &serde_json::Value) -> Result<Option<(PathBuf, String)>, VmSandboxError> {
    let options: Vec<&str> = mount["options"]
        .as_array()
        .map(|o| o.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let bind = mount["type"].as_str() == Some("bind")
        || options.iter().any(|o| matches!(*o, "bind" | "rbind"));
    if !bind {
        return Ok(None);
    }
    let source = PathBuf::from(mount["source"].as_str().unwrap_or_default());
    let destination = mount["destination"].as_str().unwrap_or_default().to_owned();
    let volume = |reason: &str| VmSandboxError::Volume {
        host: source.clone(),
        destination: destination.clone(),
        reason: reason.to_owned(),
    };
    // The last of ro/rw wins, as in mount(8).
    let ro = options.iter().rev().find(|o| matches!(**o, "ro" | "rw")) == Some(&"ro");
    if !ro {
        return Err(volume(
            "read-write bind mounts need a file system shared with the host (virtio-fs), which the vm handler does not have yet; mount it read-only to get a copy",
        ));
    }
    if !source.is_dir() {
        return Err(volume(
            "only directories can be bind-mounted into the VM (as a read-only disk)",
        ));
    }
    Ok(Some((source, destination)))
}

/// A running micro-VM and its agent client.
pub struct VmSandbox {
    state_dir: PathBuf,
    /// Per disk slot, the host directory whose image it holds (or is
    /// being built for it).
    disks: Mutex<Vec<Option<SlotUse>>>,
    client: AgentClient,
    vm: Mutex<Option<RunningVm>>,
    ready_after: Duration,
}

impl std::fmt::Debug for VmSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSandbox")
            .field("state_dir", &self.state_dir)
            .field("disks", &self.disks)
            .finish_non_exhaustive()
    }
}

impl VmSandbox {
    /// How long the VM took from start to the agent's first answer.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// Stops the sandbox like [`Sandbox::stop`] and reports how the VM
    /// ended (`None` if it was already stopped). A clean end is
    /// [`ExitReason::Reset`]: the agent resets the VM after DestroySandbox.
    pub fn stop_vm(&self, timeout: Duration) -> Result<Option<VmReport>, SandboxError> {
        let vm = lock(&self.vm).take();
        let Some(vm) = vm else {
            return Ok(None);
        };
        if let Err(err) = self.client.destroy_sandbox() {
            log::warn!("agent DestroySandbox failed: {err}");
        }
        let deadline = Instant::now() + timeout;
        while !vm.has_exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !vm.has_exited() {
            log::warn!("the VM did not end within {timeout:?} of DestroySandbox; stopping it");
            vm.stop();
        }
        let report = vm.wait();
        log::info!("VM ended: {:?}", report.exit);
        for line in guest_faults(&self.state_dir.join(SERIAL_NAME)) {
            log::warn!("guest kernel: {line}");
        }
        std::fs::remove_dir_all(&self.state_dir).map_err(|e| {
            SandboxError::io(format!("cannot remove {}", self.state_dir.display()), e)
        })?;
        Ok(Some(report))
    }
}

/// The used slot holding `host`'s image.
fn find_slot<'a>(
    disks: &'a mut [Option<SlotUse>],
    host: &Path,
) -> Option<(usize, &'a mut SlotUse)> {
    disks
        .iter_mut()
        .enumerate()
        .find_map(|(i, d)| d.as_mut().filter(|d| d.host == host).map(|d| (i, d)))
}

impl VmSandbox {
    /// Replaces each read-only directory bind mount of `spec` by a mount
    /// of that directory's disk (read-only ext4); pushes each shared
    /// directory to `shared`.
    fn share_binds(
        &self,
        spec: &mut serde_json::Value,
        shared: &mut Vec<PathBuf>,
    ) -> Result<(), SandboxError> {
        let Some(mounts) = spec["mounts"].as_array_mut() else {
            return Ok(());
        };
        for mount in mounts {
            let Some((source, destination)) = ro_bind(mount)? else {
                continue;
            };
            let device = self.share_path(&source)?;
            shared.push(source.clone());
            let mut options = vec![serde_json::Value::from("ro")];
            if let Some(old) = mount["options"].as_array() {
                options.extend(
                    old.iter()
                        .filter(|o| o.as_str().is_some_and(|o| KEPT_MOUNT_OPTIONS.contains(&o)))
                        .cloned(),
                );
            }
            log::info!(
                "volume {} at {destination}: read-only copy on {device}",
                source.display()
            );
            mount["type"] = "ext4".into();
            mount["source"] = device.into();
            mount["options"] = options.into();
        }
        Ok(())
    }
}

impl Sandbox for VmSandbox {
    fn agent(&self) -> &AgentClient {
        &self.client
    }

    fn share_path(&self, host: &Path) -> Result<String, SandboxError> {
        // Reserve a slot, then build and attach without the table's lock.
        let slot = {
            let mut disks = lock(&self.disks);
            if let Some((slot, used)) = find_slot(&mut disks, host) {
                used.users += 1;
                return Ok(guest_disk(slot));
            }
            let slots = disks.len();
            let slot = disks.iter().position(Option::is_none).ok_or_else(|| {
                VmSandboxError::NoFreeDisk {
                    path: host.to_owned(),
                    slots,
                }
            })?;
            disks[slot] = Some(SlotUse {
                host: host.to_owned(),
                users: 1,
            });
            slot
        };
        let image = image_path(&self.state_dir, slot);
        let attached = build_image(host, &image).and_then(|bytes| {
            let vm = lock(&self.vm);
            let vm = vm.as_ref().ok_or(VmSandboxError::NotRunning)?;
            vm.set_disk(slot, Some(&DiskConfig::file(&image)))
                .map_err(VmSandboxError::Disk)?;
            Ok(bytes)
        });
        match attached {
            Ok(bytes) => {
                log::info!(
                    "{} shared as {} ({} MiB image)",
                    host.display(),
                    guest_disk(slot),
                    bytes >> 20
                );
                Ok(guest_disk(slot))
            }
            Err(err) => {
                let _ = std::fs::remove_file(&image);
                lock(&self.disks)[slot] = None;
                Err(err.into())
            }
        }
    }

    fn unshare_path(&self, host: &Path) -> Result<(), SandboxError> {
        let mut disks = lock(&self.disks);
        let Some((slot, used)) = find_slot(&mut disks, host) else {
            return Ok(());
        };
        used.users = used.users.saturating_sub(1);
        if used.users > 0 {
            return Ok(());
        }
        if let Some(vm) = lock(&self.vm).as_ref() {
            vm.set_disk(slot, None).map_err(VmSandboxError::Disk)?;
        }
        disks[slot] = None;
        drop(disks);
        let image = image_path(&self.state_dir, slot);
        match std::fs::remove_file(&image) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(SandboxError::io(
                    format!("cannot remove {}", image.display()),
                    e,
                ))
            }
            _ => {}
        }
        log::info!("{} taken out of {}", host.display(), guest_disk(slot));
        Ok(())
    }

    fn share_mounts(&self, spec: &mut serde_json::Value) -> Result<Vec<PathBuf>, SandboxError> {
        let mut shared = Vec::new();
        let result = self.share_binds(spec, &mut shared);
        if result.is_err() {
            for host in shared.iter().rev() {
                if let Err(err) = self.unshare_path(host) {
                    log::warn!("{err}");
                }
            }
        }
        result.map(|()| shared)
    }

    fn stop(&self, timeout: Duration) -> Result<(), SandboxError> {
        self.stop_vm(timeout).map(drop)
    }
}

impl Drop for VmSandbox {
    fn drop(&mut self) {
        // RunningVm's own Drop stops and joins the VM's threads.
        drop(lock(&self.vm).take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_fault_lines_are_picked_out() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(
            &log,
            "[ 1.0] Run /init as init process\n\
             [ 75.1] traps: sh[50] general protection fault ip:4a4d02 sp:7ffe error:0 in busybox\n\
             [ 75.2] ok\n\
             [ 76.0] exe[33]: segfault at 0 ip 00007fa1 sp 00007ffe error 4 in init\n",
        )
        .unwrap();
        let faults = guest_faults(&log);
        assert_eq!(faults.len(), 2, "{faults:?}");
        assert!(faults[0].contains("general protection fault"));
        assert!(guest_faults(&dir.path().join("none")).is_empty());
    }

    #[test]
    fn only_read_only_directory_binds_go_to_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().to_str().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let m = |ty: &str, source: &str, opts: &[&str]| serde_json::json!({"destination": "/v", "type": ty, "source": source, "options": opts});
        assert!(ro_bind(&m("proc", "proc", &[])).unwrap().is_none());
        assert!(ro_bind(&m("tmpfs", "tmpfs", &["ro"])).unwrap().is_none());
        let (source, dest) = ro_bind(&m("bind", src, &["rbind", "ro"])).unwrap().unwrap();
        assert_eq!((source.as_path(), dest.as_str()), (dir.path(), "/v"));
        // containerd's style: type "none" with a bind option.
        assert!(ro_bind(&m("none", src, &["ro", "rbind"]))
            .unwrap()
            .is_some());
        for opts in [&["rbind"][..], &["rbind", "rw"], &["ro", "bind", "rw"]] {
            let err = ro_bind(&m("bind", src, opts)).unwrap_err().to_string();
            assert!(
                err.contains("read-write bind mounts need"),
                "{opts:?}: {err}"
            );
            assert!(
                err.contains(&format!("cannot bind-mount {src} at /v")),
                "{err}"
            );
        }
        let err = ro_bind(&m("bind", file.to_str().unwrap(), &["ro", "bind"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("only directories"), "{err}");
        let err = ro_bind(&m("bind", "/nonexistent/v", &["ro", "bind"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("only directories"), "{err}");
    }

    #[test]
    fn guest_disk_names_follow_slots() {
        assert_eq!(guest_disk(0), "/dev/vda");
        assert_eq!(guest_disk(3), "/dev/vdd");
        assert_eq!(guest_disk(25), "/dev/vdz");
        assert_eq!(guest_disk(26), "/dev/vdaa");
    }

    #[test]
    fn image_size_has_a_floor_and_a_margin() {
        assert_eq!(image_size(0), 1 << 30);
        assert_eq!(image_size(1 << 20), (1 << 30) + (2 << 20));
        assert_eq!(image_size(100 << 20), (1 << 30) + (125 << 20));
    }

    #[test]
    fn missing_artifacts_are_clear_errors() {
        let err = artifacts(&Config::default()).unwrap_err().to_string();
        assert!(err.contains("needs `kernel`"), "{err}");
        let config = Config {
            kernel: Some("/nonexistent/vmlinux".into()),
            initrd: Some("/nonexistent/initramfs.cpio".into()),
            ..Config::default()
        };
        let err = artifacts(&config).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/vmlinux does not exist"), "{err}");
        let err = VmHandler
            .start(&SandboxRequest {
                id: "x",
                state_dir: Path::new("/nonexistent"),
                hostname: "",
                rootfs: Path::new("/nonexistent/rootfs"),
                config: &config,
                ready_timeout: Duration::from_secs(1),
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/vmlinux does not exist"), "{err}");
    }

    #[test]
    fn image_from_a_directory() {
        if find_mkfs().is_none() {
            eprintln!("skipped: mkfs.ext4 missing (apt-get install e2fsprogs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hello"), b"hi").unwrap();
        let image = dir.path().join("img");
        let size = build_image(&root, &image).unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), size);
        assert!(
            (IMAGE_MARGIN_BYTES - (64 << 20)..=image_size(1 << 20)).contains(&size),
            "{size}"
        );
        let err = build_image(&dir.path().join("nope"), &image)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a directory"), "{err}");
    }
}
