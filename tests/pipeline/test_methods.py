"""Tests for pipeline/methods/: the registry table, the method configs and the shared method interface."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from mbir_batch import config
from mbir_batch.errors import ConfigError
from mbir_batch.io import simulate_measurements
from mbir_batch.kernels.comm import LocalComm
from mbir_batch.kernels.operators import operator_from_geometry
from mbir_batch.methods import METHODS, get, names
from mbir_batch.methods import admm_tv, dds, fbp, mbir, slice2d
from mbir_batch.phantoms import make_phantom
from mbir_batch.solve import SlabProblem, SlabSolver, SlabState, check_finite

MODULES = {"fbp": fbp, "admm-tv": admm_tv, "slice2d": slice2d, "dds": dds, "mbir": mbir}
ADMM = {"admm-tv", "dds", "mbir"}


@pytest.fixture(scope="module")
def problem(tmp_path_factory) -> SlabProblem:
    volume = make_phantom(4, 16, 4)
    sim = simulate_measurements(volume, task="svct", views=6, seed=0)
    operator = operator_from_geometry("ct", sim.geometry, volume.shape, cache_dir=tmp_path_factory.mktemp("radon"))
    return SlabProblem(0, 4, 4, operator, torch.as_tensor(sim.measurements), chunk_z=4)


def test_the_table_names_labels_and_needs():
    assert names() == ("fbp", "admm-tv", "slice2d", "dds", "mbir")
    assert {name: m.label for name, m in METHODS.items()} == {
        "fbp": "FBP", "admm-tv": "ADMM-TV", "slice2d": "slice2d", "dds": "DDS", "mbir": "DiffusionMBIR"}
    assert {name for name, m in METHODS.items() if m.needs_model} == {"slice2d", "dds", "mbir"}
    for name, method in METHODS.items():
        assert method.name == name == method.config_type.method
        assert method is MODULES[name].METHOD
        fields = {item.name for item in dataclasses.fields(method.config_type)}
        assert method.steps_key is None if name == "fbp" else method.steps_key in fields


def test_an_unknown_method_is_one_line_listing_the_choices():
    with pytest.raises(ConfigError, match=r"^unknown method 'sirt'; choose one of fbp, admm-tv, slice2d, dds, mbir$"):
        get("sirt")


def test_every_module_has_the_same_small_interface():
    expected = {"initial_state": ["problem", "cfg", "device", "denoiser"],
                "run": ["problem", "cfg", "state", "comm", "denoiser", "device", "callback"]}
    for name, method in METHODS.items():
        for attribute, parameters in expected.items():
            assert list(inspect.signature(getattr(method, attribute)).parameters) == parameters, (name, attribute)


@pytest.mark.parametrize("name", list(METHODS))
def test_configs_are_frozen_and_record_only_their_own_settings(name):
    cfg = get(name).config_type(seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4
    recorded = cfg.to_dict()
    assert recorded["method"] == name and recorded["seed"] == 3
    assert set(recorded) == {"method"} | {item.name for item in dataclasses.fields(cfg)}
    assert cfg.replace(seed=None) == cfg and cfg.replace(seed=5).seed == 5
    with pytest.raises(ConfigError, match=rf"^eta_typo: not a setting of {name}"):
        cfg.replace(eta_typo=1.0)


def test_from_mapping_refuses_keys_the_method_ignores():
    with pytest.raises(ConfigError, match=r"^my\.yaml: admm-tv\.eta: unknown key \(known: cg_iters, iters, lam, "):
        get("admm-tv").config_type.from_mapping("my.yaml", {"iters": 3, "eta": 0.5})
    with pytest.raises(ConfigError, match=r"^my\.yaml: dds\.eta: must be in \[0, 1\], got 2\.0$"):
        get("dds").config_type.from_mapping("my.yaml", {"eta": 2})
    cfg = get("slice2d").config_type.from_mapping("my.yaml", {"steps": 4, "sigma_max": 5})
    assert (cfg.steps, cfg.sigma_max) == (4, 5.0) and isinstance(cfg.sigma_max, float)


def test_nfe_and_total_steps():
    expected = {"fbp": (0, 1), "admm-tv": (0, 7), "slice2d": (7, 7), "dds": (7, 7), "mbir": (14, 7)}
    for name, (nfe, total) in expected.items():
        method = get(name)
        cfg = method.config_type(**({method.steps_key: 7} if method.steps_key else {}))
        assert (cfg.nfe, cfg.total_steps) == (nfe, total), name


@pytest.mark.parametrize("name", list(METHODS))
def test_initial_state_and_its_checkpoint_arrays(name, problem):
    """The checkpoint keys are those the output store verifies: step, x and, for ADMM, admm_z/admm_w."""
    state = get(name).initial_state(problem, get(name).config_type(), device=torch.device("cpu"))
    arrays = state.to_numpy()
    assert set(arrays) == {"step", "x"} | ({"admm_z", "admm_w"} if name in ADMM else set())
    assert arrays["step"] == 0 and arrays["x"].shape == (4, 16, 16)
    if name in ADMM:
        shape = (3, 4, 16, 16) if name == "admm-tv" else (4, 16, 16)
        assert arrays["admm_z"].shape == arrays["admm_w"].shape == shape
        assert not arrays["admm_z"].any() and not arrays["admm_w"].any()
    back = SlabState.from_numpy(arrays)
    assert set(back.to_numpy()) == set(arrays)
    assert all(np.array_equal(back.to_numpy()[key], value) for key, value in arrays.items())


def test_a_state_without_admm_variables_is_refused_by_an_admm_method(problem):
    cfg = get("dds").config_type(steps=2, cg_iters=1)
    foreign = get("slice2d").initial_state(problem, get("slice2d").config_type(), device=torch.device("cpu"))
    solver = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=torch.nn.Identity())
    with pytest.raises(ValueError, match="dds: the state has no admm_z or admm_w"):
        solver.run(foreign)


def test_a_method_that_needs_a_model_refuses_to_start_without_one(problem):
    with pytest.raises(ValueError, match="method 'mbir' needs a denoiser"):
        SlabSolver(problem, get("mbir").config_type(), comm=LocalComm())


def test_the_divergence_message_names_the_methods_own_settings(problem):
    bad = torch.full((4, 16, 16), float("inf"))
    with pytest.raises(Exception, match=r"^slice2d diverged on slices \[0, 4\): .* \(cg_iters 20\); nothing"):
        check_finite(bad, problem, get("slice2d").config_type())
    with pytest.raises(Exception, match=r"\(rho 1\.0, lam 0\.1, cg_iters 20\)"):
        check_finite(bad, problem, get("admm-tv").config_type())


# -- the sampler's noise schedule (issue 14: clipped to the model's range; schedule: model) -------

FIXTURES = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "pretrained"


class _RangeDenoiser(torch.nn.Module):
    """Identity denoiser that supports only sigma in [0.01, 2] (what an imported model reports)."""

    sigma_min, sigma_max = 0.01, 2.0

    def __init__(self, resolution: int) -> None:
        super().__init__()
        self.config = type("Config", (), {"resolution": resolution})()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, sigma):
        return x * self.scale


def test_karras_sigmas_are_clipped_to_the_range_the_denoiser_supports(problem):
    from mbir_batch.methods.sampling import sampler_sigmas

    cfg = get("dds").config_type(steps=5, sigma_min=0.005, sigma_max=10.0)
    denoiser = _RangeDenoiser(16)
    sigmas = sampler_sigmas(cfg, denoiser)
    assert sigmas[0].item() == pytest.approx(2.0) and sigmas[-2].item() == pytest.approx(0.01) and sigmas[-1] == 0
    state = SlabSolver(problem, cfg, comm=LocalComm(), denoiser=denoiser).initial_state()
    expected = 2.0 * SlabSolver(problem, cfg.replace(sigma_max=1.0), comm=LocalComm(),
                                denoiser=denoiser).initial_state().x  # same draw, scaled
    torch.testing.assert_close(state.x, expected)
    with pytest.raises(ConfigError, match="outside the range the denoiser supports"):
        sampler_sigmas(cfg.replace(sigma_min=3.0, sigma_max=5.0), denoiser)


def test_model_schedule_uses_the_checkpoints_own_timesteps():
    """DDS's VP checkpoint with ``schedule: model`` samples at t = 980, 960, ..., 0 (50 steps)."""
    from mbir_batch.kernels.priors import load_denoiser
    from mbir_batch.methods.sampling import sampler_sigmas

    prior = load_denoiser(FIXTURES / "adm-tiny" / "model.pt", config=FIXTURES / "adm-tiny" / "AAPM32_tiny.yml")
    sigmas = sampler_sigmas(get("dds").config_type(steps=50, schedule="model"), prior)
    grid = prior.discrete_sigmas()
    assert len(sigmas) == 51 and sigmas[-1] == 0
    torch.testing.assert_close(sigmas[:-1], grid[torch.arange(980, -1, -20)], rtol=0, atol=0)


def test_model_schedule_needs_a_model_that_knows_its_timesteps(problem):
    from mbir_batch.methods.sampling import sampler_sigmas

    with pytest.raises(ConfigError, match="schedule: 'model' needs a denoiser loaded by"):
        sampler_sigmas(get("dds").config_type(schedule="model"), _RangeDenoiser(16))
    with pytest.raises(ConfigError, match="schedule: must be one of karras, model"):
        config.load_config("svct-8view", "dds", schedule="linear")


def test_listing_the_methods_does_not_import_torch():
    """The CLI builds its --method choices from the table; --help must not pay for torch."""
    import subprocess
    import sys

    code = ("import sys; import mbir_batch.cli, mbir_batch.config; from mbir_batch.methods import names; "
            "names(); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
