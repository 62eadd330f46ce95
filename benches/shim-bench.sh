#!/usr/bin/env bash
# skiff shim vs the stock runc shim under one private containerd (root).
#
#   benches/shim-bench.sh [N] [M] [V]   (defaults N=20, M=100, V=0; 0 skips a part)
#
# 1. `ctr run --rm localhost/busybox /bin/true`, skiff and runc alternating,
#    N runs each: medians and the skiff/runc ratio (goal <= 1.0).
# 2. Shim memory with one sleeping container: Rss/Pss from smaps_rollup of
#    containerd-shim-skiff-v2 (+ its skiff-agent processes, reported apart)
#    vs containerd-shim-runc-v2 (goal <= 0.25 for the shim).
# 3. M sleeping containers at once (skiff, torn down, then runc): Rss and Pss
#    summed over every shim process (goal <= 0.3 for the shims), skiff-agent
#    processes summed apart (with the linux handler they are part of skiff's
#    per-pod cost), threads. Everything is killed and deleted afterwards and
#    the script fails if a shim, agent, mount or socket is left.
# 4. (V > 0; needs SKIFF_VM_KERNEL and SKIFF_VM_INITRD, the guest kernel and
#    agent initramfs) the `vm` handler: `ctr run --rm /bin/true` V times
#    with templates off (each boots a micro-VM: about a minute under PVM)
#    and V times with templates on (each restores the template one warm-up
#    run made), alternating; medians, their ratio, and against part 1's
#    skiff-linux and runc medians; then one sleeping container: the shim
#    process's Rss outside the guest RAM mapping (shim + VMM) against the
#    runc shim's Rss from part 2.
#
# Binaries: $SKIFF_BIN_DIR, else a release build (`cargo build --release`,
# always run, a no-op when up to date) in ${CARGO_TARGET_DIR:-target}/release.
# Use a CARGO_TARGET_DIR of its own (e.g. /work/target-bench) to stay off the
# lock of other builds.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-20}
M=${2:-100}
V=${3:-0}
if [ "$V" -gt 0 ] && { [ -z "${SKIFF_VM_KERNEL:-}" ] || [ -z "${SKIFF_VM_INITRD:-}" ]; }; then
    echo "V > 0 needs SKIFF_VM_KERNEL and SKIFF_VM_INITRD (guest-image/kernel/build.sh, guest-image/initramfs/agent-build.sh)" >&2
    exit 1
fi
scripts/containerd-env deps
IMAGE_TAR=$(scripts/containerd-env image)
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
BIN_DIR=${SKIFF_BIN_DIR:-$TARGET/release}
if [ -z "${SKIFF_BIN_DIR:-}" ]; then
    cargo build -q --release -p shim -p skiff-agent --bin containerd-shim-skiff-v2 --bin skiff-agent
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
# Every shim daemon of this containerd for runtime $1 (skiff|runc).
shim_pids() { pgrep -f "containerd-shim-$1-v2 -namespace $NS -id [^ ]+ -address $SOCK( |$)" || true; }
# The skiff-agent processes under the given skiff shims (agent + spawner).
agent_pids() {
    local s a
    for s in "$@"; do
        for a in $(pgrep -P "$s" skiff-agent || true); do
            echo "$a"
            pgrep -P "$a" skiff-agent || true
        done
    done
}
# "Rss Pss threads processes", kB, summed over the given pids.
mem_sum() {
    local rss=0 pss=0 thr=0 n=0 p r q
    for p in "$@"; do
        read -r r q < <(awk '$1 == "Rss:" {r = $2} $1 == "Pss:" {q = $2} END {print r + 0, q + 0}' \
            "/proc/$p/smaps_rollup" 2>/dev/null || echo "0 0")
        [ "$r" -gt 0 ] || continue
        rss=$((rss + r))
        pss=$((pss + q))
        thr=$((thr + $(ls "/proc/$p/task" 2>/dev/null | wc -l)))
        n=$((n + 1))
    done
    echo "$rss $pss $thr $n"
}
mb() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }

