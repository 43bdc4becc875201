"""End-to-end tests of the SlabSolver: every method on every modality, on tiny problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mbir_batch.config import load_config
from mbir_batch.io import simulate_measurements
from mbir_batch.kernels.comm import LocalComm
from mbir_batch.kernels.denoiser import bundled_model_path, load_denoiser
from mbir_batch.kernels.operators import operator_from_geometry
from mbir_batch.methods import get
from mbir_batch.metrics import psnr_ssim_per_axis
from mbir_batch.phantoms import make_phantom
from mbir_batch.solve import SlabProblem, SlabSolver, SlabState

TASKS = {"svct": dict(task="svct", views=8), "lact": dict(task="lact", views=None, arc=90.0),
         "csmri": dict(task="csmri", accel=4.0)}
PRESET = {"svct": "svct-8view", "lact": "lact-90", "csmri": "csmri-4x"}


def make_problem(volume: np.ndarray, task: str, tmp_path) -> SlabProblem:
    sim = simulate_measurements(volume, seed=1, **TASKS[task])
    depth = volume.shape[0]
    operator = operator_from_geometry(sim.modality, sim.geometry, volume.shape, mask=sim.mask, cache_dir=tmp_path)
    return SlabProblem(0, depth, depth, operator, torch.as_tensor(sim.measurements))


def small_config(preset: str, method: str, *, steps: int, cg_iters: int, **settings):
    """The preset's config of ``method`` with ``steps`` (its step count) and ``cg_iters`` where it has them."""
    cfg = load_config(preset, method, steps=steps, **settings)
    return cfg.replace(cg_iters=cg_iters) if "cg_iters" in cfg.to_dict() else cfg


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("method", ["fbp", "admm-tv", "slice2d", "dds", "mbir"])
def test_every_method_runs_on_every_modality(task, method, tiny_denoiser, tmp_path):
    volume = make_phantom(3, 16, 16)
    problem = make_problem(volume, task, tmp_path)
    cfg = small_config(PRESET[task], method, steps=3, cg_iters=3)
    events = []
    solver = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=tiny_denoiser)
    out = solver.run(solver.initial_state(), callback=events.append)
    assert out.shape == volume.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert [e.step for e in events] == list(range(1, solver.total_steps + 1))
    # The output contract: the last step's state, clamped to the image range [0, 1] for the
    # diffusion methods (the denoiser's range), as is for the model-based ones, FBP equal to the
    # operator's own one-shot inverse.
    last = events[-1].state.x
    if get(method).needs_model:
        assert last.min() < 0.0 or last.max() > 1.0  # else the clamp would not be exercised
        assert torch.equal(out, last.clamp(0.0, 1.0))
    else:
        assert torch.equal(out, last)
    if method == "fbp":
        assert torch.equal(out, problem.operator.direct_inverse(problem.measurements))


def test_diffusion_is_deterministic_for_a_seed_and_resumes_exactly(tiny_denoiser, tmp_path):
    volume = make_phantom(4, 16, 16)
    problem = make_problem(volume, "svct", tmp_path)
    cfg = load_config("svct-8view", "dds", steps=4, cg_iters=3, seed=7)
    saved: dict[int, SlabState] = {}

    def keep(event):
        saved[event.step] = SlabState.from_numpy(event.state.to_numpy())

    first = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=tiny_denoiser)
    a = first.run(first.initial_state(), callback=keep)
    second = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=tiny_denoiser)
    b = second.run(second.initial_state())
    assert torch.equal(a, b)
    resumed = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=tiny_denoiser)
    c = resumed.run(saved[2])
    assert torch.equal(a, c)
    other = SlabSolver(problem, cfg.replace(seed=8), comm=LocalComm(), denoiser=tiny_denoiser)
    assert not torch.equal(a, other.run(other.initial_state()))


def test_admm_tv_beats_fbp_on_8_view_ct(tmp_path):
    volume = make_phantom(9002, 64, 64)[24:40]
    problem = make_problem(volume, "svct", tmp_path)
    scores = {}
    for method in ("fbp", "admm-tv"):
        cfg = load_config("svct-8view", method)
        solver = SlabSolver(problem, cfg, comm=LocalComm())
        scores[method] = psnr_ssim_per_axis(volume, solver.run(solver.initial_state()).numpy())
    for axis in ("axial", "coronal", "sagittal"):
        assert scores["admm-tv"][axis]["psnr"] > scores["fbp"][axis]["psnr"] + 5.0


def test_bundled_prior_beats_admm_tv_on_a_heldout_slab(tmp_path):
    """The shipped denoiser is real: DDS with it beats ADMM-TV on a held-out phantom (axial PSNR)."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    denoiser = load_denoiser(bundled_model_path())
    volume = make_phantom(9003, 64, 64)[28:36]
    problem = make_problem(volume, "svct", tmp_path)
    psnr = {}
    for method in ("admm-tv", "dds"):
        cfg = load_config("svct-8view", method, steps=20)
        solver = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=denoiser)
        psnr[method] = psnr_ssim_per_axis(volume, solver.run(solver.initial_state()).numpy())["axial"]["psnr"]
    assert psnr["dds"] > psnr["admm-tv"] + 1.0, psnr


@pytest.mark.parametrize("method", ["admm-tv", "dds", "mbir"])
def test_run_frees_the_starting_state_after_the_first_step(method, tiny_denoiser, tmp_path):
    """The starting ADMM variables (and ADMM-TV's starting slab) must not live for the whole run."""
    import gc
    import weakref

    problem = make_problem(make_phantom(5, 16, 8), "svct", tmp_path)
    cfg = small_config("svct-8view", method, steps=3, cg_iters=2)
    solver = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=tiny_denoiser)
    state = solver.initial_state()
    tensors = list(state.aux.values())
    if method == "admm-tv":
        tensors.append(state.x)  # the diffusion samplers' own argument keeps their starting x
    refs = [weakref.ref(t) for t in tensors]
    assert len(refs) >= 2
    del tensors
    alive_at: dict[int, list[bool]] = {}

    def look(event):
        gc.collect()
        alive_at[event.step] = [r() is not None for r in refs]

    solver.run(state, callback=look)
    assert state.x is None and state.aux == {}
    assert not any(alive_at[2]), alive_at


@pytest.mark.parametrize("method", ["admm-tv", "dds"])
def test_a_diverged_slab_raises_instead_of_returning_nan(method, tiny_denoiser, tmp_path):
    from mbir_batch.errors import SolverDivergedError

    problem = make_problem(make_phantom(5, 16, 8), "svct", tmp_path)
    problem.measurements[0, 0, problem.measurements.shape[-1] // 2] = float("nan")  # as a solver bug would
    cfg = small_config("svct-8view", method, steps=2, cg_iters=2)
    solver = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=tiny_denoiser)
    with pytest.raises(SolverDivergedError, match=rf"{method} diverged on slices \[0, 8\)"):
        solver.run(solver.initial_state())
