#!/usr/bin/env bash
# Build skiff's tiny test initramfs: an uncompressed cpio (newc) holding
# Debian's static busybox, its applet links, /dev/console and ./init.
#
#   I=$(guest-image/initramfs/build.sh | tail -1)
#
# Uncompressed because unpacking it needs no decompressor (always supported
# by a kernel with BLK_DEV_INITRD) and costs almost nothing under slow
# emulation. The archive is reproducible: sorted, owner 0:0, mtime 0.
#
# The cache key is a sha256 over the busybox-static package version, ./init
# and this script; the result is $SKIFF_CACHE_DIR/initramfs/<key>/initramfs.cpio
# (default cache root: /var/cache/skiff). On a cache hit nothing is built.
# Progress goes to stderr; the only stdout line is the initramfs path.
#
# Needs root (or fakeroot) for the /dev/console device node.
set -euo pipefail

readonly BUSYBOX_PKG=busybox-static

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root="${SKIFF_CACHE_DIR:-/var/cache/skiff}/initramfs"

log() { printf 'initramfs/build.sh: %s\n' "$*" >&2; }
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

main() {
	ensure_packages "$BUSYBOX_PKG" cpio
	local ver key out
	ver=$(dpkg-query -W -f='${Version}' "$BUSYBOX_PKG")
	key=$(
		cd "$here"
		printf '%s %s\n' "$BUSYBOX_PKG" "$ver"
		sha256sum init build.sh
	)
	key=$(sha256sum <<<"$key" | cut -c1-16)
	out="$cache_root/$key"
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

	local busybox
	busybox=$(dpkg -L "$BUSYBOX_PKG" | grep -m1 -E '/busybox$') ||
		die "no busybox binary in $BUSYBOX_PKG"
	if ! "$busybox" --list | grep -qx devmem; then
		die "$busybox has no devmem applet (needed for the boot-timer write)"
	fi

	local stage tmp
	tmp=$(mktemp -d "$cache_root/.tmp-$key.XXXXXX")
	stage="$tmp/root"
	mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt}
	install -m 0755 "$busybox" "$stage/bin/busybox"
	install -m 0755 "$here/init" "$stage/init"
	# One symlink per applet, at the path busybox itself suggests.
	local applet
	while IFS= read -r applet; do
		[ "$applet" = bin/busybox ] && continue
		mkdir -p "$stage/$(dirname "$applet")"
		ln -sf /bin/busybox "$stage/$applet"
	done < <("$busybox" --list-full)

	# The kernel opens /dev/console for init's stdio before /init runs, and
	# devtmpfs is not mounted on an initramfs root: the node must be here.
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
	printf '%s %s\n' "$BUSYBOX_PKG" "$ver" >"$tmp/busybox-version"

	rm -rf "$out"
	mv "$tmp" "$out"
	chmod 0755 "$out"
	log "cached at $out ($(stat -c %s "$out/initramfs.cpio") bytes)"
	printf '%s\n' "$out/initramfs.cpio"
}

main "$@"
