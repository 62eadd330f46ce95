//! The TaskService's errors and their one mapping to ttrpc status codes.

use ttrpc::Code;

use crate::agent_client::AgentCallError;
use crate::sandbox::{SandboxError, SandboxErrorKind};
use crate::task::rootfs::RootfsError;
use crate::task::spec::SpecError;

/// Everything a TaskService request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The agent refused or could not be reached.
    #[error(transparent)]
    Agent(#[from] AgentCallError),
    /// Starting or reaching the sandbox failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// Mounting or unmounting the container's root filesystem failed.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// The bundle's spec is unreadable or malformed.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// No such container.
    #[error("container {0:?} does not exist in this shim")]
    ContainerNotFound(String),
    /// No such exec process.
    #[error("exec {exec_id:?} does not exist in container {id:?}")]
    ExecNotFound {
        /// The container.
        id: String,
        /// The unknown exec id.
        exec_id: String,
    },
    /// The process has already exited.
    #[error("process {exec_id:?} of container {id:?} has already finished")]
    ProcessFinished {
        /// The container.
        id: String,
        /// The exec id ("" for init).
        exec_id: String,
    },
    /// The id is taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request is malformed (bad spec, bad options).
    #[error("{0}")]
    InvalidArgument(String),
    /// The process is not in a state that allows the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The operation is not supported by skiff.
    #[error("{0} is not implemented by the skiff shim")]
    NotImplemented(&'static str),
    /// A host-side I/O failure (bundle files, FIFOs).
    #[error("{context}")]
    Io {
        /// What the shim was doing.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl TaskError {
    /// Wraps an I/O error with what the shim was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The ttrpc (gRPC) code containerd sees; containerd turns it into its
    /// `errdefs` kinds (NOT_FOUND → ErrNotFound, …).
    pub fn code(&self) -> Code {
        match self {
            Self::Agent(err) => err.code(),
            Self::Sandbox(err) => match err.kind() {
                SandboxErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
                SandboxErrorKind::ResourceExhausted => Code::RESOURCE_EXHAUSTED,
                SandboxErrorKind::Internal => Code::INTERNAL,
            },
            Self::Spec(SpecError::Parse { .. }) => Code::INVALID_ARGUMENT,
            Self::Rootfs(_) | Self::Spec(_) | Self::Io { .. } => Code::INTERNAL,
            Self::ContainerNotFound(_)
            | Self::ExecNotFound { .. }
            | Self::ProcessFinished { .. } => Code::NOT_FOUND,
            Self::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Self::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Self::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Self::NotImplemented(_) => Code::UNIMPLEMENTED,
        }
    }
}

/// The message with every `source` appended once (shared with the agent, so
/// both sides of the protocol word errors alike).
pub use skiff_agent_proto::error_chain;

impl From<TaskError> for ttrpc::Error {
    fn from(err: TaskError) -> Self {
        let code = err.code();
        let message = error_chain(&err);
        // A signal to a process that already exited is routine (CRI's
        // ExecSync kills each exec after its exit; containerd takes
        // NOT_FOUND as done): not worth a warning.
        if matches!(err, TaskError::ProcessFinished { .. }) {
            log::debug!("request failed: {code:?}: {message}");
        } else {
            log::warn!("request failed: {code:?}: {message}");
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(err: TaskError) -> ttrpc::proto::Status {
        match ttrpc::Error::from(err) {
            ttrpc::Error::RpcStatus(status) => status,
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn codes_and_messages() {
        let s = status(TaskError::ContainerNotFound("web".into()));
        assert_eq!(s.code(), Code::NOT_FOUND);
        assert_eq!(s.message(), "container \"web\" does not exist in this shim");
        let s = status(TaskError::ExecNotFound {
            id: "web".into(),
            exec_id: "e1".into(),
        });
        assert_eq!(s.code(), Code::NOT_FOUND);
        assert_eq!(
            TaskError::AlreadyExists("x".into()).code(),
            Code::ALREADY_EXISTS
        );
        let s = status(TaskError::NotImplemented("checkpoint"));
        assert_eq!(s.code(), Code::UNIMPLEMENTED);
        let agent = AgentCallError::Status {
            code: Code::FAILED_PRECONDITION,
            message: "container is paused".into(),
        };
        let s = status(agent.into());
        assert_eq!(s.code(), Code::FAILED_PRECONDITION);
        assert_eq!(s.message(), "agent: container is paused");
        let s = status(TaskError::io(
            "cannot open stdout FIFO /x",
            std::io::Error::from_raw_os_error(libc::ENOENT),
        ));
        assert_eq!(s.code(), Code::INTERNAL);
        assert!(
            s.message().starts_with("cannot open stdout FIFO /x: "),
            "{}",
            s.message()
        );
        #[derive(Debug, thiserror::Error)]
        #[error("no slot")]
        struct NoSlot;
        let s = status(SandboxError::handler(SandboxErrorKind::ResourceExhausted, NoSlot).into());
        assert_eq!(s.code(), Code::RESOURCE_EXHAUSTED);
        assert_eq!(s.message(), "no slot");
    }
}
