#!/usr/bin/env bash
# The container rootfs inside the micro-VM (a virtio-blk ext4 image built
# from the rootfs directory) against the same rootfs on the host (the `linux`
# handler), one `skiff run` each, same workload, same run:
#
#   SKIFF_VM_KERNEL=... SKIFF_VM_INITRD=... benches/rootfs-bench.sh [MIB] [FILES]
#
# Inside the container: write MIB MiB (dd, then sync), read it back (cat),
# create FILES small files, list them with stat data (ls -l), remove them.
# Times come from the container's own /proc/uptime (10 ms resolution), so
# the VM's boot is not in them; the script also prints how long building
# the ext4 image took (the vm handler's extra container-start cost).
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
run() {
    "$SKIFF" run --handler "$1" --kernel "$SKIFF_VM_KERNEL" --initrd "$SKIFF_VM_INITRD" \
        --rootfs "$DIR/root" -e MIB="$MIB" -e FILES="$FILES" -- sh -c "$WORKLOAD" 2>"$DIR/$1.err"
}
read -r _ HW HR HC HL HD < <(run linux | grep RESULT)
read -r _ VW VR VC VL VD < <(run vm | grep RESULT)
IMG=$(sed -n 's/.*rootfs image .*(\([0-9]*\) MiB) built in \(.*\)$/\1 MiB in \2/p' "$DIR/vm.err")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) b = 1; printf "%.1f", a / b }'; }
echo "rootfs workload, centiseconds (host = linux handler on the host fs; vm = ext4 on virtio-blk in the guest):"
printf '  %-28s host %5s  vm %5s  vm/host %sx\n' \
    "write $MIB MiB + sync" "$HW" "$VW" "$(ratio "$VW" "$HW")" \
    "read $MIB MiB" "$HR" "$VR" "$(ratio "$VR" "$HR")" \
    "create $FILES files" "$HC" "$VC" "$(ratio "$VC" "$HC")" \
    "ls -l $FILES files" "$HL" "$VL" "$(ratio "$VL" "$HL")" \
    "remove them" "$HD" "$VD" "$(ratio "$VD" "$HD")"
echo "vm handler's ext4 image: $IMG"
