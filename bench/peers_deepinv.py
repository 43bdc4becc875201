"""deepinv's diffusion samplers (DiffPIR, DPS, DDRM) driven by OUR denoiser and OUR operators.

Same prior, same physics, different algorithm: this isolates the sampler. deepinv (Tachella et
al., deepinv 0.5) conventions, read from its source:

- a denoiser is called as ``D(x, sigma)`` with ``x`` in [0, 1] and ``sigma`` the noise std on
  that [0, 1] scale. Samplers that run in [-1, 1] (DiffPIR, DPS) convert before the call
  (``(x + 1) / 2`` and ``sigma / 2``). This is exactly our image-space convention
  (:mod:`mbir_batch.kernels.denoiser`), so :class:`OurDenoiser` passes both through unchanged.
- tensors are ``(B, C, H, W)``. Slices are independent 2D problems here: a slab of ``Z`` slices is
  a batch ``(Z, 1, H, W)``, and our slice-wise operator maps it to ``(Z, 1, n_views, det)`` (CT)
  or complex ``(Z, 1, H, W)`` (MRI).

Samplers (NFE = denoiser evaluations per slice, counted by :class:`OurDenoiser`):

- DiffPIR (Zhu et al., CVPRW 2023): HQS plug-and-play in a DDPM schedule; the data step is
  ``prox_{||A x - y||^2 / rho_t}`` solved by deepinv's CG on our A^T A.
- DPS (Chung et al., ICLR 2023): reverse SDE with the guidance ``-w grad ||y - A D(x_t)||``
  (autograd through our denoiser and operator).
- DDRM (Kawar et al., NeurIPS 2022): needs an SVD ``A = U diag(s) V^T``; :func:`svd_physics`
  builds it densely from our operator (n = H W columns), which fits at 64^2 and not at 256^2.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["import_deepinv", "OurDenoiser", "slice_physics", "svd_physics", "SamplerSettings", "run_sampler",
           "SAMPLERS"]

SAMPLERS = ("diffpir", "dps", "ddrm")


def import_deepinv():
    """Import deepinv after :func:`peers_env.prepare` (torchvision beside a CPU torch)."""
    from peers_env import prepare

    prepare()
    import deepinv

    return deepinv


dinv = import_deepinv()


class OurDenoiser(dinv.models.Denoiser):
    """Our image-space denoiser D(x, sigma) as a deepinv denoiser, counting its calls.

    ``x`` is ``(B, 1, H, W)`` in [0, 1] and ``sigma`` (float, 0-d or ``(B,)``) the noise std on
    that scale: deepinv's convention and ours, so nothing is rescaled. ``calls`` counts forward
    evaluations (one per batch; with autograd, as in DPS, the backward is not a separate call).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x: Tensor, sigma: float | Tensor, *args, **kwargs) -> Tensor:
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        return self.model(x.to(torch.float32), sigma.clamp_min(1e-8))


def operator_norm(operator) -> float:
    """``||A||_2 = sqrt(||A^T A||_2)`` of one slice (power iteration; 1 for our MRI operator)."""
    return math.sqrt(operator.normal_norm_estimate())


def slice_physics(operator, scale: float = 1.0) -> dinv.physics.LinearPhysics:
    """Our slice-wise operator ``A / scale`` (and ``A^T / scale``) as a deepinv ``LinearPhysics`` on (Z, 1, H, W).

    The measurements gain the channel axis: ``(Z, 1, n_views, det)`` for CT, complex
    ``(Z, 1, H, W)`` for MRI. ``A_adjoint`` is our exact adjoint (real inner product).
    deepinv recommends an operator of unit norm (its samplers' default step sizes and weights
    assume it): :func:`run_sampler` passes ``scale = ||A||`` and divides the measurements by it.
    """
    def forward(x: Tensor, **kwargs) -> Tensor:
        return operator.A(x[:, 0].to(torch.float32)).unsqueeze(1) / scale

    def adjoint(y: Tensor, **kwargs) -> Tensor:
        return operator.AT(y[:, 0]).unsqueeze(1) / scale

    return dinv.physics.LinearPhysics(A=forward, A_adjoint=adjoint)


def _real_rows(measurement: Tensor) -> Tensor:
    """(B, ...) measurements, real or complex, as real rows (B, m); complex -> interleaved (re, im)."""
    if measurement.is_complex():
        measurement = torch.view_as_real(measurement)
    return measurement.reshape(measurement.shape[0], -1)


