"""A prepared check of the CUDA path in about 3 minutes on one H100/H200 (issue 5, "Speed").

Sections, in order of importance (each is skipped, with the reason printed, when the budget
is short or there is no CUDA):

1. correctness: ParallelBeam A/AT, CartesianMRI A/AT, D_z, one ADMM-TV-z step, the denoiser
   forward (fp32) and one DDS step on a 32^3 problem, CUDA against CPU;
2. the goal: a 256^3, 8-view, 50-step DDS run with the paper-size random-weight denoiser
   (bench/throughput.py's measurement: wall time, time per step, denoiser share, peak memory);
3. throughput at 64^3 with the bundled model (random-small if it is not there yet, labelled);
4. the largest slice batch of the paper-size denoiser that fits, with slices/s and peak memory;
5. torch.distributed: NCCL world 1, and TorchDistComm's halo exchange + all-reduce over 2 ranks
   (the ranks are started by ``harness.ranks.run_ranks``).

Writes ``bench/results/gpu-<date>.md`` and ``.json`` (and into ``$OUT`` when set). Run it through
``bench/gpu_check.sh``. ``--prepare-cache`` builds the radon matrices (needs astra) beforehand.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.denoisers import build_denoiser
from harness.problems import (
    make_volume,
    missing_radon_matrices,
    prepare_radon_cache,
    radon_cache,
    svct_operator,
    svct_problem,
)
from harness.ranks import RankContext, RankError, run_ranks
from harness.results import RESULTS_DIR, SectionReport, environment, markdown_table, today, write_report
from harness.timing import Deadline, peak_mib, reset_peak, sync

CACHE_SIZES = (16, 32, 64, 256)   # every slice size the check (and --quick) uses, at 8 views
VIEWS = 8


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- 1. correctness ------------------------------------------------------------------------------

class _Fp32Denoiser(torch.nn.Module):
    """The same denoiser with autocast switched off inside, for a strict fp32 comparison."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        with torch.autocast("cuda", enabled=False):
            return self.inner(x.float(), sigma)


def _diff(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float, note: str) -> list[Any]:
    ref, got = ref.detach().cpu(), got.detach().cpu()
    if ref.is_complex():
        ref, got = torch.view_as_real(ref), torch.view_as_real(got)
    abs_diff = float((ref.double() - got.double()).abs().max())
    rel = abs_diff / max(float(ref.double().abs().max()), 1e-30)
    return [name, abs_diff, rel, tol, "PASS" if rel <= tol else "FAIL", note]


def _one_dds_step(problem_args: tuple, denoiser: torch.nn.Module, device: str, state_x: torch.Tensor):
    """x after the first DDS step of a 10-step SlabSolver run started from ``state_x``."""
    from mbir_batch.kernels.comm import LocalComm
    from mbir_batch.methods import get
    from mbir_batch.solve import SlabSolver

    size, depth, volume = problem_args
    problem = svct_problem(volume, VIEWS, device)
    cfg = get("dds").config_type(steps=10, cg_iters=10, batch=16)
    solver = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=denoiser, device=device)
    captured: dict[str, torch.Tensor] = {}

    class Stop(Exception):
        pass

    def grab(event: Any) -> None:
        captured["x"] = event.state.x.detach().cpu()
        raise Stop

    start = solver.initial_state()
    start.x = state_x.to(device)
    try:
        solver.run(start, callback=grab)
    except Stop:
        pass
    return captured["x"]


