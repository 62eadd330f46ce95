//! The `vm` handler's default, `vm_rootfs = "virtio-fs"`, with a real
//! Linux guest, in one boot (a jailed VMM, as by default):
//!
//! - A container writes, renames, links, truncates, removes and makes
//!   directories in its rootfs and in a read-write volume; the host sees
//!   exactly those changes in the rootfs directory and the volume. A
//!   read-only volume refuses writes. A single-file bind at
//!   `/dev/termination-log`, written in the guest, is read back on the
//!   host.
//! - Escape attempts from the guest (symlinks to `/` and up the tree
//!   followed, `..` walks, a hard link across the share's entries, a
//!   directory swapped for a symlink to the outside while the container
//!   writes through its path) change nothing outside the share: a sentinel
//!   tree next to it is compared before and after. (The backend's own
//!   tests race renames against held nodes on the host, where the timing
//!   can be forced.)
//! - Two containers of the pod, each from its own rootfs, see each other's
//!   writes in a shared volume while both run.
//! - A scripted POSIX conformance suite on the share (`posix` below): every
//!   check prints PASS or FAIL, and all must pass.
//!
//! After the sandbox stops nothing is left mounted and every source is
//! intact. Needs `SKIFF_TEST_KERNEL` / `SKIFF_TEST_AGENT_INITRD` (set by
//! scripts/test); without them the test says so and returns, except under
//! CI.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use oci_spec::runtime::Spec;
use shim::config::Config;
use shim::sandbox::vm::{VmHandler, VmSandbox};
use shim::sandbox::{Sandbox, SandboxHandler, SandboxRequest};
use shim::testing::{busybox_rootfs, spec_json, vm_artifacts, BUSYBOX};
use shim::vmm::ExitReason;

/// Applets the containers use (symlinks to one busybox).
const APPLETS: &[&str] = &[
    "sh", "cat", "mv", "ln", "rm", "mkdir", "rmdir", "sleep", "ls", "chmod", "stat", "readlink",
    "sync", "touch", "wc", "dd", "truncate",
];

/// The exit status of a process killed by SIGSEGV (the known PVM guest
/// fault, when it hits a script's last command).
const SEGV_STATUS: u32 = 128 + 11;

/// A container started in `sandbox`: what [`finish`] needs.
struct Running {
    id: String,
    shared: Vec<PathBuf>,
    rootfs: PathBuf,
}

/// Creates and starts container `id` from `rootfs` running `script` (its
/// stderr to stdout) with `mounts` (OCI mount objects, bind sources on the
/// host) added to the default spec.
fn start(
    sandbox: &VmSandbox,
    id: &str,
    rootfs: &Path,
    mounts: &[serde_json::Value],
    script: &str,
) -> Running {
    let guest_rootfs = sandbox.share_path(rootfs).expect("the rootfs is shared");
    assert!(
        guest_rootfs.starts_with("/run/skiff/shared/"),
        "{guest_rootfs}"
    );
    let mut spec: serde_json::Value = serde_json::from_slice(&spec_json(&[
        "/bin/sh",
        "-c",
        &format!("exec 2>&1; {script}"),
    ]))
    .unwrap();
    let list = spec["mounts"].as_array_mut().expect("spec_json has mounts");
    list.extend(mounts.iter().cloned());
    let mut spec: Spec = serde_json::from_value(spec).unwrap();
    let list = spec.mounts_mut().get_or_insert_with(Vec::new);
    let volumes = VmHandler::default()
        .volumes(list)
        .expect("virtio-fs serves every bind");
    let shared = sandbox
        .share_volumes(list, &volumes)
        .expect("volumes shared");
    for (mount, volume) in volumes.iter().map(|v| (&list[v.index], v)) {
        let source = mount.source().as_ref().unwrap().display().to_string();
        assert!(
            source.starts_with("/run/skiff/shared/"),
            "{} → {source}",
            volume.source.display()
        );
    }
    let agent = sandbox.agent();
    agent
        .create_container(
            id,
            serde_json::to_vec(&spec).unwrap(),
            &guest_rootfs,
            false,
            false,
        )
        .unwrap_or_else(|e| panic!("CreateContainer {id}: {e}"));
    agent.start_container(id).expect("StartContainer");
    Running {
        id: id.to_owned(),
        shared,
        rootfs: rootfs.to_owned(),
    }
}

