//! Reaching the guest agent: the hybrid-vsock handshake and a first
//! Health, retried while the guest boots.

use std::path::Path;
use std::time::{Duration, Instant};

use skiff_agent_proto::AGENT_VSOCK_PORT;

use super::error::VmSandboxError;
use super::serial::serial_tail;
use crate::agent_client::AgentClient;
use crate::sandbox::error::SandboxError;
use crate::vmm::{self, VmHandle};

/// Bound on one handshake's answer; the muxer stays silent while the guest
/// does not listen yet.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between handshake attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Bound on the agent's first Health answer over a connected stream.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

/// Retries the handshake and a first Health until `timeout` has passed
/// since the call, the agent answers, or the VM ends.
pub(super) fn connect_agent(
    vm: &VmHandle,
    uds: &Path,
    serial: &Path,
    timeout: Duration,
) -> Result<AgentClient, SandboxError> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        if let Some(exit) = vm.exit_reason() {
            return Err(VmSandboxError::EndedEarly {
                exit,
                elapsed: start.elapsed(),
                serial: serial_tail(serial),
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
        log::debug!(
            "agent not reached yet (attempt {attempts}, {:?}): {last}",
            start.elapsed()
        );
        if start.elapsed() >= timeout {
            return Err(SandboxError::NotReady {
                timeout,
                detail: format!(
                    "{attempts} attempts in {:?}, last: {last}; serial log: {}",
                    start.elapsed(),
                    serial_tail(serial)
                ),
            });
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}
