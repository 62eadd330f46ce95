//! The `vm` handler's errors, and the kind each is for its callers.

use std::path::PathBuf;
use std::time::Duration;

use crate::podnet::PodNetError;
use crate::sandbox::error::{SandboxError, SandboxErrorKind};
use crate::vmm::{ExitReason, VmmError};

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
    Start(#[source] VmmError),
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
    #[error("cannot bind-mount {} at {} in the VM: {reason}", host.display(), destination.display())]
    Volume {
        /// The host path.
        host: PathBuf,
        /// Where the container wanted it.
        destination: PathBuf,
        /// Why not.
        reason: &'static str,
    },
    /// The pod's virtio-fs share could not be set up or changed.
    #[error("virtio-fs share: cannot {what}")]
    Share {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VM is stopped.
    #[error("the VM is not running")]
    NotRunning,
    /// The VMM refused to put a disk into a slot or take it out.
    #[error("cannot change the VM's disks")]
    Disk(#[source] VmmError),
    /// The pod's network namespace cannot be wired to the VM.
    #[error("cannot wire the pod's network namespace {} to the VM", netns.display())]
    PodNetwork {
        /// The namespace.
        netns: PathBuf,
        /// Why not.
        #[source]
        source: PodNetError,
    },
}

impl VmSandboxError {
    /// The kind of failure, for the caller's status code.
    pub fn kind(&self) -> SandboxErrorKind {
        match self {
            Self::Volume { .. } => SandboxErrorKind::InvalidArgument,
            // What the spec or CNI gave: a namespace that is not there, or
            // not one pod interface in it.
            Self::PodNetwork {
                source:
                    PodNetError::Netns(_)
                    | PodNetError::NoPodInterface
                    | PodNetError::SeveralPodInterfaces { .. }
                    | PodNetError::TapNameTaken { .. },
                ..
            } => SandboxErrorKind::InvalidArgument,
            Self::NoFreeDisk { .. } => SandboxErrorKind::ResourceExhausted,
            // A bind source that is not there is the spec's fault.
            Self::Share { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                SandboxErrorKind::InvalidArgument
            }
            _ => SandboxErrorKind::Internal,
        }
    }
}

impl From<VmSandboxError> for SandboxError {
    fn from(err: VmSandboxError) -> Self {
        SandboxError::handler(err.kind(), err)
    }
}
