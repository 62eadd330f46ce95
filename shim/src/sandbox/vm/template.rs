//! VM templates: a snapshot of a booted guest whose agent answers, kept
//! per VM configuration under the config's `template_dir`, from which
//! later sandboxes of that configuration are restored instead of booted.
//!
//! A template is the directory `<template_dir>/<key>`:
//!
//! - `vm.state`, `memory`: the snapshot ([`crate::vmm::snapshot`]; the
//!   state file carries its own CRC-32C);
//! - `inputs`: what the template was made from, as text ([`inputs`]): the
//!   skiff binary, the kernel and initramfs (path, size, mtime, ctime,
//!   inode), the command line, vCPUs, memory, CPU template, disk slots and
//!   vsock CID; `<key>` is the start of its SHA-256;
//! - `memory-id`: the memory file's size, mtime, ctime and inode when the
//!   template was made.
//!
//! A template is used only if its `inputs` equal this sandbox's in full
//! and its memory file is still the one written (any write, truncation
//! or replacement changes its ctime); otherwise it is removed and rebuilt.
//! The memory file is not checksummed on each use: reading it would page
//! in all of guest memory, which restoring maps lazily and shares between
//! VMs through the page cache. A state file that fails its checksum, or a
//! restore that fails, also removes the template.
//!
//! Building is atomic: the snapshot is written into a private temporary
//! directory, which is renamed to `<key>` once complete. One shim builds
//! at a time per key (an `flock` on `<key>.lock`); a shim that finds the
//! lock taken boots without making a template.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::vmm::{BootSource, VmConfig};

/// The file naming what a template was made from.
const INPUTS: &str = "inputs";
/// The file holding the memory file's identity.
const MEMORY_ID: &str = "memory-id";
/// Templates kept at most; older ones are removed when one is made.
const KEEP: usize = 8;

