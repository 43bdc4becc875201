#!/usr/bin/env bash
# Train the bundled denoiser (pipeline/models/svct-phantom-64) on one CUDA GPU for a fixed wall budget.
#
# Usage, from the repository root (the repo need not be installed):
#   OUT=/some/dir bash bench/train_gpu.sh [--max-minutes 6] [more `python -m mbir_batch.train` options]
# Writes $OUT/pipeline/models/svct-phantom-64.{safetensors,json} and $OUT/train_log.txt (loss curve,
# then held-out denoising MSE). Needs python3 with CUDA torch, numpy, scipy, safetensors and diffusers
# importable (diffusers may come from PYTHONPATH, which is kept). Later options override earlier ones.
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

# mbir_batch = pipeline/*.py, mbir_batch.kernels = kernels/*.py (what pyproject's package-dir maps)
PKG=$(mktemp -d "${TMPDIR:-/tmp}/mbir-pkg.XXXXXX")
trap 'rm -rf "$PKG"' EXIT
mkdir -p "$PKG/mbir_batch/kernels"
cp pipeline/*.py "$PKG/mbir_batch/"
cp kernels/*.py "$PKG/mbir_batch/kernels/"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT/pipeline/models"

DEVICE="$DEVICE" "$PYTHON" - <<'PY'
import os, torch, diffusers, safetensors, scipy
cuda = os.environ["DEVICE"] == "cuda"
assert torch.cuda.is_available() or not cuda, "no CUDA device visible"
print(f"torch {torch.__version__}, diffusers {diffusers.__version__},",
      torch.cuda.get_device_name(0) if cuda else "CPU", flush=True)
PY

# `python -c` (not -m) so the spawned phantom workers import only mbir_batch.phantoms, not torch.
set -x
"$PYTHON" -u -c 'from mbir_batch.train import main; main()' \
    --out "$OUT/pipeline/models/svct-phantom-64" --checkpoint "$PKG/train.ckpt.pt" --no-resume \
    --device "$DEVICE" --bf16 --batch "$BATCH" --lr "$LR" --warmup 300 --ema 0.999 \
    --steps 1000000 --max-minutes "$MAX_MINUTES" \
    --workers "$WORKERS" --phantoms-per-pool 48 --refresh-every 150 \
    --checkpoint-every 5000 --log-every 100 "$@" 2>&1 | tee "$OUT/train_log.txt"
