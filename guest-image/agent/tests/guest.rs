//! End-to-end tests of what the agent does for the micro-VM, run on the
//! host (root only): listening on vsock, and a container rootfs on a block
//! device (a loop device here, `/dev/vda` in the guest).

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{code_of, ctx, skip, spec, Agent, Rootfs};
use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, VsockAddr};
use skiff_agent_proto::agent as pb;
use skiff_agent_proto::agent_ttrpc::AgentClient;

/// VMADDR_CID_LOCAL: the local host, served by the `vsock_loopback` transport.
const CID_LOCAL: u32 = 1;

/// Kills and reaps the agent when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Binds an AF_VSOCK stream socket to `port` on any CID.
fn bind_vsock(port: u32) -> nix::Result<std::os::fd::OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    Ok(fd)
}

/// A vsock port nobody has bound.
fn free_vsock_port() -> u32 {
    (0..100)
        .map(|i| 40_000 + (std::process::id() % 10_000) * 2 + i)
        .find(|&port| bind_vsock(port).is_ok())
        .expect("no free vsock port")
}

#[test]
fn listens_on_vsock() {
    if skip() {
        return;
    }
    if let Err(err) = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        eprintln!("skipped: this kernel has no AF_VSOCK ({err})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_vsock_port();
    let mut child = Command::new(common::agent_binary())
        .arg("--listen")
        .arg(format!("vsock://{port}"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--cgroup-parent")
        .arg(format!("/skiff-test-vsock-{}", std::process::id()))
        .arg("--rootfs-mount-dir")
        .arg(dir.path().join("rootfs-mounts"))
        .arg("--log-level")
        .arg("info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let agent = Running(child);

    // Readiness: the agent logs "serving on vsock://<port>" once listening.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("agent: {line}");
            if line.contains("serving on") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the agent did not report listening on vsock");
    assert!(
        line.ends_with(&format!("serving on vsock://{port}")),
        "{line}"
    );

    // The port is taken: the agent holds a vsock listener on it.
    let err = bind_vsock(port).unwrap_err();
    assert_eq!(err, nix::errno::Errno::EADDRINUSE);

    // A connection over vsock needs a transport that reaches this host's
    // own CID: vsock_loopback (VMADDR_CID_LOCAL).
    if !Path::new("/sys/module/vsock_loopback").exists() {
        eprintln!(
            "skipped the Health call over vsock: the vsock_loopback module is not \
             loaded (and this kernel has no modules to load); binding was checked"
        );
        return;
    }
    let client = ttrpc::Client::connect(&format!("vsock://{CID_LOCAL}:{port}")).unwrap();
    let client = AgentClient::new(client);
    let health = client.health(ctx(), &pb::Empty::new()).unwrap();
    assert_eq!(health.status, "SERVING");
    drop(agent);
}

/// A loop device over a file; detached when dropped.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(image: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {out:?}");
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Self { path }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

fn tool_missing(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipped: {tool} missing (apt-get install -y e2fsprogs mount)");
    }
    !found
}

fn mounted(target: &Path) -> bool {
    let target = target.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(target.as_str()))
}

#[test]
fn rootfs_on_a_block_device() {
    if skip() || tool_missing("mkfs.ext4") || tool_missing("losetup") {
        return;
    }
    if !Path::new("/dev/loop-control").exists() {
        eprintln!("skipped: no loop devices (/dev/loop-control)");
        return;
    }
    let rootfs = Rootfs::new();
    std::fs::write(rootfs.path().join("etc/from-disk"), "on the disk\n").unwrap();
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("rootfs.ext4");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(rootfs.path())
        .arg(&image)
        .status()
        .unwrap();
    assert!(status.success());
    let disk = LoopDevice::attach(&image);

    let agent = Agent::start();
    let target = agent.rootfs_mount_dir().join("disk");
    let spec_ = spec(&["sh", "-c", "cat /etc/from-disk; echo written > /etc/new"]);
    agent.create("disk", &spec_, &disk.path, false, false);
    assert!(mounted(&target), "{target:?} is not mounted");
    agent.start_container("disk");
    let out = agent.read_all("disk", "", false);
    assert_eq!(agent.wait("disk", ""), 0);
    assert_eq!(String::from_utf8_lossy(&out), "on the disk\n");
    // The container wrote to the file system on the device.
    assert_eq!(
        std::fs::read_to_string(target.join("etc/new")).unwrap(),
        "written\n"
    );
    agent.remove("disk");
    assert!(!mounted(&target), "{target:?} is still mounted");
    assert!(!target.exists());

    // A device without a file system: INTERNAL, naming the device, and
    // nothing is left mounted or created.
    let blank_image = images.path().join("blank.img");
    std::fs::write(&blank_image, vec![0u8; 1 << 20]).unwrap();
    let blank = LoopDevice::attach(&blank_image);
    let err = agent
        .try_create(
            "blank",
            &common::spec_json(&spec_),
            &blank.path,
            false,
            false,
        )
        .unwrap_err();
    assert_eq!(code_of(&err), ttrpc::Code::INTERNAL, "{err:?}");
    assert!(
        format!("{err:?}").contains(&blank.path.display().to_string()),
        "{err:?}"
    );
    assert!(!agent.rootfs_mount_dir().join("blank").exists());
    // The id is free again.
    agent.create("blank", &spec_, rootfs.path(), false, false);
    agent.remove("blank");
}
