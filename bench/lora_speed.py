"""What an active LoRA adapter costs the sampler: one denoiser forward, side by side (issue 13).

After the first adaptation round (or with ``submit --adapter``) every denoiser call of the
sampler runs with LoRA on. ``kernels/lora.LoraLayer`` computes such a call with the merged
weights ``W + s B A`` (one base operation per layer) when autograd is off, and with the explicit
branch ``base(x) + s up(down(x))`` only under autograd (the adaptation loss). This measures one
forward of a batch of slices (no autograd) of the same network, in one process, as:

- ``base``: no LoRA injected;
- ``injected, off``: LoRA injected, not active (an unadapted run);
- ``active, merged``: the sampler's path;
- ``active, branch``: the explicit branch (what every sampler call cost before merging), timed
  under ``torch.enable_grad`` with the LoRA weights frozen so that no graph is built.

Prints a table (median seconds over ``--repeats``, ratio to ``base``) and writes
``bench/results/lora-speed-<device>-<date>.md`` and ``.json``.

    python bench/lora_speed.py                      # bundled model, batch 32, 1 thread
    python bench/lora_speed.py --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.results import RESULTS_DIR, command_line, environment, header, markdown_table, publish, today
from harness.timing import median, time_call

BUNDLED = Path(__file__).resolve().parents[1] / "pipeline" / "models" / "svct-phantom-64.json"


def _median_seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    return median(time_call(fn, device, repeats=repeats)[0])


def measure(model_path: Path, *, device: str, batch: int, rank: int, repeats: int) -> dict:
    from mbir_batch.kernels.lora import LoraConfig, inject_lora, lora_parameters, set_lora_active
    from mbir_batch.kernels.priors import load_denoiser

    model = load_denoiser(model_path).to(device).eval()
    x = torch.rand(batch, 1, model.resolution, model.resolution, generator=torch.Generator().manual_seed(0))
    x = x.to(device)

    def forward(grad: bool = False) -> Callable[[], object]:
        def run() -> object:
            with torch.set_grad_enabled(grad):
                return model(x, 0.5)
        return run

    rows = {"base": _median_seconds(forward(), repeats, device)}
    names = inject_lora(model, LoraConfig(rank=rank, train_bias=True))
    params = [p for _, p in lora_parameters(model)]
    with torch.no_grad():                                  # a non-zero adapter, as after a round
        gen = torch.Generator().manual_seed(1)
        for param in params:
            param.add_(0.01 * torch.randn(param.shape, generator=gen).to(device))
    rows["injected, off"] = _median_seconds(forward(), repeats, device)
    set_lora_active(model, True)
    rows["active, merged (sampler)"] = _median_seconds(forward(), repeats, device)
    for param in params:
        param.requires_grad_(False)                        # enable_grad picks the branch; nothing to record
    rows["active, branch"] = _median_seconds(forward(grad=True), repeats, device)
    with torch.no_grad():
        diff = float((forward()() - forward(grad=True)()).abs().max())
    shown, root = model_path.resolve(), BUNDLED.parents[2]
    return {"model": str(shown.relative_to(root) if shown.is_relative_to(root) else shown), "device": device,
            "batch": batch, "rank": rank, "layers": len(names),
            "lora_parameters": sum(p.numel() for p in params), "repeats": repeats, "seconds": rows,
            "max_abs_difference_merged_vs_branch": diff}


def render(result: dict, env: dict, command: str) -> str:
    secs = result["seconds"]
    table = markdown_table(["forward", "median s", "ratio to base"],
                           [[name, s, s / secs["base"]] for name, s in secs.items()])
    return "\n".join(header("LoRA: the cost of an active adapter per denoiser forward", env, command) + [
        f"Model {result['model']}, batch {result['batch']} on {result['device']}, rank {result['rank']} on "
        f"{result['layers']} layers ({result['lora_parameters']:,} LoRA parameters), median of {result['repeats']}.",
        "", table, "",
        f"merged vs branch output: max |difference| {result['max_abs_difference_merged_vs_branch']:.2e}.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=BUNDLED, help="any model submit --model reads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", type=Path, default=None, help="report stem (default bench/results/lora-speed-<device>-<date>)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    torch.set_num_threads(args.threads)
    result = measure(args.model, device=args.device, batch=args.batch, rank=args.rank, repeats=args.repeats)
    env = environment(args.device)
    stem = args.out or RESULTS_DIR / f"lora-speed-{torch.device(args.device).type}-{today()}"
    publish(stem, render(result, env, command_line("lora_speed.py", argv)), {"environment": env, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
