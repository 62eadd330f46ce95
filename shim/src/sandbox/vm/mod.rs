//! The `vm` sandbox handler: `skiff-agent` as PID 1 of a skiff micro-VM,
//! run by a jailed VMM child process (`vmm = "process"`, the default; see
//! [`crate::vmm::jail`]) or by VMM threads in the shim's own process
//! (`vmm = "inline"`).
//!
//! Start: the VM boots the configured kernel and agent initramfs with
//! `vm_disks` empty virtio-blk slots and a hybrid vsock device whose unix
//! socket is in the state dir; the handler then retries the
//! `CONNECT <AGENT_VSOCK_PORT>` handshake until the agent answers Health or
//! the bound from the config runs out, and wraps the connected stream in an
//! [`AgentClient`]. With `template = true` the first VM of a configuration
//! is then snapshotted as its template, and later ones are restored from
//! it instead of booted ([`template`]); every VM gets the guest fix-ups
//! (fresh entropy, clock, machine id) before its first container. Stop:
//! DestroySandbox (the agent resets the VM), wait for the VM to end, force
//! it off if it doesn't.
//!
//! Containers of one pod share the VM. By default (`vm_rootfs =
//! "virtio-fs"`) the VM has one virtio-fs device serving the pod's share
//! ([`share`]): each container's rootfs and bind sources are bound under
//! it on the host and reached live by the guest, which mounts the share
//! once (`CreateSandbox`). With `vm_rootfs = "block"` each container's
//! rootfs directory becomes an ext4 image (`mkfs.ext4 -d`) in the state
//! dir and goes into a free slot while the VM runs
//! ([`RunningVm::set_disk`]: the guest driver sees a configuration change
//! and the new capacity), and leaves it when the container is deleted, so
//! `vm_disks` bounds the containers a pod holds at once. Slot `i` is
//! `/dev/vd{a+i}` in the guest: Linux names virtio-blk disks in probe
//! order, which is slot order, and each answers GET_ID with its name
//! (`skiff-vdX`, `/sys/block/vdX/serial`), which the agent checks.
//!
//! - [`boot`]: the artifacts and the VM's configuration.
//! - [`image`]: a directory as an ext4 image.
//! - [`slots`]: the disk slot table.
//! - [`volumes`]: which bind mounts the VM serves, and their spec rewriting.
//! - [`connect`]: the handshake and first Health, retried while it boots.
//! - [`serial`]: the guest's serial log.
//! - [`share`]: the pod's virtio-fs share on the host.
//! - [`sandbox`]: the running [`VmSandbox`].
//! - [`template`]: the template store.
//!
//! This is the only module of the sandbox layer that depends on the VMM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::Mount;

mod boot;
mod connect;
mod error;
mod image;
mod network;
mod sandbox;
mod serial;
mod share;
mod slots;
mod template;
mod volumes;

pub use error::VmSandboxError;
pub use sandbox::VmSandbox;
pub use slots::guest_disk;

use self::boot::{artifacts, vm_config, VmFiles};
use self::connect::connect_agent;
use self::serial::SERIAL_NAME;
use self::share::{Share, GUEST_MOUNT_POINT, SHARE_TAG};
use self::slots::DiskSlots;
use self::template::TemplateStore;
use crate::agent_client::AgentClient;
use crate::config::{Config, VmRootfs, VmmMode};
use crate::podnet;
use crate::sandbox::error::SandboxError;
use crate::sandbox::handler::{Sandbox, SandboxHandler, SandboxRequest};
use crate::sandbox::mounts::BindMount;
use crate::sandbox::state_dir;
use crate::vmm;
use crate::vmm::jail::cgroup::{pod_parent, VmmCgroup};
use crate::vmm::jail::JailConfig;

/// The hybrid vsock's socket in the sandbox's state dir.
const VSOCK_NAME: &str = "vsock.sock";
/// The state-dir file recording the jailed VMM's cgroup directories.
const CGROUP_RECORD: &str = "vmm-cgroup";
/// Bound on a VM restored from a template answering: it resumes a guest
/// whose agent was listening, so it answers within a second or two even
/// on a PVM host; past this the template is taken for broken.
pub const RESTORED_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Boots, or restores from a template, one micro-VM per sandbox.
#[derive(Debug, Default, Clone)]
pub struct VmHandler {
    vmm_exe: Option<PathBuf>,
    rootfs: VmRootfs,
}

impl VmHandler {
    /// A handler giving VMs their containers' rootfs and volumes as
    /// `rootfs` says.
    pub fn new(rootfs: VmRootfs) -> Self {
        VmHandler {
            vmm_exe: None,
            rootfs,
        }
    }

