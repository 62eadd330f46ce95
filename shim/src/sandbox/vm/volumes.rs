//! A container's bind mounts in the VM: which the VM can serve, and the
//! spec rewriting that mounts what the guest has instead.
//!
//! With the virtio-fs share (`vm_rootfs = "virtio-fs"`) every bind whose
//! source exists is served live: directories and files, read-only or
//! read-write; the spec's entry keeps its options and gets the share's
//! guest path as its source. With `"block"`: read-only directories, as
//! read-only disks holding a copy, and the pod's `/etc/hosts` and
//! `/etc/resolv.conf` files, as the guest's copies.

use oci_spec::runtime::Mount;

use super::error::VmSandboxError;
use crate::config::VmRootfs;
use crate::sandbox::mounts::BindMount;

/// Options of a bind mount that carry over to its disk's mount.
const KEPT_MOUNT_OPTIONS: [&str; 5] = ["nosuid", "nodev", "noexec", "noatime", "relatime"];

/// The bind mounts among `mounts`, each checked to be one the VM can serve.
/// With virtio-fs, a source must exist. With block, read-write or
/// non-directory binds are errors: the VM gets a copy of the source, and
/// writes to a copy would not reach the host.
pub(super) fn vm_volumes(
    mounts: &[Mount],
    rootfs: VmRootfs,
) -> Result<Vec<BindMount>, VmSandboxError> {
    BindMount::all(mounts)
        .into_iter()
        .map(|bind| {
            let refuse = |reason| VmSandboxError::Volume {
                host: bind.source.clone(),
                destination: bind.destination.clone(),
                reason,
            };
            if rootfs == VmRootfs::VirtioFs {
                return match std::fs::metadata(&bind.source) {
                    Ok(_) => Ok(bind),
                    Err(_) => Err(refuse("the source does not exist")),
                };
            }
            if pod_file(&bind).is_some() {
                return Ok(bind);
            }
            if !bind.read_only {
                return Err(refuse(
                    "read-write bind mounts need the virtio-fs share (vm_rootfs = \"virtio-fs\"); with vm_rootfs = \"block\" mount it read-only to get a copy",
                ));
            }
            if !bind.source.is_dir() {
                return Err(refuse(
                    "only directories can be bind-mounted into the VM (as a read-only disk)",
                ));
            }
            Ok(bind)
        })
        .collect()
}

/// Points `volume`'s entry of `mounts` at `guest`, its path in the guest's
/// virtio-fs share; the entry keeps its type and options (a bind, read-only
/// or not, as the container asked).
pub(super) fn mount_shared(
    mounts: &mut [Mount],
    volume: &BindMount,
    guest: &str,
) -> Result<(), VmSandboxError> {
    let mount = entry_of(mounts, volume)?;
    mount.set_source(Some(guest.into()));
    Ok(())
}

/// `volume`'s entry of `mounts`, if the spec still has it where it was.
fn entry_of<'m>(
    mounts: &'m mut [Mount],
    volume: &BindMount,
) -> Result<&'m mut Mount, VmSandboxError> {
    mounts
        .get_mut(volume.index)
        .filter(|mount| *mount.destination() == volume.destination)
        .ok_or_else(|| VmSandboxError::Volume {
            host: volume.source.clone(),
            destination: volume.destination.clone(),
            reason: "the spec's mounts changed after they were checked",
        })
}

/// A pod network file a container binds from the host (the CRI plugin's
/// `/etc/hosts` and `/etc/resolv.conf` of the pod): the guest gets a copy
/// at the same path (`ConfigureNetwork`), shared by the pod's containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PodFile {
    /// `/etc/hosts`.
    Hosts,
    /// `/etc/resolv.conf`.
    ResolvConf,
}

impl PodFile {
    /// Where the guest has it (and where the container sees it).
    pub(super) fn guest_path(self) -> &'static str {
        match self {
            PodFile::Hosts => "/etc/hosts",
            PodFile::ResolvConf => "/etc/resolv.conf",
        }
    }
}

