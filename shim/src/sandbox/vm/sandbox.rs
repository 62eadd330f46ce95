//! A running `vm` sandbox: the micro-VM, its agent client, and where its
//! containers' rootfs and volumes go: the pod's virtio-fs share
//! ([`Share`]), or (`vm_rootfs = "block"`) the disk slots their images go
//! into while they run.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oci_spec::runtime::Mount;

use super::error::VmSandboxError;
use super::image::{build_image, image_path};
use super::network;
use super::serial::{guest_faults, SERIAL_NAME};
use super::share::Share;
use super::slots::{guest_disk, DiskSlots, Reserved};
use super::volumes::{
    mount_disk, mount_guest_file, mount_shared, pod_file, PodFile, POD_FILE_MAX_LEN,
};
use crate::agent_client::AgentClient;
use crate::podnet::PodNetwork;
use crate::sandbox::error::SandboxError;
use crate::sandbox::handler::Sandbox;
use crate::sandbox::mounts::BindMount;
use crate::sandbox::state_dir;
use crate::sync::lock;
use crate::vmm::{DiskConfig, VmHandle, VmReport};

/// A running micro-VM and its agent client.
pub struct VmSandbox {
    state_dir: PathBuf,
    disks: Mutex<DiskSlots>,
    client: AgentClient,
    vm: Mutex<Option<VmHandle>>,
    ready_after: Duration,
    restored: bool,
    /// The pod network wired to the VM's NIC, unwired when it stops.
    network: Mutex<Option<PodNetwork>>,
    /// The pod's virtio-fs share (`None`: block mode).
    share: Mutex<Option<Share>>,
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
    /// A sandbox of the running `vm` whose agent answered `client` after
    /// `ready_after`, restored from a template if `restored`; its
    /// containers' rootfs and volumes go to `share` (virtio-fs), or else
    /// into `disks`. Its stop unmounts the share.
    pub(super) fn new(
        state_dir: &Path,
        disks: DiskSlots,
        share: Option<Share>,
        client: AgentClient,
        vm: VmHandle,
        ready_after: Duration,
        restored: bool,
    ) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            disks: Mutex::new(disks),
            client,
            vm: Mutex::new(Some(vm)),
            ready_after,
            restored,
            network: Mutex::new(None),
            share: Mutex::new(share),
        }
    }

    /// Whether the sandbox serves rootfs and volumes through virtio-fs.
    pub fn has_share(&self) -> bool {
        lock(&self.share).is_some()
    }

    /// Hands the sandbox the pod network wired to its VM's NIC: its stop
    /// unwires it.
    pub(super) fn set_pod_network(&self, pod: Option<PodNetwork>) {
        *lock(&self.network) = pod;
    }

    /// Whether the VM was restored from a template (not booted).
    pub fn restored(&self) -> bool {
        self.restored
    }

    /// The jailed VMM process's pid (`None`: the VMM runs inline, or the
    /// VM is stopped).
    pub fn vmm_pid(&self) -> Option<i32> {
        lock(&self.vm).as_ref()?.vmm_pid()
    }

    /// How long the VM took from start to the agent's first answer.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// Stops the sandbox like [`Sandbox::stop`] and reports how the VM
    /// ended (`None` if it was already stopped). A clean end is
    /// [`crate::vmm::ExitReason::Reset`]: the agent resets the VM after
    /// DestroySandbox.
    pub fn stop_vm(&self, timeout: Duration) -> Result<Option<VmReport>, SandboxError> {
        let vm = lock(&self.vm).take();
        let Some(vm) = vm else {
            return Ok(None);
        };
        // An ended VM has no agent left to ask; a zero timeout asks none.
        if !vm.has_exited() && !timeout.is_zero() {
            if let Err(err) = self.client.destroy_sandbox() {
                log::warn!("agent DestroySandbox failed: {err}");
            }
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
        if let Some(pod) = lock(&self.network).take() {
            network::unwire(&pod);
        }
        drop(lock(&self.share).take());
        state_dir::remove(&self.state_dir)?;
        Ok(Some(report))
    }

    /// Builds `host`'s image for the reserved `slot` and puts it into the
    /// running VM; returns the image's size.
    fn attach(&self, host: &Path, slot: usize) -> Result<u64, VmSandboxError> {
        let image = image_path(&self.state_dir, slot);
        let attached = build_image(host, &image).and_then(|bytes| {
            let vm = lock(&self.vm);
            let vm = vm.as_ref().ok_or(VmSandboxError::NotRunning)?;
            vm.set_disk(slot, Some(&DiskConfig::file(&image)))
                .map_err(VmSandboxError::Disk)?;
            Ok(bytes)
        });
        if attached.is_err() {
            let _ = std::fs::remove_file(&image);
        }
        attached
    }

    /// Shares each volume and mounts its disk in `mounts`; pushes each
    /// shared directory to `shared`.
    fn share_each(
        &self,
        mounts: &mut [Mount],
        volumes: &[BindMount],
        shared: &mut Vec<PathBuf>,
    ) -> Result<(), SandboxError> {
        if let Some(share) = lock(&self.share).as_mut() {
            for volume in volumes {
                let guest = share.add(&volume.source, volume.read_only)?;
                if let Some(host) = share.host_path(&guest) {
                    shared.push(host);
                }
                mount_shared(mounts, volume, &guest)?;
                log::info!(
                    "volume {} at {}: shared ({}) as {guest}",
                    volume.source.display(),
                    volume.destination.display(),
                    if volume.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    }
                );
            }
            return Ok(());
        }
        let (mut hosts, mut resolv_conf, mut first_file) = (None, None, None);
        for volume in volumes {
            if let Some(file) = pod_file(volume) {
                let text = read_pod_file(volume)?;
                match file {
                    PodFile::Hosts => hosts = Some(text),
                    PodFile::ResolvConf => resolv_conf = Some(text),
                }
                mount_guest_file(mounts, volume, file)?;
                first_file.get_or_insert(volume);
                continue;
            }
            let device = self.share_path(&volume.source)?;
            shared.push(volume.source.clone());
            mount_disk(mounts, volume, &device)?;
            log::info!(
                "volume {} at {}: read-only copy on {device}",
                volume.source.display(),
                volume.destination.display()
            );
        }
        if let Some(volume) = first_file {
            self.give_pod_files(volume, hosts, resolv_conf)?;
        }
        Ok(())
    }

    /// Gives the guest the pod's `/etc/hosts` and `/etc/resolv.conf`
    /// (`ConfigureNetwork` again, with the pod's network as it is, so the
    /// agent only writes the files). Without a pod network there is no
    /// guest network for them to describe: refused, naming `volume`.
    fn give_pod_files(
        &self,
        volume: &BindMount,
        hosts: Option<String>,
        resolv_conf: Option<String>,
    ) -> Result<(), SandboxError> {
        let req = lock(&self.network).as_ref().map(|pod| {
            let mut req = pod.to_proto();
            req.hosts = hosts.unwrap_or_default();
            req.resolv_conf = resolv_conf.unwrap_or_default();
            req
        });
        let Some(req) = req else {
            return Err(VmSandboxError::Volume {
                host: volume.source.clone(),
                destination: volume.destination.clone(),
                reason: "the pod's /etc/hosts and /etc/resolv.conf go to the VM with its network; this sandbox has no network namespace",
            }
            .into());
        };
        self.client
            .configure_network(&req)
            .map_err(SandboxError::Agent)?;
        log::info!("pod files given to the guest: {}", volume.source.display());
        Ok(())
    }
}

