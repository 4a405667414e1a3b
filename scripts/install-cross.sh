#!/usr/bin/env bash
# Debian's aarch64 cross compiler and qemu-user, for the kernel check harness under emulation
# (tests/unit/test_kernels_c_harness.py). Optional: without root or apt-get this prints a note and
# exits 0, and those tests skip with a reason.
set -euo pipefail
if command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-cross: aarch64-linux-gnu-gcc / qemu-aarch64 missing and cannot apt-get them here" \
       "(needs root and apt-get): the aarch64 kernel checks will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# libc6-dev-arm64-cross: the static libc that `aarch64-linux-gnu-gcc -static` links.
apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null
