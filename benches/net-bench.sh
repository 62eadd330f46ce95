#!/usr/bin/env bash
# Pod to pod networking on one CNI bridge: a client pod fetching from a
# server pod, as runc<->runc, vm<->runc and vm<->vm, same run, same bridge:
#
#   SKIFF_VM_KERNEL=... SKIFF_VM_INITRD=... benches/net-bench.sh [MIB] [REQUESTS]
#
# Throughput: one HTTP GET of a MIB MiB file (busybox httpd -> wget), so TCP
# with whatever offloads the path has. Round trip: REQUESTS sequential GETs
# of a 2-byte file (a TCP connect, a request, an answer, a close each).
# Times come from the client's own /proc/uptime (10 ms resolution), so a
# VM's start is not in them; each request is a new busybox wget process,
# so in a VM the round trip includes a guest fork and exec. A "runc" pod here is busybox run in the pod's
# network namespace on the host: runc adds nothing to the network path. A
# "vm" pod is `skiff run --handler vm --netns` (templates on: the first VM
# boots and makes the template, the others restore from it).
#
# Everything runs inside network namespaces the script makes (a host
# namespace holding the bridge, one per pod; 10.98.0.0/24), all removed at
# the end. Needs root, /dev/kvm, busybox-static, containernetworking-plugins
# and release builds of skiff and skiff-agent (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-4}
REQUESTS=${2:-20}
: "${SKIFF_VM_KERNEL:?set SKIFF_VM_KERNEL (guest-image/kernel/build.sh)}"
: "${SKIFF_VM_INITRD:?set SKIFF_VM_INITRD (guest-image/initramfs/agent-build.sh)}"
cargo build -q --release -p shim -p skiff-agent --bin skiff --bin skiff-agent
SKIFF=${CARGO_TARGET_DIR:-$PWD/target}/release/skiff
CNI=/usr/lib/cni

TAG=sknb$$
DIR=$(mktemp -d /var/tmp/skiff-net-bench-XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for p in a b c; do
        ip netns exec "$TAG-host" env CNI_COMMAND=DEL CNI_CONTAINERID="$TAG-$p" \
            CNI_NETNS="/var/run/netns/$TAG-$p" CNI_IFNAME=eth0 CNI_PATH=$CNI \
            $CNI/bridge <"$DIR/bridge.conf" >/dev/null 2>&1 || true
        ip netns del "$TAG-$p" 2>/dev/null || true
    done
    ip netns del "$TAG-host" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

cat >"$DIR/bridge.conf" <<EOF
{"cniVersion": "0.4.0", "name": "skiff-bench", "type": "bridge", "bridge": "sknb0",
 "isGateway": true, "ipMasq": false,
 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.98.0.0/24"}]],
          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$DIR/ipam"}}
EOF
ip netns add "$TAG-host"
ip netns exec "$TAG-host" ip link set lo up
declare -A IP
for p in a b c; do
    ip netns add "$TAG-$p"
    ip netns exec "$TAG-$p" ip link set lo up
    IP[$p]=$(ip netns exec "$TAG-host" env CNI_COMMAND=ADD CNI_CONTAINERID="$TAG-$p" \
        CNI_NETNS="/var/run/netns/$TAG-$p" CNI_IFNAME=eth0 CNI_PATH=$CNI \
        $CNI/bridge <"$DIR/bridge.conf" | sed -n 's/.*"address": *"\([0-9.]*\)\/.*/\1/p')
done

# The pods' root: busybox, the files the server serves.
ROOT=$DIR/root
mkdir -p "$ROOT/bin" "$ROOT/proc" "$ROOT/dev" "$ROOT/sys" "$ROOT/tmp" "$ROOT/www"
cp /bin/busybox "$ROOT/bin/"
for a in sh wget httpd head sleep echo cat; do ln -s busybox "$ROOT/bin/$a"; done
head -c $((MIB << 20)) /dev/zero >"$ROOT/www/big"
echo x >"$ROOT/www/small"

CLIENT='
now() { read -r up _ </proc/uptime; echo "${up%.*}${up#*.}"; }
until wget -q -O /dev/null "http://$SERVER:8080/small"; do sleep 1; done
t0=$(now)
wget -q -O /dev/null "http://$SERVER:8080/big"
t1=$(now)
i=0
while [ $i -lt $REQUESTS ]; do wget -q -O /dev/null "http://$SERVER:8080/small"; i=$((i + 1)); done
t2=$(now)
echo "RESULT $((t1 - t0)) $((t2 - t1))"
'
vm() { # vm POD CMD...: a skiff run in pod POD's namespace
    local pod=$1
    shift
    "$SKIFF" run --handler vm --kernel "$SKIFF_VM_KERNEL" --initrd "$SKIFF_VM_INITRD" \
        --netns "/var/run/netns/$TAG-$pod" --rootfs "$ROOT" "$@"
}

# Servers: pod a on the host ("runc"), pod c in a VM (up while it is used).
ip netns exec "$TAG-a" busybox httpd -f -p 8080 -h "$ROOT/www" &
PIDS+=($!)
# (not through `vm`: a function run with & is a subshell, and killing it
# would leave the skiff process)
"$SKIFF" run --handler vm --kernel "$SKIFF_VM_KERNEL" --initrd "$SKIFF_VM_INITRD" \
    --netns "/var/run/netns/$TAG-c" --rootfs "$ROOT" -- httpd -f -p 8080 -h /www \
    2>"$DIR/server-vm.err" &
PIDS+=($!)

run_host() { ip netns exec "$TAG-b" env SERVER="$1" REQUESTS="$REQUESTS" busybox sh -c "$CLIENT"; }
run_vm() { vm b -e SERVER="$1" -e REQUESTS="$REQUESTS" -- sh -c "$CLIENT" 2>>"$DIR/client-vm.err"; }

read -r _ RR_T RR_R < <(run_host "${IP[a]}" | grep RESULT)
read -r _ VR_T VR_R < <(run_vm "${IP[a]}" | grep RESULT)
read -r _ VV_T VV_R < <(run_vm "${IP[c]}" | grep RESULT)

mibs() { awk -v m="$MIB" -v cs="$1" 'BEGIN { if (cs == 0) cs = 1; printf "%.2f", m * 100 / cs }'; }
ms() { awk -v cs="$1" -v n="$REQUESTS" 'BEGIN { printf "%.1f", cs * 10 / n }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) b = 1; printf "%.1f", a / b }'; }
echo "pod to pod on one bridge ($MIB MiB GET; $REQUESTS sequential GETs), client's clock:"
printf '  %-12s %8s MiB/s  %7s ms/request\n' \
    "runc<->runc" "$(mibs "$RR_T")" "$(ms "$RR_R")" \
    "vm<->runc" "$(mibs "$VR_T")" "$(ms "$VR_R")" \
    "vm<->vm" "$(mibs "$VV_T")" "$(ms "$VV_R")"
echo "ratios against runc<->runc (time, higher is slower):"
printf '  %-12s throughput %sx  round trip %sx\n' \
    "vm<->runc" "$(ratio "$VR_T" "$RR_T")" "$(ratio "$VR_R" "$RR_R")" \
    "vm<->vm" "$(ratio "$VV_T" "$RR_T")" "$(ratio "$VV_R" "$RR_R")"