# Kills and deletes every task and container of the namespace, then checks
# that nothing of them is left: shims, agents (pids given), mounts under
# $DIR, shim sockets, skiff state dirs.
teardown() {
    local agents=("$@") ids left
    # Addresses and state dirs of what is about to go, to check afterwards.
    local files=()
    for f in "$DIR/state/io.containerd.runtime.v2.task/$NS"/*/address "$DIR/state/io.containerd.runtime.v2.task/$NS"/*/skiff-state; do
        [ -f "$f" ] && files+=("$(sed 's|^unix://||' "$f")")
    done
    ids=$(command ctr -a "$SOCK" -n $NS tasks ls -q 2>/dev/null || true)
    for id in $ids; do
        command ctr -a "$SOCK" -n $NS tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    for _ in $(seq 200); do
        command ctr -a "$SOCK" -n $NS tasks ls 2>/dev/null | grep -qE 'RUNNING|PAUSED' || break
        sleep 0.05
    done
    # shellcheck disable=SC2086
    printf '%s\n' $ids | xargs -r -n 10 -P 4 ctr -a "$SOCK" -n $NS tasks delete -f >/dev/null 2>&1 || true
    ids=$(command ctr -a "$SOCK" -n $NS containers ls -q 2>/dev/null || true)
    # shellcheck disable=SC2086
    printf '%s\n' $ids | xargs -r -n 20 ctr -a "$SOCK" -n $NS containers delete >/dev/null 2>&1 || true
    # Shims exit after Shutdown, agents (the spawner notices its agent is
    # gone) a moment later; give them time.
    live_agents() {
        local a
        for a in "${agents[@]}"; do
            [ "$(cat "/proc/$a/comm" 2>/dev/null)" = skiff-agent ] && echo "$a"
        done
        return 0
    }
    for _ in $(seq 200); do
        [ -z "$(shim_pids skiff)$(shim_pids runc)$(live_agents)" ] && break
        sleep 0.05
    done
    left=""
    [ -z "$(shim_pids skiff)$(shim_pids runc)" ] || left+=" shims: $(shim_pids skiff) $(shim_pids runc);"
    [ -z "$(live_agents)" ] || left+=" agents: $(live_agents | tr '\n' ' ');"
    grep -q " $DIR/state" /proc/self/mountinfo && left+=" mounts: $(grep -c " $DIR/state" /proc/self/mountinfo);"
    for f in "${files[@]}"; do
        [ -e "$f" ] && left+=" $f;"
    done
    [ -z "$(command ctr -a "$SOCK" -n $NS containers ls -q 2>/dev/null)" ] || left+=" containers;"
    if [ -n "$left" ]; then
        echo "teardown left:$left" >&2
        return 1
    fi
}

cleanup() {
    teardown || true
    kill "$CTRD" 2>/dev/null || true
    wait "$CTRD" 2>/dev/null || true
    grep " $DIR" /proc/self/mountinfo | awk '{print $5}' | sort -r | xargs -r -n1 umount -l || true
    rm -rf "$DIR"
}
trap cleanup EXIT
ctr() { command ctr -a "$SOCK" -n $NS "$@"; }
for _ in $(seq 100); do ctr version >/dev/null 2>&1 && break; sleep 0.05; done
ctr images import "$IMAGE_TAR" >/dev/null
echo "host: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at start; binaries $BIN_DIR"

median() { sort -n | awk '{a[NR] = $1} END {if (NR % 2) print a[(NR + 1) / 2]; else printf "%d\n", (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

run_once() {
    local runtime=$1 id=$2 t0 t1
    t0=$(date +%s%N)
    ctr run --rm --runtime "$runtime" localhost/busybox:latest "$id" /bin/true
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000))
}

if [ "$N" -gt 0 ]; then
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
    echo "ctr run --rm /bin/true, N=$N alternating: skiff median $((S / 1000)).$(((S % 1000) / 100)) ms, runc median $((R / 1000)).$(((R % 1000) / 100)) ms, ratio $(ratio "$S" "$R")x"
fi

# Memory with one sleeping container each.
ctr run -d --runtime io.containerd.skiff.v2 localhost/busybox:latest mem-s sleep 1000 >/dev/null
ctr run -d --runtime io.containerd.runc.v2 localhost/busybox:latest mem-r sleep 1000 >/dev/null
# Steady state (skiff's event connection closes after 1 s idle).
sleep 2
SHIM_S=$(shim_pids skiff)
SHIM_R=$(shim_pids runc)
AGENTS=$(agent_pids "$SHIM_S")
# shellcheck disable=SC2086
read -r SR SP ST _ < <(mem_sum $SHIM_S)
# shellcheck disable=SC2086
read -r RR RP RT _ < <(mem_sum $SHIM_R)
# shellcheck disable=SC2086
read -r AR AP AT AN < <(mem_sum $AGENTS)
echo "shim memory, one sleeping container (kB): skiff shim Rss $SR Pss $SP threads $ST; runc shim Rss $RR Pss $RP threads $RT"
echo "ratio skiff/runc shim: Rss $(ratio "$SR" "$RR")x, Pss $(ratio "$SP" "$RP")x"
echo "skiff agent processes (the linux sandbox; runc has none): $AN processes, Rss $AR kB, Pss $AP kB, threads $AT"
echo "with agent: Rss ratio $(ratio "$((SR + AR))" "$RR")x, Pss ratio $(ratio "$((SP + AP))" "$RP")x"
# shellcheck disable=SC2086
teardown $AGENTS

