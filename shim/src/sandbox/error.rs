//! The sandbox layer's error, and the kind the TaskService maps to a
//! containerd status code.

use std::path::PathBuf;
use std::time::Duration;

use crate::agent_client::AgentCallError;

/// What kind of failure a [`SandboxError`] is, for the caller's status
/// code; handlers decide it for their own errors, so the caller never
/// matches on a handler's variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxErrorKind {
    /// The request asks for something this kind of sandbox cannot do
    /// (e.g. a bind mount the VM cannot serve).
    InvalidArgument,
    /// A bounded resource of the sandbox is used up (e.g. disk slots).
    ResourceExhausted,
    /// Anything else: the host, the agent, the VM.
    Internal,
}

/// Errors starting, reaching or stopping a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The agent binary is nowhere to be found.
    #[error("the skiff-agent binary was not found (looked at {looked}); install it next to containerd-shim-skiff-v2 or set agent_path in the skiff config")]
    AgentNotFound {
        /// The places searched.
        looked: String,
    },
    /// Spawning the agent failed.
    #[error("cannot start the agent {path}")]
    Spawn {
        /// The agent binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent exited or never answered.
    #[error("the agent did not come up within {timeout:?}: {detail}")]
    NotReady {
        /// The bound waited.
        timeout: Duration,
        /// What happened (exit status, last log lines).
        detail: String,
    },
    /// The agent's first requests failed.
    #[error("the agent failed to set up the sandbox")]
    Agent(#[source] AgentCallError),
    /// A handler's own failure (the `vm` handler's artifacts, images,
    /// disks, VM start).
    #[error(transparent)]
    Handler(HandlerFailure),
    /// Host I/O for the sandbox's state failed.
    #[error("{context}")]
    Io {
        /// What the handler was doing.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl SandboxError {
    /// Wraps an I/O error with what the handler was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps a handler's own error with the kind it decided.
    pub fn handler(
        kind: SandboxErrorKind,
        error: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Handler(HandlerFailure {
            kind,
            error: Box::new(error),
        })
    }

    /// The kind of failure, for the caller's status code.
    pub fn kind(&self) -> SandboxErrorKind {
        match self {
            Self::Handler(failure) => failure.kind,
            Self::AgentNotFound { .. }
            | Self::Spawn { .. }
            | Self::NotReady { .. }
            | Self::Agent(_)
            | Self::Io { .. } => SandboxErrorKind::Internal,
        }
    }

    /// The handler's own error, if this is one (for callers that know the
    /// handler, e.g. its tests).
    pub fn handler_error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            Self::Handler(failure) => Some(failure.error.as_ref()),
            _ => None,
        }
    }
}

/// A handler's error and its kind. Displays as the error itself and hands
/// on its sources, so the message chain reads as the handler wrote it.
#[derive(Debug)]
pub struct HandlerFailure {
    kind: SandboxErrorKind,
    error: Box<dyn std::error::Error + Send + Sync>,
}

impl std::fmt::Display for HandlerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for HandlerFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_handler_error_keeps_its_kind_message_and_sources() {
        let err = SandboxError::handler(
            SandboxErrorKind::ResourceExhausted,
            Outer(std::io::Error::other("inner")),
        );
        assert_eq!(err.kind(), SandboxErrorKind::ResourceExhausted);
        assert_eq!(err.to_string(), "outer");
        let source = std::error::Error::source(&err).expect("the handler error's source");
        assert_eq!(source.to_string(), "inner");
        assert!(err
            .handler_error()
            .unwrap()
            .downcast_ref::<Outer>()
            .is_some());
        assert_eq!(
            SandboxError::io("x", std::io::Error::other("y")).kind(),
            SandboxErrorKind::Internal
        );
    }
}
