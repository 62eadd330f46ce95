//! `skiff run`: one container in a fresh sandbox, from the command line.
//!
//! The `linux` handler case runs everywhere the agent can (root); the `vm`
//! case boots a micro-VM (one to two minutes under PVM) with the kernel and
//! agent initramfs from `SKIFF_TEST_KERNEL` / `SKIFF_TEST_AGENT_INITRD`
//! (scripts/test sets both; CI must have them).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::time::Instant;

use shim::image::fixture::{tagged, tar_dir, LayoutBuilder};
use shim::image::Compression;
use shim::testing::busybox_rootfs;

fn skiff() -> Command {
    Command::new(env!("CARGO_BIN_EXE_skiff"))
}

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Builds `skiff-agent` next to the `skiff` binary (the `linux` handler
/// looks for it there).
fn build_agent() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_skiff"));
    let dir = bin.parent().unwrap();
    let profile = dir.file_name().unwrap().to_string_lossy().into_owned();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-q", "-p", "skiff-agent", "--bin", "skiff-agent"])
        .env("CARGO_TARGET_DIR", dir.parent().unwrap())
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    if profile == "release" {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "cannot build skiff-agent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const APPLETS: &[&str] = &["sh", "echo", "cat", "cut", "hostname", "true"];

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Skips (or fails under CI) unless root and busybox-static are there.
fn can_run_containers() -> bool {
    let missing = if !is_root() {
        Some("not root")
    } else if !Path::new("/bin/busybox").exists() {
        Some("/bin/busybox missing (apt-get install busybox-static)")
    } else {
        None
    };
    match missing {
        Some(why) => {
            assert!(!ci(), "CI runs as root with busybox-static: {why}");
            eprintln!("skipped: {why}");
            false
        }
        None => true,
    }
}

const SCRIPT: &str = "echo out $FOO $(hostname); echo err >&2; exit 3";

fn run(args: &[&str]) -> Output {
    skiff().args(args).output().unwrap()
}

#[test]
fn run_with_the_linux_handler() {
    if !can_run_containers() {
        return;
    }
    build_agent();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    busybox_rootfs(&root, APPLETS, None).unwrap();
    let root = root.to_str().unwrap();
    let out = run(&[
        "run",
        "--handler",
        "linux",
        "--rootfs",
        root,
        "-e",
        "FOO=bar",
        "--hostname",
        "box",
        "--",
        "sh",
        "-c",
        SCRIPT,
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out bar box\n");
    assert!(text(&out.stderr).contains("err\n"), "{}", text(&out.stderr));

    // The sandbox's state is gone afterwards.
    let id = sandbox_id(&text(&out.stderr));
    assert!(
        !Path::new(shim::run::RUN_STATE_ROOT).join(&id).exists(),
        "{id} left"
    );

    // A missing binary is the agent's clear error, and a failure.
    let out = run(&[
        "run",
        "--handler",
        "linux",
        "--rootfs",
        root,
        "--",
        "/no/such",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/no/such"),
        "{}",
        text(&out.stderr)
    );
    let id = sandbox_id(&text(&out.stderr));
    assert!(
        !Path::new(shim::run::RUN_STATE_ROOT).join(&id).exists(),
        "{id} left"
    );
}

#[test]
fn run_an_oci_image_tarball_with_the_linux_handler() {
    if !can_run_containers() {
        return;
    }
    build_agent();
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(
        dir.path(),
        serde_json::json!({
            "Cmd": ["sh", "-c", "echo from $FROM in $(pwd); exit 4"],
            "Env": ["FROM=image"],
            "WorkingDir": "/tmp",
        }),
    );

    let args = ["run", "--handler", "linux", "--image", &image];
    let out = run(&[&args[..], &["--", "sh", "-c", "echo hi; exit 3"]].concat());
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi\n");
    // The unpacked rootfs went with the sandbox's state.
    let id = sandbox_id(&text(&out.stderr));
    assert!(
        !Path::new(shim::run::RUN_STATE_ROOT).join(&id).exists(),
        "{id} left"
    );

    // Without a command: the image's Cmd, Env and WorkingDir.
    let out = run(&args);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from image in /tmp\n");
}

/// A busybox OCI image layout tarball (one gzip layer, image config
/// `config`) in `dir`, as a `--image` reference with its tag.
fn busybox_image(dir: &Path, config: serde_json::Value) -> String {
    let root = dir.join("rootfs");
    busybox_rootfs(&root, APPLETS, None).unwrap();
    let layout = LayoutBuilder::new(&dir.join("layout")).unwrap();
    let layer = layout
        .layer(&tar_dir(&root).unwrap(), Compression::Gzip)
        .unwrap();
    let manifest = layout.image(config, &[layer]).unwrap();
    layout.finish(&[tagged(manifest, "latest")]).unwrap();
    let image = dir.join("busybox.tar");
    std::fs::write(&image, tar_dir(&dir.join("layout")).unwrap()).unwrap();
    format!("{}:latest", image.display())
}

/// The sandbox id `skiff run` logged (`sandbox <id> started…`).
fn sandbox_id(stderr: &str) -> String {
    let id = stderr
        .split("sandbox ")
        .nth(1)
        .and_then(|s| s.split([' ', ':']).next())
        .unwrap_or_default();
    assert!(!id.is_empty(), "no sandbox id in {stderr}");
    id.to_owned()
}

#[test]
fn run_bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--rootfs", "/nonexistent/rootfs", "--", "true"],
            "/nonexistent/rootfs is not a directory",
        ),
        (&["run", "--rootfs", "/"], "CMD"),
        (&["run", "--", "true"], "--rootfs"),
        (
            &["run", "--rootfs", "/", "--image", "/x", "--", "true"],
            "cannot be used with",
        ),
        (
            &["run", "--image", "/nonexistent/image.tar", "--", "true"],
            "cannot unpack the image /nonexistent/image.tar: /nonexistent/image.tar does not exist",
        ),
        (
            &["run", "--handler", "qemu", "--rootfs", "/", "--", "true"],
            "qemu",
        ),
        (
            &["run", "-e", "NOEQUALS", "--rootfs", "/", "--", "true"],
            "NAME=value",
        ),
    ];
    for (args, needle) in cases {
        let out = run(args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            text(&out.stderr).contains(needle),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // The vm handler without a kernel says which key is missing.
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "handler = \"vm\"\n").unwrap();
    let out = run(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--rootfs",
        "/",
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("needs `kernel`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn run_with_the_vm_handler() {
    let Some((kernel, initrd)) = shim::testing::vm_artifacts() else {
        return;
    };
    if !can_run_containers() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // From an image (its Env applies), unpacked on the host, in the VM.
    let image = busybox_image(dir.path(), serde_json::json!({"Env": ["BAR=image"]}));
    let t = Instant::now();
    let out = skiff()
        .args(["run", "--handler", "vm", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--image", &image])
        .args(["-e", "FOO=vm", "--hostname", "guest", "--", "sh", "-c"])
        // Shell built-ins only: one guest process (forks expose the PVM
        // fault described in guest-image/README.md).
        .arg(
            "read -r rel </proc/sys/kernel/osrelease; read -r h </proc/sys/kernel/hostname; \
             echo kernel ${rel%.*}; echo out $FOO $BAR $h; echo err >&2; exit 3",
        )
        .env("SKIFF_LOG", "debug")
        .output()
        .unwrap();
    eprintln!(
        "skiff run --handler vm took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    // The guest kernel (6.12), not the host's, ran it.
    assert_eq!(
        text(&out.stdout),
        "kernel 6.12\nout vm image guest\n",
        "{stderr}"
    );
    assert!(!std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .starts_with("6.12."));
    assert!(stderr.contains("err\n"), "{stderr}");
    assert!(stderr.contains("VM agent answered"), "{stderr}");
    assert!(stderr.contains("VM ended: Reset"), "{stderr}");
}
