"""Tests for pipeline/train_ddpm.py: the DDPM (VP epsilon) trainer learns, resumes, exports diffusers files."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from mbir_batch.errors import ConfigError
from mbir_batch.kernels.denoiser import DenoiserConfig, load_denoiser
from mbir_batch.phantoms import HELDOUT_SEED_START
from mbir_batch.train import train_denoiser
from mbir_batch.train_ddpm import CARD_NAME, SCHEDULER, heldout_ddpm_mse, make_unet, train_ddpm
from tiny_models import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_ddpm_model_learns_to_predict_noise(tmp_path):
    """~7 s of DDPM training: loss falls and x0_hat beats the identity on held-out seeds >= 9000."""
    reports = []
    result = train_ddpm(TINY, out=tmp_path / "vp", steps=200, batch=16, lr=2e-3, warmup=10, phantoms_per_pool=2,
                        refresh_every=40, report_every=20, resume=False,
                        progress=lambda step, loss, rate: reports.append((step, loss)))
    assert result.steps == 200 and [s for s, _ in reports] == list(range(20, 201, 20))
    assert max(loss for _, loss in reports[-3:]) < 0.5 * reports[0][1]
    # the directory is what diffusers itself loads: EMA UNet + the DDPM scheduler of DDS's recipe
    unet = UNet2DModel.from_pretrained(result.out)
    scheduler = DDPMScheduler.from_pretrained(result.out)
    assert {k: scheduler.config[k] for k in SCHEDULER} == SCHEDULER
    assert unet.config.sample_size == 16 and tuple(unet.config.block_out_channels) == (8, 16)
    held = heldout_ddpm_mse(unet, timesteps=(50, 300))
    for t, (sigma, mse_model, mse_identity) in held.items():
        assert mse_model < 0.5 * mse_identity, t
    # sigma_t = sqrt((1 - abar) / abar) / 2, from the scheduler's own abar
    abar = float(scheduler.alphas_cumprod[300])
    assert held[300][0] == pytest.approx(((1 - abar) / abar) ** 0.5 / 2)
    torch.manual_seed(0)
    _, untrained, identity = heldout_ddpm_mse(make_unet(TINY), timesteps=(300,))[300]
    assert untrained > held[300][1] * 2  # the model learnt it; the parameterisation alone does not

    card = json.loads((result.out / CARD_NAME).read_text())
    assert card["steps"] == 200 and card["data_range"] == [-1.0, 1.0] and card["weights"] == "EMA"
    assert card["objective"]["prediction_type"] == "epsilon" and card["objective"]["beta_schedule"] == "linear"
    seeds = card["data"]["phantoms"]["seeds"]
    assert seeds == "0..9" and int(seeds.split("..")[1]) < HELDOUT_SEED_START
    assert card["loss_curve"][-1][0] == 200 and card["machine"]["torch"] and "warm_start" not in card


def run_short(tmp_path, name, steps, **kw):
    return train_ddpm(TINY, out=tmp_path / name, steps=steps, batch=4, lr=1e-3, warmup=2, phantoms_per_pool=1,
                      refresh_every=3, checkpoint_every=2, **kw)


def test_killed_ddpm_run_resumes_where_it_stopped(tmp_path):
    straight = run_short(tmp_path, "straight", 7, resume=False)
    run_short(tmp_path, "split", 4, resume=False)        # as if killed after step 4
    resumed = run_short(tmp_path, "split", 7)
    a = UNet2DModel.from_pretrained(straight.out).state_dict()
    b = UNet2DModel.from_pretrained(resumed.out).state_dict()
    assert resumed.steps == 7 and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))


def test_objective_and_architecture_mismatch_on_resume(tmp_path):
    run_short(tmp_path, "vp", 2, resume=False)
    with pytest.raises(ConfigError, match=r"vp\.ckpt\.pt.*objective ddpm \(asked for edm\).*new --out.*delete"):
        train_denoiser(TINY, out=tmp_path / "vp", steps=3, batch=2)
    other = DenoiserConfig(resolution=16, channels=(4, 8), layers_per_block=1, norm_groups=4)
    with pytest.raises(ConfigError, match=r"channels \[8, 16\] \(asked for \[4, 8\]\)") as info:
        train_ddpm(other, out=tmp_path / "vp", steps=3, batch=2)
    assert "resume=False" not in str(info.value)


def test_warm_start_from_an_edm_model(tmp_path):
    """--init-from copies the EDM model's UNet weights (then DDPM training continues from them)."""
    edm = train_denoiser(TINY, out=tmp_path / "edm", steps=2, batch=2, phantoms_per_pool=1, resume=False)
    result = train_ddpm(TINY, out=tmp_path / "vp", steps=0, init_from=edm.json_path, resume=False)
    exported = UNet2DModel.from_pretrained(result.out).state_dict()
    for key, value in load_denoiser(edm.json_path).unet.state_dict().items():
        assert torch.equal(exported[key], value), key
    card = json.loads((result.out / CARD_NAME).read_text())
    assert card["warm_start"]["model"] == str(edm.json_path) and card["warm_start"]["training"]["steps"] == 2