def check_correctness(size: int = 32, depth: int = 32, device: str = "cuda") -> tuple[list[str], Any]:
    """Each kernel on ``device`` against the CPU (``device="cpu"`` exercises this code without a GPU)."""
    from mbir_batch.kernels.admm import AdmmState, admm_tv_z_step
    from mbir_batch.kernels.comm import LocalComm
    from mbir_batch.kernels.mri import CartesianMRI, uniform_1d_mask
    from mbir_batch.kernels.tv import diff_z, diff_z_adjoint, diff_z_normal

    gen = torch.Generator().manual_seed(0)
    op_c, op_g = svct_operator(size, VIEWS, "cpu"), svct_operator(size, VIEWS, device)
    x = torch.rand(depth, size, size, generator=gen)
    y = torch.rand(depth, *op_c.range_shape, generator=gen)
    xg, yg = x.to(device), y.to(device)
    fp32 = "fp32; only the summation order differs"
    rows = [_diff("ParallelBeam.A", op_c.A(x), op_g.A(xg), 1e-5, fp32 + " (cuSPARSE CSR)"),
            _diff("ParallelBeam.AT", op_c.AT(y), op_g.AT(yg), 1e-5, fp32 + " (cuSPARSE CSR)")]
    mask = uniform_1d_mask((size, size), accel=4)
    mri_c, mri_g = CartesianMRI(mask), CartesianMRI(mask).to(device)
    k = mri_c.A(x)
    rows += [_diff("CartesianMRI.A", k, mri_g.A(xg), 1e-5, fp32 + " (cuFFT vs pocketfft)"),
             _diff("CartesianMRI.AT", mri_c.AT(k), mri_g.AT(k.to(device)), 1e-5, fp32 + " (cuFFT vs pocketfft)")]
    rows += [_diff("diff_z", diff_z(x, None), diff_z(xg, None), 1e-6, "elementwise, exact"),
             _diff("diff_z_adjoint", diff_z_adjoint(x, None), diff_z_adjoint(xg, None), 1e-6, "elementwise, exact"),
             _diff("diff_z_normal", diff_z_normal(x, None, None), diff_z_normal(xg, None, None), 1e-6,
                   "elementwise, exact")]
    volume = make_volume(size, depth)
    outs = []
    for dev, op in (("cpu", op_c), (device, op_g)):
        vol = volume.to(dev)
        aty = op.AT(op.A(vol))
        x_new, _, _ = admm_tv_z_step(vol * 0.9, AdmmState.zeros_like(vol), A=op.A, AT=op.AT, aty=aty, rho=1.0,
                                     lam=0.1, cg_iters=10, comm=LocalComm())
        outs.append(x_new)
    rows.append(_diff("admm_tv_z_step (10 CG)", outs[0], outs[1], 1e-4, fp32 + "; CG amplifies rounding a little"))

    torch.manual_seed(0)
    model_c, _ = build_denoiser("random-small", size, "cpu")
    model_g, _ = build_denoiser("random-small", size, device)
    model_g.load_state_dict(model_c.state_dict())
    strict_g = _Fp32Denoiser(model_g)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False   # cuDNN convs default to TF32: 10-bit mantissa
    try:
        noisy = (volume[:8] + 0.5 * torch.randn(8, size, size, generator=gen)).unsqueeze(1)
        with torch.no_grad():
            rows.append(_diff("denoiser forward, fp32", model_c(noisy, 0.5), strict_g(noisy.to(device), 0.5), 1e-3,
                              "fp32 with TF32 off; random weights"))
        start = 10.0 * torch.randn(depth, size, size, generator=gen)
        step_c = _one_dds_step((size, depth, volume), model_c, "cpu", start)
        rows.append(_diff("DDS step, fp32 denoiser", step_c, _one_dds_step((size, depth, volume), strict_g, device, start),
                          1e-3, "SlabSolver step with autocast off and TF32 off: fp32 throughout"))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    rows.append(_diff("DDS step, as shipped (bf16)", step_c, _one_dds_step((size, depth, volume), model_g, device, start),
                      5e-2, "LOOSE: denoise_slab runs the UNet under bf16 autocast on CUDA (8-bit mantissa, "
                            "~4e-3 relative per op), then CG/ADMM in fp32"))
    header = ["check", "max abs diff", "max rel diff (to max abs)", "tol", "result", "why"]
    fails = [r[0] for r in rows if r[4] != "PASS"]
    lines = [f"{device} vs CPU on {depth} x {size}^2, {VIEWS} views.", "", markdown_table(header, rows), "",
             "all PASS" if not fails else f"FAILED: {', '.join(fails)}"]
    return lines, [dict(zip(header, r)) for r in rows]


# -- 2-3. throughput (bench/throughput.py) ---------------------------------------------------------

