#!/usr/bin/env bash
# Create a small ext4 disk image for the virtio-blk boot test.
#
#   guest-image/initramfs/mkdisk.sh <path> <size-mib> [<dir>]
#
# The image is a whole-disk ext4 file system (no partition table) labelled
# "skiff-test", so the guest sees it as /dev/vda with capacity
# <size-mib> * 2048 sectors. With <dir>, that directory's contents are copied
# in (mkfs.ext4 -d); otherwise the file system holds a single
# /skiff-disk.txt. Overwrites <path>. Installs e2fsprogs if mkfs.ext4 is
# missing.
set -euo pipefail

die() { printf 'mkdisk.sh: error: %s\n' "$*" >&2; exit 1; }

[ $# -ge 2 ] && [ $# -le 3 ] || die "usage: $0 <path> <size-mib> [<dir>]"
path=$1
size_mib=$2
dir=${3:-}
[[ "$size_mib" =~ ^[0-9]+$ ]] && [ "$size_mib" -ge 2 ] ||
	die "size must be a whole number of MiB, at least 2 (got '$size_mib')"
[ -z "$dir" ] || [ -d "$dir" ] || die "not a directory: $dir"

if ! command -v mkfs.ext4 >/dev/null; then
	sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
	sudo_ apt-get update -q >&2
	sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q e2fsprogs >&2
fi

content=$dir
if [ -z "$content" ]; then
	content=$(mktemp -d)
	trap 'rm -rf "$content"' EXIT
	echo "skiff test disk" >"$content/skiff-disk.txt"
fi

rm -f "$path"
truncate -s "${size_mib}M" "$path"
mkfs.ext4 -q -F -L skiff-test -E root_owner=0:0 -d "$content" "$path" >&2
printf '%s\n' "$path"
