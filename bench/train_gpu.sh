#!/usr/bin/env bash
# Train the bundled denoiser (pipeline/models/svct-phantom-64) on one CUDA GPU for a fixed wall budget,
# on the phantom mixture (as the current bundled model; `--phantom-set torso` for the torso family only,
# `--init-from pipeline/models/svct-phantom-64.json` to fine-tune the bundled model instead of starting anew).
#
# Usage, from the repository root (the repo need not be installed):
#   OUT=/some/dir bash bench/train_gpu.sh [--max-minutes 6] [more `mbir-batch train` options]
# Writes $OUT/pipeline/models/svct-phantom-64.{safetensors,json} and $OUT/train_log.txt (loss curve,
# then held-out denoising MSE). Needs python3 with CUDA torch, numpy, scipy, safetensors, diffusers,
# typer and rich importable (diffusers may come from PYTHONPATH, which is kept). Later options
# override earlier ones. The package is assembled from this checkout by bench/bare_node.py.
# Environment knobs: MAX_MINUTES (6), BATCH (256), LR (4e-4), WORKERS (nproc - 2), PYTHON (python3),
# DEVICE (cuda; DEVICE=cpu only to smoke-test this script, e.g. MAX_MINUTES=0.3 BATCH=4).
set -euo pipefail
: "${OUT:?set OUT to the output folder}"
MAX_MINUTES=${MAX_MINUTES:-6}
BATCH=${BATCH:-256}
LR=${LR:-4e-4}
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}

[ -f pipeline/train.py ] && [ -f kernels/denoiser.py ] || { echo "run from the repository root" >&2; exit 2; }

PKG=$(mktemp -d "${TMPDIR:-/tmp}/mbir-pkg.XXXXXX")
trap 'rm -rf "$PKG"' EXIT
"$PYTHON" bench/bare_node.py package "$PKG" --force >/dev/null
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT/pipeline/models"
"$PYTHON" bench/bare_node.py check --device "$DEVICE" --need torch,diffusers,safetensors,scipy,typer,rich

# `-m mbir_batch.cli`: spawned phantom workers do not re-import a `__main__` module, so they load
# only what their function needs (mbir_batch.phantoms, not torch).
set -x
"$PYTHON" -u -m mbir_batch.cli train --heldout \
    --out "$OUT/pipeline/models/svct-phantom-64" --checkpoint "$PKG/train.ckpt.pt" --no-resume \
    --device "$DEVICE" --bf16 --batch "$BATCH" --lr "$LR" --warmup 300 --ema 0.999 \
    --steps 1000000 --max-minutes "$MAX_MINUTES" \
    --workers "$WORKERS" --phantoms-per-pool 48 --refresh-every 150 \
    --checkpoint-every 5000 --log-every 100 --phantom-set mixture "$@" 2>&1 | tee "$OUT/train_log.txt"