/// Errors managing templates.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file or directory could not be read, written or removed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was tried.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The VM boots from something a template cannot stand for.
    #[error("a VM booting {0} has no template")]
    Unsupported(&'static str),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TemplateError + 'a {
    move |source| TemplateError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A file's identity without its name: device, size, mtime, ctime (ns)
/// and inode (a rename changes none of them).
fn file_id(path: &Path) -> Result<String, TemplateError> {
    let m = std::fs::metadata(path).map_err(io("cannot stat", path))?;
    Ok(format!(
        "dev={} size={} mtime={}.{:09} ctime={}.{:09} ino={}",
        m.dev(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.ino()
    ))
}

/// A file's path and identity.
fn identity(path: &Path) -> Result<String, TemplateError> {
    Ok(format!("{} {}", path.display(), file_id(path)?))
}

/// What a template of `config` is made from, one item per line (see the
/// module docs); two configs with equal inputs restore the same guest.
pub fn inputs(config: &VmConfig) -> Result<String, TemplateError> {
    let BootSource::Kernel(spec) = &config.boot else {
        return Err(TemplateError::Unsupported("raw code"));
    };
    let exe = std::env::current_exe().map_err(io("cannot find", Path::new("/proc/self/exe")))?;
    let mut text = format!(
        "skiff {} snapshot-format {}\n",
        env!("CARGO_PKG_VERSION"),
        crate::vmm::snapshot::FORMAT_VERSION
    );
    text.push_str(&format!("exe {}\n", identity(&exe)?));
    text.push_str(&format!("kernel {}\n", identity(&spec.kernel)?));
    match &spec.initrd {
        Some(initrd) => text.push_str(&format!("initrd {}\n", identity(initrd)?)),
        None => text.push_str("initrd none\n"),
    }
    text.push_str(&format!("cmdline {:?}\n", spec.cmdline));
    text.push_str(&format!(
        "vcpus {} memory_mib {} cpu_template {}\n",
        config.vcpus, config.mem_mib, config.cpu_template
    ));
    let disks: Vec<String> = config
        .disks
        .iter()
        .map(|d| match (&d.path, d.read_only) {
            (None, _) => "empty".to_owned(),
            (Some(p), ro) => format!("{}{}", p.display(), if ro { " ro" } else { "" }),
        })
        .collect();
    text.push_str(&format!("disks [{}]\n", disks.join(", ")));
    match &config.vsock {
        Some(v) => text.push_str(&format!("vsock cid {}\n", v.guest_cid)),
        None => text.push_str("vsock none\n"),
    }
    text.push_str(&format!("rng {}\n", config.rng));
    // A NIC or none; its MAC and MTU are each pod's, set by the agent.
    text.push_str(&format!("net {}\n", config.net.is_some()));
    // A share or none, by tag and cache mode; its directory is each pod's.
    match &config.fs {
        Some(fs) => text.push_str(&format!("fs {} {:?}\n", fs.tag, fs.cache)),
        None => text.push_str("fs none\n"),
    }
    Ok(text)
}

/// The templates of one configuration in a template directory.
#[derive(Debug)]
pub struct TemplateStore {
    root: PathBuf,
    key: String,
    inputs: String,
}

/// A template being made: the temporary directory to snapshot into, and
/// the lock that makes this shim the only one making it.
#[derive(Debug)]
pub struct TemplateBuild {
    tmp: PathBuf,
    _lock: File,
}

impl TemplateBuild {
    /// Where the snapshot goes.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }
}

impl Drop for TemplateBuild {
    fn drop(&mut self) {
        // Left over only if the build was not committed.
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

impl TemplateStore {
    /// The templates of `config` under `root`.
    pub fn new(root: &Path, config: &VmConfig) -> Result<Self, TemplateError> {
        let inputs = inputs(config)?;
        let digest = Sha256::digest(inputs.as_bytes());
        let key: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(TemplateStore {
            root: root.to_owned(),
            key,
            inputs,
        })
    }

    /// The template's directory.
    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.key)
    }

    /// The template's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The template's directory if one is there for this configuration
    /// and unchanged since it was made; a stale or damaged one is removed
    /// (and `None` returned), so that it is rebuilt.
    pub fn ready(&self) -> Option<PathBuf> {
        let dir = self.dir();
        if !dir.exists() {
            return None;
        }
        match self.check(&dir) {
            Ok(()) => Some(dir),
            Err(why) => {
                log::warn!(
                    "template {} is not used and will be rebuilt: {why}",
                    dir.display()
                );
                self.discard();
                None
            }
        }
    }

    fn check(&self, dir: &Path) -> Result<(), String> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| format!("{name}: {e}"))
        };
        if read(INPUTS)? != self.inputs {
            return Err("it was made from another kernel, initramfs, binary or config".into());
        }
        let memory = dir.join(crate::vmm::snapshot::MEMORY_FILE);
        let now = file_id(&memory).map_err(|e| crate::vmm::error_chain(&e))?;
        if read(MEMORY_ID)? != now {
            return Err("its memory file changed since it was made".into());
        }
        if !dir.join(crate::vmm::snapshot::STATE_FILE).is_file() {
            return Err("it has no state file".into());
        }
        Ok(())
    }

    /// Removes the template (a failed restore, a damaged template).
    pub fn discard(&self) {
        let dir = self.dir();
        // Renamed aside first: a shim restoring at this moment either has
        // its files open already or finds no template.
        let aside = self
            .root
            .join(format!(".{}.discarded.{}", self.key, std::process::id()));
        if std::fs::rename(&dir, &aside).is_ok() {
            if let Err(e) = std::fs::remove_dir_all(&aside) {
                log::warn!("cannot remove {}: {e}", aside.display());
            }
        }
    }

    /// Starts making the template, unless another shim is making it: takes
    /// the key's lock and makes an empty temporary directory.
    pub fn build(&self) -> Result<Option<TemplateBuild>, TemplateError> {
        use std::os::unix::fs::DirBuilderExt;
        // Root's only: a template's memory holds the guest's state (its
        // entropy pool before the clones' reseed among it).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io("cannot create", &self.root))?;
        let lock_path = self.root.join(format!("{}.lock", self.key));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("cannot open", &lock_path))?;
        // SAFETY: flock on an fd this function owns; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(None);
        }
        let tmp = self
            .root
            .join(format!(".{}.tmp.{}", self.key, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io("cannot create", &tmp))?;
        Ok(Some(TemplateBuild { tmp, _lock: lock }))
    }

    /// Makes the snapshot in `build` the template: records its inputs and
    /// its memory file's identity, renames it into place, and removes the
    /// oldest templates beyond [`KEEP`].
    pub fn commit(&self, build: TemplateBuild) -> Result<PathBuf, TemplateError> {
        let write = |name: &str, text: &str| {
            let path = build.tmp.join(name);
            File::create(&path)
                .and_then(|mut f| {
                    f.write_all(text.as_bytes())?;
                    f.sync_all()
                })
                .map_err(io("cannot write", &path))
        };
        write(INPUTS, &self.inputs)?;
        let id = file_id(&build.tmp.join(crate::vmm::snapshot::MEMORY_FILE))?;
        write(MEMORY_ID, &id)?;
        let final_dir = self.dir();
        self.discard();
        std::fs::rename(&build.tmp, &final_dir).map_err(io("cannot rename", &build.tmp))?;
        self.prune();
        Ok(final_dir)
    }

    /// Removes templates beyond the newest [`KEEP`] (never this one).
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                !name.starts_with('.') && name != self.key && e.path().is_dir()
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        dirs.sort();
        let excess = (dirs.len() + 1).saturating_sub(KEEP);
        for (_, dir) in dirs.into_iter().take(excess) {
            log::info!("removing old template {}", dir.display());
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(dir.with_extension("lock"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{DiskConfig, KernelSpec, SerialOutput, VsockConfig};

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        let initrd = dir.join("initrd");
        if !kernel.exists() {
            std::fs::write(&kernel, b"kernel").unwrap();
            std::fs::write(&initrd, b"initrd").unwrap();
        }
        VmConfig {
            vcpus: 1,
            mem_mib: 256,
            boot: BootSource::Kernel(KernelSpec {
                kernel,
                initrd: Some(initrd),
                cmdline: "console=ttyS0".into(),
            }),
            disks: vec![DiskConfig::empty(), DiskConfig::empty()],
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: dir.join("vsock.sock"),
            }),
            cpu_template: crate::vmm::CpuTemplate::default(),
            serial: SerialOutput::Discard,
            epoch: std::time::Instant::now(),
            rng: false,
            net: None,
            fs: None,
            seccomp: true,
        }
    }

    /// A fake snapshot in `build`: what the VMM would write.
    fn fill(build: &TemplateBuild) {
        std::fs::write(build.dir().join("vm.state"), b"state").unwrap();
        std::fs::write(build.dir().join("memory"), vec![1u8; 4096]).unwrap();
    }

    #[test]
    fn a_template_is_made_once_used_and_rebuilt_when_anything_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("templates");
        let cfg = config(tmp.path());
        let store = TemplateStore::new(&root, &cfg).unwrap();
        assert_eq!(store.key().len(), 16);
        assert_eq!(store.ready(), None);

        // One builder at a time.
        let build = store.build().unwrap().expect("the lock is free");
        use std::os::unix::fs::PermissionsExt;
        for dir in [&root, &build.tmp] {
            let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", dir.display());
        }
        assert!(store.build().unwrap().is_none(), "a second builder waits");
        fill(&build);
        let dir = store.commit(build).unwrap();
        assert_eq!(store.ready(), Some(dir.clone()));
        assert!(store.build().unwrap().is_some(), "the lock is released");

        // Another config (memory), another key; the same config, the same.
        let mut other = config(tmp.path());
        other.mem_mib = 512;
        assert_ne!(
            TemplateStore::new(&root, &other).unwrap().key(),
            store.key()
        );
        assert_eq!(TemplateStore::new(&root, &cfg).unwrap().key(), store.key());
        // A NIC is in the key; its MAC and MTU (each pod's) are not.
        let tap = |mac: u8, mtu: u16| {
            Some(crate::vmm::NetConfig {
                tap: std::sync::Arc::new(std::fs::File::open("/dev/null").unwrap().into()),
                mac: [2, 0, 0, 0, 0, mac],
                mtu,
            })
        };
        let nic = |net| {
            let mut c = config(tmp.path());
            c.net = net;
            TemplateStore::new(&root, &c).unwrap().key().to_owned()
        };
        assert_ne!(nic(tap(1, 1500)), store.key());
        assert_eq!(nic(tap(1, 1500)), nic(tap(2, 9000)));

        // A changed memory file: removed, so rebuilt.
        std::fs::write(dir.join("memory"), vec![2u8; 4096]).unwrap();
        assert_eq!(store.ready(), None);
        assert!(!dir.exists());

        // Rebuilt, then the kernel changes: another key; the old template
        // is not used for it.
        let build = store.build().unwrap().unwrap();
        fill(&build);
        store.commit(build).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(tmp.path().join("vmlinux"), b"kernel 2").unwrap();
        let after = TemplateStore::new(&root, &config(tmp.path())).unwrap();
        assert_ne!(after.key(), store.key());
        assert_eq!(after.ready(), None);

        // Inputs that do not match in full (a forged or colliding key).
        std::fs::write(dir.join(INPUTS), "something else").unwrap();
        assert_eq!(store.ready(), None);
        assert!(!dir.exists());
    }

    #[test]
    fn an_uncommitted_build_leaves_nothing_and_old_templates_are_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("templates");
        let store = TemplateStore::new(&root, &config(tmp.path())).unwrap();
        let build = store.build().unwrap().unwrap();
        let dir = build.dir().to_owned();
        fill(&build);
        drop(build);
        assert!(!dir.exists());
        assert_eq!(store.ready(), None);

        for i in 0..KEEP + 2 {
            std::fs::create_dir_all(root.join(format!("old{i:02}"))).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let build = store.build().unwrap().unwrap();
        fill(&build);
        store.commit(build).unwrap();
        let left: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), KEEP, "{left:?}");
        assert!(left.contains(&store.key().to_owned()));
        assert!(!left.contains(&"old00".to_owned()) && !left.contains(&"old01".to_owned()));
    }

    #[test]
    fn raw_guests_have_no_template() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.boot = BootSource::Raw {
            image: vec![0xf4],
            load_addr: 0x1000,
            protocol: crate::vmm::BootProtocol::RealMode,
        };
        assert!(matches!(
            TemplateStore::new(tmp.path(), &cfg),
            Err(TemplateError::Unsupported(_))
        ));
    }
}