def run_throughput(label: str, report: SectionReport, results: list, **kwargs: Any) -> None:
    import throughput

    result = throughput.measure(**kwargs, log=log)
    results.append(result)
    lines = throughput.render(result).split("\n")[2:]   # drop the "## ..." line: the section has its own
    report.section(label, lines, result)
    if torch.device(kwargs["device"]).type == "cuda":   # on CPU (a smoke test) leave the CPU figures alone
        write_report(RESULTS_DIR / f"throughput-cuda-{today()}",
                     throughput.report_header(kwargs["device"]) + "\n" + "\n".join(throughput.render(r) for r in results),
                     {"environment": report.env, "results": results})


# -- 4. largest batch ------------------------------------------------------------------------------

def batch_sweep(deadline: Deadline, resolution: int = 256, max_batch: int = 4096) -> tuple[list[str], Any]:
    from mbir_batch.kernels.denoiser import denoise_slab

    model, label = build_denoiser("paper", resolution, "cuda")
    rows, largest, batch = [], 0, 32
    while batch <= max_batch and deadline.left() > 15:
        try:
            x = torch.rand(batch, resolution, resolution, device="cuda")
            denoise_slab(model, x, 1.0, batch=batch)          # warm-up (cuDNN picks algorithms per shape)
            sync("cuda")
            reset_peak("cuda")
            started = time.perf_counter()
            denoise_slab(model, x, 1.0, batch=batch)
            sync("cuda")
            seconds = time.perf_counter() - started
            rows.append([batch, seconds, batch / seconds, peak_mib("cuda"), "fits"])
            largest = batch
            log(f"batch {batch}: {batch / seconds:.0f} slices/s, peak {peak_mib('cuda'):.0f} MiB")
        except torch.cuda.OutOfMemoryError:
            rows.append([batch, None, None, None, "out of memory"])
            break
        finally:
            x = None
            torch.cuda.empty_cache()
        batch *= 2
    lines = [f"model: {label}; denoise_slab over `batch` slices of {resolution}^2 in one batch, bf16 autocast", "",
             markdown_table(["batch", "seconds", "slices / s", "peak MiB (max_memory_allocated)", ""], rows), "",
             f"largest batch that fits: {largest}" + ("" if rows and rows[-1][4] == "out of memory"
                                                     else f" (stopped at {largest}: limit or time, not memory)")]
    if deadline.left() > 20 and largest:
        torch.backends.cudnn.benchmark = True
        try:
            x = torch.rand(256, resolution, resolution, device="cuda")
            for _ in range(2):
                denoise_slab(model, x, 1.0, batch=32)
            sync("cuda")
            started = time.perf_counter()
            denoise_slab(model, x, 1.0, batch=32)
            sync("cuda")
            seconds = time.perf_counter() - started
            lines.append(f"with torch.backends.cudnn.benchmark = True: 256 slices, batch 32: {seconds:.3f} s "
                         f"({256 / seconds:.0f} slices/s); compare section 2's (a)")
        finally:
            torch.backends.cudnn.benchmark = False
    return lines, {"rows": rows, "largest": largest}


# -- 5. torch.distributed --------------------------------------------------------------------------

def _noisy_volume(size: int, depth: int) -> torch.Tensor:
    """The volume every rank and the reference split: :func:`make_volume` plus seeded noise."""
    volume = make_volume(size, depth)
    return volume + 0.1 * torch.randn(volume.shape, generator=torch.Generator().manual_seed(1))


