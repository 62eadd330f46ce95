//! Listening: the address parser and the ttrpc server setup.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use skiff_agent_proto::agent_ttrpc::create_agent;

use crate::container::{Engine, EngineConfig};
use crate::oom::{OomError, OomWatcher};
use crate::reaper::{Reaper, ReaperError};
use crate::service::AgentService;
use crate::spawner::{Spawner, SpawnerError};

/// Handler threads kept idle per connection: long polls occupy threads, and
/// ttrpc starts more whenever fewer than the minimum are idle.
const IDLE_THREADS_MIN: usize = 2;
const IDLE_THREADS_DEFAULT: usize = 4;
const IDLE_THREADS_MAX: usize = 16;

/// Errors of address parsing and server start-up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address has no scheme we know.
    #[error("listen address {0:?} is invalid: use unix:///path/to.sock or vsock://<port>")]
    BadAddress(String),
    /// The reaper could not start.
    #[error("cannot start the reaper")]
    Reaper(#[from] ReaperError),
    /// The spawner process could not start.
    #[error("cannot start the spawner process")]
    Spawner(#[from] SpawnerError),
    /// The OOM watcher could not start.
    #[error("cannot start the OOM watcher")]
    Oom(#[from] OomError),
    /// The engine could not prepare its state directory.
    #[error("cannot prepare the state directory")]
    Engine(#[from] crate::container::ContainerError),
    /// The socket file could not be removed or put in place.
    #[error("cannot replace the socket file {path:?}")]
    StaleSocket {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// ttrpc failed to bind or start.
    #[error("ttrpc server failed: {0}")]
    Ttrpc(String),
}

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A vsock port (inside the micro-VM).
    Vsock(u32),
}

impl std::str::FromStr for ListenAddr {
    type Err = ServerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix://") {
            if path.starts_with('/') {
                return Ok(Self::Unix(PathBuf::from(path)));
            }
        } else if let Some(port) = s.strip_prefix("vsock://") {
            // Decimal only: no sign, no `cid:` prefix (the agent always
            // listens on VMADDR_CID_ANY).
            let port = port.trim_end_matches('/');
            if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(port) = port.parse() {
                    return Ok(Self::Vsock(port));
                }
            }
        }
        Err(ServerError::BadAddress(s.to_owned()))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Vsock(port) => write!(f, "vsock://{port}"),
        }
    }
}

/// Options beyond the address and the engine's files.
#[derive(Default)]
pub struct ServerOptions {
    /// Called (on the request's thread) after DestroySandbox has removed every
    /// container and before its reply is sent; the guest init uses it to
    /// schedule the VM's reset.
    pub on_sandbox_destroyed: Option<Box<dyn Fn() + Send + Sync>>,
    /// The agent is the micro-VM's init (PID 1): it serves RefreshGuest,
    /// which sets the system's clock and machine id and feeds its RNG.
    /// False (the default) refuses it; never true on a host.
    pub guest_init: bool,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field(
                "on_sandbox_destroyed",
                &self.on_sandbox_destroyed.as_ref().map(|_| "Fn"),
            )
            .field("guest_init", &self.guest_init)
            .finish()
    }
}

/// A running agent server; dropping it does not stop it (call `shutdown`).
pub struct AgentServer {
    server: ttrpc::Server,
}

impl std::fmt::Debug for AgentServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentServer").finish_non_exhaustive()
    }
}

impl AgentServer {
    /// Forks the spawner, starts the reaper, the OOM watcher and the ttrpc
    /// server on `addr`.
    ///
    /// Call once per process, before it starts any thread (the spawner is
    /// forked here and refuses a multi-threaded parent); the reaper reaps
    /// every child of the process.
    pub fn start(addr: &ListenAddr, config: EngineConfig) -> Result<Self, ServerError> {
        Self::start_with(addr, config, ServerOptions::default())
    }

