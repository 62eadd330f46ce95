#!/usr/bin/env bash
# Build the guest initramfs whose /init is skiff-agent: an uncompressed cpio
# (newc) with the statically linked agent, /dev/console, /dev/null and the
# empty mount points the agent fills (it mounts /proc, /sys, /dev, /run, ...
# itself; see guest-image/agent/src/init.rs).
#
#   I=$(guest-image/initramfs/agent-build.sh | tail -1)
#   guest-image/initramfs/agent-build.sh --with-busybox   # + /bin/busybox and applets
#
# The agent is built with glibc, statically (crt-static, static-pie) for
# x86_64-unknown-linux-gnu, linking libseccomp.a from libseccomp-dev, with
# fat LTO and opt-level s; the script fails unless `file` and `ldd` both say
# the result is static. The binary is stripped for the image (smaller cpio =
# faster unpack under PVM).
# CARGO_TARGET_DIR is honoured (default: <repo>/target).
#
# The cache key is a sha256 over the stripped agent's own sha256, the
# busybox-static package version (with --with-busybox) and this script; the
# result is $SKIFF_CACHE_DIR/initramfs-agent/<key>/initramfs.cpio (default
# cache root: /var/cache/skiff). cargo runs every time (a no-op when the
# agent is up to date); the cpio is only packed on a cache miss. Progress
# goes to stderr; the only stdout line is the initramfs path.
#
# Needs root (or fakeroot) for the device nodes.
set -euo pipefail

readonly TARGET=x86_64-unknown-linux-gnu
readonly BUSYBOX_PKG=busybox-static

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache_root="${SKIFF_CACHE_DIR:-/var/cache/skiff}/initramfs-agent"
work="" # scratch dir for the stripped agent

log() { printf 'initramfs/agent-build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
	if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

pkg_installed() {
	[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

ensure_packages() {
	local missing=() p
	for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
	[ "${#missing[@]}" -eq 0 ] && return 0
	log "installing: ${missing[*]}"
	as_root apt-get update -q >&2
	as_root env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# Builds the agent statically; prints the binary's path.
build_agent() {
	local target_dir="${CARGO_TARGET_DIR:-$repo/target}"
	log "building skiff-agent (static, $TARGET)"
	(
		cd "$repo"
		# libseccomp-sys links dynamically unless told otherwise; crt-static
		# makes the whole binary static (glibc's libc.a, static-pie). Size
		# over speed (fat LTO, one codegen unit, opt-level s: 9.0 -> 5.7 MiB
		# stripped): under PVM the kernel unpacks the initramfs at ~1 s/MiB.
		CARGO_PROFILE_RELEASE_LTO=fat \
			CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
			CARGO_PROFILE_RELEASE_OPT_LEVEL=s \
			LIBSECCOMP_LINK_TYPE=static \
			LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
			RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
			cargo build --release --locked --target "$TARGET" -p skiff-agent >&2
	)
	printf '%s\n' "$target_dir/$TARGET/release/skiff-agent"
}

# Fails unless both `file` and `ldd` say the binary is static.
check_static() {
	local bin=$1 kind linked
	kind=$(file -b "$bin")
	case "$kind" in
	*"statically linked"* | *"static-pie linked"*) ;;
	*) die "$bin is not static: file says: $kind" ;;
	esac
	# ldd exits 1 on static binaries; only its message matters.
	linked=$(ldd "$bin" 2>&1 || true)
	case "$linked" in
	*"not a dynamic executable"* | *"statically linked"*) ;;
	*) die "$bin is not static: ldd says: $linked" ;;
	esac
	log "static: $kind"
}

main() {
	local busybox_wanted=0 arg
	for arg in "$@"; do
		case "$arg" in
		--with-busybox) busybox_wanted=1 ;;
		-h | --help)
			sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
			return 0
			;;
		*) die "unknown argument '$arg' (known: --with-busybox)" ;;
		esac
	done
	local packages=(libseccomp-dev libc6-dev cpio file binutils)
	[ "$busybox_wanted" -eq 1 ] && packages+=("$BUSYBOX_PKG")
	ensure_packages "${packages[@]}"

	local agent
	agent=$(build_agent)
	[ -x "$agent" ] || die "cargo did not produce $agent"
	check_static "$agent"
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT # global: the trap runs after main returns
	strip -o "$work/init" "$agent"
	check_static "$work/init"

	local key busybox="" ver=""
	if [ "$busybox_wanted" -eq 1 ]; then
		ver=$(dpkg-query -W -f='${Version}' "$BUSYBOX_PKG")
		busybox=$(dpkg -L "$BUSYBOX_PKG" | grep -m1 -E '/busybox$') ||
			die "no busybox binary in $BUSYBOX_PKG"
	fi
	key=$(
		sha256sum "$work/init" | cut -d' ' -f1
		[ -z "$busybox" ] || printf '%s %s\n' "$BUSYBOX_PKG" "$ver"
		cd "$here" && sha256sum agent-build.sh
	)
	key=$(sha256sum <<<"$key" | cut -c1-16)
	local out="$cache_root/$key"
	if [ -f "$out/initramfs.cpio" ]; then
		log "cache hit"
		printf '%s\n' "$out/initramfs.cpio"
		return 0
	fi

	if [ "$(id -u)" -ne 0 ]; then
		command -v fakeroot >/dev/null ||
			die "run as root or install fakeroot (needed for /dev/console)"
	fi
	as_root mkdir -p "$cache_root"
	[ -w "$cache_root" ] || die "cache dir $cache_root is not writable"

	local tmp stage
	tmp=$(mktemp -d "$cache_root/.tmp-$key.XXXXXX")
	stage="$tmp/root"
	mkdir -p "$stage"/{dev,proc,sys,run,tmp,etc}
	chmod 1777 "$stage/tmp"
	install -m 0755 "$work/init" "$stage/init"
	if [ -n "$busybox" ]; then
		mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin}
		install -m 0755 "$busybox" "$stage/bin/busybox"
		local applet
		while IFS= read -r applet; do
			[ "$applet" = bin/busybox ] && continue
			mkdir -p "$stage/$(dirname "$applet")"
			ln -sf /bin/busybox "$stage/$applet"
		done < <("$busybox" --list-full)
	fi

	# The kernel opens /dev/console for init's stdio before /init runs, and
	# devtmpfs is not mounted on an initramfs root: the nodes must be here.
	local pack='
		mknod -m 0600 dev/console c 5 1
		mknod -m 0666 dev/null c 1 3
		find . -exec touch -h -d @0 {} +
		find . -mindepth 1 | LC_ALL=C sort |
			cpio --quiet -o -H newc -R 0:0 --reproducible
	'
	if [ "$(id -u)" -eq 0 ]; then
		(cd "$stage" && sh -c "$pack") >"$tmp/initramfs.cpio"
	else
		(cd "$stage" && fakeroot sh -c "$pack") >"$tmp/initramfs.cpio"
	fi
	rm -rf "$stage"
	{
		printf 'agent %s\n' "$(sha256sum "$work/init" | cut -d' ' -f1)"
		[ -z "$busybox" ] || printf '%s %s\n' "$BUSYBOX_PKG" "$ver"
	} >"$tmp/contents"

	rm -rf "$out"
	mv "$tmp" "$out"
	chmod 0755 "$out"
	log "cached at $out ($(stat -c %s "$out/initramfs.cpio") bytes)"
	printf '%s\n' "$out/initramfs.cpio"
}

main "$@"
