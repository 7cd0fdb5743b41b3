#!/usr/bin/env bash
# Build (once) an aarch64 Debian root with Python 3.11 and the aarch64 runtime wheels, for running
# devices/ondevice/eval.py under qemu-aarch64-static on an x86 machine (see ../shared/STACK.md).
#
#   scripts/make_arm_root.sh            -> prints the root's path (builds it first when not cached)
#
# The root is cached outside the repo under $GHNQ_ARM_CACHE (default ~/.cache/ghnq/arm-root), in a folder
# named by a hash of everything that decides its contents (this script, suite, packages, wheel pins), so a
# changed input builds a new root and an unchanged one costs nothing. Building never runs code under
# emulation: debootstrap --foreign only downloads, `dpkg-deb -x` unpacks, and the host's pip installs the
# aarch64 wheels with --platform/--only-binary. The folder appears only when complete (built beside it,
# then renamed), so a killed build leaves nothing that looks usable.
# Needs: debootstrap, dpkg-deb, qemu-user-static (scripts/system-deps.sh), a pip, network on first build.
set -euo pipefail

SUITE=bookworm
MIRROR=${GHNQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEB_PACKAGES=python3,python3.11,libpython3.11-stdlib,python3-minimal
# Same pins as requirements.lock, so the aarch64 run uses the same LiteRT as the x86 run it is compared to.
WHEELS=(numpy==2.4.6 ai-edge-litert==2.3.0)
# Every manylinux level must be listed: pip matches --platform exactly (manylinux2014 alone finds nothing).
PLATFORMS=(manylinux_2_36_aarch64 manylinux_2_34_aarch64 manylinux_2_28_aarch64 manylinux_2_27_aarch64
           manylinux_2_26_aarch64 manylinux_2_17_aarch64 manylinux2014_aarch64)
PIP=${GHNQ_PIP:-}
if [ -z "$PIP" ]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  if [ -x "$here/.venv/bin/pip" ]; then PIP="$here/.venv/bin/pip"; else PIP="python3 -m pip"; fi
fi

cache=${GHNQ_ARM_CACHE:-$HOME/.cache/ghnq/arm-root}
key=$( { cat "$0"; echo "$SUITE $DEB_PACKAGES ${WHEELS[*]} ${PLATFORMS[*]}"; } | sha256sum | cut -c1-16)
root="$cache/$key"
if [ -f "$root/.ghnq-complete" ]; then echo "$root"; exit 0; fi

if [ "$(id -u)" != 0 ]; then
  echo "error: building the aarch64 root needs root (debootstrap); run scripts/make_arm_root.sh once as root" >&2
  exit 3
fi
for tool in debootstrap dpkg-deb; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool not found (run scripts/system-deps.sh as root)" >&2; exit 2; }
done
mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# 1. Debian's aarch64 Python: download the .debs (first stage only), then unpack every one of them.
debootstrap --foreign --arch=arm64 --variant=minbase --include="$DEB_PACKAGES" \
  "$SUITE" "$work/root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; echo "error: debootstrap failed" >&2; exit 1; }
for deb in "$work"/root/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
rm -rf "$work/root/var/cache/apt/archives"/*.deb "$work/root/debootstrap"
test -x "$work/root/usr/bin/python3.11" || { echo "error: no aarch64 python3.11 in the root" >&2; exit 1; }

# 2. aarch64 wheels, installed by the host's pip into a folder that goes on PYTHONPATH under qemu.
plat_args=()
for p in "${PLATFORMS[@]}"; do plat_args+=(--platform "$p"); done
$PIP install --no-warn-script-location --no-warn-conflicts --disable-pip-version-check \
  --target "$work/root/opt/ghnq-wheels" "${plat_args[@]}" --python-version 3.11 --implementation cp --abi cp311 \
  --only-binary=:all: "${WHEELS[@]}" >"$work/pip.log" 2>&1 \
  || { tail -20 "$work/pip.log" >&2; echo "error: pip could not install the aarch64 wheels" >&2; exit 1; }

# 3. LiteRT reads /proc/cpuinfo to pick kernels; the host's x86 one makes it segfault under qemu-user.
#    qemu-user opens paths inside its -L prefix first, so this file shadows the host's.
mkdir -p "$work/root/proc"
cat >"$work/root/proc/cpuinfo" <<'EOF'
processor	: 0
BogoMIPS	: 50.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x3
CPU part	: 0xd0c
CPU revision	: 1

EOF

echo "built in $((SECONDS - start)) s: ${WHEELS[*]} on Debian $SUITE aarch64" >"$work/root/.ghnq-complete"
rm -rf "$root"
mv "$work/root" "$root"
echo "$root"
