//! What the engine hands out: a [`Container`] (libcontainer's handle, its
//! processes, its bundle and cgroup) and each of its [`Process`]es (pid,
//! exit status, stdio).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use libcgroups::common::{CgroupConfig, CgroupManager, ControllerOpt};
use libcontainer::container::{Container as LcContainer, ContainerStatus};
use libcontainer::error::LibcontainerError;
use oci_spec::runtime::LinuxResources;
use skiff_agent_proto::error_chain;

use super::error::{runtime_error, ContainerError};
use crate::reaper::{lock, ExitCell};
use crate::stdio::{self, OutputBuffer};

/// One process of a container: the init process or an exec.
#[derive(Debug)]
pub struct Process {
    /// Host pid.
    pub pid: i32,
    /// Delivered by the reaper.
    pub exit: Arc<ExitCell>,
    /// stdout (or the pty output).
    pub stdout: Arc<OutputBuffer>,
    /// stderr; `None` on a terminal.
    pub stderr: Option<Arc<OutputBuffer>>,
    pub(super) stdin: Mutex<Option<File>>,
    pub(super) pty_master: Option<OwnedFd>,
}

impl Process {
    /// Writes all of `data` to the process's stdin (blocking while the pipe is full).
    pub fn write_stdin(&self, data: &[u8]) -> Result<usize, ContainerError> {
        // Clone the handle so a blocked write does not hold the lock CloseStdin needs.
        let mut file = {
            let guard = lock(&self.stdin);
            let file = guard.as_ref().ok_or(ContainerError::NoStdin)?;
            file.try_clone().map_err(ContainerError::ProcessIo)?
        };
        file.write_all(data).map_err(ContainerError::ProcessIo)?;
        Ok(data.len())
    }

    /// Closes stdin; on a terminal, sends end-of-file (^D) instead.
    pub fn close_stdin(&self) -> Result<(), ContainerError> {
        let file = lock(&self.stdin).take();
        if let (Some(mut file), true) = (file, self.pty_master.is_some()) {
            file.write_all(&[4]).map_err(ContainerError::ProcessIo)?;
        }
        Ok(())
    }