    /// A handler whose jailed VMMs run `exe` (a skiff binary) instead of
    /// re-executing this one; for tests, whose binary is the test harness.
    pub fn with_vmm_exe(exe: impl Into<PathBuf>) -> Self {
        VmHandler {
            vmm_exe: Some(exe.into()),
            rootfs: VmRootfs::default(),
        }
    }

    /// This handler, giving rootfs and volumes as `rootfs` says.
    pub fn with_rootfs(self, rootfs: VmRootfs) -> Self {
        VmHandler { rootfs, ..self }
    }

    /// How `req`'s VMM is jailed; `None`: it runs inline.
    fn jail(&self, req: &SandboxRequest<'_>) -> Option<JailConfig> {
        if req.config.vmm == VmmMode::Inline {
            return None;
        }
        let name = req
            .state_dir
            .file_name()
            .map_or_else(|| req.id.to_owned(), |n| n.to_string_lossy().into_owned());
        let mut jail = JailConfig::new(req.state_dir, &name, req.id);
        if let Some(exe) = &self.vmm_exe {
            jail.exe = exe.clone();
        }
        jail.cgroup_parent = req.cgroups_path.and_then(pod_parent);
        jail.cgroup_record = Some(req.state_dir.join(CGROUP_RECORD));
        jail.uid = req.config.vmm_uid;
        jail.gid = req.config.vmm_gid;
        jail.seccomp = req.config.seccomp;
        jail.log_level = req.config.log_level.filter();
        Some(jail)
    }

    /// Starts a sandbox (see the module docs); the concrete type, for
    /// callers that want the VM's report on stop. The bound on boot plus
    /// the agent's first answer is the config's `vm_ready_timeout_secs`
    /// (default 300 s), not `req.ready_timeout`, which is sized for a host
    /// process; a VM restored from a template gets
    /// [`RESTORED_READY_TIMEOUT`], then the template is dropped and the VM
    /// boots.
    pub fn start_vm(&self, req: &SandboxRequest<'_>) -> Result<VmSandbox, SandboxError> {
        let artifacts = artifacts(req.config)?;
        state_dir::create(req.state_dir)?;
        let uds = req.state_dir.join(VSOCK_NAME);
        let serial = req.state_dir.join(SERIAL_NAME);
        // The pod's virtio-fs share, a mount point before the VMM starts
        // (a jailed one sees what is bound under it later); unmounted
        // again if the sandbox does not start.
        let share = match self.rootfs {
            VmRootfs::VirtioFs => Some(Share::create(req.state_dir)?),
            VmRootfs::Block => None,
        };
        let files = VmFiles {
            uds: &uds,
            serial: &serial,
            share: share.as_ref().map(Share::dir),
        };
        let jail = self.jail(req);
        // Built once (it asks `check::detect` about the host); each start
        // takes a copy with its own epoch.
        let mut config = vm_config(req.config, &req.size, &artifacts, &files);
        log::info!(
            "sandbox {}: VM of {} vCPUs and {} MiB (the pod asks {:?})",
            req.id,
            config.vcpus,
            config.mem_mib,
            req.size
        );
        // The pod's network, wired before the VM starts (its NIC is the
        // tap's other end); unwired again if the sandbox does not start.
        let mut wired = Wired(None);
        if let Some(netns) = req.netns {
            let (pod, nic) = network::wire(netns, req.state_dir)?;
            config.net = Some(nic);
            wired.0 = Some(pod);
        }
        let fresh = || vmm::VmConfig {
            epoch: Instant::now(),
            ..config.clone()
        };
        let store = if req.config.template {
            match TemplateStore::new(&req.config.template_dir, &config) {
                Ok(store) => Some(store),
                Err(err) => {
                    log::warn!(
                        "sandbox {}: no template: {}",
                        req.id,
                        vmm::error_chain(&err)
                    );
                    None
                }
            }
        } else {
            None
        };

        let started = Instant::now();
        let mut restored = None;
        if let Some((store, dir)) = store.as_ref().and_then(|s| Some((s, s.ready()?))) {
            let _ = std::fs::remove_file(&uds);
            let attempt = vmm::VmHandle::restore(fresh(), jail.as_ref(), &dir)
                .map_err(|e| SandboxError::from(VmSandboxError::Start(e)))
                .and_then(|vm| ready(vm, &files, RESTORED_READY_TIMEOUT));
            match attempt {
                Ok(vm) => {
                    log::info!(
                        "sandbox {}: VM restored from template {} in {:?}",
                        req.id,
                        dir.display(),
                        started.elapsed()
                    );
                    restored = Some(vm);
                }
                Err(err) => {
                    log::warn!(
                        "sandbox {}: template {} did not restore, removing it and booting: {}",
                        req.id,
                        dir.display(),
                        vmm::error_chain(&err)
                    );
                    store.discard();
                }
            }
        }
        let from_template = restored.is_some();
        let (vm, client) = match restored {
            Some(vm) => vm,
            None => {
                // Boot, and make the booted VM the template.
                let _ = std::fs::remove_file(&uds);
                let vm =
                    vmm::VmHandle::start(fresh(), jail.as_ref()).map_err(VmSandboxError::Start)?;
                let (vm, client) = ready(vm, &files, req.config.vm_ready_timeout())?;
                if let Some(store) = &store {
                    make_template(req.id, store, &vm);
                }
                (vm, client)
            }
        };
        let ready_after = started.elapsed();
        log::info!(
            "sandbox {}: VM agent answered {:?} after {}",
            req.id,
            ready_after,
            if from_template { "restore" } else { "boot" }
        );
        // The slots the VM has (none with a share).
        let disks = DiskSlots::new(config.disks.len());
        let pod = wired.0.take();
        let shared_fs = share.is_some().then_some((SHARE_TAG, GUEST_MOUNT_POINT));
        let sandbox = VmSandbox::new(
            req.state_dir,
            disks,
            share,
            client,
            vm,
            ready_after,
            from_template,
        );
        let set_up = refresh_guest(&sandbox, req.id)
            .and_then(|()| match &pod {
                Some(pod) => network::configure_guest(sandbox.agent(), pod),
                None => Ok(()),
            })
            .and_then(|()| {
                sandbox
                    .agent()
                    .create_sandbox(req.hostname, shared_fs)
                    .map_err(SandboxError::Agent)
            });
        // From here the sandbox's stop unwires the pod network.
        sandbox.set_pod_network(pod);
        if let Err(err) = set_up {
            let _ = sandbox.stop_vm(Duration::from_secs(5));
            return Err(err);
        }
        Ok(sandbox)
    }
}