/// Waits for `c` to end; its exit status and output. Removes it and
/// unshares what it shared.
fn finish(sandbox: &VmSandbox, c: Running) -> (u32, String) {
    let agent = sandbox.agent();
    let mut out = Vec::new();
    loop {
        match agent.read_stream(&c.id, "", false) {
            Ok(chunk) => {
                out.extend_from_slice(&chunk.data);
                if chunk.eof {
                    break;
                }
            }
            Err(err) if err.is_timeout() => continue,
            Err(err) => panic!("ReadStdout {}: {err}", c.id),
        }
    }
    let status = loop {
        match agent.wait_process(&c.id, "") {
            Ok(status) => break status.status,
            Err(err) if err.is_timeout() => continue,
            Err(err) => panic!("WaitProcess {}: {err}", c.id),
        }
    };
    agent.remove_container(&c.id).expect("RemoveContainer");
    for path in c.shared.iter().chain([&c.rootfs]) {
        sandbox.unshare_path(path).expect("unshared");
    }
    (status, String::from_utf8_lossy(&out).into_owned())
}

/// A bind mount object.
fn bind(source: &Path, destination: &str, opts: &[&str]) -> serde_json::Value {
    serde_json::json!({"destination": destination, "type": "bind",
        "source": source, "options": opts})
}

/// Every path under `dir` (not following symlinks) with its kind, size,
/// mode, link count, mtime and content (files) or target (symlinks).
fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&path).unwrap().display())
            } else if m.is_dir() {
                stack.push(path.clone());
                "dir".to_owned()
            } else {
                String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned()
            };
            let rel = path.strip_prefix(dir).unwrap().to_owned();
            out.insert(
                rel,
                format!(
                    "{what} size={} mode={:o} nlink={} mtime={}.{}",
                    m.len(),
                    m.mode(),
                    m.nlink(),
                    m.mtime(),
                    m.mtime_nsec()
                ),
            );
        }
    }
    out
}

