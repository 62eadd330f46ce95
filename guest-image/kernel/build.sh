#!/usr/bin/env bash
# Build skiff's minimal microVM guest kernel (an uncompressed, PVH-bootable
# vmlinux) from Debian's linux-source-6.12, and cache it.
#
#   K=$(guest-image/kernel/build.sh | tail -1)
#
# The cache key is a sha256 over the linux-source-6.12 package version, the
# config fragment (microvm.config), every patch in patches/, and this script.
# The result lives in $SKIFF_CACHE_DIR/kernel/<key>/vmlinux (default cache
# root: /var/cache/skiff), next to the final .config. On a cache hit nothing
# is built. Progress goes to stderr; the only stdout line is the vmlinux path.
#
# Environment:
#   SKIFF_CACHE_DIR     cache root (default /var/cache/skiff)
#   SKIFF_KEEP_BUILD=1  keep the build tree (<cache>/kernel/build-<key>)
#   JOBS                make -j value (default: nproc)
set -euo pipefail

readonly SRC_PKG=linux-source-6.12
readonly SRC_TARBALL=/usr/src/linux-source-6.12.tar.xz
readonly BUILD_DEPS=(build-essential bc bison flex libelf-dev libssl-dev cpio
	xz-utils patch binutils)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/microvm.config"
cache_root="${SKIFF_CACHE_DIR:-/var/cache/skiff}/kernel"
jobs="${JOBS:-$(nproc)}"

log() { printf 'kernel/build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
	if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

pkg_installed() {
	[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

apt_updated=0
apt_install() {
	local missing=() p
	for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
	[ "${#missing[@]}" -eq 0 ] && return 0
	if [ "$apt_updated" -eq 0 ]; then
		log "apt-get update"
		as_root apt-get update -q >&2
		apt_updated=1
	fi
	log "installing: ${missing[*]}"
	as_root env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# The source version: the installed package's, or else the one apt would
# install (so a cache hit needs no package installed at all).
src_version() {
	local v
	v=$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null || true)
	if ! pkg_installed "$SRC_PKG" || [ -z "$v" ]; then
		v=$(apt-cache policy "$SRC_PKG" 2>/dev/null |
			awk '/Candidate:/ { print $2 }')
		if [ -z "$v" ] || [ "$v" = "(none)" ]; then
			as_root apt-get update -q >&2
			apt_updated=1
			v=$(apt-cache policy "$SRC_PKG" | awk '/Candidate:/ { print $2 }')
		fi
	fi
	[ -n "$v" ] && [ "$v" != "(none)" ] || die "no $SRC_PKG package available from apt"
	printf '%s\n' "$v"
}

cache_key() {
	local ver=$1
	(
		cd "$here"
		printf '%s %s\n' "$SRC_PKG" "$ver"
		sha256sum microvm.config build.sh
		find patches -name '*.patch' -type f | LC_ALL=C sort | xargs -r sha256sum
	) | sha256sum | cut -c1-16
}

# Every `CONFIG_X=y` (and `CONFIG_X="..."`) in the fragment must be in the
# final .config as written, and every `# CONFIG_X is not set` must be unset.
verify_config() {
	local config=$1 bad=() sym line
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*)
			grep -qxF -- "$line" "$config" || bad+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$config" || echo absent))")
			;;
		"# CONFIG_"*" is not set")
			sym=${line#"# "}
			sym=${sym%% *}
			if grep -qE "^$sym=" "$config"; then bad+=("$line (got: $(grep -E "^$sym=" "$config"))"); fi
			;;
		esac
	done <"$fragment"
	if [ "${#bad[@]}" -ne 0 ]; then
		log "these fragment options did not survive into the final .config:"
		printf '  %s\n' "${bad[@]}" >&2
		die "config check failed (renamed symbol or unmet dependency?)"
	fi
}

# PVH entry: an ELF note owned by "Xen" of type 18 (XEN_ELFNOTE_PHYS32_ENTRY).
verify_pvh_note() {
	local notes
	notes=$(readelf -W -n "$1")
	if ! grep -iE '^\s*Xen\s+0x[0-9a-f]+\s+(.*0x0*12\b|.*PHYS32)' <<<"$notes" >/dev/null; then
		printf '%s\n' "$notes" >&2
		die "$1 has no Xen PHYS32_ENTRY (type 18) note: CONFIG_PVH missing?"
	fi
}

main() {
	local ver key out
	ver=$(src_version)
	key=$(cache_key "$ver")
	out="$cache_root/$key"
	if [ -f "$out/vmlinux" ]; then
		log "cache hit ($SRC_PKG $ver)"
		printf '%s\n' "$out/vmlinux"
		return 0
	fi

	as_root mkdir -p "$cache_root"
	[ -w "$cache_root" ] || die "cache dir $cache_root is not writable"
	exec 9>"$cache_root/.lock"
	flock 9
	if [ -f "$out/vmlinux" ]; then # built by someone else meanwhile
		printf '%s\n' "$out/vmlinux"
		return 0
	fi

	apt_install "$SRC_PKG" "${BUILD_DEPS[@]}"
	local installed
	installed=$(dpkg-query -W -f='${Version}' "$SRC_PKG")
	[ "$installed" = "$ver" ] ||
		die "$SRC_PKG $installed is installed but the cache key used $ver; re-run"

	local build="$cache_root/build-$key"
	rm -rf "$build"
	mkdir -p "$build"
	log "unpacking $SRC_TARBALL into $build"
	tar -xf "$SRC_TARBALL" -C "$build"
	local src
	src=$(find "$build" -mindepth 1 -maxdepth 1 -type d | head -n1)
	[ -f "$src/Makefile" ] || die "no kernel tree in $SRC_TARBALL"

	local p
	for p in "$here"/patches/*.patch; do
		[ -e "$p" ] || continue
		log "applying $(basename "$p")"
		patch -d "$src" -p1 --forward --batch --quiet <"$p" >&2
	done

	local -a kmake=(make -C "$src" -s ARCH=x86_64
		KBUILD_BUILD_USER=skiff KBUILD_BUILD_HOST=skiff)
	# allnoconfig with the fragment as KCONFIG_ALLCONFIG (what
	# `merge_config.sh -n` does): the fragment's values, everything else at
	# its allnoconfig value. ARCH=x86_64 makes 64BIT non-optional.
	log "configuring: allnoconfig + microvm.config"
	"${kmake[@]}" KCONFIG_ALLCONFIG="$fragment" allnoconfig >&2
	"${kmake[@]}" olddefconfig >&2
	verify_config "$src/.config"

	log "building vmlinux with -j$jobs (about 10 min on 2 cores)"
	local t0=$SECONDS
	"${kmake[@]}" -j"$jobs" vmlinux >&2
	log "built in $((SECONDS - t0)) s"
	verify_pvh_note "$src/vmlinux"

	local tmp="$cache_root/.tmp-$key"
	rm -rf "$tmp"
	mkdir -p "$tmp"
	cp "$src/vmlinux" "$tmp/vmlinux"
	cp "$src/.config" "$tmp/config"
	printf '%s %s\n' "$SRC_PKG" "$ver" >"$tmp/source-version"
	"${kmake[@]}" kernelrelease >"$tmp/kernelrelease"
	rm -rf "$out"
	mv "$tmp" "$out"
	[ "${SKIFF_KEEP_BUILD:-0}" = 1 ] || rm -rf "$build"
	log "cached at $out"
	printf '%s\n' "$out/vmlinux"
}

main "$@"
