#!/usr/bin/env bash
# The container rootfs inside the micro-VM, both ways the vm handler can
# give it (vm_rootfs = "virtio-fs", the default: the host directory served
# live; "block": an ext4 image copy on virtio-blk), against the same rootfs
# on the host (the `linux` handler), one `skiff run` each, same workload,
# same run:
#
#   SKIFF_VM_KERNEL=... SKIFF_VM_INITRD=... benches/rootfs-bench.sh [MIB] [FILES]
#
# Inside the container: write MIB MiB (dd, then sync), read it back (cat),
# create FILES small files, list them with stat data (ls -l), remove them.
# Times come from the container's own /proc/uptime (10 ms resolution), so
# the VM's boot is not in them.
#
# Then the container start cost against rootfs size: the same rootfs with
# 8 MiB and with 256 MiB of files, an empty command in each mode; what is
# printed is the handler's "shared as" time (the bind mount, or building
# the image). SKIFF_BENCH_PARTS="workload" or "start" runs one part.
# Needs root, /dev/kvm, busybox-static, mkfs.ext4, and release builds of
# skiff and skiff-agent (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-16}
FILES=${2:-200}
: "${SKIFF_VM_KERNEL:?set SKIFF_VM_KERNEL (guest-image/kernel/build.sh)}"
: "${SKIFF_VM_INITRD:?set SKIFF_VM_INITRD (guest-image/initramfs/agent-build.sh)}"
cargo build -q --release -p shim -p skiff-agent --bin skiff --bin skiff-agent
SKIFF=${CARGO_TARGET_DIR:-$PWD/target}/release/skiff

DIR=$(mktemp -d /var/tmp/skiff-rootfs-bench-XXXXXX)
trap 'rm -rf "$DIR"' EXIT
mkdir -p "$DIR/root/bin" "$DIR/root/proc" "$DIR/root/dev" "$DIR/root/sys" "$DIR/root/tmp" "$DIR/root/data"
cp /bin/busybox "$DIR/root/bin/"
for a in sh dd cat ls rm sync echo mkdir; do ln -s busybox "$DIR/root/bin/$a"; done

# Prints "write_cs read_cs create_cs list_cs remove_cs" (centiseconds).
WORKLOAD='
now() { read -r up _ </proc/uptime; echo "${up%.*}${up#*.}"; }
t0=$(now)
dd if=/dev/zero of=/data/blob bs=64k count=$((MIB * 16)) 2>/dev/null; sync
t1=$(now)
cat /data/blob >/dev/null
t2=$(now)
mkdir /data/many; i=0
while [ $i -lt $FILES ]; do echo $i >/data/many/f$i; i=$((i + 1)); done
t3=$(now)
ls -l /data/many >/dev/null
t4=$(now)
rm -r /data/many /data/blob
t5=$(now)
echo "RESULT $((t1 - t0)) $((t2 - t1)) $((t3 - t2)) $((t4 - t3)) $((t5 - t4))"
'
# One config per VM mode; templates of their own (both modes share nothing).
for mode in virtio-fs block; do
    printf 'vm_rootfs = "%s"\ntemplate_dir = "%s"\n' "$mode" "$DIR/templates-$mode" >"$DIR/$mode.toml"
done
# run HANDLER MODE ROOTFS CMD...: stdout; stderr in $DIR/HANDLER-MODE.err.
run() {
    local handler=$1 mode=$2 root=$3
    shift 3
    "$SKIFF" run --handler "$handler" --config "$DIR/$mode.toml" --kernel "$SKIFF_VM_KERNEL" \
        --initrd "$SKIFF_VM_INITRD" --rootfs "$root" -e MIB="$MIB" -e FILES="$FILES" \
        -- "$@" 2>"$DIR/$handler-$mode.err"
}
PARTS=${SKIFF_BENCH_PARTS:-workload start}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) b = 1; printf "%.1f", a / b }'; }
if [[ " $PARTS " == *" workload "* ]]; then
read -r _ HW HR HC HL HD < <(run linux virtio-fs "$DIR/root" sh -c "$WORKLOAD" | grep RESULT)
read -r _ FW FR FC FL FD < <(run vm virtio-fs "$DIR/root" sh -c "$WORKLOAD" | grep RESULT)
read -r _ BW BR BC BL BD < <(run vm block "$DIR/root" sh -c "$WORKLOAD" | grep RESULT)
echo "rootfs workload, centiseconds (host = linux handler on the host fs; fs = virtio-fs; blk = ext4 image on virtio-blk):"
printf '  %-22s host %5s  fs %6s  blk %6s  fs/host %7sx  fs/blk %5sx\n' \
    "write $MIB MiB + sync" "$HW" "$FW" "$BW" "$(ratio "$FW" "$HW")" "$(ratio "$FW" "$BW")" \
    "read $MIB MiB" "$HR" "$FR" "$BR" "$(ratio "$FR" "$HR")" "$(ratio "$FR" "$BR")" \
    "create $FILES files" "$HC" "$FC" "$BC" "$(ratio "$FC" "$HC")" "$(ratio "$FC" "$BC")" \
    "ls -l $FILES files" "$HL" "$FL" "$BL" "$(ratio "$FL" "$HL")" "$(ratio "$FL" "$BL")" \
    "remove them" "$HD" "$FD" "$BD" "$(ratio "$FD" "$HD")" "$(ratio "$FD" "$BD")"

fi

# Start cost against rootfs size.
[[ " $PARTS " == *" start "* ]] || exit 0
shared_in() { sed -n 's/.* shared as .* in \(.*\)$/\1/p' "$1" | head -1; }
echo "container start cost (the handler's share step), by rootfs size:"
for size in 8 256; do
    mkdir -p "$DIR/root/fill"
    rm -f "$DIR/root/fill/"*
    for i in $(seq 1 "$size"); do head -c 1048576 /dev/urandom >"$DIR/root/fill/f$i"; done
    run vm virtio-fs "$DIR/root" sh -c : >/dev/null
    FS=$(shared_in "$DIR/vm-virtio-fs.err")
    run vm block "$DIR/root" sh -c : >/dev/null
    BLK=$(shared_in "$DIR/vm-block.err")
    printf '  rootfs + %3s MiB: virtio-fs %s, block %s\n' "$size" "$FS" "$BLK"
done