    /// [`AgentServer::start`] with options.
    pub fn start_with(
        addr: &ListenAddr,
        config: EngineConfig,
        options: ServerOptions,
    ) -> Result<Self, ServerError> {
        // First, while the process has one thread.
        let spawner = Spawner::start()?;
        let reaper = Reaper::start()?;
        reaper.adopt(spawner.pid());
        let oom = OomWatcher::start()?;
        let engine = Engine::new(config, reaper, spawner)?;
        let mut service = AgentService::new(engine, oom);
        if let Some(hook) = options.on_sandbox_destroyed {
            service.set_on_sandbox_destroyed(hook);
        }
        service.set_guest_init(options.guest_init);
        let service = Arc::new(service);
        let server = ttrpc::Server::new();
        let server = match addr {
            ListenAddr::Unix(path) => return Self::serve_unix(server, service, path),
            // ttrpc's sync transport binds AF_VSOCK itself (`vsock://CID:PORT`,
            // -1 = VMADDR_CID_ANY); connections are accepted from any CID.
            ListenAddr::Vsock(port) => server
                .bind(&format!("vsock://-1:{port}"))
                .map_err(|e| ServerError::Ttrpc(e.to_string()))?,
        };
        let mut server = Self::configure(server, service);
        server
            .start()
            .map_err(|e| ServerError::Ttrpc(e.to_string()))?;
        Ok(Self { server })
    }

    fn configure(server: ttrpc::Server, service: Arc<AgentService>) -> ttrpc::Server {
        server
            .register_service(create_agent(service))
            .set_thread_count_min(IDLE_THREADS_MIN)
            .set_thread_count_default(IDLE_THREADS_DEFAULT)
            .set_thread_count_max(IDLE_THREADS_MAX)
    }

    fn serve_unix(
        server: ttrpc::Server,
        service: Arc<AgentService>,
        path: &Path,
    ) -> Result<Self, ServerError> {
        let path = path.to_owned();
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| ServerError::StaleSocket {
                path: path.clone(),
                source,
            })?;
        }
        // Bind under a temporary name and rename once listening, so the
        // socket's existence means the agent accepts connections.
        let mut starting = path.clone().into_os_string();
        starting.push(".starting");
        let starting = PathBuf::from(starting);
        let _ = std::fs::remove_file(&starting);
        let server = server
            .bind(&format!("unix://{}", starting.display()))
            .map_err(|e| ServerError::Ttrpc(e.to_string()))?;
        let mut server = Self::configure(server, service);
        server
            .start()
            .map_err(|e| ServerError::Ttrpc(e.to_string()))?;
        std::fs::rename(&starting, &path).map_err(|source| ServerError::StaleSocket {
            path: path.clone(),
            source,
        })?;
        Ok(Self { server })
    }

    /// Stops listening and closes connections.
    pub fn shutdown(self) {
        self.server.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!(
            "unix:///run/a.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
        assert_eq!(
            "vsock://1024".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock(1024)
        );
        for bad in [
            "unix://relative.sock",
            "vsock://x",
            "tcp://1.2.3.4:5",
            "/run/a.sock",
        ] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vsock_addresses() {
        assert_eq!(
            "vsock://0".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock(0)
        );
        assert_eq!(
            "vsock://1024/".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock(1024)
        );
        assert_eq!(
            "vsock://4294967295".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock(u32::MAX)
        );
        for bad in [
            "vsock://",
            "vsock://4294967296",
            "vsock://+1024",
            "vsock://-1",
            "vsock://3:1024",
            "vsock:1024",
            "vsock:///run/a.sock",
        ] {
            let err = bad.parse::<ListenAddr>().unwrap_err();
            assert!(err.to_string().contains("vsock://<port>"), "{bad}: {err}");
        }
        for addr in ["vsock://1024", "unix:///run/a.sock"] {
            assert_eq!(addr.parse::<ListenAddr>().unwrap().to_string(), addr);
        }
    }
}