/// A pod network wired for a sandbox that is not started yet: unwired on
/// drop unless taken.
struct Wired(Option<podnet::PodNetwork>);

impl Drop for Wired {
    fn drop(&mut self) {
        if let Some(pod) = self.0.take() {
            network::unwire(&pod);
        }
    }
}

/// Waits up to `timeout` for `vm`'s agent ([`connect_agent`]); a VM whose
/// agent does not answer is stopped.
fn ready(
    vm: vmm::VmHandle,
    files: &VmFiles<'_>,
    timeout: Duration,
) -> Result<(vmm::VmHandle, AgentClient), SandboxError> {
    match connect_agent(&vm, files.uds, files.serial, timeout) {
        Ok(client) => Ok((vm, client)),
        Err(err) => {
            vm.stop();
            let _ = vm.wait();
            Err(err)
        }
    }
}

/// Snapshots the booted `vm`, whose agent answers and runs no container
/// yet, as `store`'s template; a failure costs the template, not the VM.
fn make_template(id: &str, store: &TemplateStore, vm: &vmm::VmHandle) {
    let build = match store.build() {
        Ok(Some(build)) => build,
        Ok(None) => {
            log::info!(
                "sandbox {id}: another shim is making template {}",
                store.key()
            );
            return;
        }
        Err(err) => {
            log::warn!(
                "sandbox {id}: cannot make a template: {}",
                vmm::error_chain(&err)
            );
            return;
        }
    };
    let t = Instant::now();
    let made = vm
        .snapshot(build.dir())
        .map_err(|e| vmm::error_chain(&e))
        .and_then(|()| store.commit(build).map_err(|e| vmm::error_chain(&e)));
    match made {
        Ok(dir) => log::info!(
            "sandbox {id}: template {} made in {:?}",
            dir.display(),
            t.elapsed()
        ),
        Err(err) => log::warn!("sandbox {id}: cannot make a template: {err}"),
    }
}

/// The guest fix-ups every VM gets before its first container: fresh host
/// entropy mixed into the guest's pool and the CRNG reseeded, the wall
/// clock set, a machine id of its own. A VM restored from a template
/// shares the template's pool and clock until then, and so does the VM the
/// template was made from.
fn refresh_guest(sandbox: &VmSandbox, id: &str) -> Result<(), SandboxError> {
    let entropy = crate::fixups::host_entropy(crate::fixups::REFRESH_ENTROPY_BYTES)
        .map_err(|e| SandboxError::io("cannot read host entropy", e))?;
    let machine_id = crate::fixups::new_machine_id()
        .map_err(|e| SandboxError::io("cannot make a machine id", e))?;
    sandbox
        .agent()
        .refresh_guest(&entropy, std::time::SystemTime::now(), &machine_id)
        .map_err(SandboxError::Agent)?;
    log::debug!("sandbox {id}: guest entropy, clock and machine id refreshed");
    Ok(())
}

