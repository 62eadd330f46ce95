//! Replacing a guest file atomically (`/etc/machine-id`, `/etc/hosts`,
//! `/etc/resolv.conf`).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Replaces the file at `path` with `contents`, mode `mode` exactly: written
/// to `<name>.skiff-new` in the same directory (which must exist), synced,
/// then renamed over `path`, so a reader sees the old file or the new one,
/// never a partial one. On an error the temporary file is removed, and the
/// path that failed comes back with the cause.
pub fn replace_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), (PathBuf, std::io::Error)> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".skiff-new");
    let tmp = path.with_file_name(tmp_name);
    // A leftover from an interrupted call would make create_new fail.
    match std::fs::remove_file(&tmp) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err((tmp, err)),
        _ => {}
    }
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_CLOEXEC)
        .open(&tmp)
        .and_then(|mut file| {
            // The umask may have taken bits off.
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            file.write_all(contents)?;
            file.sync_all()
        });
    if let Err(err) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err((tmp, err));
    }
    std::fs::rename(&tmp, path).map_err(|err| {
        let _ = std::fs::remove_file(&tmp);
        (path.to_owned(), err)
    })
}
