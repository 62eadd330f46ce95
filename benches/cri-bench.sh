#!/usr/bin/env bash
# Kubernetes pods through containerd's CRI plugin, as the kubelet sees
# them: skiff (`vm`), skiff (`linux`) and runc side by side in one private
# containerd, alternating, medians, ratios against runc:
#
#   benches/cri-bench.sh [ROUNDS] [PODS]
#
# - pod start: RunPodSandbox -> CreateContainer -> StartContainer ->
#   running; pod stop: StopContainer -> RemoveContainer -> StopPodSandbox
#   -> RemovePodSandbox, until the pod's processes are gone (ROUNDS rounds,
#   default 5; the first `vm` pod boots and makes the template, unmeasured);
# - memory per idle pod: PODS pods (default 10) of one sleeping container
#   per runtime, the Pss of each pod's shim and everything below it (the
#   agent or the VMM with the guest memory it touched, the containers).
#
# It is `shim/tests/cri_e2e.rs`'s ignored `cri_bench`, in release mode,
# with the harness of the CRI tests (root, containerd, runc, busybox-static,
# CNI plugins; a network namespace and bridge of its own). Needs the test
# kernel and agent initramfs:
#   SKIFF_TEST_KERNEL=$(guest-image/kernel/build.sh | tail -n1)
#   SKIFF_TEST_AGENT_INITRD=$(guest-image/initramfs/agent-build.sh | tail -n1)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SKIFF_TEST_KERNEL:?set SKIFF_TEST_KERNEL (guest-image/kernel/build.sh)}"
: "${SKIFF_TEST_AGENT_INITRD:?set SKIFF_TEST_AGENT_INITRD (guest-image/initramfs/agent-build.sh)}"
export SKIFF_CRI_BENCH_ROUNDS=${1:-5}
export SKIFF_CRI_BENCH_PODS=${2:-10}
exec cargo test -q --release -p shim --test cri_e2e -- --ignored --exact cri_bench --nocapture
