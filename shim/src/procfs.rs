//! What `/proc` says about a process the shim did not necessarily start
//! (a dead shim's agent, a shim that is exiting), and about the shim's
//! mounts.

use std::path::{Path, PathBuf};

/// Whether `pid` is gone or a zombie (exited, not yet reaped: as good as
/// gone).
pub fn has_exited(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Whether `pid` still runs and runs the program `name` (its argv\[0\]
/// ends with it), so a recorded pid that was reused is not mistaken for it.
pub fn runs(pid: i32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    cmdline
        .split(|b| *b == 0)
        .next()
        .is_some_and(|argv0| argv0.ends_with(name.as_bytes()))
        && !has_exited(pid)
}

/// A `/proc/self/mountinfo` path field with its escapes (space, tab,
/// newline and backslash as `\ooo`) undone.
pub fn unescape_mountinfo(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = field
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount point in this process's mount namespace (empty if
/// `/proc/self/mountinfo` cannot be read).
pub fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| parse_mount_points(&info))
        .unwrap_or_default()
}

/// The mount points (field 5) of a mountinfo text.
fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect()
}

/// The mount points strictly under `dir` in this process's mount
/// namespace, deepest first (the order to unmount them in).
pub fn mount_points_under(dir: &Path) -> Vec<PathBuf> {
    under(mount_points(), dir)
}

fn under(points: Vec<PathBuf>, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = points
        .into_iter()
        .filter(|p| p != dir && p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    #[test]
    fn mount_points_under_a_dir_deepest_first() {
        let info = "1 0 8:1 / / rw - ext4 /dev/vda rw\n\
                    2 1 0:5 / /s rw - tmpfs t rw\n\
                    3 2 8:1 /x /s/shared rw - ext4 /dev/vda rw\n\
                    4 3 0:6 / /s/shared/a\\040b rw - overlay o rw\n\
                    5 1 0:7 / /sx rw - tmpfs t rw\n";
        let found = super::under(super::parse_mount_points(info), std::path::Path::new("/s"));
        assert_eq!(
            found,
            [
                std::path::PathBuf::from("/s/shared/a b"),
                "/s/shared".into()
            ]
        );
    }

    use super::*;

    #[test]
    fn a_running_child_then_a_zombie() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Until it has exec'd, the child runs this test binary.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !runs(pid, "sleep") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(runs(pid, "sleep"));
        assert!(!runs(pid, "containerd-shim-skiff-v2"));
        assert!(!has_exited(pid));
        child.kill().unwrap();
        // Not reaped yet: a zombie counts as gone.
        while !has_exited(pid) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!runs(pid, "sleep"));
        child.wait().unwrap();
        assert!(has_exited(pid));
    }
}