impl SandboxHandler for VmHandler {
    fn start(&self, req: &SandboxRequest<'_>) -> Result<Box<dyn Sandbox>, SandboxError> {
        Ok(Box::new(self.start_vm(req)?))
    }

    fn volumes(&self, mounts: &[Mount]) -> Result<Vec<BindMount>, SandboxError> {
        Ok(volumes::vm_volumes(mounts, self.rootfs)?)
    }

    fn cleanup(&self, state_dir: &Path, _config: &Config) -> Result<(), SandboxError> {
        // An inline VM lived in the dead shim's process and died with it; a
        // jailed VMM stops its VM and exits when its control channel
        // closes. Its cgroup, and the files (images, socket, serial log),
        // are left.
        if let Some(name) = state_dir.file_name() {
            let name = name.to_string_lossy();
            let record = state_dir.join(CGROUP_RECORD);
            if let Err(err) = VmmCgroup::remove_leftover(&name, &record, Duration::from_secs(5)) {
                log::warn!("{err}");
            }
        }
        network::cleanup(state_dir);
        state_dir::remove(state_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_artifacts_fail_before_anything_is_made() {
        let config = Config {
            kernel: Some("/nonexistent/vmlinux".into()),
            initrd: Some("/nonexistent/initramfs.cpio".into()),
            ..Config::default()
        };
        let err = VmHandler::default()
            .start(&SandboxRequest {
                id: "x",
                state_dir: Path::new("/nonexistent"),
                hostname: "",
                rootfs: Path::new("/nonexistent/rootfs"),
                cgroups_path: None,
                netns: None,
                size: crate::sandbox::PodSize::default(),
                config: &config,
                ready_timeout: Duration::from_secs(1),
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/vmlinux does not exist"), "{err}");
    }

    /// A pod network namespace that is missing, or has no interface, or
    /// two, fails the start before a VM exists, as bad input, and leaves
    /// no tap behind.
    #[test]
    fn a_bad_pod_network_fails_before_the_vm_starts() {
        use crate::podnet::testing::{skip_reason, TestNetns};
        use crate::sandbox::error::SandboxErrorKind;
        if let Some(reason) = skip_reason() {
            eprintln!("skipped: {reason}");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (kernel, initrd) = (tmp.path().join("vmlinux"), tmp.path().join("initrd"));
        std::fs::write(&kernel, b"not a kernel").unwrap();
        std::fs::write(&initrd, b"not an initrd").unwrap();
        let config = Config {
            kernel: Some(kernel),
            initrd: Some(initrd),
            template: false,
            ..Config::default()
        };
        let start = |netns: &Path| {
            let state_dir = tmp.path().join("state");
            VmHandler::default()
                .start(&SandboxRequest {
                    id: "x",
                    state_dir: &state_dir,
                    hostname: "",
                    rootfs: tmp.path(),
                    cgroups_path: None,
                    netns: Some(netns),
                    size: crate::sandbox::PodSize::default(),
                    config: &config,
                    ready_timeout: Duration::from_secs(1),
                })
                .map(drop)
                .unwrap_err()
        };
        let missing = tmp.path().join("no-such-netns");
        let err = start(&missing);
        assert_eq!(err.kind(), SandboxErrorKind::InvalidArgument);
        let text = vmm::error_chain(&err);
        assert!(text.contains(&missing.display().to_string()), "{text}");

        let empty = TestNetns::new().unwrap();
        let err = start(empty.path());
        assert_eq!(err.kind(), SandboxErrorKind::InvalidArgument);
        let text = vmm::error_chain(&err);
        assert!(text.contains("no interface"), "{text}");

        let two = TestNetns::new().unwrap();
        for (a, b) in [("v0", "p0"), ("v1", "p1")] {
            two.ip(&["link", "add", a, "type", "veth", "peer", "name", b])
                .unwrap();
            two.ip(&["link", "set", a, "up"]).unwrap();
            two.ip(&["link", "set", b, "up"]).unwrap();
        }
        let err = start(two.path());
        assert_eq!(err.kind(), SandboxErrorKind::InvalidArgument);
        let text = vmm::error_chain(&err);
        assert!(text.contains("several interfaces"), "{text}");
        for ns in [&empty, &two] {
            assert!(!ns.link_exists(network::TAP_NAME));
        }
    }
}