def svd_physics(operator, shape: tuple[int, int], *, scale: float = 1.0, sigma_y: float = 0.0,
                rtol: float = 1e-5) -> dinv.physics.DecomposablePhysics:
    """A dense SVD ``A = U diag(s) V^T`` of our per-slice operator as a deepinv ``DecomposablePhysics``.

    The real matrix M (m x n, n = H W) is read off ``A`` applied to the n unit images (a complex
    measurement is split into interleaved real and imaginary parts, so the real inner product
    and our adjoint are preserved), divided by ``scale``. The thin SVD is taken in float64; singular values below
    ``rtol * s_max`` count as zero (null space). In deepinv's layout the singular values live
    on the image grid ``(1, 1, H, W)`` padded with zeros, ``U^T y`` is zero-padded to n entries,
    and ``V`` maps that grid back to images. ``sigma_y`` is the noise std deepinv's DDRM assumes
    (its ``noise_model.sigma``).
    """
    height, width = shape
    n = height * width
    eye = torch.eye(n, dtype=torch.float32).reshape(n, height, width)
    with torch.no_grad():
        probe = operator.A(eye[:1])
        matrix = torch.cat([_real_rows(operator.A(eye[i:i + 512])) for i in range(0, n, 512)]).T.double()
    left, singular, right_t = torch.linalg.svd(matrix / scale, full_matrices=False)
    rank = int((singular > rtol * singular[0]).sum())
    left, right = left[:, :rank].float(), right_t.T.float()  # right: (n, r) with r = min(m, n)
    if right.shape[1] < n:  # complete V to an orthonormal basis of R^n (null space directions)
        q, _ = torch.linalg.qr(torch.cat([right.double(), torch.randn(n, n - right.shape[1], dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(0))], dim=1))
        right = torch.cat([right, q[:, right.shape[1]:].float()], dim=1)
    mask = torch.zeros(n)
    mask[:rank] = singular[:rank].float()
    measurement_shape = tuple(probe.shape[1:])
    is_complex = probe.is_complex()

    def v_adjoint(x: Tensor) -> Tensor:
        return (x.reshape(x.shape[0], n).to(torch.float32) @ right).reshape(x.shape[0], 1, height, width)

    def v(z: Tensor) -> Tensor:
        return (z.reshape(z.shape[0], n).to(torch.float32) @ right.T).reshape(z.shape[0], 1, height, width)

    def u_adjoint(y: Tensor) -> Tensor:
        coefficients = _real_rows(y[:, 0]).to(torch.float32) @ left
        padded = torch.zeros(y.shape[0], n, dtype=torch.float32, device=y.device)
        padded[:, :rank] = coefficients
        return padded.reshape(y.shape[0], 1, height, width)

    def u(z: Tensor) -> Tensor:
        rows = z.reshape(z.shape[0], n)[:, :rank].to(torch.float32) @ left.T
        if is_complex:
            rows = torch.view_as_complex(rows.reshape(z.shape[0], *measurement_shape, 2).contiguous())
        return rows.reshape(z.shape[0], 1, *measurement_shape)

    return dinv.physics.DecomposablePhysics(U=u, U_adjoint=u_adjoint, V=v, V_adjoint=v_adjoint,
                                            mask=mask.reshape(1, 1, height, width),
                                            noise_model=dinv.physics.GaussianNoise(sigma=float(sigma_y)))


@dataclass(frozen=True)
class SamplerSettings:
    """Knobs of one deepinv sampler (names follow deepinv's arguments).

    diffpir: ``lambda_`` (rho_t = lambda sigma^2 / sigma_t^2), ``zeta`` (fresh-noise share),
    ``sigma`` (the data-noise level DiffPIR assumes, [0, 1] scale), ``cg_iters`` (its prox).
    dps: ``weight`` (guidance strength), ``schedule`` ("vp" = deepinv's DPS class as is; "ve" =
    the same DPS composition with a VE SDE over ``[sigma_min, sigma_max]`` on the [0, 1] scale).
    ddrm: ``eta``, ``etab``, noise levels geometric from ``sigma_max`` to ``sigma_min``, ``sigma_y``.
    """

    nfe: int = 50
    extra: dict = field(default_factory=dict)

    def get(self, key: str, default):
        return self.extra.get(key, default)


_SVD_CACHE: list = []  # [(operator, shape, sigma_y, physics)]: the operator is kept alive, so `is` is safe


def _cached_svd_physics(operator, shape: tuple[int, int], scale: float, sigma_y: float):
    """:func:`svd_physics`, computed once per operator (tuning grids run DDRM many times on one operator)."""
    for cached_operator, cached_shape, cached_sigma, physics in _SVD_CACHE:
        if cached_operator is operator and cached_shape == (shape, scale) and cached_sigma == sigma_y:
            return physics
    physics = svd_physics(operator, shape, scale=scale, sigma_y=sigma_y)
    _SVD_CACHE[:] = [(operator, (shape, scale), sigma_y, physics)]  # one at a time: a 64^2 SVD holds ~100 MB
    return physics


def _linear_start(operator, measurements: Tensor) -> Tensor:
    """A [0, 1]-scale linear estimate to start DiffPIR from: FBP for CT, zero-filled for MRI."""
    start = operator.fbp(measurements) if hasattr(operator, "fbp") else operator.AT(measurements)
    return start.clamp(0.0, 1.0)