    /// Resizes the process's terminal.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ContainerError> {
        let master = self.pty_master.as_ref().ok_or(ContainerError::NoTerminal)?;
        stdio::resize_pty(master, rows, cols).map_err(ContainerError::ProcessIo)
    }

    /// Sends `signal` unless the process has already been reaped (checked
    /// under the exit cell's lock, so a reused pid is never signalled).
    pub fn signal(&self, signal: i32) -> Result<(), ContainerError> {
        let result = self.exit.if_running(|| {
            // SAFETY: kill(2) takes plain integers.
            let rc = unsafe { libc::kill(self.pid, signal) };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
        match result {
            None | Some(Ok(())) => Ok(()),
            Some(Err(err)) if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Some(Err(err)) => Err(ContainerError::ProcessIo(err)),
        }
    }
}

/// A container the engine created.
#[derive(Debug)]
pub struct Container {
    pub(super) id: String,
    pub(super) runtime: Mutex<LcContainer>,
    pub(super) init: Arc<Process>,
    pub(super) execs: Mutex<HashMap<String, Arc<Process>>>,
    pub(super) bundle: PathBuf,
    pub(super) cgroup_path: PathBuf,
    /// Where the agent mounted the container's block-device rootfs.
    pub(super) rootfs_mount: Option<PathBuf>,
}

impl Container {
    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cgroup path (relative to each hierarchy's root).
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup_path
    }

    /// The init process (`exec_id` empty) or an exec process.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        if exec_id.is_empty() {
            return Ok(Arc::clone(&self.init));
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ExecNotFound {
                container_id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }

    pub(super) fn runtime_error(
        &self,
        operation: &'static str,
        err: LibcontainerError,
    ) -> ContainerError {
        runtime_error(&self.id, operation, err)
    }

    /// The status as libcontainer sees it, plus the init pid.
    pub fn status(&self) -> Result<(ContainerStatus, i32), ContainerError> {
        let mut runtime = lock(&self.runtime);
        runtime
            .refresh_status()
            .map_err(|e| self.runtime_error("query", e))?;
        Ok((runtime.status(), self.init.pid))
    }

    /// Starts the init process.
    pub fn start(&self) -> Result<(), ContainerError> {
        let mut runtime = lock(&self.runtime);
        runtime
            .refresh_status()
            .map_err(|e| self.runtime_error("start", e))?;
        if runtime.status() != ContainerStatus::Created {
            return Err(self.wrong_state(runtime.status(), "start"));
        }
        runtime.start().map_err(|e| self.runtime_error("start", e))
    }

    /// Freezes every process of the container.
    pub fn pause(&self) -> Result<(), ContainerError> {
        let mut runtime = lock(&self.runtime);
        runtime
            .refresh_status()
            .map_err(|e| self.runtime_error("pause", e))?;
        if runtime.status() != ContainerStatus::Running {
            return Err(self.wrong_state(runtime.status(), "pause"));
        }
        runtime.pause().map_err(|e| self.runtime_error("pause", e))
    }

    /// Thaws the container.
    pub fn resume(&self) -> Result<(), ContainerError> {
        let mut runtime = lock(&self.runtime);
        runtime
            .refresh_status()
            .map_err(|e| self.runtime_error("resume", e))?;
        if runtime.status() != ContainerStatus::Paused {
            return Err(self.wrong_state(runtime.status(), "resume"));
        }
        runtime
            .resume()
            .map_err(|e| self.runtime_error("resume", e))
    }

    /// Signals every process of the container (libcontainer's `kill --all`).
    pub fn signal_all(&self, signal: i32) -> Result<(), ContainerError> {
        let signal = nix::sys::signal::Signal::try_from(signal).map_err(|_| {
            ContainerError::InvalidSpec(format!("signal {signal} is not a valid signal number"))
        })?;
        let mut runtime = lock(&self.runtime);
        runtime
            .refresh_status()
            .map_err(|e| self.runtime_error("signal", e))?;
        if runtime.status() == ContainerStatus::Stopped {
            return Ok(());
        }
        runtime
            .kill(signal, true)
            .map_err(|e| self.runtime_error("signal", e))
    }

    pub(super) fn wrong_state(
        &self,
        status: ContainerStatus,
        operation: &'static str,
    ) -> ContainerError {
        ContainerError::WrongState {
            id: self.id.clone(),
            status: status.to_string(),
            operation,
        }
    }

    fn cgroup_manager(&self) -> Result<libcgroups::common::AnyCgroupManager, ContainerError> {
        libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: self.cgroup_path.clone(),
            systemd_cgroup: false,
            container_name: self.id.clone(),
        })
        .map_err(|e| self.cgroup_error(&e))
    }

    fn cgroup_error(&self, err: &dyn std::error::Error) -> ContainerError {
        ContainerError::Cgroup {
            id: self.id.clone(),
            message: error_chain(err),
        }
    }

    /// cgroup statistics: on a v2 hierarchy read leniently (see
    /// `cgroup_stats`), on v1 by libcgroups.
    pub fn stats(&self) -> Result<libcgroups::stats::Stats, ContainerError> {
        let root = Path::new(super::cgroup_stats::UNIFIED_ROOT);
        if super::cgroup_stats::is_unified(root) {
            let relative = self
                .cgroup_path
                .strip_prefix("/")
                .unwrap_or(&self.cgroup_path);
            let dir = root.join(relative);
            if !dir.is_dir() {
                return Err(ContainerError::Cgroup {
                    id: self.id.clone(),
                    message: format!("no cgroup at {}", dir.display()),
                });
            }
            return Ok(super::cgroup_stats::read(&dir));
        }
        let manager = self.cgroup_manager()?;
        manager.stats().map_err(|e| self.cgroup_error(&e))
    }

    /// Pids in the container's cgroup.
    pub fn pids(&self) -> Result<Vec<i32>, ContainerError> {
        let manager = self.cgroup_manager()?;
        let pids = manager.get_all_pids().map_err(|e| self.cgroup_error(&e))?;
        Ok(pids.into_iter().map(|p| p.as_raw()).collect())
    }

    /// Applies new resource limits.
    pub fn update(&self, resources_json: &[u8]) -> Result<(), ContainerError> {
        let resources: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| ContainerError::InvalidSpec(format!("resources: {e}")))?;
        let manager = self.cgroup_manager()?;
        manager
            .apply(&ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| self.cgroup_error(&e))
    }
}
