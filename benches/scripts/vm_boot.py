#!/usr/bin/env python3
"""Boot benchmark: skiff's VMM vs QEMU `-M microvm` on the same kernel,
initramfs, memory, command line and CPUID masks, alternating in one run.

Prints, per VMM, the median time from process start to the kernel banner,
to `Run /init`, and to the init's line; the skiff/QEMU ratios; skiff's
process-start-to-first-vCPU-entry figure; and the VMM memory overhead
(process RSS minus the guest-RAM mapping's resident pages) of both.

Usage: benches/scripts/vm_boot.py [--runs N]
Builds (or reuses) the kernel and initramfs through guest-image/ and the
release `skiff` binary. Needs qemu-system-x86 (installed if missing).
A benchmark, not a test: it prints figures and asserts nothing.
"""
import argparse
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEM_MIB = 128
MARKS = {
    "banner": re.compile(rb"Linux version 6\."),
    "run_init": re.compile(rb"Run /init as init process"),
    "init_line": re.compile(rb"skiff-init: hello from the guest"),
}
# What the pvm-compat template hides, expressed as QEMU CPU flags.
# (-arch-capabilities: QEMU cannot start on PVM otherwise; PVM rejects its
# write of MSR 0x10a. skiff's template hides the bit too.)
QEMU_PVM_CPU = ("host,-cx16,-xsave,-smap,-fsgsbase,-pcid,-invpcid,-rdtscp,-rdpid,-popcnt,"
                "-avx,-avx2,-fma,-f16c,-avx512f,-arch-capabilities")


def sh(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout


def host_kind():
    out = subprocess.run([os.path.join(ROOT, "target/release/skiff"), "check"],
                         capture_output=True, text=True).stdout
    return out


def vmm_overhead_kib(pid, guest_bytes):
    """Rss of the process minus Rss of the guest RAM mapping, in KiB."""
    total = guest = 0
    size = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                size = end - start
            elif line.startswith("Rss:"):
                kib = int(line.split()[1])
                total += kib
                if size == guest_bytes:
                    guest += kib
    return total - guest, total


def run_once(cmd, timeout=180.0, hold_for_rss=False):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    marks, buf, err = {}, b"", b""
    rss = None
    streams = [p.stdout, p.stderr]
    while streams and time.monotonic() - t0 < timeout:
        ready, _, _ = select.select(streams, [], [], 0.5)
        for s in ready:
            chunk = os.read(s.fileno(), 65536)
            if not chunk:
                streams.remove(s)
                continue
            now = time.monotonic() - t0
            if s is p.stdout:
                buf += chunk
                for name, rx in MARKS.items():
                    if name not in marks and rx.search(buf):
                        marks[name] = now
                        if name == "init_line" and rss is None:
                            try:
                                rss = vmm_overhead_kib(p.pid, MEM_MIB << 20)
                            except OSError:
                                pass
            else:
                err += chunk
    if p.poll() is None:
        p.kill()
    p.wait()
    first = re.search(rb"first vCPU entry (\d+) us", err)
    return marks, rss, (int(first.group(1)) if first else None), p.returncode, buf, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    if not shutil.which("qemu-system-x86_64"):
        subprocess.run(["apt-get", "install", "-y", "-q", "qemu-system-x86"], check=True,
                       stdout=subprocess.DEVNULL)
    kernel = sh(["guest-image/kernel/build.sh"]).strip().splitlines()[-1]
    initrd = sh(["guest-image/initramfs/build.sh"]).strip().splitlines()[-1]
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "shim", "--bin", "skiff"],
                   check=True, cwd=ROOT)
    check = host_kind()
    pvm = "PVM" in check
    cmdline = re.search(r"kernel command line: (.*)", check).group(1).strip()
    print(f"host: {check.splitlines()[0]}\nkernel: {kernel}\ninitrd: {initrd}\ncmdline: {cmdline}\n")

    skiff = [os.path.join(ROOT, "target/release/skiff"), "vm", "boot", "--kernel", kernel,
             "--initrd", initrd, "--mem-mib", str(MEM_MIB), "--cmdline", cmdline]
    qemu = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm",
            "-cpu", QEMU_PVM_CPU if pvm else "host", "-m", str(MEM_MIB), "-smp", "1",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-monitor", "none",
            "-no-reboot", "-device", "i8042"]
    results = {"skiff": [], "qemu": []}
    for i in range(args.runs):
        for name, cmd in (("skiff", skiff), ("qemu", qemu)):
            marks, rss, first, rc, out, err = run_once(cmd)
            results[name].append((marks, rss, first))
            print(f"run {i + 1} {name:5}: " + ", ".join(
                f"{k} {v:.2f}s" for k, v in marks.items()) +
                (f", overhead {rss[0]} KiB (rss {rss[1]} KiB)" if rss else "") +
                (f", first entry {first} us" if first else "") + f", exit {rc}")
            if "init_line" not in marks:
                print("  (no init line; last output:)", out[-500:].decode(errors="replace"),
                      err[-500:].decode(errors="replace"))

    def med(name, key):
        xs = [m[key] for m, _, _ in results[name] if key in m]
        return statistics.median(xs) if xs else None

    print("\nmedians:")
    for key in MARKS:
        s, q = med("skiff", key), med("qemu", key)
        if s and q:
            print(f"  {key:9}: skiff {s:.2f}s  qemu {q:.2f}s  ratio skiff/qemu {s / q:.2f}x")
    for name in results:
        rs = [r[0] for _, r, _ in results[name] if r]
        if rs:
            print(f"  {name} VMM overhead (RSS - guest RAM): median {statistics.median(rs)} KiB")
    firsts = [f for _, _, f in results["skiff"] if f]
    if firsts:
        print(f"  skiff process start -> first vCPU entry: median {statistics.median(firsts) / 1000:.2f} ms")


if __name__ == "__main__":
    main()