def _make_sampler(name: str, denoiser: OurDenoiser, settings: SamplerSettings, shape: tuple[int, int], operator,
                  scale: float, noise: float = 0.0):
    nfe = int(settings.nfe)
    if name == "diffpir":
        sampler = dinv.sampling.DiffPIR(model=denoiser, data_fidelity=dinv.optim.data_fidelity.L2(),
                                        sigma=float(settings.get("sigma", 0.01)), max_iter=nfe,
                                        zeta=float(settings.get("zeta", 0.3)),
                                        lambda_=float(settings.get("lambda_", 7.0)))
        physics = slice_physics(operator, scale)
        physics.max_iter = int(settings.get("cg_iters", 50))
        return sampler, physics
    if name == "dps":
        # The ancestral solver evaluates the denoiser at every time step but the last (t = 0), then once
        # more to denoise the end state unless it is noise-free: VP reaches sigma = 0 at t = 0 (nfe + 1
        # steps), VE stops at sigma_min > 0 (nfe steps). The counted NFE checks this.
        schedule = str(settings.get("schedule", "vp"))
        weight = float(settings.get("weight", 1.0))
        if schedule == "vp":
            sampler = dinv.sampling.DPS(denoiser, schedule="vp", solver="ddpm", num_steps=nfe + 1, weight=weight,
                                        rng=torch.Generator())
        else:  # DPS.__init__'s composition, with the VE noise range our denoiser was trained over
            sde = dinv.sampling.VarianceExplodingDiffusion(sigma_min=2 * float(settings.get("sigma_min", 0.005)),
                                                           sigma_max=2 * float(settings.get("sigma_max", 10.0)))
            fidelity = dinv.sampling.DPSDataFidelity(denoiser=denoiser, clip=[-1.0, 1.0], weight=weight)
            solver = dinv.sampling.DDPMSolver(timesteps=torch.linspace(1, 0, nfe, dtype=torch.float64),
                                              rng=torch.Generator())
            sampler = dinv.sampling.PosteriorDiffusion(data_fidelity=fidelity, denoiser=denoiser, sde=sde,
                                                       solver=solver)
        return sampler, slice_physics(operator, scale)
    if name == "ddrm":
        sigmas = np.geomspace(float(settings.get("sigma_max", 1.0)), float(settings.get("sigma_min", 0.005)), nfe)
        sampler = dinv.sampling.DDRM(denoiser, sigmas=sigmas, eta=float(settings.get("eta", 0.85)),
                                     etab=float(settings.get("etab", 1.0)))
        # DDRM is built to be told the measurement noise: by default the simulated --noise on the operator's scale
        return sampler, _cached_svd_physics(operator, shape, scale, float(settings.get("sigma_y", noise / scale)))
    raise ValueError(f"unknown deepinv sampler {name!r}; choose one of {SAMPLERS}")


def run_sampler(name: str, model: nn.Module, operator, measurements: Tensor, *, settings: SamplerSettings,
                batch: int = 16, seed: int = 0, noise: float = 0.0) -> tuple[np.ndarray, dict]:
    """Reconstruct a (Z, H, W) volume slice by slice (``batch`` slices at a time) with a deepinv sampler.

    The operator and the measurements are divided by ``||A||`` first (deepinv assumes a unit-norm
    operator; DiffPIR's ``lambda_``, DPS's ``weight`` and DDRM's ``sigma_y`` are on that scale). ``noise``
    is the std of the measurement noise (unscaled); DDRM's ``sigma_y`` defaults to it, divided by ``||A||``.
    Returns the volume and ``{"nfe": denoiser calls per slice, "setup_s": ..., "settings": ...}``.
    The NFE is counted, not assumed; all batches must agree. ``setup_s`` is the time to build the
    sampler and its physics (DDRM: the dense SVD, cached per operator within a process).
    """
    depth = measurements.shape[0]
    resolution = int(model.config.resolution)
    shape = (resolution, resolution)
    denoiser = OurDenoiser(model.eval())
    started = time.perf_counter()
    scale = operator_norm(operator)
    sampler, physics = _make_sampler(name, denoiser, settings, shape, operator, scale, noise)
    setup_s = time.perf_counter() - started
    volume = np.empty((depth, *shape), dtype=np.float32)
    counts = []
    for index, z0 in enumerate(range(0, depth, batch)):
        y = measurements[z0:z0 + batch].unsqueeze(1) / scale
        denoiser.calls = 0
        chunk_seed = seed * 100003 + index + 1  # deepinv skips seeding on a seed of 0
        if name == "diffpir":
            start = _linear_start(operator, measurements[z0:z0 + batch]).unsqueeze(1)
            out = sampler(y, physics, seed=chunk_seed, x_init=start)
        elif name == "dps":
            out = sampler(y, physics, x_init=(y.shape[0], 1, *shape), seed=chunk_seed)
        else:
            out = sampler(y, physics, seed=chunk_seed)
        volume[z0:z0 + batch] = out.detach().to(torch.float32)[:, 0].numpy()
        counts.append(denoiser.calls)
    if len(set(counts)) != 1:
        raise RuntimeError(f"{name}: batches made different numbers of denoiser calls {counts}")
    return volume, {"nfe": counts[0], "setup_s": setup_s, "operator_norm": scale,
                    "settings": {"nfe": settings.nfe, **settings.extra}}
