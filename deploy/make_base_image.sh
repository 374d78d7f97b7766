#!/usr/bin/env bash
# Make a base image for deploy/Dockerfile without any registry: Debian bookworm (python3 is 3.11)
# with python3, python3-venv and python3-pip, built with debootstrap and loaded with `docker import`.
#   sudo deploy/make_base_image.sh [TAG]      # TAG defaults to topd-base:bookworm
# Needs root, debootstrap (apt-get install -y debootstrap) and a running Docker engine.
# DEBIAN_MIRROR overrides the mirror (default: deb.debian.org). The host's extra CA certificates
# (/usr/local/share/ca-certificates) are copied in, so pip inside the build trusts what the host does.
set -euo pipefail

tag=${1:-topd-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [[ $(id -u) -ne 0 ]]; then
  echo "make_base_image.sh: debootstrap needs root" >&2
  exit 1
fi
for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || { echo "make_base_image.sh: $tool is not installed" >&2; exit 1; }
done

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/topd-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$rootfs" "$mirror"

if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  chroot "$rootfs" update-ca-certificates >/dev/null
fi
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin

tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$tag"
docker run --rm --network none "$tag" python3 -c 'import sys, venv; print("base:", sys.version.split()[0])'
echo "$tag"