def _dist_rank(ctx: RankContext, backend: str, size: int, depth: int) -> dict[str, Any]:
    """One rank: all-reduce, halo exchange (D_z, D_z^T), global dot and an ADMM step on its slab."""
    from mbir_batch.cluster.dist_comm import TorchDistComm
    from mbir_batch.kernels.admm import AdmmState, admm_tv_z_step
    from mbir_batch.kernels.comm import make_dot
    from mbir_batch.kernels.tv import diff_z_adjoint_comm, diff_z_comm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(ctx.rank % torch.cuda.device_count())
    comm = TorchDistComm(ctx.rank, ctx.world, backend, addr=ctx.addr, port=ctx.port, timeout_s=60)
    z0, z1 = ctx.rank * depth // ctx.world, (ctx.rank + 1) * depth // ctx.world
    x = _noisy_volume(size, depth)[z0:z1].to(device)
    total = comm.all_reduce_sum(torch.full((4,), float(ctx.rank + 1), dtype=torch.float64, device=device))
    scalar = torch.zeros((), dtype=torch.float64, device=device)
    comm.all_reduce_sum(scalar)
    sync(device)
    started = time.perf_counter()
    for _ in range(50):
        comm.all_reduce_sum(scalar)
    sync(device)
    latency_us = (time.perf_counter() - started) / 50 * 1e6
    problem = svct_problem(make_volume(size, depth), VIEWS, device, z0=z0, z1=z1)
    op = problem.operator
    x_new, _, info = admm_tv_z_step(x, AdmmState.zeros_like(x), A=op.A, AT=op.AT, aty=problem.aty, rho=1.0, lam=0.1,
                                    cg_iters=10, comm=comm)
    out = {"dz": diff_z_comm(x, comm).cpu().numpy(), "dzt": diff_z_adjoint_comm(x, comm).cpu().numpy(),
           "dot": float(make_dot(comm)(x, x)), "admm": x_new.cpu().numpy(), "total": total.cpu().numpy(),
           "latency_us": latency_us, "bytes_sent": comm.bytes_sent(), "device": str(x.device),
           "primal": info.primal_residual}
    comm.close()
    return out


def run_dist(backend: str, world: int, size: int, depth: int) -> list[Any]:
    """Run ``world`` ranks over ``backend`` and compare their slabs with one LocalComm process."""
    from mbir_batch.kernels.admm import AdmmState, admm_tv_z_step
    from mbir_batch.kernels.comm import LocalComm, make_dot
    from mbir_batch.kernels.tv import diff_z_adjoint_comm, diff_z_comm

    try:
        ranks = run_ranks(_dist_rank, world, backend, size, depth, timeout_s=90)
    except RankError as error:
        return [backend, world, "FAIL", str(error).strip().splitlines()[-1][-300:], None, None, None]
    device = ranks[0]["device"]
    x = _noisy_volume(size, depth).to(device)
    problem, comm = svct_problem(make_volume(size, depth), VIEWS, device), LocalComm()
    op = problem.operator
    ref_admm, _, _ = admm_tv_z_step(x, AdmmState.zeros_like(x), A=op.A, AT=op.AT, aty=problem.aty,
                                    rho=1.0, lam=0.1, cg_iters=10, comm=comm)
    diffs = {
        "D_z": np.abs(np.concatenate([r["dz"] for r in ranks]) - diff_z_comm(x, comm).cpu().numpy()).max(),
        "D_z^T": np.abs(np.concatenate([r["dzt"] for r in ranks]) - diff_z_adjoint_comm(x, comm).cpu().numpy()).max(),
        "dot": abs(float(ranks[0]["dot"]) - float(make_dot(comm)(x, x))) / float(make_dot(comm)(x, x)),
        "ADMM": np.abs(np.concatenate([r["admm"] for r in ranks]) - ref_admm.cpu().numpy()).max(),
    }
    sums_ok = all(np.allclose(r["total"], world * (world + 1) / 2) for r in ranks)
    ok = sums_ok and diffs["D_z"] < 1e-6 and diffs["D_z^T"] < 1e-6 and diffs["dot"] < 1e-9 and diffs["ADMM"] < 1e-4
    detail = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()) + f"; all_reduce sums {'ok' if sums_ok else 'WRONG'}"
    return [backend, world, "PASS" if ok else "FAIL", detail, device, float(ranks[0]["latency_us"]),
            int(sum(int(r["bytes_sent"]) for r in ranks))]


def check_dist(size: int, depth: int) -> tuple[list[str], Any]:
    cuda = torch.cuda.is_available()
    rows, notes = [], []
    if cuda:
        rows.append(run_dist("nccl", 1, size, depth))
        if torch.cuda.device_count() >= 2:
            rows.append(run_dist("nccl", 2, size, depth))
        else:
            notes.append("SKIPPED: NCCL with 2 ranks (needs 2 GPUs)")
    else:
        notes.append("SKIPPED: NCCL (no CUDA)")
    rows.append(run_dist("gloo", 2, size, depth))
    header = ["backend", "ranks", "result", "max diff vs one process (D_z, D_z^T abs; dot rel; ADMM abs)",
              "slab device", "scalar all-reduce us", "bytes sent"]
    lines = [f"{depth} x {size}^2 volume split into equal slabs; reference: LocalComm over the whole volume.", "",
             markdown_table(header, rows), "", *notes]
    return lines, [dict(zip(header, r)) for r in rows]


