#!/usr/bin/env bash
# Build the guest initramfs whose /init is skiff-agent: an uncompressed cpio
# (newc) with the statically linked agent, /dev/console, /dev/null and the
# empty mount points the agent fills (it mounts /proc, /sys, /dev, /run, ...
# itself; see guest-image/agent/src/init.rs).
#
#   I=$(guest-image/initramfs/agent-build.sh | tail -1)
#   guest-image/initramfs/agent-build.sh --with-busybox   # + /bin/busybox and applets
#
# The agent is built with musl, statically (static-pie) for
# x86_64-unknown-linux-musl, with fat LTO and opt-level s; the script fails
# unless `file`, `ldd` and `readelf` all say the result is static and it has
# libseccomp linked in (OCI seccomp profiles are enforced in the guest too).
# Debian has no musl libseccomp, so the script builds libseccomp.a from
# Debian's own source package (the version of libseccomp2 apt offers, with
# Debian's patches) with musl-gcc and caches it under
# $SKIFF_CACHE_DIR/libseccomp-musl/<key>/, key = sha256 over that version,
# the musl-dev, linux-libc-dev and gcc versions and this script. It installs
# what it needs: apt packages, and the musl target through rustup. The
# binary is stripped for the image (smaller cpio = faster unpack under PVM).
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
shopt -s inherit_errexit # a failure inside $(...) fails the script too

readonly TARGET=x86_64-unknown-linux-musl
readonly BUSYBOX_PKG=busybox-static
# Debian's libseccomp source package, and a binary package built from it
# whose candidate version names the source version to fetch.
readonly SECCOMP_SRC=libseccomp
readonly SECCOMP_BIN=libseccomp2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache_root="${SKIFF_CACHE_DIR:-/var/cache/skiff}/initramfs-agent"
seccomp_root="${SKIFF_CACHE_DIR:-/var/cache/skiff}/libseccomp-musl"
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

# Adds the musl target to the toolchain rust-toolchain.toml pins.
ensure_rust_target() {
	command -v rustup >/dev/null || die "rustup is needed to add the $TARGET target"
	(
		cd "$repo"
		installed=$(rustup target list --installed)
		grep -qxF "$TARGET" <<<"$installed" && exit 0
		log "rustup target add $TARGET"
		rustup target add "$TARGET" >&2
	)
}

# The libseccomp version to build: the candidate of the binary package, so
# it matches what a glibc build would link (the source version is the same).
seccomp_version() {
	local v
	v=$(apt-cache policy "$SECCOMP_BIN" 2>/dev/null | awk '/Candidate:/ { print $2 }')
	if [ -z "$v" ] || [ "$v" = "(none)" ]; then
		as_root apt-get update -q >&2
		v=$(apt-cache policy "$SECCOMP_BIN" | awk '/Candidate:/ { print $2 }')
	fi
	[ -n "$v" ] && [ "$v" != "(none)" ] || die "no $SECCOMP_BIN package known to apt"
	printf '%s\n' "$v"
}

# Builds (or finds in the cache) a musl libseccomp.a from Debian's source
# package; prints the prefix holding lib/libseccomp.a, lib/pkgconfig and
# include/.
build_libseccomp() {
	local ver key out
	ver=$(seccomp_version)
	key=$(
		printf '%s %s\n' "$SECCOMP_SRC" "$ver"
		dpkg-query -W musl-dev linux-libc-dev
		gcc -dumpfullversion
		cd "$here" && sha256sum agent-build.sh
	)
	key=$(sha256sum <<<"$key" | cut -c1-16)
	out="$seccomp_root/$key"
	if [ -f "$out/lib/libseccomp.a" ]; then
		log "libseccomp $ver for musl: cache hit"
		printf '%s\n' "$out"
		return 0
	fi
	as_root mkdir -p "$seccomp_root"
	[ -w "$seccomp_root" ] || die "cache dir $seccomp_root is not writable"
	(
		exec 9>"$seccomp_root/.lock"
		flock 9
		[ -f "$out/lib/libseccomp.a" ] && exit 0 # built meanwhile
		local tmp
		tmp=$(mktemp -d "$seccomp_root/.tmp-$key.XXXXXX")
		trap 'rm -rf "$tmp"' EXIT
		log "building libseccomp $ver for musl in $tmp"

		# The Debian archives apt already uses, as deb-src entries in a
		# private sources list and lists dir (the system's apt config is
		# left alone; no package cache files are written).
		mkdir -p "$tmp/lists/partial"
		# shellcheck disable=SC2016 # $(...) is apt's format syntax
		apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' \
			'Identifier: Packages' 'Origin: Debian' | LC_ALL=C sort -u |
			while read -r uri release component; do
				printf 'deb-src [signed-by=%s] %s %s %s\n' \
					/usr/share/keyrings/debian-archive-keyring.gpg \
					"$uri" "$release" "$component"
			done >"$tmp/sources.list"
		[ -s "$tmp/sources.list" ] || die "apt knows no Debian archive to fetch $SECCOMP_SRC from"
		local apt_opts=(
			-o Dir::Etc::SourceList="$tmp/sources.list"
			-o Dir::Etc::SourceParts=/dev/null
			-o Dir::State::Lists="$tmp/lists"
			-o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
			-o APT::Sandbox::User=root
		)
		apt-get "${apt_opts[@]}" update -q >&2
		# Unpacks with dpkg-source, so Debian's patches are applied
		# (bookworm's update the syscall table; gperf regenerates it).
		mkdir "$tmp/src"
		(cd "$tmp/src" && apt-get "${apt_opts[@]}" source -q "$SECCOMP_SRC=$ver" >&2)
		local src
		src=$(find "$tmp/src" -mindepth 1 -maxdepth 1 -type d | head -n1)
		[ -x "$src/configure" ] || die "no libseccomp tree from apt-get source"

		# musl-gcc sees only musl's headers; libseccomp also needs the
		# kernel's UAPI ones (linux-libc-dev), which are libc-neutral.
		mkdir "$tmp/kinc"
		ln -s /usr/include/linux /usr/include/asm-generic "$tmp/kinc/"
		ln -s "/usr/include/$(gcc -print-multiarch)/asm" "$tmp/kinc/asm"
		(
			cd "$src"
			./configure -q --prefix="$out" --enable-static --disable-shared \
				--disable-python CC=musl-gcc \
				CFLAGS="-O2 -fPIC -isystem $tmp/kinc" >&2
			make -s -j"$(nproc)" -C src >&2
			make -s -C src install DESTDIR="$tmp/dest" >/dev/null
			make -s -C include install DESTDIR="$tmp/dest" >/dev/null
			make -s install-pkgconfDATA DESTDIR="$tmp/dest" >/dev/null
		)
		[ -f "$tmp/dest$out/lib/libseccomp.a" ] || die "libseccomp build produced no libseccomp.a"
		printf '%s %s\n' "$SECCOMP_SRC" "$ver" >"$tmp/dest$out/source-version"
		rm -rf "$out"
		mv "$tmp/dest$out" "$out"
		log "libseccomp for musl cached at $out"
	)
	printf '%s\n' "$out"
}