/// A pod file's text, bounded by [`POD_FILE_MAX_LEN`].
fn read_pod_file(volume: &BindMount) -> Result<String, VmSandboxError> {
    let refuse = |reason| VmSandboxError::Volume {
        host: volume.source.clone(),
        destination: volume.destination.clone(),
        reason,
    };
    let file = std::fs::File::open(&volume.source).map_err(|_| refuse("cannot be opened"))?;
    let mut text = String::new();
    use std::io::Read;
    file.take(POD_FILE_MAX_LEN + 1)
        .read_to_string(&mut text)
        .map_err(|_| refuse("cannot be read as text"))?;
    if text.len() as u64 > POD_FILE_MAX_LEN {
        return Err(refuse("is larger than 64 KiB"));
    }
    Ok(text)
}

impl Sandbox for VmSandbox {
    fn agent(&self) -> &AgentClient {
        &self.client
    }

    fn share_path(&self, host: &Path) -> Result<String, SandboxError> {
        let t = Instant::now();
        if let Some(share) = lock(&self.share).as_mut() {
            let guest = share.add(host, false)?;
            log::info!("{} shared as {guest} in {:?}", host.display(), t.elapsed());
            return Ok(guest);
        }
        // Reserve a slot, then build and attach without the table's lock.
        let slot = match lock(&self.disks).reserve(host)? {
            Reserved::Shared(slot) => return Ok(guest_disk(slot)),
            Reserved::Free(slot) => slot,
        };
        match self.attach(host, slot) {
            Ok(bytes) => {
                log::info!(
                    "{} shared as {} ({} MiB image) in {:?}",
                    host.display(),
                    guest_disk(slot),
                    bytes >> 20,
                    t.elapsed()
                );
                Ok(guest_disk(slot))
            }
            Err(err) => {
                lock(&self.disks).release(slot);
                Err(err.into())
            }
        }
    }

    fn unshare_path(&self, host: &Path) -> Result<(), SandboxError> {
        if let Some(share) = lock(&self.share).as_mut() {
            // A volume's entry by its own path, a rootfs by its source.
            match share.entry_name(host) {
                Some(name) => share.release(name)?,
                None => share.remove(host, false)?,
            }
            return Ok(());
        }
        let mut disks = lock(&self.disks);
        let Some(slot) = disks.drop_user(host) else {
            return Ok(());
        };
        // An ended VM has no guest to tell.
        if let Some(vm) = lock(&self.vm).as_ref().filter(|vm| !vm.has_exited()) {
            vm.set_disk(slot, None).map_err(VmSandboxError::Disk)?;
        }
        disks.release(slot);
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

    fn share_volumes(
        &self,
        mounts: &mut [Mount],
        volumes: &[BindMount],
    ) -> Result<Vec<PathBuf>, SandboxError> {
        let mut shared = Vec::new();
        let result = self.share_each(mounts, volumes, &mut shared);
        if result.is_err() {
            for host in shared.iter().rev() {
                if let Err(err) = self.unshare_path(host) {
                    log::warn!("{err}");
                }
            }
        }
        result.map(|()| shared)
    }

    fn ended(&self) -> Option<String> {
        // A VM takes everything in it along: nothing is left to stop.
        let exit = lock(&self.vm).as_ref()?.exit_reason()?;
        Some(format!("the VM ended ({exit:?})"))
    }

    fn stop(&self, timeout: Duration) -> Result<(), SandboxError> {
        self.stop_vm(timeout).map(drop)
    }

    fn pod_network_in_sandbox(&self) -> bool {
        true
    }
}

impl Drop for VmSandbox {
    fn drop(&mut self) {
        // The handle's own Drop stops the VM (joins its threads, or kills
        // and reaps its process).
        drop(lock(&self.vm).take());
        if let Some(pod) = lock(&self.network).take() {
            network::unwire(&pod);
        }
        drop(lock(&self.share).take());
    }
}
