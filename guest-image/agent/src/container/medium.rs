//! Waiting for a disk's medium: a disk the host attaches to a running VM
//! appears in the guest empty first.

use std::path::Path;

use skiff_agent_proto::{disk_serial, DISK_SERIAL_PREFIX};

use super::error::ContainerError;

/// Where the kernel lists block devices.
pub(super) const SYS_BLOCK: &str = "/sys/class/block";
/// Bound on a hot-attached disk's medium showing up in the guest.
pub(super) const DISK_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits until the block device `device` has a medium: the host attaches
/// a container's disk to a running VM by filling an empty virtio-blk slot,
/// and the guest driver learns the new size from a configuration change
/// it handles asynchronously. A skiff disk also reports its name as its
/// serial (`skiff-vdb` for `vdb`); another serial means the guest named
/// the disks differently from the host, and the wrong disk would be
/// mounted. Devices `sys_block` does not list are not waited for.
pub(super) fn wait_for_medium(
    sys_block: &Path,
    device: &Path,
    timeout: std::time::Duration,
) -> Result<(), ContainerError> {
    let Some(name) = device.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    let dir = sys_block.join(name);
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(serial) = std::fs::read_to_string(dir.join("serial")) {
        let serial = serial.trim_end_matches(['\n', '\0']);
        if serial.starts_with(DISK_SERIAL_PREFIX) && serial != disk_serial(name) {
            return Err(ContainerError::DiskMismatch {
                device: device.to_owned(),
                serial: serial.to_owned(),
            });
        }
    }
    let start = std::time::Instant::now();
    loop {
        let sectors = std::fs::read_to_string(dir.join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if sectors > 0 {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(ContainerError::DiskNotReady {
                device: device.to_owned(),
                timeout,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub(super) fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fake_disk(sys: &Path, name: &str, serial: Option<&str>, size: &str) {
        let dir = sys.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("size"), size).unwrap();
        if let Some(serial) = serial {
            std::fs::write(dir.join("serial"), serial).unwrap();
        }
    }

    #[test]
    fn medium_wait_checks_size_and_serial() {
        let sys = tempfile::tempdir().unwrap();
        let sys = sys.path();
        fake_disk(sys, "vdb", Some("skiff-vdb\n"), "2048\n");
        wait_for_medium(sys, Path::new("/dev/vdb"), Duration::ZERO).unwrap();

        // Unknown to sysfs (a host directory's device, say): no wait.
        wait_for_medium(sys, Path::new("/dev/sdz"), Duration::ZERO).unwrap();

        // Another skiff disk than the name says: refused.
        fake_disk(sys, "vdc", Some("skiff-vdd"), "2048\n");
        let err = wait_for_medium(sys, Path::new("/dev/vdc"), Duration::ZERO).unwrap_err();
        assert!(
            matches!(err, ContainerError::DiskMismatch { ref serial, .. } if serial == "skiff-vdd"),
            "{err}"
        );

        // Empty slot: waits for the bound, then says so.
        fake_disk(sys, "vde", Some("skiff-vde"), "0\n");
        let t = std::time::Instant::now();
        let err =
            wait_for_medium(sys, Path::new("/dev/vde"), Duration::from_millis(100)).unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(
            err.to_string().contains("got no medium within 100ms"),
            "{err}"
        );

        // The medium arrives while waiting.
        let size = sys.join("vde/size");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(size, "4096\n").unwrap();
        });
        wait_for_medium(sys, Path::new("/dev/vde"), Duration::from_secs(10)).unwrap();
        writer.join().unwrap();
    }
}
