#!/usr/bin/env bash
# skiff shim vs the stock runc shim under one private containerd (root).
#
#   benches/shim-bench.sh [N]        (default N=20)
#
# 1. `ctr run --rm localhost/busybox /bin/true`, skiff and runc alternating,
#    N runs each: medians and the skiff/runc ratio (goal <= 1.0).
# 2. Shim memory with one sleeping container: Rss/Pss from smaps_rollup of
#    containerd-shim-skiff-v2 (+ its skiff-agent processes, reported apart)
#    vs containerd-shim-runc-v2 (goal <= 0.25 for the shim).
#
# Binaries: $SKIFF_BIN_DIR (default: the release build in
# ${CARGO_TARGET_DIR:-target}/release, built here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-20}
scripts/containerd-env deps
IMAGE_TAR=$(scripts/containerd-env image)
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN_DIR=${SKIFF_BIN_DIR:-$TARGET/release}
if [ -z "${SKIFF_BIN_DIR:-}" ]; then
    cargo build -q --release -p shim --bin containerd-shim-skiff-v2 -p skiff-agent --bin skiff-agent
fi
[ -x "$BIN_DIR/containerd-shim-skiff-v2" ] && [ -x "$BIN_DIR/skiff-agent" ] ||
    { echo "no shim/agent binaries in $BIN_DIR" >&2; exit 1; }

DIR=$(mktemp -d /var/tmp/skiff-bench-XXXXXX)
SOCK=$DIR/c.sock
NS=skiff-bench
cat >"$DIR/config.toml" <<EOF
version = 2
root = "$DIR/root"
state = "$DIR/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[debug]
  address = "$DIR/debug.sock"
[metrics]
  address = ""
EOF
PATH="$BIN_DIR:$PATH" containerd --config "$DIR/config.toml" >"$DIR/containerd.log" 2>&1 &
CTRD=$!
cleanup() {
    for id in $(ctr -a "$SOCK" -n $NS tasks ls -q 2>/dev/null); do
        ctr -a "$SOCK" -n $NS tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
        sleep 0.2
        ctr -a "$SOCK" -n $NS tasks delete -f "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr -a "$SOCK" -n $NS containers ls -q 2>/dev/null); do
        ctr -a "$SOCK" -n $NS containers delete "$id" >/dev/null 2>&1 || true
    done
    kill "$CTRD" 2>/dev/null || true
    wait "$CTRD" 2>/dev/null || true
    grep " $DIR" /proc/self/mountinfo | awk '{print $5}' | sort -r | xargs -r -n1 umount -l || true
    rm -rf "$DIR"
}
trap cleanup EXIT
ctr() { command ctr -a "$SOCK" -n $NS "$@"; }
for _ in $(seq 100); do ctr version >/dev/null 2>&1 && break; sleep 0.05; done
ctr images import "$IMAGE_TAR" >/dev/null

now_ms() { date +%s%N | awk '{printf "%d", $1/1000000}'; }
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

run_once() {
    local runtime=$1 id=$2 t0 t1
    t0=$(date +%s%N)
    ctr run --rm --runtime "$runtime" localhost/busybox:latest "$id" /bin/true
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000))
}

# Warm-up (page cache, first-run costs).
run_once io.containerd.skiff.v2 warm-s >/dev/null
run_once io.containerd.runc.v2 warm-r >/dev/null
: >"$DIR/skiff.us"
: >"$DIR/runc.us"
for i in $(seq "$N"); do
    run_once io.containerd.skiff.v2 "s-$i" >>"$DIR/skiff.us"
    run_once io.containerd.runc.v2 "r-$i" >>"$DIR/runc.us"
done
S=$(median <"$DIR/skiff.us")
R=$(median <"$DIR/runc.us")
echo "ctr run --rm /bin/true, N=$N alternating: skiff median $((S / 1000)).$(((S % 1000) / 100)) ms, runc median $((R / 1000)).$(((R % 1000) / 100)) ms, ratio $(awk -v s="$S" -v r="$R" 'BEGIN {printf "%.2f", s / r}')x"

# Memory with one sleeping container each.
ctr run -d --runtime io.containerd.skiff.v2 localhost/busybox:latest mem-s sleep 1000 >/dev/null
ctr run -d --runtime io.containerd.runc.v2 localhost/busybox:latest mem-r sleep 1000 >/dev/null
sleep 1
rollup() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/smaps_rollup"; }
SHIM_S=$(cat "$DIR/state/io.containerd.runtime.v2.task/$NS/mem-s/shim.pid")
SHIM_R=$(pgrep -f "containerd-shim-runc-v2 -namespace $NS -id mem-r" | head -n1)
AGENTS=$(pgrep -P "$SHIM_S" skiff-agent || true)
AGENT_RSS=0
AGENT_PSS=0
for a in $AGENTS $(for a in $AGENTS; do pgrep -P "$a" skiff-agent || true; done); do
    AGENT_RSS=$((AGENT_RSS + $(rollup "$a" Rss)))
    AGENT_PSS=$((AGENT_PSS + $(rollup "$a" Pss)))
done
SR=$(rollup "$SHIM_S" Rss)
SP=$(rollup "$SHIM_S" Pss)
RR=$(rollup "$SHIM_R" Rss)
RP=$(rollup "$SHIM_R" Pss)
echo "shim memory, one sleeping container (kB): skiff shim Rss $SR Pss $SP threads $(ls /proc/"$SHIM_S"/task | wc -l); runc shim Rss $RR Pss $RP threads $(ls /proc/"$SHIM_R"/task | wc -l)"
echo "ratio skiff/runc shim: Rss $(awk -v a="$SR" -v b="$RR" 'BEGIN {printf "%.2f", a / b}')x, Pss $(awk -v a="$SP" -v b="$RP" 'BEGIN {printf "%.2f", a / b}')x"
echo "skiff agent processes (the linux sandbox; runc has none): Rss $AGENT_RSS kB, Pss $AGENT_PSS kB"
echo "with agent: Pss ratio $(awk -v a="$((SP + AGENT_PSS))" -v b="$RP" 'BEGIN {printf "%.2f", a / b}')x"