/// Most bytes a pod file may have (the agent's bound).
pub(super) const POD_FILE_MAX_LEN: u64 = skiff_agent_proto::NET_FILE_MAX_LEN as u64;

/// Which pod file `bind` is: a regular file bound at `/etc/hosts` or
/// `/etc/resolv.conf`.
pub(super) fn pod_file(bind: &BindMount) -> Option<PodFile> {
    let file = match bind.destination.to_str()? {
        "/etc/hosts" => PodFile::Hosts,
        "/etc/resolv.conf" => PodFile::ResolvConf,
        _ => return None,
    };
    bind.source.is_file().then_some(file)
}

/// Points `mounts`' entry for the pod file `volume` at the guest's copy,
/// read-only (a container's writes would reach no one).
pub(super) fn mount_guest_file(
    mounts: &mut [Mount],
    volume: &BindMount,
    file: PodFile,
) -> Result<(), VmSandboxError> {
    let mount = entry_of(mounts, volume)?;
    mount.set_typ(Some("bind".into()));
    mount.set_source(Some(file.guest_path().into()));
    mount.set_options(Some(vec!["rbind".into(), "ro".into()]));
    Ok(())
}

pub(super) fn mount_disk(
    mounts: &mut [Mount],
    volume: &BindMount,
    device: &str,
) -> Result<(), VmSandboxError> {
    let mount = entry_of(mounts, volume)?;
    let options = std::iter::once("ro".to_owned())
        .chain(
            volume
                .options
                .iter()
                .filter(|o| KEPT_MOUNT_OPTIONS.contains(&o.as_str()))
                .cloned(),
        )
        .collect();
    mount.set_typ(Some("ext4".into()));
    mount.set_source(Some(device.into()));
    mount.set_options(Some(options));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The block mode's checks (what most tests here are about).
    fn vm_volumes(mounts: &[Mount]) -> Result<Vec<BindMount>, VmSandboxError> {
        super::vm_volumes(mounts, VmRootfs::Block)
    }

    #[test]
    fn with_virtio_fs_every_existing_bind_is_served_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().to_str().unwrap();
        let file = dir.path().join("termination-log");
        std::fs::write(&file, b"").unwrap();
        let fs = |m: &[Mount]| super::vm_volumes(m, VmRootfs::VirtioFs);
        for opts in [&["rbind", "rw"][..], &["rbind", "ro"]] {
            assert_eq!(fs(&spec_with("bind", src, opts)).unwrap().len(), 1);
            let mut spec = spec_with("bind", file.to_str().unwrap(), opts);
            let volumes = fs(&spec).unwrap();
            mount_shared(&mut spec, &volumes[0], "/run/skiff/shared/e4").unwrap();
            let m = &spec[1];
            assert_eq!(
                m.source().as_deref(),
                Some(Path::new("/run/skiff/shared/e4"))
            );
            assert_eq!(m.typ().as_deref(), Some("bind"));
            // The container's own options stay: read-only stays read-only.
            let want: Vec<String> = opts.iter().map(|o| o.to_string()).collect();
            assert_eq!(m.options().clone().unwrap(), want);
        }
        let err = fs(&spec_with("bind", "/nonexistent/v", &["rbind", "rw"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        let mut other = oci_spec::runtime::get_default_mounts();
        let volumes = fs(&spec_with("bind", src, &["rbind"])).unwrap();
        assert!(mount_shared(&mut other, &volumes[0], "/run/skiff/shared/e0").is_err());
    }

    fn spec_with(ty: &str, source: &str, opts: &[&str]) -> Vec<Mount> {
        serde_json::from_value(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/v", "type": ty, "source": source, "options": opts},
        ]))
        .unwrap()
    }

    #[test]
    fn only_read_only_directory_binds_go_to_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().to_str().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(vm_volumes(&spec_with("tmpfs", "tmpfs", &["ro"]))
            .unwrap()
            .is_empty());
        let volumes = vm_volumes(&spec_with("bind", src, &["rbind", "ro"])).unwrap();
        assert_eq!(volumes.len(), 1);
        assert_eq!(volumes[0].source, dir.path());
        assert_eq!(volumes[0].destination.to_str(), Some("/v"));
        // containerd's style: type "none" with a bind option.
        assert_eq!(
            vm_volumes(&spec_with("none", src, &["ro", "rbind"]))
                .unwrap()
                .len(),
            1
        );
        for opts in [&["rbind"][..], &["rbind", "rw"], &["ro", "bind", "rw"]] {
            let err = vm_volumes(&spec_with("bind", src, opts))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("read-write bind mounts need the virtio-fs share"),
                "{opts:?}: {err}"
            );
            assert!(
                err.contains(&format!("cannot bind-mount {src} at /v")),
                "{err}"
            );
        }
        let err = vm_volumes(&spec_with("bind", file.to_str().unwrap(), &["ro", "bind"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("only directories"), "{err}");
        let err = vm_volumes(&spec_with("bind", "/nonexistent/v", &["ro", "bind"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("only directories"), "{err}");
    }

    #[test]
    fn the_pods_hosts_and_resolv_conf_files_become_the_guests() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts");
        std::fs::write(&file, b"127.0.0.1 localhost\n").unwrap();
        let src = file.to_str().unwrap();
        let mounts = |dst: &str, opts: &[&str]| -> Vec<Mount> {
            serde_json::from_value(serde_json::json!([
                {"destination": dst, "type": "bind", "source": src, "options": opts},
            ]))
            .unwrap()
        };
        // Read-write as the CRI plugin binds them, or read-only.
        for (dst, want) in [
            ("/etc/hosts", PodFile::Hosts),
            ("/etc/resolv.conf", PodFile::ResolvConf),
        ] {
            for opts in [&["rbind", "rw"][..], &["rbind", "ro"]] {
                let mut spec = mounts(dst, opts);
                let volumes = vm_volumes(&spec).unwrap();
                assert_eq!(pod_file(&volumes[0]), Some(want));
                mount_guest_file(&mut spec, &volumes[0], want).unwrap();
                let m = &spec[0];
                assert_eq!(m.source().as_deref(), Some(Path::new(dst)));
                assert_eq!(m.typ().as_deref(), Some("bind"));
                assert_eq!(
                    m.options().clone().unwrap(),
                    ["rbind".to_owned(), "ro".to_owned()]
                );
            }
        }
        // Any other file, or a directory at /etc/hosts, is no pod file.
        let err = vm_volumes(&mounts("/etc/hostname", &["rbind", "rw"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("read-write bind mounts need"), "{err}");
        let dir_src = dir.path().to_str().unwrap();
        let as_dir: Vec<Mount> = serde_json::from_value(serde_json::json!([
            {"destination": "/etc/hosts", "type": "bind", "source": dir_src,
             "options": ["rbind", "ro"]},
        ]))
        .unwrap();
        assert_eq!(pod_file(&vm_volumes(&as_dir).unwrap()[0]), None);
    }

    #[test]
    fn a_volume_becomes_a_read_only_disk_mount() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().to_str().unwrap();
        let mut spec = spec_with("bind", src, &["rbind", "ro", "nosuid", "rprivate"]);
        let volumes = vm_volumes(&spec).unwrap();
        mount_disk(&mut spec, &volumes[0], "/dev/vdb").unwrap();
        let mount = &spec[1];
        assert_eq!(mount.typ().as_deref(), Some("ext4"));
        assert_eq!(mount.source().as_deref(), Some("/dev/vdb".as_ref()));
        assert_eq!(
            mount.options().as_deref(),
            Some(&["ro".into(), "nosuid".into()][..])
        );
        // Another spec's volume does not fit this one.
        let mut other = oci_spec::runtime::get_default_mounts();
        assert!(mount_disk(&mut other, &volumes[0], "/dev/vdb").is_err());
    }
}
