"""``lam: auto`` in the product: the config accepts it, DDS and DiffusionMBIR choose lam before the
first step, the choice is the same for any slab split and survives a resume, and it is reported."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mbir_batch.config import load_config
from mbir_batch.errors import ConfigError
from mbir_batch.kernels.comm import LocalComm
from mbir_batch.methods.sampling import LAM_AUTO, LAM_KEYS
from mbir_batch.solve import SlabProblem, SlabSolver, SlabState
from slab_threads import run_threads

DEPTH, CHUNK = 8, 2
SPLITS = {1: [(0, 8)], 2: [(0, 4), (4, 8)], 3: [(0, 2), (2, 6), (6, 8)]}  # chunk-aligned, as the jobs cut


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors run faster on one thread


def slab_problem(ct, z0: int, z1: int) -> SlabProblem:
    operator, sinogram = ct
    return SlabProblem(z0, z1, DEPTH, operator, sinogram[z0:z1], chunk_z=CHUNK)


def solve_split(ct, cfg, denoiser, pieces: int):
    """Every slab of the split solved by its own SlabSolver in its own thread; (volume, last events)."""
    return run_threads([slab_problem(ct, *piece) for piece in SPLITS[pieces]], cfg, denoiser)


def auto_config(method: str = "dds", steps: int = 4):
    cfg = load_config("svct-8view", method, steps=steps, lam="auto", seed=5)
    return cfg.replace(cg_iters=3)


# -- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dds", "mbir"])
def test_lam_auto_is_accepted_from_a_file_and_an_override(method, tmp_path):
    path = tmp_path / "auto.yaml"
    path.write_text(f"{method}:\n  lam: auto\n")
    assert load_config(path, method).lam == "auto"
    assert load_config("svct-8view", method, lam="auto").to_dict()["lam"] == "auto"
    assert load_config(path, method, lam=0.02).lam == 0.02  # a number still overrides it


@pytest.mark.parametrize("value, problem", [("autox", "expected a number or 'auto', got 'autox'"),
                                            ("-1", "must be >= 0, got -1.0"), ("Auto", "expected a number or 'auto', got 'Auto'")])
def test_other_words_and_negative_lams_are_refused_in_one_line(value, problem, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"dds:\n  lam: {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, "dds")
    assert str(caught.value) == f"{path}: dds.lam: {problem}"
    with pytest.raises(ConfigError, match=r"^override: dds\.lam: "):
        load_config("svct-8view", "dds", lam=float(value) if value == "-1" else value)


def test_methods_without_lam_auto_refuse_it():
    with pytest.raises(ConfigError, match=r"admm-tv\.lam: expected a number, got 'auto'"):
        load_config("svct-8view", "admm-tv", lam="auto")


# -- the solver ---------------------------------------------------------------------------------

def test_lam_auto_chooses_the_same_lam_and_volume_for_any_split(ct, tiny_denoiser):
    cfg = auto_config()
    results = {pieces: solve_split(ct, cfg, tiny_denoiser, pieces) for pieces in (1, 2, 3)}
    whole, events = results[1]
    chosen = events[0].info["lam"]
    errors = ["lam"] + [f"lam_cv_error[{lam:g}]" for lam in LAM_AUTO.candidates]
    assert LAM_AUTO.candidates[0] <= chosen <= LAM_AUTO.candidates[-1]
    for pieces in (2, 3):
        volume, slab_events = results[pieces]
        for event in slab_events:  # the same choice from the same held-out errors on every rank
            assert [event.info[key] for key in errors] == [events[0].info[key] for key in errors]
        assert torch.equal(volume, whole)


def test_lam_auto_is_reported_and_resumes_without_choosing_again(ct, tiny_denoiser, monkeypatch):
    cfg = auto_config()
    problem = slab_problem(ct, 0, DEPTH)
    saved: dict[int, dict[str, np.ndarray]] = {}  # what a checkpoint holds
    events = []

    def keep(event):
        events.append(event)
        saved[event.step] = event.state.to_numpy()

    first = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=tiny_denoiser)
    whole = first.run(first.initial_state(), callback=keep)
    info = events[0].info
    errors = [info[f"lam_cv_error[{lam:g}]"] for lam in LAM_AUTO.candidates]
    assert all(np.isfinite(errors)) and all(event.info["lam"] == info["lam"] for event in events)
    assert info["lam_auto_nfe"] == len(LAM_AUTO.candidates) * LAM_AUTO.steps and info["lam_auto_s"] > 0
    assert float(saved[2][LAM_KEYS[0]][0]) == info["lam"]
    assert saved[2][LAM_KEYS[2]].tolist() == errors
    # The chosen lam is the one the run used: a run with that number gives the same volume.
    fixed = SlabSolver(problem, cfg.replace(lam=info["lam"]), comm=LocalComm(), denoiser=tiny_denoiser)
    assert torch.equal(fixed.run(fixed.initial_state()), whole)

    import mbir_batch.methods.sampling as sampling

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run must not run the cross-validation again")

    monkeypatch.setattr(sampling, "cross_validate", refuse)
    resumed = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=tiny_denoiser)
    later = []
    assert torch.equal(resumed.run(SlabState.from_numpy(saved[2]), callback=later.append), whole)
    assert later[-1].info["lam"] == info["lam"]
    # A state past step 0 without the choice is not a state of this run.
    stripped = SlabState.from_numpy({k: v for k, v in saved[2].items() if k not in LAM_KEYS})
    with pytest.raises(ValueError, match="holds no chosen lam"):
        resumed.run(stripped)


def test_mbir_chooses_lam_too(ct, tiny_denoiser):
    cfg = auto_config("mbir", steps=2)
    events = []
    solver = SlabSolver(slab_problem(ct, 0, DEPTH), cfg, comm=LocalComm(), denoiser=tiny_denoiser)
    volume = solver.run(solver.initial_state(), callback=events.append)
    assert torch.isfinite(volume).all()
    assert events[-1].info["lam_auto_nfe"] == 2 * len(LAM_AUTO.candidates) * LAM_AUTO.steps
    assert LAM_AUTO.candidates[0] <= events[-1].info["lam"] <= LAM_AUTO.candidates[-1]
