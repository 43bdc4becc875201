"""Strict loading: every bad file ends in ONE line that names the file and the first offending keys."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from mbir_batch.kernels.denoiser import DenoiserLoadError
from mbir_batch.kernels.priors import load_denoiser

from .conftest import ADM_DIR, NCSNPP_DIR


def load_error(path, **kw) -> str:
    with pytest.raises(DenoiserLoadError) as err:
        load_denoiser(path, **kw)
    message = str(err.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


@pytest.fixture
def adm_copy(tmp_path):
    """A writable copy of the ADM fixture (checkpoint + YAML) and its state dict."""
    shutil.copy(ADM_DIR / "AAPM32_tiny.yml", tmp_path / "AAPM32_tiny.yml")
    return tmp_path / "model.pt", torch.load(ADM_DIR / "model.pt", weights_only=True)


@pytest.fixture
def ncsnpp_copy(tmp_path):
    shutil.copy(NCSNPP_DIR / "config.json", tmp_path / "config.json")
    return tmp_path / "checkpoint.pth", torch.load(NCSNPP_DIR / "checkpoint.pth", weights_only=True)


def test_missing_file(tmp_path):
    message = load_error(tmp_path / "nope.pt")
    assert str(tmp_path / "nope.pt") in message and "not found" in message


@pytest.mark.parametrize("source", [ADM_DIR / "model.pt", NCSNPP_DIR / "checkpoint.pth"])
def test_truncated_checkpoint(tmp_path, source):
    target = tmp_path / source.name
    target.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    for name in ("AAPM32_tiny.yml", "config.json"):
        if (source.parent / name).exists():
            shutil.copy(source.parent / name, tmp_path / name)
    message = load_error(target)
    assert str(target) in message and "truncated or corrupted" in message


def test_adm_key_renamed(adm_copy):
    path, state = adm_copy
    state["input_blocks.1.0.in_layers.0.weight_typo"] = state.pop("input_blocks.1.0.in_layers.0.weight")
    torch.save(state, path)
    message = load_error(path)
    assert str(path) in message and "1 unmapped key(s) ['input_blocks.1.0.in_layers.0.weight_typo']" in message
    assert "1 missing key(s) ['input_blocks.1.0.in_layers.0.weight']" in message


def test_adm_key_removed_and_reshaped(adm_copy):
    path, state = adm_copy
    del state["out.2.bias"]
    torch.save(state, path)
    assert "missing key(s) ['out.2.bias']" in load_error(path)
    state = torch.load(ADM_DIR / "model.pt", weights_only=True)
    state["middle_block.1.qkv.weight"] = state["middle_block.1.qkv.weight"][:, :, 0]
    torch.save(state, path)
    message = load_error(path)
    assert "middle_block.1.qkv.weight (192, 64) (expected (192, 64, 1))" in message


def test_adm_missing_or_ambiguous_config(tmp_path, adm_copy):
    path, state = adm_copy
    torch.save(state, path)
    (tmp_path / "AAPM32_tiny.yml").unlink()
    assert "needs its YAML config" in load_error(path)
    (tmp_path / "a.yml").write_text("model: {}\n")
    (tmp_path / "b.yaml").write_text("model: {}\n")
    assert "['a.yml', 'b.yaml']" in load_error(path)
    assert "a.yml: ADM config lacks key 'diffusion'" in load_error(path, config=tmp_path / "a.yml")


def test_score_sde_missing_config(tmp_path, ncsnpp_copy):
    path, payload = ncsnpp_copy
    torch.save(payload, path)
    (tmp_path / "config.json").unlink()
    message = load_error(path)
    assert str(path) in message and "no config.json beside it" in message


def test_score_sde_key_renamed_and_ema_mismatch(ncsnpp_copy):
    path, payload = ncsnpp_copy
    payload["model"] = {(k + "x" if k == "module.all_modules.25.weight" else k): v  # renamed in place
                        for k, v in payload["model"].items()}
    torch.save(payload, path)
    message = load_error(path)
    assert "unmapped key(s) ['module.all_modules.25.weightx']" in message
    assert "missing key(s) ['module.all_modules.25.weight']" in message
    payload = torch.load(NCSNPP_DIR / "checkpoint.pth", weights_only=True)
    payload["ema"]["shadow_params"] = payload["ema"]["shadow_params"][:-1]
    torch.save(payload, path)
    assert "ema.shadow_params has 215 tensors but 'model' has 216" in load_error(path)
    payload = torch.load(NCSNPP_DIR / "checkpoint.pth", weights_only=True)
    del payload["ema"]
    torch.save(payload, path)
    assert "not a known checkpoint format" in load_error(path)


def test_unsupported_score_sde_option(tmp_path, ncsnpp_copy):
    path, payload = ncsnpp_copy
    torch.save(payload, path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["progressive"] = "output_skip"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "model.progressive = 'output_skip' is not supported" in load_error(path)


def test_bad_data_range(tmp_path):
    assert "lo < hi" in load_error(ADM_DIR / "model.pt", data_range=(1.0, 0.0))
