//! `skiff` CLI: bad input gives a clear error and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn skiff() -> Command {
    Command::new(env!("CARGO_BIN_EXE_skiff"))
}

mod common;
use common::kvm_available;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("skiff-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A minimal valid ELF64 x86-64 executable: one PT_LOAD at 1 MiB holding
/// `out 0x64, 0xfe` (reset) so it would end at once if it ran.
fn tiny_elf() -> Vec<u8> {
    let code: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4];
    let (ehsize, phsize) = (64u16, 56u16);
    let off = u64::from(ehsize + phsize);
    let mut e = Vec::new();
    e.extend(b"\x7fELF\x02\x01\x01\x00");
    e.extend([0u8; 8]);
    e.extend(2u16.to_le_bytes()); // ET_EXEC
    e.extend(62u16.to_le_bytes()); // EM_X86_64
    e.extend(1u32.to_le_bytes());
    e.extend(0x10_0000u64.to_le_bytes()); // entry
    e.extend(u64::from(ehsize).to_le_bytes()); // phoff
    e.extend(0u64.to_le_bytes()); // shoff
    e.extend(0u32.to_le_bytes()); // flags
    e.extend(ehsize.to_le_bytes());
    e.extend(phsize.to_le_bytes());
    e.extend(1u16.to_le_bytes()); // phnum
    e.extend(0u16.to_le_bytes()); // shentsize
    e.extend(0u16.to_le_bytes()); // shnum
    e.extend(0u16.to_le_bytes()); // shstrndx
    e.extend(1u32.to_le_bytes()); // PT_LOAD
    e.extend(7u32.to_le_bytes()); // RWX
    e.extend(off.to_le_bytes()); // offset
    e.extend(0x10_0000u64.to_le_bytes()); // vaddr
    e.extend(0x10_0000u64.to_le_bytes()); // paddr
    e.extend((code.len() as u64).to_le_bytes()); // filesz
    e.extend((code.len() as u64).to_le_bytes()); // memsz
    e.extend(0x1000u64.to_le_bytes()); // align
    e.extend(code);
    e
}

fn fails_with(args: &[&str], needle: &str) {
    let out = skiff().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{args:?} succeeded; stderr: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "{args:?}: expected {needle:?} in stderr: {stderr}"
    );
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn bad_vm_boot_input_is_a_clear_error() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("bad");
    let garbage = dir.file("garbage", &[0x42; 4096]);
    let corrupt = dir.file("corrupt.elf", &tiny_elf()[..70]);
    let elf = dir.file("tiny.elf", &tiny_elf());
    let big_initrd = dir.file("big.initrd", &vec![0u8; 20 << 20]);

    fails_with(
        &["vm", "boot", "--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
    fails_with(
        &["vm", "boot", "--kernel", p(&garbage)],
        "neither an ELF vmlinux nor a bzImage",
    );
    fails_with(
        &["vm", "boot", "--kernel", p(&corrupt)],
        "cannot load kernel",
    );
    fails_with(
        &[
            "vm",
            "boot",
            "--kernel",
            p(&elf),
            "--mem-mib",
            "16",
            "--initrd",
            p(&big_initrd),
        ],
        "does not fit",
    );
    fails_with(
        &["vm", "boot", "--kernel", p(&elf), "--mem-mib", "4"],
        "too small",
    );
    fails_with(
        &["vm", "boot", "--kernel", p(&elf), "--cpu-template", "t2"],
        "unknown CPU template",
    );
    fails_with(
        &["vm", "boot", "--kernel", p(&elf), "--disk", "/x.img,bogus"],
        "unknown disk option",
    );
    fails_with(
        &[
            "vm",
            "boot",
            "--kernel",
            p(&elf),
            "--disk",
            "/nonexistent/d.img",
        ],
        "/nonexistent/d.img",
    );
    fails_with(
        &["vm", "boot", "--kernel", p(&elf), "--vcpus", "0"],
        "vCPUs",
    );
}

#[test]
fn a_tiny_elf_kernel_boots_and_resets() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("ok");
    let elf = dir.file("tiny.elf", &tiny_elf());
    // A 64-bit ELF without a PVH note enters in long mode; the code is
    // 32/64-bit neutral.
    let out = skiff()
        .args([
            "vm",
            "boot",
            "--kernel",
            p(&elf),
            "--mem-mib",
            "32",
            "--vcpus",
            "2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(stderr.contains("VM exited: Reset"), "stderr: {stderr}");
}

#[test]
fn check_reports_the_host() {
    let out = skiff().arg("check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("host: "), "{stdout}");
    assert!(stdout.contains("cpu template: "), "{stdout}");
    let cmdline = shim::check::detect().cmdline();
    assert!(
        stdout.contains(&format!("kernel command line: {cmdline}")),
        "{stdout}"
    );
    for filter in shim::vmm::seccomp::describe() {
        assert!(stdout.contains(&format!("  {filter}\n")), "{stdout}");
    }
    assert!(stdout.contains("  vcpu: "), "{stdout}");
    assert!(stdout.contains("ioctl(arg 1: KVM_RUN or "), "{stdout}");
    let cgroup = match shim::vmm::jail::cgroup::host_layout() {
        Ok(layout) => format!("its cgroup: {layout}"),
        Err(_) => "no cgroup of its own can be made here".to_owned(),
    };
    assert!(
        stdout.contains("jailed VMM (vmm = \"process\")"),
        "{stdout}"
    );
    assert!(stdout.contains(&cgroup), "{stdout}");
    let kind = shim::check::detect().kind;
    assert_eq!(out.status.success(), kind != shim::check::HostKind::NoKvm);
    assert!(stdout.contains(&kind.to_string()), "{stdout}");
}
