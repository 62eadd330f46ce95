//! The engine's errors ([`ContainerError`], with [`IdError`] saying why an
//! id was refused) and their ttrpc-facing class ([`ErrorKind`]).

use std::path::PathBuf;

use libcontainer::error::LibcontainerError;
use skiff_agent_proto::error_chain;

use crate::stdio::StdioError;

/// Errors of the container engine.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The container id is empty, too long, or has characters other than
    /// `[A-Za-z0-9_+.-]`.
    #[error("container id {id:?} is invalid: use 1-64 characters from [A-Za-z0-9_+.-]")]
    InvalidId {
        /// The refused id.
        id: String,
        /// What is wrong with it.
        #[source]
        reason: IdError,
    },
    /// The exec id is invalid.
    #[error("exec id {id:?} is invalid: use 1-64 characters from [A-Za-z0-9_+.-]")]
    InvalidExecId {
        /// The refused id.
        id: String,
        /// What is wrong with it.
        #[source]
        reason: IdError,
    },
    /// A container with this id already exists.
    #[error("container {0:?} already exists; remove it first or pick another id")]
    AlreadyExists(String),
    /// An exec process with this id already exists in the container.
    #[error("exec {exec_id:?} already exists in container {container_id:?}")]
    ExecAlreadyExists {
        /// The container.
        container_id: String,
        /// The clashing exec id.
        exec_id: String,
    },
    /// No container has this id.
    #[error("container {0:?} does not exist")]
    NotFound(String),
    /// No exec process has this id in the container.
    #[error("exec {exec_id:?} does not exist in container {container_id:?}")]
    ExecNotFound {
        /// The container.
        container_id: String,
        /// The unknown exec id.
        exec_id: String,
    },
    /// The OCI spec is not valid JSON or does not match the runtime spec.
    #[error("the OCI spec is invalid: {0}")]
    InvalidSpec(String),
    /// The rootfs path does not exist or is neither a directory nor a block device.
    #[error("rootfs {0:?} does not exist or is neither a directory nor a block device")]
    RootfsMissing(PathBuf),
    /// A block device (rootfs or volume) still had no medium (size 0) when the bound
    /// ran out: the host's disk change did not reach the guest.
    #[error("the block device {device:?} got no medium within {timeout:?}")]
    DiskNotReady {
        /// The block device.
        device: PathBuf,
        /// The bound waited.
        timeout: std::time::Duration,
    },
    /// The block device's serial names another disk than the host meant.
    #[error("the block device {device:?} is disk {serial:?}, not the one the host attached")]
    DiskMismatch {
        /// The block device.
        device: PathBuf,
        /// Its serial (`/sys/block/<name>/serial`).
        serial: String,
    },
    /// The rootfs block device could not be mounted.
    #[error("cannot mount the rootfs block device {device:?} (ext4) on {target:?}")]
    MountRootfs {
        /// The block device.
        device: PathBuf,
        /// Where it was to be mounted.
        target: PathBuf,
        /// The mount error.
        #[source]
        source: std::io::Error,
    },
    /// The container is in a state that does not allow the operation.
    #[error("container {id:?} is {status}; cannot {operation} it")]
    WrongState {
        /// The container.
        id: String,
        /// Its current status.
        status: String,
        /// What was asked.
        operation: &'static str,
    },
    /// The process has no stdin pipe (it was created without `stdin`) or it is closed.
    #[error("the process has no open stdin; create it with stdin=true")]
    NoStdin,
    /// The process has no terminal.
    #[error("the process has no terminal; create it with terminal=true")]
    NoTerminal,
    /// The process has no separate stderr (a terminal merges it into stdout).
    #[error("the process runs on a terminal, so its stderr is merged into stdout")]
    NoStderr,
    /// libcontainer failed.
    #[error("cannot {operation} container {id:?}: {message}")]
    Runtime {
        /// The container.
        id: String,
        /// What was attempted.
        operation: &'static str,
        /// libcontainer's error chain.
        message: String,
    },
    /// A cgroup operation failed.
    #[error("cgroup operation on container {id:?} failed: {message}")]
    Cgroup {
        /// The container.
        id: String,
        /// The error chain.
        message: String,
    },
    /// Setting up the process's stdio failed.
    #[error("cannot set up stdio")]
    Stdio(#[from] StdioError),
    /// Reading or writing the agent's state directory failed.
    #[error("cannot access {path:?}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing to, signalling or resizing a process failed.
    #[error("process I/O failed")]
    ProcessIo(#[source] std::io::Error),
}

/// Why a container or exec id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("it is empty")]
    Empty,
    /// The id is longer than 64 bytes.
    #[error("it is {0} bytes long")]
    TooLong(usize),
    /// The id is `.` or `..`, which name directories.
    #[error("{0:?} names a directory")]
    Dots(String),
    /// The id has a character outside `[A-Za-z0-9_+.-]`.
    #[error("it contains {0:?}")]
    Character(char),
}

/// The ttrpc-facing class of an error; the service maps it to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad request.
    InvalidArgument,
    /// Unknown id or path.
    NotFound,
    /// Duplicate id.
    AlreadyExists,
    /// Wrong state for the operation.
    FailedPrecondition,
    /// Anything else.
    Internal,
}

impl ContainerError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidId { .. } | Self::InvalidExecId { .. } | Self::InvalidSpec(_) => {
                ErrorKind::InvalidArgument
            }
            Self::AlreadyExists(_) | Self::ExecAlreadyExists { .. } => ErrorKind::AlreadyExists,
            Self::NotFound(_) | Self::ExecNotFound { .. } | Self::RootfsMissing(_) => {
                ErrorKind::NotFound
            }
            Self::WrongState { .. }
            | Self::NoStdin
            | Self::NoTerminal
            | Self::NoStderr
            | Self::DiskMismatch { .. } => ErrorKind::FailedPrecondition,
            Self::Runtime { .. }
            | Self::Cgroup { .. }
            | Self::Stdio(_)
            | Self::MountRootfs { .. }
            | Self::DiskNotReady { .. }
            | Self::Io { .. }
            | Self::ProcessIo(_) => ErrorKind::Internal,
        }
    }
}

/// Classifies a libcontainer error: a state conflict (e.g. exec into a
/// container that stopped meanwhile) is the caller's precondition, anything
/// else is the runtime's failure.
pub(super) fn runtime_error(
    id: &str,
    operation: &'static str,
    err: LibcontainerError,
) -> ContainerError {
    match err {
        LibcontainerError::IncorrectStatus(status) => ContainerError::WrongState {
            id: id.to_owned(),
            status: status.to_string(),
            operation,
        },
        err => ContainerError::Runtime {
            id: id.to_owned(),
            operation,
            message: error_chain(&err),
        },
    }
}
