#!/usr/bin/env bash
# Boot the skiff guest kernel + test initramfs under QEMU `-M microvm` and
# report how long it took. A reference for validating the kernel and for the
# skiff-vs-QEMU benchmark; skiff's own tests use skiff's VMM.
#
#   guest-image/kernel/qemu-boot.sh [options]
#     --tcg            software emulation (default if /dev/kvm is absent)
#     --kvm            hardware virtualisation (default if /dev/kvm exists)
#     --pvm            PVM host: hide CPU features PVM cannot emulate and add
#                      the PVM boot parameters (default: auto, from
#                      /sys/module/kvm_pvm, only with --kvm)
#     --no-pvm         never add them
#     --disk IMG       attach IMG as a virtio-blk (virtio-mmio) disk
#     --append ARGS    extra kernel command-line arguments
#     --kernel K       default: $(guest-image/kernel/build.sh | tail -1)
#     --initrd I       default: $(guest-image/initramfs/build.sh | tail -1)
#     --mem MIB        default 256
#     --timeout S      give up after S seconds (default 180)
#     --log FILE       also keep the raw serial log in FILE
#
# Prints the serial console with each line prefixed by the wall-clock seconds
# since QEMU was started, then a summary on stderr:
#   banner=<s> run_init=<s> init_line=<s> exit=<clean|timeout|...>
# "clean" means the guest printed the init line and then reset through the
# i8042 (reboot=k, QEMU -no-reboot exits 0) without a panic.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Command line for every host; PVM additions below.
readonly CMDLINE_BASE="console=ttyS0 reboot=k panic=-1"
# PVM (this project's CI hosts): CPUID masks repeated on the command line,
# the three guest-kernel accommodations (patches/), no verw-based buffer
# clearing (an emulation failure under PVM), and no RCU stall reports (the
# guest is slow enough to trigger them; printing them over the emulated UART
# only slows it further).
readonly CMDLINE_PVM="noxsave nopcid noinvpcid nofsgsbase \
clearcpuid=cx16,smap,rdtscp,rdpid,popcnt pti=on \
skip_int3_selftest pvm_syscall_fixup pvm_no_fwait \
mds=off mmio_stale_data=off tsx_async_abort=off reg_file_data_sampling=off \
rcupdate.rcu_cpu_stall_suppress=1"
# -arch-capabilities: QEMU 7.2 otherwise writes MSR_IA32_ARCH_CAPABILITIES
# (0x10a), which PVM rejects ("failed to set MSR 0x10a", QEMU aborts).
readonly CPU_PVM="host,-cx16,-xsave,-smap,-fsgsbase,-pcid,-invpcid,-rdtscp,-rdpid,-arch-capabilities"

accel=auto pvm=auto disk="" extra="" kernel="" initrd="" mem=256 timeout_s=180 rawlog=""
while [ $# -gt 0 ]; do
	case "$1" in
	--tcg) accel=tcg ;;
	--kvm) accel=kvm ;;
	--pvm) pvm=yes ;;
	--no-pvm) pvm=no ;;
	--disk) disk=$2; shift ;;
	--append) extra=$2; shift ;;
	--kernel) kernel=$2; shift ;;
	--initrd) initrd=$2; shift ;;
	--mem) mem=$2; shift ;;
	--timeout) timeout_s=$2; shift ;;
	--log) rawlog=$2; shift ;;
	*) echo "qemu-boot.sh: unknown option $1" >&2; exit 2 ;;
	esac
	shift
done

[ "$accel" != auto ] || { [ -c /dev/kvm ] && accel=kvm || accel=tcg; }
if [ "$pvm" = auto ]; then
	[ "$accel" = kvm ] && [ -d /sys/module/kvm_pvm ] && pvm=yes || pvm=no
fi
[ -n "$kernel" ] || kernel=$("$here/build.sh" | tail -1)
[ -n "$initrd" ] || initrd=$("$here/../initramfs/build.sh" | tail -1)

cmdline="$CMDLINE_BASE"
# shellcheck disable=SC2054 # commas are inside QEMU option values
args=(-M microvm,acpi=off -m "$mem" -smp 1 -nodefaults -no-user-config
	-display none -serial stdio -monitor none -no-reboot
	-device i8042 -kernel "$kernel" -initrd "$initrd")
if [ "$accel" = kvm ]; then
	args+=(-enable-kvm)
	if [ "$pvm" = yes ]; then
		args+=(-cpu "$CPU_PVM")
		cmdline="$cmdline $CMDLINE_PVM"
	else
		args+=(-cpu host)
	fi
else
	args+=(-accel tcg -cpu max)
fi
if [ -n "$disk" ]; then
	# shellcheck disable=SC2054
	args+=(-drive "id=disk0,file=$disk,format=raw,if=none"
		-device virtio-blk-device,drive=disk0)
fi
[ -z "$extra" ] || cmdline="$cmdline $extra"
args+=(-append "$cmdline")

echo "qemu-boot.sh: accel=$accel pvm=$pvm" >&2
echo "qemu-boot.sh: qemu-system-x86_64 ${args[*]}" >&2

t0=$EPOCHREALTIME
banner="" run_init="" init_line="" panic=0
since() { awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }
set +e
exec 3< <(timeout "$timeout_s" qemu-system-x86_64 "${args[@]}" </dev/null 2>&1; echo "@@qemu-exit $?")
qemu_rc=""
while IFS= read -r line <&3; do
	line=${line%$'\r'}
	case "$line" in
	"@@qemu-exit "*) qemu_rc=${line#@@qemu-exit }; continue ;;
	esac
	t=$(since)
	[ -z "$rawlog" ] || printf '%s\n' "$line" >>"$rawlog"
	printf '[+%7ss] %s\n' "$t" "$line"
	case "$line" in
	*"Linux version "*) [ -n "$banner" ] || banner=$t ;;
	*"Run /init as init process"*) run_init=$t ;;
	*"skiff-init: hello from the guest"*) init_line=$t ;;
	*"Kernel panic"*) panic=1 ;;
	esac
done
set -e

case "$qemu_rc" in
0) if [ -n "$init_line" ] && [ "$panic" = 0 ]; then status=clean; else status="reset-without-init-line"; fi ;;
124) status=timeout ;;
*) status="qemu-exit-$qemu_rc" ;;
esac
echo "qemu-boot.sh: banner=${banner:-none} run_init=${run_init:-none} init_line=${init_line:-none} exit=$status total=$(since)" >&2
[ "$status" = clean ]