/// `out` without the shell's reports of the known PVM guest fault (a
/// process killed by a stale page: guest-image/README.md), which are
/// printed; the files the scripts leave are checked on the host anyway.
fn without_known_fault(what: &str, out: &str) -> String {
    let kept: Vec<&str> = out
        .lines()
        .filter(|l| !l.ends_with("Segmentation fault"))
        .collect();
    if kept.len() != out.lines().count() {
        eprintln!("{what}: known PVM guest fault (guest-image/README.md) in {out:?}");
    }
    kept.join("\n")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The writer's script: rootfs, read-write volume `/vol`, read-only
/// `/ro`, the termination log, and the escape attempts.
const WRITER: &str = "\
echo a > /new && mv /new /renamed && ln /renamed /linked && echo 12345 > /trunc && \
truncate -s 2 /trunc && rm /gone && mkdir /dir && rmdir /dir2 && \
echo b > /vol/new && mv /vol/new /vol/renamed && ln /vol/renamed /vol/linked && \
echo 12345 > /vol/trunc && truncate -s 3 /vol/trunc && rm /vol/v-gone && mkdir /vol/dir && \
echo written-ok; \
echo x > /ro/x && echo RO-WRITABLE; \
echo terminated > /dev/termination-log; \
ln -s / /vol/rootlink; ln -s ../../../outside /vol/uplink; \
echo evil > /vol/uplink/sentinel && echo UPLINK-WRITE; \
echo evil > /vol/rootlink/evil-in-guest-root; \
cat /vol/../../../outside/sentinel && echo DOTDOT-READ; \
ln /renamed /vol/cross && echo CROSS-LINK; \
mkdir /vol/race; i=0; while [ $i -lt 3 ]; do \
  mv /vol/race /vol/race.d; ln -s ../../../outside /vol/race; echo x > /vol/race/f$i; \
  rm /vol/race; mv /vol/race.d /vol/race; i=$((i+1)); done; \
echo escapes-done";

/// A POSIX conformance suite in shell: each check prints `PASS name` or
/// `FAIL name`; run in a directory of the share.
const POSIX: &str = r#"
cd /vol/posix || exit 9
t() { if eval "$2"; then echo "PASS $1"; else echo "FAIL $1"; fi; }
t create-write-read 'echo hello > f && [ "$(cat f)" = hello ]'
t append 'echo more >> f && [ "$(wc -l < f)" -eq 2 ]'
t rename-replaces 'echo new > g && mv g f && [ "$(cat f)" = new ] && [ ! -e g ]'
t hardlink-count 'ln f h && [ "$(stat -c %h f)" -eq 2 ] && rm h && [ "$(stat -c %h f)" -eq 1 ]'
t symlink-readlink 'ln -s target s && [ "$(readlink s)" = target ] && [ ! -e s ] && rm s'
t chmod-mode 'chmod 0640 f && [ "$(stat -c %a f)" = 640 ]'
t truncate-grow-shrink 'truncate -s 10000 f && [ "$(stat -c %s f)" -eq 10000 ] && truncate -s 1 f && [ "$(stat -c %s f)" -eq 1 ]'
t mkdir-exists-fails 'mkdir d && ! mkdir d 2>/dev/null'
t rmdir-nonempty-fails 'touch d/x && ! rmdir d 2>/dev/null && rm d/x && rmdir d'
t unlink-dir-fails 'mkdir e && ! rm e 2>/dev/null && rmdir e'
t rename-dir 'mkdir a && touch a/in && mv a b && [ -e b/in ] && [ ! -e a ] && rm -r b'
t name-255 'n=$(printf "%0255d" 0) && touch "$n" && [ -e "$n" ] && rm "$n"'
t name-256-fails '! touch "$(printf "%0256d" 0)" 2>/dev/null'
t dd-offset-write 'dd if=/dev/zero of=z bs=4096 count=3 2>/dev/null && [ "$(stat -c %s z)" -eq 12288 ] && echo Q | dd of=z bs=1 seek=5000 conv=notrunc 2>/dev/null && [ "$(stat -c %s z)" -eq 12288 ]'
t listdir 'ls > /dev/null && [ "$(ls | wc -l)" -ge 2 ]'
t unlink-open-file 'echo keep > u && exec 3<u && rm u && [ "$(cat <&3)" = keep ] && exec 3<&-'
t sync 'sync'
echo posix-done
"#;

#[test]
fn virtio_fs_share_with_a_real_guest() {
    let Some((kernel, initrd)) = vm_artifacts() else {
        return;
    };
    assert!(
        Path::new(BUSYBOX).exists(),
        "needs {BUSYBOX} (busybox-static)"
    );
    let t0 = Instant::now();
    // On the root file system, not /tmp (a tmpfs here has no user xattrs
    // and other behaviour of its own).
    let dir = tempfile::Builder::new()
        .prefix("skiff-vm-virtiofs-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path();
    let config = Config {
        kernel: Some(kernel),
        initrd: Some(initrd),
        memory_mib: 256,
        template: false,
        ..Config::default()
    };

    // The host side: two rootfs, volumes, a termination log, and a
    // sentinel tree outside everything shared.
    let (r1, r2, r3) = (d.join("r1"), d.join("r2"), d.join("r3"));
    for r in [&r1, &r2, &r3] {
        busybox_rootfs(r, APPLETS, None).unwrap();
        for sub in ["vol", "ro"] {
            std::fs::create_dir_all(r.join(sub)).unwrap();
        }
    }
    let (vol, ro, shared_vol) = (d.join("vol"), d.join("ro"), d.join("shared-vol"));
    for v in [&vol, &ro, &shared_vol] {
        std::fs::create_dir(v).unwrap();
    }
    std::fs::write(ro.join("data"), b"ro\n").unwrap();
    let tlog = d.join("termination-log");
    std::fs::write(&tlog, b"").unwrap();
    let outside = d.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("sentinel"), b"keep\n").unwrap();
    let outside_before = tree(&outside);
    let ro_before = tree(&ro);

    let sandbox = VmHandler::with_vmm_exe(env!("CARGO_BIN_EXE_skiff"))
        .start_vm(&SandboxRequest {
            id: "vm-virtiofs",
            state_dir: &d.join("state"),
            hostname: "fsvm",
            rootfs: &r1,
            cgroups_path: None,
            netns: None,
            size: shim::sandbox::PodSize::default(),
            config: &config,
            ready_timeout: config.vm_ready_timeout(),
        })
        .unwrap_or_else(|e| panic!("the sandbox starts: {e:#?}"));
    assert!(sandbox.has_share());
    // The jailed VMM serving the share: uid 0 with the file server's
    // capabilities only, every thread filtered, the share served by its
    // own `vmm-fs` thread.
    let vmm = sandbox.vmm_pid().expect("a jailed VMM");
    let status = read(Path::new(&format!("/proc/{vmm}/status")));
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let fs_caps = format!("{:016x}", (1u64 << 27) | 0xdf);
    assert_eq!(field("CapEff"), fs_caps, "{status}");
    assert_eq!(field("CapBnd"), fs_caps, "{status}");
    assert_eq!(field("Uid"), "0\t0\t0\t0", "{status}");
    assert_eq!(field("NoNewPrivs"), "1", "{status}");
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{vmm}/task")).unwrap() {
        let task = task.unwrap().path();
        names.push(read(&task.join("comm")).trim().to_owned());
        assert!(
            read(&task.join("status")).contains("Seccomp:\t2"),
            "{}",
            task.display()
        );
    }
    assert!(names.iter().any(|n| n == "vmm-fs"), "{names:?}");
    eprintln!(
        "[{:6.1}s] agent answered {:.1} s after VM start",
        t0.elapsed().as_secs_f64(),
        sandbox.ready_after().as_secs_f64()
    );

    // The writer: from the same starting files each attempt; one that a
    // known PVM guest fault broke is run again (up to three in all).
    let reset = || {
        for root in [&r1, &vol] {
            for f in [
                "renamed", "linked", "trunc", "new", "rootlink", "uplink", "race.d", "cross",
            ] {
                let _ = std::fs::remove_file(root.join(f));
            }
            for d in ["dir", "race"] {
                let _ = std::fs::remove_dir_all(root.join(d));
            }
        }
        let _ = std::fs::remove_file(r1.join("evil-in-guest-root"));
        std::fs::write(r1.join("gone"), b"gone").unwrap();
        std::fs::create_dir_all(r1.join("dir2")).unwrap();
        std::fs::write(vol.join("v-gone"), b"v").unwrap();
        std::fs::write(&tlog, b"").unwrap();
    };
    let mut attempt = 0;
    let (status, out) = loop {
        attempt += 1;
        reset();
        let writer = start(
            &sandbox,
            &format!("writer{attempt}"),
            &r1,
            &[
                bind(&vol, "/vol", &["rbind", "rw"]),
                bind(&ro, "/ro", &["rbind", "ro"]),
                bind(&tlog, "/dev/termination-log", &["rbind", "rw"]),
            ],
            WRITER,
        );
        let (status, out) = finish(&sandbox, writer);
        if (out.contains("Segmentation fault") || status == SEGV_STATUS) && attempt < 3 {
            eprintln!("writer: known PVM guest fault (guest-image/README.md), again: {out}");
            continue;
        }
        break (status, out);
    };
    eprintln!(
        "[{:6.1}s] writer: status {status}: {out}",
        t0.elapsed().as_secs_f64()
    );
    assert!(out.contains("written-ok"), "{out}");
    assert!(out.contains("escapes-done"), "{out}");
    for bad in [
        "RO-WRITABLE",
        "UPLINK-WRITE",
        "DOTDOT-READ",
        "CROSS-LINK",
        "keep",
    ] {
        assert!(!out.contains(bad), "{bad}: {out}");
    }
    // The rootfs on the host: exactly the writer's changes.
    for (root, content, trunc) in [(&r1, "a\n", 2), (&vol, "b\n", 3)] {
        assert_eq!(read(&root.join("renamed")), content);
        let (a, b) = (
            std::fs::metadata(root.join("renamed")).unwrap(),
            std::fs::metadata(root.join("linked")).unwrap(),
        );
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "a hard link");
        assert_eq!(std::fs::metadata(root.join("trunc")).unwrap().len(), trunc);
        assert!(root.join("dir").is_dir());
        assert!(!root.join("new").exists());
    }
    assert!(!r1.join("gone").exists() && !r1.join("dir2").exists());
    assert!(!vol.join("v-gone").exists());
    assert_eq!(tree(&ro), ro_before, "the read-only volume is untouched");
    assert_eq!(read(&tlog), "terminated\n", "the termination log");
    // The escapes: symlinks were made (inside the share) and nothing
    // outside it changed; the write through `/vol/rootlink` landed in the
    // container's own root, which is r1.
    assert_eq!(
        std::fs::read_link(vol.join("rootlink")).unwrap(),
        Path::new("/")
    );
    assert_eq!(read(&r1.join("evil-in-guest-root")), "evil\n");
    assert_eq!(tree(&outside), outside_before, "nothing outside changed");
    assert!(!vol.join("cross").exists());
    assert!(vol.join("race").is_dir(), "the race's directory is back");
    assert!(
        !d.join("f0").exists() && !Path::new("/outside").exists(),
        "race files stayed in the share"
    );
    eprintln!(
        "[{:6.1}s] host sees the writes; escapes changed nothing outside",
        t0.elapsed().as_secs_f64()
    );

    // Two containers at once, each from its own rootfs, one volume: ping
    // writes p and waits for q; pong waits for p and renames its answer
    // into q whole (again, from scratch, if a known PVM guest fault broke
    // a step).
    let vols = [bind(&shared_vol, "/vol", &["rbind", "rw"])];
    let mut attempt = 0;
    loop {
        attempt += 1;
        for f in ["p", "q", "q.new"] {
            let _ = std::fs::remove_file(shared_vol.join(f));
        }
        let ping = start(
            &sandbox,
            &format!("ping{attempt}"),
            &r2,
            &vols,
            "echo ping > /vol/p; i=0; while [ ! -e /vol/q ] && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done; cat /vol/q",
        );
        let pong = start(
            &sandbox,
            &format!("pong{attempt}"),
            &r3,
            &vols,
            "i=0; while [ ! -e /vol/p ] && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done; { cat /vol/p; echo pong; } > /vol/q.new; mv /vol/q.new /vol/q; echo sent",
        );
        let (ping_status, ping_out) = finish(&sandbox, ping);
        let (pong_status, pong_out) = finish(&sandbox, pong);
        let host_q = std::fs::read_to_string(shared_vol.join("q")).unwrap_or_default();
        // A script's last command runs in the shell's place: a fault
        // there is the container's own status, 128 + SIGSEGV.
        let faulted = format!("{ping_out}{pong_out}").contains("Segmentation fault")
            || [ping_status, pong_status].contains(&SEGV_STATUS);
        if faulted && host_q != "ping\npong\n" && attempt < 3 {
            eprintln!("ping/pong: known PVM guest fault, again: {ping_out:?} {pong_out:?}");
            continue;
        }
        let (ping_out, pong_out) = (
            without_known_fault("ping", &ping_out),
            without_known_fault("pong", &pong_out),
        );
        assert_eq!((pong_status, pong_out.trim()), (0, "sent"));
        assert_eq!((ping_status, ping_out.trim()), (0, "ping\npong"));
        assert_eq!(host_q, "ping\npong\n");
        break;
    }
    eprintln!(
        "[{:6.1}s] two containers saw each other's writes",
        t0.elapsed().as_secs_f64()
    );

    // The conformance suite, on the volume (the writer's rootfs again), in
    // a fresh directory per attempt: a check a known PVM fault broke is
    // run again (the whole suite, up to three times).
    let mut attempt = 0;
    let (status, out) = loop {
        attempt += 1;
        let at = vol.join(format!("posix{attempt}"));
        std::fs::create_dir(&at).unwrap();
        let script = POSIX.replace("/vol/posix", &format!("/vol/posix{attempt}"));
        let posix = start(
            &sandbox,
            &format!("posix{attempt}"),
            &r1,
            &[bind(&vol, "/vol", &["rbind", "rw"])],
            &script,
        );
        let (status, out) = finish(&sandbox, posix);
        let faulted = out.contains("Segmentation fault") || status == SEGV_STATUS;
        if faulted && out.contains("FAIL ") && attempt < 3 {
            eprintln!("posix suite: known PVM guest fault, again: {out}");
            continue;
        }
        break (status, without_known_fault("posix", &out));
    };
    let passed: Vec<&str> = out.lines().filter(|l| l.starts_with("PASS ")).collect();
    let failed: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL ")).collect();
    eprintln!(
        "[{:6.1}s] posix suite: {} passed: {}",
        t0.elapsed().as_secs_f64(),
        passed.len(),
        passed.join(", ")
    );
    assert!(failed.is_empty() && status == 0, "status {status}: {out}");
    assert!(out.contains("posix-done") && passed.len() >= 17, "{out}");

    let report = sandbox
        .stop_vm(std::time::Duration::from_secs(60))
        .expect("the sandbox stops")
        .expect("the VM was running");
    assert_eq!(report.exit, ExitReason::Reset);
    assert!(!d.join("state").exists(), "the state dir is removed");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&d.display().to_string()), "{mounts}");
    assert_eq!(read(&r1.join("renamed")), "a\n", "sources intact");
    assert!(r1.join("bin/busybox").exists() && vol.join(format!("posix{attempt}/f")).exists());
}