# Builds the agent statically for musl against the libseccomp.a under
# prefix $1; prints the binary's path.
build_agent() {
	local seccomp=$1 target_dir="${CARGO_TARGET_DIR:-$repo/target}"
	log "building skiff-agent (static, $TARGET)"
	(
		cd "$repo"
		# libseccomp-sys links dynamically unless told otherwise; crt-static
		# (musl's default, spelled out) makes the whole binary static
		# (static-pie). LIBSECCOMP_LIB_PATH also points the libseccomp
		# crate's pkg-config probe at the musl build's .pc. Any C a
		# dependency compiles goes through musl-gcc. Size over speed (fat
		# LTO, one codegen unit, opt-level s): under PVM the kernel unpacks
		# the initramfs at ~1 s/MiB.
		CARGO_PROFILE_RELEASE_LTO=fat \
			CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
			CARGO_PROFILE_RELEASE_OPT_LEVEL=s \
			LIBSECCOMP_LINK_TYPE=static \
			LIBSECCOMP_LIB_PATH="$seccomp/lib" \
			CC_x86_64_unknown_linux_musl=musl-gcc \
			RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
			cargo build --release --locked --target "$TARGET" -p skiff-agent >&2
	)
	printf '%s\n' "$target_dir/$TARGET/release/skiff-agent"
}

# Fails unless `file`, `ldd` and the ELF headers all say the binary is
# static: no program interpreter, no shared-library dependency.
check_static() {
	local bin=$1 kind linked headers dynamic
	kind=$(file -b "$bin")
	case "$kind" in
	*"statically linked"* | *"static-pie linked"*) ;;
	*) die "$bin is not static: file says: $kind" ;;
	esac
	# glibc's ldd exits 1 on static binaries; only its message matters.
	linked=$(ldd "$bin" 2>&1 || true)
	case "$linked" in
	*"not a dynamic executable"* | *"statically linked"*) ;;
	*) die "$bin is not static: ldd says: $linked" ;;
	esac
	headers=$(readelf -lW "$bin")
	! grep -q 'INTERP' <<<"$headers" ||
		die "$bin is not static: it has a program interpreter"
	dynamic=$(readelf -dW "$bin")
	! grep -q '(NEEDED)' <<<"$dynamic" ||
		die "$bin is not static: it needs $(grep '(NEEDED)' <<<"$dynamic")"
	log "static: $kind"
}

# Fails unless libseccomp is linked in (checked before stripping).
check_seccomp() {
	local symbols
	symbols=$(nm "$1")
	grep -qE ' T seccomp_init$' <<<"$symbols" ||
		die "$1 has no libseccomp in it: seccomp profiles would not be enforced"
}

main() {
	local busybox_wanted=0 arg
	for arg in "$@"; do
		case "$arg" in
		--with-busybox) busybox_wanted=1 ;;
		-h | --help)
			sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
			return 0
			;;
		*) die "unknown argument '$arg' (known: --with-busybox)" ;;
		esac
	done
	# musl-tools: musl-gcc (a gcc wrapper); gperf, dpkg-dev, make and
	# linux-libc-dev: libseccomp's build.
	local packages=(musl-tools gcc make gperf dpkg-dev linux-libc-dev
		debian-archive-keyring cpio file binutils)
	[ "$busybox_wanted" -eq 1 ] && packages+=("$BUSYBOX_PKG")
	ensure_packages "${packages[@]}"
	ensure_rust_target

	local seccomp agent
	seccomp=$(build_libseccomp)
	agent=$(build_agent "$seccomp")
	[ -x "$agent" ] || die "cargo did not produce $agent"
	check_static "$agent"
	check_seccomp "$agent"
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