# M sleeping containers at once, one runtime at a time.
many() {
    local runtime=$1 t0 t1 shims agents
    t0=$(date +%s%N)
    for i in $(seq "$M"); do
        ctr run -d --runtime "io.containerd.$runtime.v2" localhost/busybox:latest "many-$runtime-$i" sleep 1000 >/dev/null
    done
    t1=$(date +%s%N)
    sleep 2
    shims=$(shim_pids "$runtime")
    agents=""
    # shellcheck disable=SC2086
    [ "$runtime" = skiff ] && agents=$(agent_pids $shims)
    # shellcheck disable=SC2086
    read -r MR MP MT MN < <(mem_sum $shims)
    # shellcheck disable=SC2086
    read -r MAR MAP MAT MAN < <(mem_sum $agents)
    echo "$M x $runtime: started in $(((t1 - t0) / 1000000)) ms; $MN shims Rss $(mb "$MR") MB Pss $(mb "$MP") MB threads $MT"
    if [ "$runtime" = skiff ]; then
        echo "$M x skiff: $MAN agent processes Rss $(mb "$MAR") MB Pss $(mb "$MAP") MB threads $MAT"
    fi
    # shellcheck disable=SC2086
    teardown $agents
}
if [ "$M" -gt 0 ]; then
    many skiff
    read -r KR KP KAR KAP <<<"$MR $MP $MAR $MAP"
    many runc
    echo "$M sleeping containers, skiff/runc total shim Rss $(ratio "$KR" "$MR")x Pss $(ratio "$KP" "$MP")x (goal <= 0.3); with the agents Rss $(ratio "$((KR + KAR))" "$MR")x Pss $(ratio "$((KP + KAP))" "$MP")x"
fi
if [ "$V" -gt 0 ]; then
    VM_MIB=256
    printf 'handler = "vm"\nkernel = "%s"\ninitrd = "%s"\nmemory_mib = %d\ntemplate = false\n' \
        "$SKIFF_VM_KERNEL" "$SKIFF_VM_INITRD" "$VM_MIB" >"$DIR/vm.toml"
    printf 'handler = "vm"\nkernel = "%s"\ninitrd = "%s"\nmemory_mib = %d\ntemplate_dir = "%s"\n' \
        "$SKIFF_VM_KERNEL" "$SKIFF_VM_INITRD" "$VM_MIB" "$DIR/templates" >"$DIR/vm-template.toml"
    # The warm-up run boots and makes the template.
    ctr run --rm --runtime io.containerd.skiff.v2 --runtime-config-path "$DIR/vm-template.toml" \
        localhost/busybox:latest "v-warm" /bin/true
    : >"$DIR/vm.us"
    : >"$DIR/vmt.us"
    fails=0
    for i in $(seq "$V"); do
        for kind in vm vmt; do
            config="$DIR/vm.toml"
            [ "$kind" = vmt ] && config="$DIR/vm-template.toml"
            t0=$(date +%s%N)
            if ctr run --rm --runtime io.containerd.skiff.v2 --runtime-config-path "$config" \
                localhost/busybox:latest "$kind-$i" /bin/true; then
                t1=$(date +%s%N)
                echo $(((t1 - t0) / 1000)) >>"$DIR/$kind.us"
            else
                fails=$((fails + 1))
            fi
        done
    done
    if [ -s "$DIR/vm.us" ] && [ -s "$DIR/vmt.us" ]; then
        VMT=$(median <"$DIR/vm.us")
        VMR=$(median <"$DIR/vmt.us")
        line="ctr run --rm /bin/true, vm handler, $(wc -l <"$DIR/vm.us") + $(wc -l <"$DIR/vmt.us") of $V + $V runs ok: median booted $((VMT / 1000)) ms, restored from the template $((VMR / 1000)) ms: $(ratio "$VMR" "$VMT")x"
        [ "$N" -gt 0 ] && line+="; booted vs the linux handler $(ratio "$VMT" "$S")x, vs runc $(ratio "$VMT" "$R")x; restored vs the linux handler $(ratio "$VMR" "$S")x, vs runc $(ratio "$VMR" "$R")x"
        echo "$line"
    fi
    [ "$fails" -eq 0 ] || echo "vm handler: $fails of $((2 * V)) runs failed"
    ctr run -d --runtime io.containerd.skiff.v2 --runtime-config-path "$DIR/vm.toml" \
        localhost/busybox:latest mem-v sleep 1000 >/dev/null
    sleep 2
    SHIM_V=$(shim_pids skiff)
    # Rss (kB) outside and inside the guest RAM mapping (at least VM_MIB
    # MiB: the kernel may merge it with a neighbouring anonymous mapping).
    read -r VO VG < <(python3 - "/proc/$SHIM_V/smaps" $((VM_MIB << 20)) <<'PY'
import sys
other = guest = 0
in_guest = False
for line in open(sys.argv[1]):
    f = line.split()
    if "-" in f[0] and not f[0].endswith(":"):
        a, b = (int(x, 16) for x in f[0].split("-"))
        in_guest = b - a >= int(sys.argv[2])
    elif f[0] == "Rss:":
        if in_guest:
            guest += int(f[1])
        else:
            other += int(f[1])
print(other, guest)
PY
    )
    echo "vm handler shim + VMM, one sleeping container: Rss outside guest RAM $VO kB (guest RAM touched $VG kB of $((VM_MIB << 10))); vs the runc shim's Rss $RR kB: $(ratio "$VO" "$RR")x; threads $(ls "/proc/$SHIM_V/task" | wc -l)"
    teardown
fi
echo "host load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
