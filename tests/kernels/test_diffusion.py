"""Tests for kernels/diffusion.py: schedules, sharding-invariant noise, samplers."""
from __future__ import annotations

import math
import threading

import pytest
import torch
from mbir_batch.kernels.diffusion import (
    get_sigmas_geometric,
    get_sigmas_karras,
    sample_dds,
    sample_mbir,
    slice_noise,
)

MEAN, STD = 0.5, 0.1
SHAPE = (16, 16)


def gaussian_denoiser(x, sigma):
    """Exact D(x, sigma) for an i.i.d. N(MEAN, STD^2) prior."""
    return MEAN + STD**2 / (STD**2 + sigma**2) * (x - MEAN)


def noise_for(seed, z0, z1):
    return lambda k: slice_noise(seed, k, range(z0, z1), SHAPE)


@pytest.mark.parametrize("schedule", [get_sigmas_karras, get_sigmas_geometric])
def test_schedules(schedule):
    s = schedule(10, 0.01, 10.0)
    assert len(s) == 11 and s[-1] == 0
    assert s[0] == pytest.approx(10.0) and s[-2] == pytest.approx(0.01)
    assert (s[:-1] > s[1:]).all()


def test_slice_noise_independent_of_split():
    whole = slice_noise(3, 5, torch.arange(16), SHAPE)
    parts = torch.cat([slice_noise(3, 5, range(5), SHAPE), slice_noise(3, 5, [5, 6, 7], SHAPE),
                       slice_noise(3, 5, range(8, 16), SHAPE)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, slice_noise(3, 6, range(16), SHAPE))
    assert not torch.equal(whole, slice_noise(4, 5, range(16), SHAPE))
    assert not torch.equal(whole[0], whole[1])
    assert abs(whole.mean()) < 0.05 and abs(whole.std() - 1) < 0.05


def run_dds(z0=0, z1=16, seed=0, eta=0.85):
    sigmas = get_sigmas_geometric(20, 0.005, 5.0)
    x = MEAN + sigmas[0].item() * slice_noise(seed, -1, range(z0, z1), SHAPE)
    return sample_dds(gaussian_denoiser, x, sigmas, data_step=lambda v: v,
                      noise=noise_for(seed, z0, z1), eta=eta)


def test_dds_deterministic_and_split_invariant():
    whole = run_dds()
    assert torch.equal(whole, run_dds())
    assert not torch.equal(whole, run_dds(seed=1))
    assert torch.allclose(whole, torch.cat([run_dds(0, 9), run_dds(9, 16)]), atol=1e-6)


def test_dds_deterministic_ddim_matches_prior():
    """eta = 0 is the probability-flow ODE: for a Gaussian prior it recovers its moments."""
    out = run_dds(eta=0.0)
    assert out.mean().item() == pytest.approx(MEAN, abs=0.01)
    assert out.std().item() == pytest.approx(STD, rel=0.15)


def run_mbir(z0=0, z1=16, seed=0, norm=None, steps=60, callback=None, start=0, x=None):
    sigmas = get_sigmas_geometric(steps, 0.005, 5.0)
    if x is None:
        x = MEAN + sigmas[0].item() * slice_noise(seed, -1, range(z0, z1), SHAPE)
    kw = {"norm": norm} if norm is not None else {}
    return sample_mbir(gaussian_denoiser, x, sigmas, data_step=lambda v: v.clamp(-1, 2),
                       noise=noise_for(seed, z0, z1), start=start, callback=callback, **kw)


def test_mbir_samples_the_prior_and_is_deterministic():
    out = run_mbir()
    assert torch.equal(out, run_mbir())
    assert out.mean().item() == pytest.approx(MEAN, abs=0.01)
    assert out.std().item() == pytest.approx(STD, rel=0.15)


def test_mbir_split_invariant_with_global_norm():
    """Two slabs run in lockstep (threads); the corrector's norms are all-reduced."""
    barrier = threading.Barrier(2)
    sums, results = [0.0, 0.0], {}

    def make_norm(rank):
        def norm(t):
            sums[rank] = float((t.double() ** 2).sum())
            barrier.wait()
            total = sums[0] + sums[1]
            barrier.wait()
            return torch.tensor(total).sqrt()
        return norm

    def work(rank, z0, z1):
        results[rank] = run_mbir(z0, z1, norm=make_norm(rank), steps=15)

    threads = [threading.Thread(target=work, args=a) for a in ((0, 0, 6), (1, 6, 16))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat([results[0], results[1]]), run_mbir(steps=15), atol=1e-5)


def test_resume_from_callback_state():
    states = {}
    full = run_mbir(steps=12, callback=lambda info: states.__setitem__(info["step"], info["x"]))
    assert sorted(states) == list(range(12))
    resumed = run_mbir(steps=12, start=5, x=states[4])
    assert torch.equal(full, resumed)


def test_samplers_with_a_network_on_16_cubed():
    """Both samplers with a real (random-init) network: each recorded step is the paper's update,
    recomputed here from the previous recorded state (DDS Algorithm 1 / DiffusionMBIR Algorithm 2)."""
    from mbir_batch.kernels.denoiser import Denoiser, DenoiserConfig, denoise_slab
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(resolution=16, channels=(8, 16), layers_per_block=1, norm_groups=4))
    sigmas = get_sigmas_karras(4, 0.01, 2.0)
    x0 = sigmas[0].item() * slice_noise(0, -1, range(16), SHAPE)
    noise, eta, snr = noise_for(0, 0, 16), 0.85, 0.16

    def denoise(v, sigma):
        return denoise_slab(model, v, sigma)

    def data_step(v):
        return v.clamp(0, 1)

    def dds_step(x, i):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        eps_hat = (x - denoised) / sigma
        return data_step(denoised) + sigma_next * (math.sqrt(1 - eta**2) * eps_hat + eta * noise(i))

    def mbir_step(x, i):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        var = sigma**2 - sigma_next**2
        x = x + var * (denoise(x, sigma) - x) / sigma**2 + math.sqrt(var) * noise(2 * i)
        z = noise(2 * i + 1)
        score = (denoise(x, sigma_next) - x) / sigma_next**2
        step = 2 * (snr * float(torch.linalg.vector_norm(z) / torch.linalg.vector_norm(score))) ** 2
        return data_step(x + step * score + math.sqrt(2 * step) * z)

    for sampler, by_hand in ((sample_dds, dds_step), (sample_mbir, mbir_step)):
        seen = {}
        out = sampler(denoise, x0.clone(), sigmas, data_step=data_step, noise=noise,
                      callback=lambda info: seen.__setitem__(info["step"], info["x"]))
        assert out.shape == (16, 16, 16) and torch.isfinite(out).all()
        assert sorted(seen) == [0, 1, 2, 3] and torch.equal(out, seen[3])
        states = [x0, seen[0], seen[1], seen[2]]
        for i in range(3):
            assert torch.allclose(seen[i], by_hand(states[i], i), rtol=1e-5, atol=1e-5), (sampler.__name__, i)
        # the last step (sigma' = 0) is the data step of the denoised sample, nothing else
        assert torch.equal(out, data_step(denoise(seen[2], float(sigmas[3]))))


def test_noise_prefetch_gives_exactly_slice_noise():
    """The CUDA noise path (drawn one ahead on a thread) must give the same values in any order."""
    from mbir_batch.kernels.diffusion import NoisePrefetch, slice_noise

    z = torch.arange(3, 7)
    prefetch = NoisePrefetch(5, z, (8, 8), "cpu")
    try:
        for k in (-1, 0, 1, 2, 4, 3):
            assert torch.equal(prefetch(k), slice_noise(5, k, z, (8, 8)))
    finally:
        prefetch.close()
