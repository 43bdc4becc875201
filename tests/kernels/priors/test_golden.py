"""D(x, sigma) of the papers' checkpoint formats against the original code's own outputs.

The goldens were written by DDS and DiffusionMBIR themselves (tests/fixtures/pretrained/README.md)
single-threaded; on 2 threads outputs move by ~3e-6, so D is compared to 1e-4 * max(1, sigma)
and raw network outputs to 1e-5 of their magnitude.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mbir_batch.kernels.priors import load_denoiser
from mbir_batch.kernels.priors.adapters import VEScoreDenoiser, VPDenoiser
from mbir_batch.kernels.priors.files import build_strict, read_torch_file, strip_prefix
from mbir_batch.kernels.priors.ncsnpp import NCSNpp

from .conftest import ADM_DIR, NCSNPP_DIR


def assert_per_sample(actual: torch.Tensor, expected: np.ndarray, tol: np.ndarray, what: str) -> None:
    err = np.abs(actual.detach().numpy() - expected).reshape(len(expected), -1).max(axis=1)
    assert (err <= tol).all(), f"{what}: max |diff| per sample {err} exceeds {tol}"


@pytest.fixture(scope="module")
def ncsnpp() -> VEScoreDenoiser:
    return load_denoiser(NCSNPP_DIR / "checkpoint.pth")


@pytest.fixture(scope="module")
def adm() -> VPDenoiser:
    return load_denoiser(ADM_DIR / "model.pt")


@torch.no_grad()
def test_ncsnpp_denoiser_matches_diffusionmbir(ncsnpp, ncsnpp_golden):
    g = ncsnpp_golden
    sigma = g["sigma"].astype(np.float64)
    assert ncsnpp.format == "score_sde" and ncsnpp.resolution == 32
    assert (ncsnpp.sigma_min, ncsnpp.sigma_max, ncsnpp.data_range) == (0.01, 378.0, (0.0, 1.0))
    x0 = ncsnpp(torch.from_numpy(g["x"]), torch.from_numpy(sigma))
    assert x0.shape == g["x"].shape and x0.dtype == torch.float32
    assert_per_sample(x0, g["denoised"], 1e-4 * np.maximum(1.0, sigma), "D vs x + sigma^2 score")
    score = ncsnpp.score(torch.from_numpy(g["x"]), torch.from_numpy(sigma))
    magnitude = np.abs(g["net_out"]).reshape(4, -1).max(axis=1)
    assert_per_sample(score, g["net_out"], 1e-5 * np.maximum(1.0, magnitude), "raw network output")
    # a float sigma is broadcast over the batch
    one = ncsnpp(torch.from_numpy(g["x"][1:2]), float(sigma[1]))
    assert_per_sample(one, g["denoised"][1:2], np.array([1e-4]), "float sigma")


@torch.no_grad()
def test_ncsnpp_uses_ema_and_raw_weights_map_too(ncsnpp, ncsnpp_golden):
    """The EMA copy is what DiffusionMBIR samples with; the raw ``model`` weights map 1:1 as well."""
    g = ncsnpp_golden
    x, labels = torch.from_numpy(g["x"]), torch.from_numpy(g["labels"])
    assert np.abs(ncsnpp.score(x, labels.double()).numpy() - g["net_out_nonema"]).max() > 1.0
    payload = read_torch_file(NCSNPP_DIR / "checkpoint.pth")
    raw = {k: v for k, v in strip_prefix(payload["model"]).items() if k != "sigmas"}
    net = build_strict("raw", lambda: NCSNpp(ncsnpp.net.cfg), raw)
    magnitude = np.abs(g["net_out_nonema"]).reshape(4, -1).max(axis=1)
    assert_per_sample(net(x, labels), g["net_out_nonema"], 1e-5 * np.maximum(1.0, magnitude), "non-EMA output")


@torch.no_grad()
def test_adm_matches_dds(adm, adm_golden):
    g = adm_golden
    assert adm.format == "adm" and adm.resolution == 32 and adm.learn_sigma
    assert torch.equal(adm.alphas_cumprod, torch.from_numpy(g["alphas_cumprod"])), "abar table differs from DDS's"
    out = adm.network_output(torch.from_numpy(g["x"]), torch.from_numpy(g["t"]))
    magnitude = np.abs(g["out"]).reshape(4, -1).max(axis=1)
    assert_per_sample(out, g["out"], 1e-5 * np.maximum(1.0, magnitude), "raw [eps, v] output")
    sigma = torch.from_numpy(g["sigma_equiv"]).double()
    assert torch.equal(adm.sigma_to_t(sigma), torch.from_numpy(g["t"]).double()), "grid sigma -> integer t"
    x_ve = torch.from_numpy(g["x"]) / torch.from_numpy(g["alpha_bar_t"]).sqrt().view(-1, 1, 1, 1)
    x0 = adm(x_ve, sigma)
    assert_per_sample(x0, g["x0_pred_dds"], 1e-4 * np.maximum(1.0, g["sigma_equiv"]), "D vs DDS Tweedie x0")


def test_adm_sigma_grid_and_dds_schedule(adm, adm_golden):
    abar = adm_golden["alphas_cumprod"].astype(np.float64)
    grid = np.sqrt((1 - abar) / abar)
    assert np.allclose(adm.discrete_sigmas().numpy(), grid, rtol=1e-12)
    assert adm.sigma_min == pytest.approx(grid[0]) and adm.sigma_max == pytest.approx(grid[-1])
    schedule = adm.model_schedule(50)
    expected_t = list(range(980, -1, -20))  # DDS: reversed(range(0, 1000, 1000 // 50))
    assert len(schedule) == 51 and float(schedule[-1]) == 0.0
    assert np.allclose(schedule[:-1].numpy(), grid[expected_t], rtol=1e-12)
    assert torch.equal(adm.sigma_to_t(schedule[:-1]), torch.tensor(expected_t, dtype=torch.float64))


def test_adm_fractional_t_interpolates_log_sigma(adm, adm_golden):
    abar = adm_golden["alphas_cumprod"].astype(np.float64)
    log_grid = np.log(np.sqrt((1 - abar) / abar))
    sigma = np.exp(0.25 * log_grid[400] + 0.75 * log_grid[401])
    assert float(adm.sigma_to_t(torch.tensor([sigma], dtype=torch.float64))) == pytest.approx(400.75, abs=1e-9)
    beyond = adm.sigma_to_t(torch.tensor([1e-4, 1e4], dtype=torch.float64))
    assert beyond.tolist() == [0.0, 999.0]


def test_ncsnpp_model_schedule(ncsnpp):
    sched = ncsnpp.model_schedule(2000)
    t = np.linspace(1.0, 1e-5, 2000)
    assert np.allclose(sched[:-1].numpy(), 0.01 * 37800.0**t, rtol=1e-12) and float(sched[-1]) == 0.0
    grid = ncsnpp.discrete_sigmas()
    assert len(grid) == 2000 and float(grid[0]) == pytest.approx(0.01) and float(grid[-1]) == pytest.approx(378.0)


@torch.no_grad()
def test_data_range_override_scales_sigma(ncsnpp_golden):
    """Treating the same network as trained in [-1, 1]: D maps x and sigma by the factor 2."""
    g = ncsnpp_golden
    wide = load_denoiser(NCSNPP_DIR / "checkpoint.pth", data_range=(-1.0, 1.0))
    assert wide.sigma_max == pytest.approx(189.0) and wide.data_range == (-1.0, 1.0)
    x_img = (torch.from_numpy(g["x"][2:3]) + 1.0) / 2.0
    x0 = wide(x_img, float(g["sigma"][2]) / 2.0)
    assert_per_sample(x0, (g["denoised"][2:3] + 1.0) / 2.0, np.array([1e-4 * g["sigma"][2]]), "[-1, 1] mapping")
