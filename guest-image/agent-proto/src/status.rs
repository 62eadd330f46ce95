//! The container status that `StateContainer` answers as a string.

use std::fmt;
use std::str::FromStr;

/// A container's status as the protocol names it
/// (`ContainerStateResponse.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContainerStatus {
    /// Created; the init process waits for StartContainer.
    Created,
    /// The init process runs.
    Running,
    /// Frozen by PauseContainer.
    Paused,
    /// The init process has exited.
    Stopped,
}

impl ContainerStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [Self; 4] = [Self::Created, Self::Running, Self::Paused, Self::Stopped];

    /// The protocol's name: "created", "running", "paused" or "stopped".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        }
    }
}

impl fmt::Display for ContainerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status string is none of the protocol's names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a container status (created, running, paused or stopped)")]
pub struct UnknownStatusError(pub String);

impl FromStr for ContainerStatus {
    type Err = UnknownStatusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatusError(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for status in ContainerStatus::ALL {
            assert_eq!(status.as_str().parse::<ContainerStatus>(), Ok(status));
            assert_eq!(status.to_string(), status.as_str());
        }
        assert_eq!(
            "Running".parse::<ContainerStatus>(),
            Err(UnknownStatusError("Running".into()))
        );
    }
}
