//! The VM a `vm` sandbox boots: its artifacts and its [`VmConfig`] from
//! the skiff config.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::error::VmSandboxError;
use super::share::SHARE_TAG;
use crate::config::Config;
use crate::sandbox::size::PodSize;
use crate::vmm::{
    BootSource, DiskConfig, FsConfig, KernelSpec, SerialOutput, VmConfig, VsockConfig,
};

/// The guest's vsock CID.
const GUEST_CID: u64 = 3;

/// The guest kernel and initramfs.
#[derive(Debug)]
pub(super) struct Artifacts {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// The guest kernel and initramfs from the config, which must exist.
pub(super) fn artifacts(config: &Config) -> Result<Artifacts, VmSandboxError> {
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
    Ok(Artifacts { kernel, initrd })
}

/// Where the VM's host-side files go.
#[derive(Debug)]
pub(super) struct VmFiles<'a> {
    /// The hybrid vsock's unix socket.
    pub(super) uds: &'a Path,
    /// The serial log.
    pub(super) serial: &'a Path,
    /// The pod's virtio-fs share (`vm_rootfs = "virtio-fs"`).
    pub(super) share: Option<&'a Path>,
}

/// The VM for `config` and a pod of `size`: its vCPUs and memory
/// ([`PodSize::vm`]), a virtio-fs share (`vm_rootfs = "virtio-fs"`) or
/// `vm_disks` empty disk slots (`"block"`), vsock, the serial log, the
/// kernel command line and CPU template for this host. Nothing else in it
/// depends on the pod (the share's directory is each pod's, but not part
/// of the guest), so one template serves every pod of a config and size.
pub(super) fn vm_config(
    config: &Config,
    size: &PodSize,
    artifacts: &Artifacts,
    files: &VmFiles<'_>,
) -> VmConfig {
    let (vcpus, mem_mib) = size.vm(config);
    let host = crate::check::detect();
    let mut cmdline = host.cmdline();
    if !config.kernel_params.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(config.kernel_params.trim());
    }
    VmConfig {
        vcpus: u8::try_from(vcpus).unwrap_or(u8::MAX),
        mem_mib,
        boot: BootSource::Kernel(KernelSpec {
            kernel: artifacts.kernel.clone(),
            initrd: Some(artifacts.initrd.clone()),
            cmdline,
        }),
        disks: match files.share {
            Some(_) => Vec::new(),
            None => (0..config.vm_disks.max(1))
                .map(|_| DiskConfig::empty())
                .collect(),
        },
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: files.uds.to_owned(),
        }),
        cpu_template: match &config.cpu_template {
            // Validated by `Config`; an unknown name falls back to the host's.
            Some(name) => name.parse().unwrap_or(host.template),
            None => host.template,
        },
        serial: SerialOutput::File(files.serial.to_owned()),
        epoch: Instant::now(),
        rng: true,
        net: None,
        fs: files.share.map(|dir| FsConfig {
            dir: dir.to_owned(),
            tag: SHARE_TAG.to_owned(),
            cache: config.fs_cache,
        }),
        seccomp: config.seccomp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
