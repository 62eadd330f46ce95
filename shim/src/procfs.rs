//! What `/proc` says about a process the shim did not necessarily start
//! (a dead shim's agent, a shim that is exiting).

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

#[cfg(test)]
mod tests {
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
