//! A disk image file as a virtio-blk backend.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use vmm_core::devices::blk::{BackendError, BlockBackend, SECTOR_SIZE};

use super::config::DiskConfig;

/// The disk image could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open disk {}", path.display())]
pub struct FileDiskError {
    /// The file.
    pub path: PathBuf,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

/// A disk image file, or no medium (capacity 0).
pub struct FileDisk {
    file: Option<File>,
    path: Option<PathBuf>,
    capacity: u64,
}

impl FileDisk {
    /// No medium.
    pub fn none() -> Self {
        FileDisk {
            file: None,
            path: None,
            capacity: 0,
        }
    }

    /// Opens the image (read-only if the disk is); its size is rounded down
    /// to whole sectors. A config without a path is [`FileDisk::none`].
    pub fn open(disk: &DiskConfig) -> Result<Self, FileDiskError> {
        let Some(path) = &disk.path else {
            return Ok(Self::none());
        };
        let err = |source| FileDiskError {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(path)
            .map_err(err)?;
        Self::from_file(file, path.clone())
    }

    /// The open image `file` (named `path` in logs and errors), e.g. one
    /// another process opened and passed over a socket.
    pub fn from_file(file: File, path: PathBuf) -> Result<Self, FileDiskError> {
        let size = file
            .metadata()
            .map_err(|source| FileDiskError {
                path: path.clone(),
                source,
            })?
            .len();
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "disk {}: size {size} is not a multiple of 512; the last {} bytes are ignored",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(FileDisk {
            file: Some(file),
            path: Some(path),
            capacity: size - size % SECTOR_SIZE,
        })
    }

    /// Whether a medium is in.
    pub fn has_medium(&self) -> bool {
        self.file.is_some()
    }

    /// The image's path, if a medium is in.
    pub fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }
}

fn no_medium() -> BackendError {
    BackendError {
        errno: libc::ENOMEDIUM,
    }
}

fn backend_error(e: std::io::Error) -> BackendError {
    BackendError {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    }
}

impl BlockBackend for FileDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let file = self.file.as_ref().ok_or_else(no_medium)?;
        file.read_exact_at(buf, offset).map_err(backend_error)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        let file = self.file.as_ref().ok_or_else(no_medium)?;
        file.write_all_at(buf, offset).map_err(backend_error)
    }
    fn flush(&mut self) -> Result<(), BackendError> {
        match &self.file {
            Some(file) => file.sync_data().map_err(backend_error),
            None => Ok(()),
        }
    }
}
