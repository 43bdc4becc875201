#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): about 3 minutes on one H100/H200.
#
# From the repository root (a plain copy of the working tree is enough; nothing is installed):
#   OUT=/some/dir bash bench/gpu_check.sh            # full check (CUDA); report also copied to $OUT
#   bash bench/gpu_check.sh --quick                  # small sizes: a smoke test, runs on CPU too
# Options after the script name go to bench/gpu_check.py (--budget S, --steps N, --batch B).
#
# Needs python ($PYTHON, default python3) with torch, numpy, scipy, safetensors, pyyaml, psutil and
# diffusers (diffusers may come from /tmp/site or PYTHONPATH); NOT zarr, ray or astra. The radon
# matrices come from bench/.radon-cache (MBIR_CACHE), prepared where astra is installed
# (`python bench/gpu_check.py --prepare-cache`) and carried to the GPU machine (the folder is
# git-ignored). When mbir_batch does not import from this checkout, bench/bare_node.py assembles
# it at $MBIR_PKG (default /tmp/pkg); MBIR_ASSEMBLE=1 assembles it even when it does.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -f pipeline/solve.py ] && [ -f kernels/radon.py ] || { echo "gpu_check.sh: not a mbir-batch checkout" >&2; exit 2; }

if [ -d /tmp/site ]; then export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"; fi
PKG=$("$PYTHON" bench/bare_node.py package "${MBIR_PKG:-/tmp/pkg}" ${MBIR_ASSEMBLE:+--force})
if [ -n "$PKG" ]; then
    export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check.sh: mbir_batch assembled at $PKG/mbir_batch"
fi
export MBIR_CACHE=${MBIR_CACHE:-$(pwd -P)/bench/.radon-cache}
"$PYTHON" bench/bare_node.py check --need torch,numpy,scipy,safetensors,yaml,psutil,diffusers --warn-only
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    "$PYTHON" -u bench/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
exec "$PYTHON" -u bench/gpu_check.py "$@"
