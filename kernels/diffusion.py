"""Sigma schedules, sharding-invariant noise and the two samplers (k-diffusion style).

Everything is in the variance-exploding (VE) form x_sigma = x0 + sigma * n with x0 in [0, 1]
image space, and the prior is a denoiser D(x, sigma) -> x0 (:mod:`.denoiser`).

Closures shared by both samplers (they act on one slab and hide all communication):

* ``denoise(x, sigma) -> x0``: D applied slice-wise, e.g. ``partial(denoise_slab, model)``.
* ``data_step(x) -> x``: the data-consistency step, e.g. one ADMM-TV-z iteration
  (:func:`.admm.admm_tv_z_step`, closing over its state and comm) or plain CG (slice2d).
* ``noise(k) -> Tensor``: a slab-shaped standard normal for *draw index* ``k``; build it with
  :func:`slice_noise` over the slab's global z indices so the result does not depend on the
  split. ``sample_dds`` draws ``k = i`` at step i; ``sample_mbir`` draws ``k = 2i``
  (predictor) and ``k = 2i + 1`` (corrector).
* ``callback(info: dict)``: after every step, with keys ``step`` (i), ``sigma`` (sigma_i),
  ``sigma_next``, ``x`` (the state to resume from at step i + 1) and ``denoised`` (x0).
* ``before_step(i, x, sigma)``: optional, before the denoiser of step i sees ``x`` at sigma_i;
  it may change the denoiser (test-time adaptation, :mod:`.adapt`), never ``x``.

Both samplers take ``x`` at noise level ``sigmas[start]`` (for a fresh run
``x = x_init + sigmas[0] * noise(-1)`` or pure noise; for a resumed run the saved state) and
run steps ``start .. len(sigmas) - 2``. They never print or log.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Denoise = Callable[[Tensor, float], Tensor]
DataStep = Callable[[Tensor], Tensor]
Noise = Callable[[int], Tensor]
Callback = Callable[[dict[str, Any]], None]

_MASK64 = (1 << 64) - 1


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (EDM) Eq. (5): n sigmas from sigma_max to sigma_min, then 0.

    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    Returns float64 tensor of n + 1 entries (the last is 0).
    """
    if n < 1:
        raise ValueError(f"need at least one step, got n={n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def get_sigmas_geometric(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """VE schedule of Song et al. 2021 (score_sde): geometric from sigma_max to sigma_min, then 0.

    Returns float64 tensor of n + 1 entries (the last is 0).
    """
    if n < 1:
        raise ValueError(f"need at least one step, got n={n}")
    sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _splitmix64(v: int) -> int:
    v = (v + 0x9E3779B97F4A7C15) & _MASK64
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & _MASK64
    return v ^ (v >> 31)


def slice_seed(seed: int, step: int, z: int) -> int:
    """The generator seed of global slice ``z`` at draw ``step`` (a splitmix64 hash, < 2**63)."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (step & _MASK64))
    h = _splitmix64(h ^ (z & _MASK64))
    return h & ((1 << 63) - 1)


def slice_noise(seed: int, step: int, z_index: Tensor | Sequence[int], shape: tuple[int, int], *,
                device: torch.device | str | None = None) -> Tensor:
    """Standard normal noise (len(z_index), H, W) for the given GLOBAL slice indices.

    Each slice has its own CPU ``torch.Generator`` seeded by :func:`slice_seed` (seed, step, z),
    so slice z gets the same noise however the volume is cut into slabs and on any device.
    """
    zs = z_index.tolist() if isinstance(z_index, Tensor) else list(z_index)
    out = torch.empty((len(zs), *shape), dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    for row, z in enumerate(zs):
        gen.manual_seed(slice_seed(int(seed), int(step), int(z)))
        out[row] = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    return out if device is None else out.to(device)


class NoisePrefetch:
    """``noise(k)`` for a slab: :func:`slice_noise` draws made one ahead on a worker thread.

    Draw ``k + 1`` is generated on the CPU (into pinned memory for CUDA) while step ``k + 1``'s
    denoiser runs on the device, then copied without blocking. The values are exactly those of
    :func:`slice_noise`, so the sharding/device invariance is kept. DDS draws ``k = i`` and
    DiffusionMBIR ``2i, 2i + 1``, so "prefetch k + 1" is right for both.
    """

    def __init__(self, seed: int, z_index: Tensor, shape: tuple[int, int], device: torch.device | str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.seed, self.z_index, self.shape, self.device = seed, z_index, tuple(shape), torch.device(device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slice-noise")
        self._pending: dict[int, Any] = {}

    def _draw(self, k: int) -> Tensor:
        host = slice_noise(self.seed, k, self.z_index, self.shape)
        return host.pin_memory() if self.device.type == "cuda" else host

    def __call__(self, k: int) -> Tensor:
        future = self._pending.pop(k, None)
        host = future.result() if future is not None else self._draw(k)
        self._pending = {k + 1: self._pool.submit(self._draw, k + 1)}
        return host.to(self.device, non_blocking=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _local_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t)


Step = Callable[[int, Tensor, Tensor, float, float], tuple[Tensor, Tensor]]
BeforeStep = Callable[[int, Tensor, float], None]


def _run_steps(step: Step, denoise: Denoise, x: Tensor, sigmas: Tensor, start: int,
               callback: Callback | None, before_step: BeforeStep | None = None) -> Tensor:
    """The loop both samplers share: for i = start .. len(sigmas) - 2, with sigma = sigma_i and
    sigma' = sigma_{i+1}, ``before_step(i, x, sigma)`` (when given), then
    ``x, shown = step(i, x, D(x, sigma), sigma, sigma')``, then the callback (``shown`` is its
    ``denoised``). Returns the last x."""
    for i in range(start, len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if before_step is not None:
            before_step(i, x, sigma)
        x, shown = step(i, x, denoise(x, sigma), sigma, sigma_next)
        if callback is not None:
            callback({"step": i, "sigma": sigma, "sigma_next": sigma_next, "x": x, "denoised": shown})
    return x


def sample_dds(denoise: Denoise, x: Tensor, sigmas: Tensor, *, data_step: DataStep, noise: Noise,
               eta: float = 0.85, start: int = 0, final_data_step: bool = True,
               callback: Callback | None = None, before_step: BeforeStep | None = None) -> Tensor:
    """DDS: Decomposed Diffusion Sampling (Chung, Lee, Ye, ICLR 2024, Algorithm 1) in VE form.

    Per step i (sigma = sigma_i, sigma' = sigma_{i+1}):

    1. x0_hat = D(x, sigma)                          Tweedie denoised estimate (DDS Eq. 8)
    2. x0 = data_step(x0_hat)                        CG / ADMM-TV-z on the clean manifold (Eq. 11)
    3. eps_hat = (x - x0_hat) / sigma                the predicted noise
    4. x = x0 + sigma' (sqrt(1 - eta^2) eps_hat + eta n_i)   DDIM re-noising (Eq. 9)

    Step 4 is DDS's DDIM update x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1})
    (sqrt(1 - eta^2) eps_hat + eta n) divided by sqrt(abar_{t-1}), with
    sigma' = sqrt((1 - abar_{t-1}) / abar_{t-1}); like the authors' code, eta is the fraction
    of *fresh* noise (eta = 0: deterministic DDIM, eta = 1: fully stochastic). At the last
    step (sigma' = 0) it returns x0 (or x0_hat when ``final_data_step`` is False).

    Symbols: x0_hat = ``denoised``, x0 = ``x0``, n_i = ``noise(i)``; the callback's ``denoised`` is x0.
    """
    def step(i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> tuple[Tensor, Tensor]:
        if sigma_next == 0.0:
            x0 = data_step(denoised) if final_data_step else denoised
            return x0, x0
        x0 = data_step(denoised)
        eps_hat = (x - denoised) / sigma
        return x0 + sigma_next * (math.sqrt(1.0 - eta**2) * eps_hat + eta * noise(i)), x0

    return _run_steps(step, denoise, x, sigmas, start, callback, before_step)


def sample_mbir(denoise: Denoise, x: Tensor, sigmas: Tensor, *, data_step: DataStep, noise: Noise,
                snr: float = 0.16, start: int = 0, final_data_step: bool = True,
                norm: Callable[[Tensor], Tensor] = _local_norm,
                callback: Callback | None = None, before_step: BeforeStep | None = None) -> Tensor:
    """DiffusionMBIR (Chung, Ryu, McCann, Klasky, Ye, CVPR 2023, Algorithm 2) with a denoiser prior.

    The score is s(x, sigma) = (D(x, sigma) - x) / sigma^2 (Tweedie). Per step i
    (sigma = sigma_i, sigma' = sigma_{i+1}), following the authors' code:

    1. predictor (reverse diffusion, VE; Song et al. ICLR 2021):
       x = x + (sigma^2 - sigma'^2) s(x, sigma) + sqrt(sigma^2 - sigma'^2) n_{2i}
    2. corrector (one Langevin step at sigma'): g = s(x, sigma'), step = 2 (snr ||z|| / ||g||)^2,
       x = x + step g + sqrt(2 step) z, with z = n_{2i+1}
    3. x = data_step(x)     one ADMM-TV-z iteration (DiffusionMBIR Sec. 3.2)

    The last step (sigma' = 0) returns data_step(D(x, sigma)), the noise-free predictor mean
    (or D(x, sigma) alone when ``final_data_step`` is False). ``norm`` must be the GLOBAL L2
    norm over the whole volume (e.g. ``lambda t: dot(t, t).sqrt()`` with a comm dot) so the
    corrector step size does not depend on the slab split; the default is local. The callback's
    ``denoised`` is D(x, sigma) at the start of the step.
    """
    def step(i: int, x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> tuple[Tensor, Tensor]:
        if sigma_next == 0.0:
            return (data_step(denoised) if final_data_step else denoised), denoised
        # 1. predictor: reverse-diffusion step from sigma to sigma'
        var = sigma**2 - sigma_next**2
        x = x + var * (denoised - x) / sigma**2 + math.sqrt(var) * noise(2 * i)
        # 2. corrector: Langevin step at sigma', step size from the signal-to-noise ratio
        z = noise(2 * i + 1)
        grad = (denoise(x, sigma_next) - x) / sigma_next**2
        ratio = norm(z) / norm(grad).clamp_min(1e-30)
        step_size = 2.0 * (snr * float(ratio)) ** 2
        x = x + step_size * grad + math.sqrt(2.0 * step_size) * z
        # 3. data consistency + TV-z
        return data_step(x), denoised

    return _run_steps(step, denoise, x, sigmas, start, callback, before_step)
