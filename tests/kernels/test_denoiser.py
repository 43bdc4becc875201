"""Tests for kernels/denoiser.py: EDM preconditioning, strict save/load, slab batching."""
from __future__ import annotations

import json

import pytest
import torch
from mbir_batch.kernels.denoiser import (
    Denoiser,
    DenoiserConfig,
    DenoiserLoadError,
    bundled_model_path,
    denoise_slab,
    load_denoiser,
    save_denoiser,
)

TINY = DenoiserConfig(resolution=16, channels=(8, 16), layers_per_block=1, norm_groups=4)


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = Denoiser(TINY)
    json_path, weights_path = save_denoiser(model, tmp_path / "tiny", {"data": "test"})
    return model, json_path, weights_path


def test_config_roundtrip_and_validation():
    assert DenoiserConfig.from_dict(TINY.to_dict()) == TINY
    assert TINY.attention_levels == (False, True)
    assert json.loads(json.dumps(TINY.to_dict())) == TINY.to_dict()
    with pytest.raises(ValueError, match="divisible"):
        DenoiserConfig(resolution=17, channels=(8, 16), norm_groups=4)
    with pytest.raises(ValueError, match="unknown keys"):
        DenoiserConfig.from_dict({**TINY.to_dict(), "bogus": 1})


def test_preconditioning_limits():
    """At tiny sigma D is (nearly) the identity (c_skip -> 1, c_out -> 0)."""
    torch.manual_seed(0)
    model = Denoiser(TINY).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x, 1e-6), x, atol=1e-4)
        assert torch.isfinite(model(x, torch.tensor([50.0, 0.01]))).all()


def test_save_load_roundtrip(saved):
    model, json_path, weights_path = saved
    x = torch.rand(3, 16, 16)
    for path in (json_path, weights_path, json_path.with_suffix("")):
        loaded = load_denoiser(path)
        assert not loaded.training
        assert torch.allclose(denoise_slab(loaded, x, 0.3), denoise_slab(model, x, 0.3), atol=1e-6)
    card = json.loads(json_path.read_text())
    assert card["training"] == {"data": "test"} and card["resolution"] == 16


def test_missing_files(saved, tmp_path):
    _, json_path, weights_path = saved
    with pytest.raises(DenoiserLoadError, match="nothere.json"):
        load_denoiser(tmp_path / "nothere.json")
    weights_path.unlink()
    with pytest.raises(DenoiserLoadError, match="tiny.safetensors.*not found"):
        load_denoiser(json_path)


def test_corrupted_weights(saved):
    _, json_path, weights_path = saved
    data = bytearray(weights_path.read_bytes())
    data[-100] ^= 0xFF
    weights_path.write_bytes(bytes(data))
    with pytest.raises(DenoiserLoadError, match="tiny.safetensors.*corrupted"):
        load_denoiser(json_path)
    # without a recorded checksum, a broken header is still caught by safetensors
    card = json.loads(json_path.read_text())
    del card["weights_sha256"]
    json_path.write_text(json.dumps(card))
    weights_path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header")
    with pytest.raises(DenoiserLoadError, match="tiny.safetensors.*cannot read"):
        load_denoiser(json_path)


@pytest.mark.parametrize("change, message", [
    ({"channels": [8, 24], "norm_groups": 4}, "shape mismatch"),
    ({"layers_per_block": 2}, "key mismatch"),
])
def test_mismatched_architecture(saved, change, message):
    _, json_path, _ = saved
    card = json.loads(json_path.read_text())
    card["config"].update(change)
    json_path.write_text(json.dumps(card))
    with pytest.raises(DenoiserLoadError, match=f"tiny.safetensors.*{message}"):
        load_denoiser(json_path)


def test_expected_architecture(saved):
    _, json_path, _ = saved
    other = DenoiserConfig(resolution=16, channels=(8, 8), layers_per_block=1, norm_groups=4)
    with pytest.raises(DenoiserLoadError, match="tiny.json.*architecture mismatch"):
        load_denoiser(json_path, expect=other)
    assert load_denoiser(json_path, expect=TINY).config == TINY


def test_denoise_slab_batches_and_errors(saved):
    model, _, _ = saved
    model.train()
    x = torch.rand(7, 16, 16)
    full = denoise_slab(model, x, 0.2, batch=32)
    assert full.dtype == torch.float32 and full.shape == x.shape
    assert torch.allclose(denoise_slab(model, x, 0.2, batch=3), full, atol=1e-5)
    assert model.training  # mode restored
    with pytest.raises(ValueError, match=r"\(32, 32\).*16x16"):
        denoise_slab(model, torch.rand(2, 32, 32), 0.2)


def test_denoise_slab_cuts_batches_at_global_slices(saved):
    """A slab of a split volume sees the same batch companions as the whole volume: equal bits."""
    model, _, _ = saved
    x = torch.rand(24, 16, 16)
    whole = denoise_slab(model, x, 0.3, batch=8)
    parts = [denoise_slab(model, x[z0:z1], 0.3, batch=8, first_slice=z0) for z0, z1 in ((0, 8), (8, 24))]
    assert torch.equal(torch.cat(parts), whole)
    # a slab starting mid-batch: its first batch ends at the next global multiple of 8
    tail = denoise_slab(model, x[4:], 0.3, batch=8, first_slice=4)
    assert torch.equal(tail[4:], whole[8:])
    with pytest.raises(ValueError, match="batch must be >= 1"):
        denoise_slab(model, x, 0.3, batch=0)


def test_bundled_model_path_points_into_package():
    path = bundled_model_path()
    assert path.name == "svct-phantom-64.json" and path.parent.name == "models"
