"""The driver's one check of a model before launch (pipeline/model_check.py), for every format.

The project's own v1 cards are checked without torch; every other format (score_sde, ADM, own v2,
diffusers) is loaded on the CPU once. Either way a model that cannot work is one ModelError line.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mbir_batch.errors import ModelError, UserError
from mbir_batch.kernels.denoiser import Denoiser, DenoiserConfig, save_denoiser
from mbir_batch.model_check import ModelUse, check_model, check_models

PRETRAINED = Path(__file__).resolve().parents[1] / "fixtures" / "pretrained"
ADM, ADM_CONFIG = PRETRAINED / "adm-tiny" / "model.pt", PRETRAINED / "adm-tiny" / "AAPM32_tiny.yml"
NCSNPP = PRETRAINED / "ncsnpp-tiny" / "checkpoint.pth"


@pytest.fixture(scope="module")
def own_model(tmp_path_factory) -> Path:
    """A random-init 16x16 own-format v1 model (a fixture for the checks, never a fallback)."""
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(resolution=16, channels=(8, 16), layers_per_block=1, norm_groups=4,
                                    attention_levels=(False, False)))
    json_path, _ = save_denoiser(model, tmp_path_factory.mktemp("own") / "tiny", {"note": "test fixture"})
    return json_path


def test_own_v1_card_is_checked_without_torch(own_model):
    code = (f"import sys; from mbir_batch.model_check import check_model; "
            f"print(check_model({str(own_model)!r}, (16, 16)), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["16", "False"]


@pytest.mark.parametrize("model, config", [(ADM, ADM_CONFIG), (NCSNPP, None)], ids=["adm", "score_sde"])
def test_pretrained_formats_are_loaded_and_sized(model, config):
    assert check_model(model, (32, 32), config=config) == 32
    with pytest.raises(ModelError, match=rf"^{model}: the denoiser was trained on 32x32 slices, but ct.zarr has "
                                         r"16x16 slices; train a model of that size .*--method admm-tv"):
        check_model(model, (16, 16), dataset="ct.zarr", config=config)
    with pytest.raises(ModelError, match="need square slices"):
        check_model(model, (32, 24), config=config)


def test_an_unloadable_checkpoint_is_one_line(tmp_path):
    truncated = tmp_path / "model.pt"
    truncated.write_bytes(ADM.read_bytes()[: ADM.stat().st_size // 3])
    for path in (truncated, tmp_path / "absent.pt"):
        with pytest.raises(ModelError) as info:
            check_model(path, (32, 32), config=ADM_CONFIG)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "\n" not in message and "--method admm-tv" in message


def test_a_data_range_for_an_own_model_goes_through_the_loader(own_model):
    """Options the cheap card path cannot judge are left to the strict loader, which refuses them."""
    with pytest.raises(ModelError, match="EDM models work in \\[0, 1\\]; data_range does not apply"):
        check_model(own_model, (16, 16), data_range=(-1.0, 1.0))


def test_check_models_checks_each_model_once_per_slice_size(own_model, monkeypatch):
    from mbir_batch import model_check

    seen = []
    monkeypatch.setattr(model_check, "check_model", lambda model, shape, **kw: seen.append((model, shape)))
    uses = [ModelUse(own_model, None, None, (16, 16), f"d{i}.zarr") for i in range(3)]
    check_models(uses + [ModelUse(own_model, None, None, (24, 24), "wide.zarr")])
    assert seen == [(own_model, (16, 16)), (own_model, (24, 24))]
    assert issubclass(ModelError, UserError)
