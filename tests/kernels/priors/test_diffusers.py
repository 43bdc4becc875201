"""diffusers ``save_pretrained`` folders through ``load_denoiser``, against hand-computed x0.

Hand computation (Ho et al. 2020; Salimans & Ho 2022), model range [-1, 1]:
x_model = 2 x - 1, x_vp = sqrt(abar) x_model, and from the UNet's output f
eps: x0 = (x_vp - sqrt(1 - abar) f) / sqrt(abar);  v: x0 = sqrt(abar) x_vp - sqrt(1 - abar) f;
sample: x0 = f;  then x0_image = (x0 + 1) / 2 and sigma_image = sqrt((1 - abar) / abar) / 2.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, ScoreSdeVeScheduler, UNet2DModel
from mbir_batch.kernels.denoiser import DenoiserLoadError
from mbir_batch.kernels.priors import load_denoiser

RES = 16


def small_unet(out_channels: int = 1, **kw) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=RES, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, **kw).eval()


def save(tmp_path, unet, scheduler, name="model"):
    folder = tmp_path / name
    unet.save_pretrained(folder)
    scheduler.save_pretrained(folder)
    return folder


@torch.no_grad()
def hand_x0(unet, abar_t: float, x_img: torch.Tensor, t: float, prediction: str, clip: float | None = 1.0
            ) -> torch.Tensor:
    """x0 in image space; ``clip``: the scheduler's clip_sample_range (DDPMScheduler clips by default)."""
    a = torch.tensor(abar_t, dtype=torch.float64)
    x_vp = a.sqrt().float() * (2.0 * x_img - 1.0)
    f = unet(x_vp, torch.full((x_img.shape[0],), t), return_dict=False)[0][:, :1]
    c_s, c_n = a.sqrt().float(), (1.0 - a).sqrt().float()
    x0 = {"epsilon": (x_vp - c_n * f) / c_s, "v_prediction": c_s * x_vp - c_n * f, "sample": f}[prediction]
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return (x0 + 1.0) / 2.0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@torch.no_grad()
def test_ddpm_folder_matches_hand_computation(tmp_path, prediction):
    unet = small_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction)
    D = load_denoiser(save(tmp_path, unet, scheduler))
    assert D.format == "diffusers" and D.resolution == RES and D.data_range == (-1.0, 1.0)
    assert torch.equal(D.alphas_cumprod, scheduler.alphas_cumprod)
    abar = scheduler.alphas_cumprod.double()
    grid_img = ((1 - abar) / abar).sqrt() / 2.0
    assert D.sigma_min == pytest.approx(float(grid_img[0])) and D.sigma_max == pytest.approx(float(grid_img[-1]))
    x = torch.rand(3, 1, RES, RES, generator=torch.Generator().manual_seed(1))
    # on the grid: t = 500, integer timestep, table abar
    expected = hand_x0(unet, float(abar[500]), x, 500.0, prediction)
    assert torch.allclose(D(x, float(grid_img[500])), expected, atol=1e-5, rtol=0)
    # between grid points: fractional t from log-sigma interpolation, abar = 1 / (1 + sigma_model^2)
    sigma_model = float(np.exp(0.5 * (np.log(2 * float(grid_img[600])) + np.log(2 * float(grid_img[601])))))
    expected = hand_x0(unet, 1.0 / (1.0 + sigma_model**2), x, 600.5, prediction)
    assert torch.allclose(D(x, sigma_model / 2.0), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("clip_sample", [True, False])
@torch.no_grad()
def test_x0_is_what_the_schedulers_own_step_predicts(tmp_path, clip_sample):
    """D agrees with DDPMScheduler.step's pred_original_sample, including its clip_sample clamp."""
    unet = small_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip_sample)
    D = load_denoiser(save(tmp_path, unet, scheduler))
    assert D.clip_sample == (1.0 if clip_sample else None)
    x = torch.rand(2, 1, RES, RES, generator=torch.Generator().manual_seed(2))
    abar = scheduler.alphas_cumprod.double()
    for t in (50, 500, 950):
        x_t = abar[t].sqrt().float() * (2.0 * x - 1.0)
        eps = unet(x_t, torch.full((2,), float(t)), return_dict=False)[0]
        reference = scheduler.step(eps, t, x_t).pred_original_sample
        ours = 2.0 * D(x, float(((1 - abar[t]) / abar[t]).sqrt() / 2.0)) - 1.0
        assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4), t
    unclipped = hand_x0(unet, float(abar[950]), x, 950.0, "epsilon", clip=None)
    assert unclipped.min() < 0 or unclipped.max() > 1, "the case must exercise the clamp"


@torch.no_grad()
def test_learned_variance_keeps_eps_half_and_pipeline_layout(tmp_path):
    unet = small_unet(out_channels=2)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    scheduler.register_to_config(variance_type="learned_range")
    folder = tmp_path / "pipe"
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    D = load_denoiser(folder)
    assert D.learn_sigma
    abar = scheduler.alphas_cumprod.double()
    x = torch.rand(2, 1, RES, RES, generator=torch.Generator().manual_seed(2))
    sigma = float(((1 - abar[250]) / abar[250]).sqrt() / 2.0)
    assert torch.allclose(D(x, sigma), hand_x0(unet, float(abar[250]), x, 250.0, "epsilon"), atol=1e-5, rtol=0)


@torch.no_grad()
def test_score_sde_ve_folder(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=RES, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, time_embedding_type="fourier").eval()
    scheduler = ScoreSdeVeScheduler(num_train_timesteps=2000, sigma_min=0.01, sigma_max=50.0)
    D = load_denoiser(save(tmp_path, unet, scheduler))
    assert D.data_range == (0.0, 1.0) and (D.sigma_min, D.sigma_max) == (0.01, 50.0)
    x = torch.rand(2, 1, RES, RES, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.05, 7.0])
    score = unet(x, sigma, return_dict=False)[0]
    assert torch.allclose(D(x, sigma), x + sigma.view(-1, 1, 1, 1) ** 2 * score, atol=1e-5, rtol=0)


def test_data_range_from_training_card(tmp_path):
    folder = save(tmp_path, small_unet(), DDPMScheduler())
    (folder / "mbir_batch_training.json").write_text('{"data_range": [0.0, 1.0], "weights": "EMA"}')
    D = load_denoiser(folder)
    assert D.data_range == (0.0, 1.0) and D.config.weights == "EMA"
    assert load_denoiser(folder, data_range=(-1, 1)).data_range == (-1.0, 1.0)


def test_diffusers_errors_are_one_line(tmp_path):
    unet = small_unet()
    folder = tmp_path / "no-scheduler"
    unet.save_pretrained(folder)
    with pytest.raises(DenoiserLoadError, match="scheduler_config.json") as err:
        load_denoiser(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    wrong = save(tmp_path, small_unet(out_channels=2), DDPMScheduler(), "wrong-out")
    with pytest.raises(DenoiserLoadError, match="out_channels is 2"):
        load_denoiser(wrong)
    weights = folder / "diffusion_pytorch_model.safetensors"
    DDPMScheduler().save_pretrained(folder)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DenoiserLoadError, match="safetensors") as err:
        load_denoiser(folder)
    assert "\n" not in str(err.value) and str(weights) in str(err.value)
