//! A container's rootfs (or a volume's) directory as an ext4 image, the
//! contents of a guest disk.

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::VmSandboxError;
use crate::sandbox::state_dir::STATE_FILE_MODE;

/// Smallest image.
const MIN_IMAGE_BYTES: u64 = 16 << 20;
/// Free space added to the directory's size (plus a quarter of it) for the
/// container's writes. The image is sparse: only written blocks take host
/// disk (about 2 MiB of metadata for an empty GiB).
pub(super) const IMAGE_MARGIN_BYTES: u64 = 1 << 30;

/// `mkfs.ext4` on `$PATH`, `/sbin` or `/usr/sbin`.
pub(super) fn find_mkfs() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/sbin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("mkfs.ext4"))
        .find(|p| p.is_file())
}

/// The image of disk slot `slot`.
pub(super) fn image_path(state_dir: &Path, slot: usize) -> PathBuf {
    state_dir.join(format!("disk-{slot}.ext4"))
}

/// The image size for a directory of `used` bytes.
fn image_size(used: u64) -> u64 {
    let size = used + used / 4 + IMAGE_MARGIN_BYTES;
    // mkfs.ext4 sizes in whole 1 KiB blocks; round up to a MiB.
    size.max(MIN_IMAGE_BYTES).div_ceil(1 << 20) << 20
}

/// Builds `image` (ext4) from the directory `rootfs`; returns its size.
pub(super) fn build_image(rootfs: &Path, image: &Path) -> Result<u64, VmSandboxError> {
    let fail = |detail: String| VmSandboxError::Image {
        rootfs: rootfs.to_owned(),
        image: image.to_owned(),
        detail,
    };
    if !rootfs.is_dir() {
        return Err(fail("the rootfs is not a directory".into()));
    }
    let mkfs = find_mkfs().ok_or(VmSandboxError::NoMkfs)?;
    let du = Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(rootfs)
        .output()
        .map_err(|e| fail(format!("cannot run du: {e}")))?;
    if !du.status.success() {
        return Err(fail(format!(
            "du failed: {}",
            String::from_utf8_lossy(&du.stderr).trim()
        )));
    }
    let used: u64 = String::from_utf8_lossy(&du.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| fail("cannot parse du's output".into()))?;
    let size = image_size(used);
    let _ = std::fs::remove_file(image);
    let out = Command::new(&mkfs)
        // No journal: the image lives as long as the container, and a
        // journal would cost 32 MiB of writes per GiB at every start.
        .args(["-q", "-F", "-O", "^has_journal", "-d"])
        .arg(rootfs)
        .arg(image)
        .arg(format!("{}k", size >> 10))
        .output()
        .map_err(|e| fail(format!("cannot run {}: {e}", mkfs.display())))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{} exited with {}: {}",
            mkfs.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // mke2fs creates the file with the umask's mode: make it private.
    std::fs::set_permissions(image, Permissions::from_mode(STATE_FILE_MODE))
        .map_err(|e| fail(format!("cannot make the image private: {e}")))?;
    // mke2fs may drop a last, too small block group: report what it made.
    std::fs::metadata(image)
        .map(|m| m.len())
        .map_err(|e| fail(format!("the image is missing after mkfs: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_size_has_a_floor_and_a_margin() {
        assert_eq!(image_size(0), 1 << 30);
        assert_eq!(image_size(1 << 20), (1 << 30) + (2 << 20));
        assert_eq!(image_size(100 << 20), (1 << 30) + (125 << 20));
    }

    #[test]
    fn image_from_a_directory() {
        if find_mkfs().is_none() {
            eprintln!("skipped: mkfs.ext4 missing (apt-get install e2fsprogs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hello"), b"hi").unwrap();
        let image = dir.path().join("img");
        let size = build_image(&root, &image).unwrap();
        let meta = std::fs::metadata(&image).unwrap();
        assert_eq!(meta.len(), size);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(
            (IMAGE_MARGIN_BYTES - (64 << 20)..=image_size(1 << 20)).contains(&size),
            "{size}"
        );
        let err = build_image(&dir.path().join("nope"), &image)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a directory"), "{err}");
    }
}
