"""``model inspect`` facts, conversion to the own format (v2) and back, and the public entry points."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from mbir_batch.kernels.denoiser import Denoiser, DenoiserConfig, DenoiserLoadError, denoise_slab, save_denoiser
from mbir_batch.kernels.priors import load_denoiser
from mbir_batch.kernels.priors.inspect import convert_model, inspect_model

from .conftest import ADM_DIR, NCSNPP_DIR


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_inspect_adm_fixture():
    report = inspect_model(ADM_DIR / "model.pt")
    assert (report.format, report.architecture, report.parameterization) == ("adm", "adm", "vp-epsilon")
    assert report.parameters == 983_746 and report.resolution == 32
    assert report.data_range == (0.0, 1.0) and report.sha256 == sha256(ADM_DIR / "model.pt")
    assert report.sigma_min == pytest.approx(0.0100013, rel=1e-5)
    assert report.sigma_max == pytest.approx(157.407, rel=1e-5)
    assert "T = 1000 timesteps" in report.schedule and "learned variance" in report.schedule
    lines = report.lines()
    assert any(line.startswith("parameters: 983,746") for line in lines)
    assert json.loads(json.dumps(report.to_dict()))["format"] == "adm"


def test_inspect_ncsnpp_fixture():
    report = inspect_model(NCSNPP_DIR / "checkpoint.pth")
    assert (report.format, report.architecture, report.parameterization) == ("score_sde", "ncsnpp", "ve-score")
    assert report.parameters == 227_281  # the fixture README's count, Fourier W included, sigmas buffer not
    assert (report.sigma_min, report.sigma_max) == (0.01, 378.0) and report.weights.startswith("ema")
    assert report.sha256 == sha256(NCSNPP_DIR / "checkpoint.pth") and "2000 scales" in report.schedule


def roundtrip(source, tmp_path, **kw):
    original = load_denoiser(source, **kw)
    json_path, weights_path = convert_model(source, tmp_path / "converted", **kw)
    converted = load_denoiser(json_path)
    assert converted.format == "own" and converted.config.architecture == original.config.architecture
    for key in ("resolution", "sigma_min", "sigma_max", "data_range"):
        assert getattr(converted, key) == pytest.approx(getattr(original, key)), key
    x = torch.rand(2, 1, original.resolution, original.resolution, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for sigma in (original.sigma_min * 1.5, 0.3, torch.tensor([0.05, 2.0])):
            assert torch.equal(converted(x, sigma), original(x, sigma)), f"differs at sigma {sigma}"
    assert torch.equal(converted.model_schedule(10), original.model_schedule(10))
    return json_path, weights_path


@pytest.mark.parametrize("source", [ADM_DIR / "model.pt", NCSNPP_DIR / "checkpoint.pth"])
def test_convert_fixtures_roundtrip(tmp_path, source):
    json_path, _ = roundtrip(source, tmp_path)
    doc = json.loads(json_path.read_text())
    assert doc["version"] == 2 and doc["converted_from"]["sha256"] == sha256(source)
    assert inspect_model(json_path).format == "own"


def test_convert_diffusers_and_own_v1_roundtrip(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    unet.save_pretrained(tmp_path / "ddpm")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "ddpm")
    roundtrip(tmp_path / "ddpm", tmp_path / "a")
    edm = Denoiser(DenoiserConfig(resolution=16, channels=(8, 16), layers_per_block=1, norm_groups=4))
    json_v1, _ = save_denoiser(edm, tmp_path / "edm", {"data": "test"})
    loaded = load_denoiser(json_v1)
    assert loaded.format == "own" and loaded.config.parameterization == "edm"
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.2), edm.eval()(x, 0.2))
    roundtrip(json_v1, tmp_path / "b")


def test_own_v2_corruption_and_config_misuse(tmp_path):
    json_path, weights_path = convert_model(ADM_DIR / "model.pt", tmp_path / "adm")
    with pytest.raises(DenoiserLoadError, match="own-format models carry their config"):
        load_denoiser(json_path, config=ADM_DIR / "AAPM32_tiny.yml")
    data = bytearray(weights_path.read_bytes())
    data[-1] ^= 0xFF
    weights_path.write_bytes(bytes(data))
    with pytest.raises(DenoiserLoadError, match="corrupted") as err:
        load_denoiser(json_path)
    assert str(weights_path) in str(err.value)


def test_denoise_slab_runs_a_pretrained_prior():
    """The samplers' slab helper accepts any loaded prior (it reads ``model.config.resolution``)."""
    model = load_denoiser(NCSNPP_DIR / "checkpoint.pth")
    slab = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        direct = model(slab.unsqueeze(1), 0.5).squeeze(1)
    assert torch.allclose(denoise_slab(model, slab, 0.5, batch=2), direct, atol=1e-6)


def test_package_level_entry_point():
    import mbir_batch

    assert mbir_batch.load_denoiser is load_denoiser
    with pytest.raises(AttributeError):
        mbir_batch.no_such_name  # noqa: B018
    lazy = "import sys, mbir_batch; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", lazy], check=True, timeout=120)
