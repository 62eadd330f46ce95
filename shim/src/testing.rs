//! Helpers for tests and benchmarks that run containers in real sandboxes:
//! a busybox rootfs, the static `skiff-vsock-probe` (guest-image/vsock-probe)
//! and its host-side client over hybrid vsock.
//!
//! Only built for tests and with the `test-utils` feature.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::vmm::vsock_connect;

/// Debian's static busybox (busybox-static).
pub const BUSYBOX: &str = "/bin/busybox";
/// The port the probe container serves in tests and benchmarks.
pub const PROBE_PORT: u32 = 1025;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
}

/// Builds the static `skiff-vsock-probe` and returns its path. Same target
/// dir, triple and `crt-static` flag as guest-image/initramfs/agent-build.sh.
pub fn probe_binary() -> Result<PathBuf, String> {
    let root = repo_root();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "-q",
            "--release",
            "--locked",
            "-p",
            "skiff-vsock-probe",
        ])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(&root)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building skiff-vsock-probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release/skiff-vsock-probe"))
}

/// A minimal rootfs at `root`: busybox with `applets`, `/etc/passwd`, and
/// `probe` copied to `/bin/skiff-vsock-probe` if given.
pub fn busybox_rootfs(root: &Path, applets: &[&str], probe: Option<&Path>) -> std::io::Result<()> {
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox"))?;
    for applet in applets {
        symlink("busybox", root.join("bin").join(applet))?;
    }
    if let Some(probe) = probe {
        std::fs::copy(probe, root.join("bin/skiff-vsock-probe"))?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
}

/// The byte at `offset` of the probe's SOURCE stream.
pub fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 9)) as u8
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Connects to the probe through the VM's hybrid vsock socket `uds`,
/// retrying until `within` has passed (the container may still start).
pub fn probe_connect(uds: &Path, within: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + within;
    loop {
        match vsock_connect(uds, PROBE_PORT, Duration::from_secs(10)) {
            Ok(s) => return Ok(s),
            Err(err) if Instant::now() >= deadline => return Err(err),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// Host → guest: sends `data` (SINK) and returns the guest's answer
/// (`<bytes> <sha256>`) and the time from first byte to answer.
pub fn probe_sink(stream: UnixStream, data: &[u8]) -> std::io::Result<(String, Duration)> {
    let mut s = stream;
    let t = Instant::now();
    s.write_all(b"SINK\n")?;
    s.write_all(data)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer)?;
    Ok((answer.trim().to_owned(), t.elapsed()))
}

/// What a correct SINK answer for `data` is.
pub fn sink_answer(data: &[u8]) -> String {
    format!("{} {}", data.len(), hex(&Sha256::digest(data)))
}

/// Guest → host: asks for `len` bytes (SOURCE); returns them and the time
/// from request to EOF.
pub fn probe_source(stream: UnixStream, len: u64) -> std::io::Result<(Vec<u8>, Duration)> {
    let mut s = stream;
    let t = Instant::now();
    s.write_all(format!("SOURCE {len}\n").as_bytes())?;
    let mut got = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    s.read_to_end(&mut got)?;
    Ok((got, t.elapsed()))
}

/// Whether `got` is exactly the first `len` bytes of the SOURCE pattern.
pub fn source_matches(got: &[u8], len: u64) -> bool {
    got.len() as u64 == len && got.iter().enumerate().all(|(i, b)| *b == pattern(i as u64))
}

/// Both ways on one connection (ECHO): returns what came back.
pub fn probe_echo(stream: UnixStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut w = stream.try_clone()?;
    let sent = data.to_vec();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(b"ECHO\n")?;
        w.write_all(&sent)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut got = Vec::new();
    (&stream).read_to_end(&mut got)?;
    writer
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
    Ok(got)
}

/// An OCI spec (JSON) running `args` with `PATH=/bin`, writable root.
pub fn spec_json(args: &[&str]) -> Vec<u8> {
    let mut spec = oci_spec::runtime::Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    process.set_env(Some(vec!["PATH=/bin".into(), "HOME=/root".into()]));
    spec.set_process(Some(process));
    if let Some(mut root) = spec.root().clone() {
        root.set_readonly(Some(false));
        spec.set_root(Some(root));
    }
    serde_json::to_vec(&spec).unwrap_or_default()
}

/// The guest kernel and agent initramfs for tests that boot the `vm`
/// handler: `SKIFF_TEST_KERNEL` and `SKIFF_TEST_AGENT_INITRD` (scripts/test
/// builds and sets both). Without them: `None` after saying why, or a
/// panic under `CI=true`, which must have them.
pub fn vm_artifacts() -> Option<(PathBuf, PathBuf)> {
    let k = std::env::var_os("SKIFF_TEST_KERNEL");
    let i = std::env::var_os("SKIFF_TEST_AGENT_INITRD");
    match (k, i) {
        (Some(k), Some(i)) => Some((k.into(), i.into())),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must set SKIFF_TEST_KERNEL and SKIFF_TEST_AGENT_INITRD (scripts/test does)"
            );
            eprintln!(
                "skipped: SKIFF_TEST_KERNEL / SKIFF_TEST_AGENT_INITRD not set (run scripts/test)"
            );
            None
        }
    }
}
