#!/usr/bin/env bash
# Fills benchmarks/gpu/wheelhouse/ (git-ignored) with what the GPU check needs on a machine that has
# JAX + CUDA, no TensorFlow and no network: the wheels of tf_revnet (built from this checkout), of
# keras and of its dependencies such a machine may lack, and the CIFAR-10 JPEG archive. Fails if the
# folder exceeds 64 MiB (what travels with the working tree).
#
# Run here, from anywhere, with the venv of this checkout active (pip reaches PyPI):
#     benchmarks/gpu/prepare.sh
# Environment: PYTHON_VERSION (the GPU machine's, default 3.12) for the compiled wheels;
# TF_REVNET_CIFAR10_ARCHIVE (default ../shared/data/cifar10-jpeg.tar.gz beside the repository).
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELHOUSE=benchmarks/gpu/wheelhouse
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
ARCHIVE=${TF_REVNET_CIFAR10_ARCHIVE:-../shared/data/cifar10-jpeg.tar.gz}
LIMIT=$((64 * 1024 * 1024))

# The versions this checkout's tests run with.
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
KERAS=$(version keras)

rm -rf "$WHEELHOUSE" && mkdir -p "$WHEELHOUSE"
python -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELHOUSE" .
# keras and its pure-Python dependencies (the GPU image has absl-py, rich, h5py, ml-dtypes, numpy and
# packaging, typing-extensions; namex and optree it lacks; the small ones travel anyway): any platform.
python -m pip download -q --no-deps -d "$WHEELHOUSE" "keras==$KERAS" "namex==$(version namex)" \
    "absl-py==$(version absl-py)" "typing-extensions==$(version typing-extensions)"
# Compiled dependencies, for the GPU machine's Python (x86-64 Linux).
python -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "$PYTHON_VERSION" --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELHOUSE" \
    "optree==$(version optree)" "h5py==$(version h5py)"
cp "$ARCHIVE" "$WHEELHOUSE/"

ls -l "$WHEELHOUSE"
TOTAL=$(du -sb "$WHEELHOUSE" | cut -f1)
echo "wheelhouse: $TOTAL bytes ($((TOTAL / 1024 / 1024)) MiB) of at most $LIMIT"
if [ "$TOTAL" -gt "$LIMIT" ]; then
    echo "error: $WHEELHOUSE is over 64 MiB" >&2
    exit 1
fi