# -- driver ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare-cache", action="store_true", help="build the radon matrices into the cache")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU smoke test of this script)")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds for all sections (default 170)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32, help="denoiser batch of the DDS runs")
    args = parser.parse_args(argv)
    cache = radon_cache()
    os.environ["MBIR_CACHE"] = str(cache)  # the ranks' operators read the same cache
    if args.prepare_cache:
        for line in prepare_radon_cache(CACHE_SIZES, VIEWS, cache):
            print(line)
        return 0

    deadline = Deadline(args.budget)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    env = environment(device) | {"radon_cache": str(cache), "quick": args.quick}
    stem = RESULTS_DIR / (f"gpu-{today()}" + ("-quick" if args.quick else "") + ("" if cuda else "-nocuda"))
    report = SectionReport(stem, f"GPU check, {today()}", env)
    log(f"device {env.get('gpu', 'cpu')}, budget {args.budget:.0f} s, report {stem}.md")
    missing = missing_radon_matrices([32, 64] + ([16] if args.quick else [256]), VIEWS)
    if missing:
        report.section("radon cache", ["FAILED: matrices missing from the cache and astra is not importable:",
                                       *[f"- {m}" for m in missing],
                                       "run `python bench/gpu_check.py --prepare-cache` where astra is installed"])
    from mbir_batch.kernels.model_paths import bundled_model_path

    bundled = "bundled" if bundled_model_path().is_file() else "random-small"
    throughput_results: list = []

    def guarded(name: str, need_s: float, needs_cuda: bool, fn: Callable[[], Any]) -> None:
        if needs_cuda and not cuda:
            report.section(name, ["SKIPPED: no CUDA"])
            return
        if deadline.left() < need_s:
            report.section(name, [f"SKIPPED: time budget ({deadline.left():.0f} s left, needs ~{need_s:.0f} s)"])
            return
        log(f"section: {name} ({deadline.left():.0f} s left)")
        started = time.perf_counter()
        try:
            out = fn()
            if out is not None:
                report.section(name, out[0] + [f"({time.perf_counter() - started:.1f} s)"], out[1])
        except Exception:  # noqa: BLE001 - a failing section must not hide the others
            report.section(name, ["FAILED:", "```", traceback.format_exc()[-3000:], "```"])

    guarded("1. correctness, CUDA vs CPU", 15, not args.quick, lambda: check_correctness(device=device))
    size, depth, model = (32, 16, "random-small") if args.quick else (256, 256, "paper")
    steps = 4 if args.quick else args.steps
    guarded(f"2. goal: {depth} x {size}^2, {VIEWS} views, {steps}-step DDS, {model} denoiser", 40, not args.quick,
            lambda: run_throughput(f"2. goal: {depth} x {size}^2, {VIEWS} views, {steps}-step DDS", report,
                                   throughput_results, device=device, size=size, depth=depth, model=model,
                                   steps=steps, batch=args.batch, cg_iters=20, repeats=3,
                                   max_seconds=max(deadline.left() - 60, 20)))
    small = (16, 16) if args.quick else (64, 64)
    bundled = "random-small" if args.quick else bundled
    guarded(f"3. throughput {small[1]} x {small[0]}^2, {bundled} model", 10, False,
            lambda: run_throughput(f"3. throughput {small[1]} x {small[0]}^2, {bundled} model", report,
                                   throughput_results, device=device, size=small[0], depth=small[1], model=bundled,
                                   steps=4 if args.quick else 10, batch=args.batch, cg_iters=20, repeats=3))
    guarded("4. largest slice batch, paper-size denoiser at 256^2", 25, True, lambda: batch_sweep(deadline))
    guarded("5. torch.distributed: NCCL and TorchDistComm halo exchange", 25, False,
            lambda: check_dist(32, 16 if args.quick else 32))
    log(f"done in {args.budget - deadline.left():.0f} s; report {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
