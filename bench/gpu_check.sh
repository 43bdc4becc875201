#!/usr/bin/env bash
# The prepared GPU check of issue 5 ("Speed"): about 3 minutes on one H100/H200.
#
# From the repository root (a plain copy of the working tree is enough; nothing is installed):
#   OUT=/some/dir bash bench/gpu_check.sh            # full check (CUDA); report also copied to $OUT
#   bash bench/gpu_check.sh --quick                  # small sizes: a smoke test, runs on CPU too
# Options after the script name go to bench/gpu_check.py (--budget S, --steps N, --batch B).
#
# Needs: python ($PYTHON, default python3) with torch, numpy, scipy, safetensors, pyyaml and
# diffusers (diffusers may come from /tmp/site or PYTHONPATH); NOT zarr, ray or astra.
# The radon matrices come from bench/.radon-cache (MBIR_CACHE), prepared beforehand where astra
# is installed: `python bench/gpu_check.py --prepare-cache`. That folder is git-ignored, so it has
# to be carried to the GPU machine explicitly.
# If `mbir_batch` is not importable from this checkout, the package tree is assembled at
# $MBIR_PKG (default /tmp/pkg): pipeline/*.py -> mbir_batch/, kernels/ -> mbir_batch/kernels,
# cluster/ -> mbir_batch/cluster, configs/ -> mbir_batch/configs, pipeline/models -> mbir_batch/models
# (MBIR_ASSEMBLE=1 forces that even when an install is importable).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -f pipeline/solve.py ] && [ -f kernels/radon.py ] || { echo "gpu_check.sh: not a mbir-batch checkout" >&2; exit 2; }

if [ -d /tmp/site ]; then export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"; fi
here=$(pwd -P)
where=$("$PYTHON" -c 'import os, mbir_batch; print(os.path.dirname(os.path.realpath(mbir_batch.__file__)))' 2>/dev/null || true)
if [ "$where" != "$here/pipeline" ] || [ -n "${MBIR_ASSEMBLE:-}" ]; then
    PKG=${MBIR_PKG:-/tmp/pkg}
    rm -rf "$PKG/mbir_batch"
    mkdir -p "$PKG/mbir_batch/kernels" "$PKG/mbir_batch/cluster" "$PKG/mbir_batch/configs"
    cp pipeline/*.py "$PKG/mbir_batch/"
    cp kernels/*.py "$PKG/mbir_batch/kernels/"
    cp cluster/*.py "$PKG/mbir_batch/cluster/"
    cp configs/*.yaml "$PKG/mbir_batch/configs/" 2>/dev/null || true
    touch "$PKG/mbir_batch/configs/__init__.py"
    if [ -d pipeline/models ]; then cp -r pipeline/models "$PKG/mbir_batch/models"; fi
    export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check.sh: mbir_batch assembled at $PKG/mbir_batch"
fi
export MBIR_CACHE=${MBIR_CACHE:-$here/bench/.radon-cache}
"$PYTHON" -c 'import diffusers' 2>/dev/null || echo "gpu_check.sh: WARNING: diffusers is not importable; the denoiser sections will fail" >&2
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    "$PYTHON" -u bench/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
exec "$PYTHON" -u bench/gpu_check.py "$@"
