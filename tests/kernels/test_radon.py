"""Tests for kernels/radon.py: the astra matrix operator, its cache and FBP."""

from __future__ import annotations

import astra
import numpy as np
import pytest
import torch
from mbir_batch.kernels import radon
from mbir_batch.kernels.radon import ParallelBeam

# (shape, angles_deg, det_count, det_spacing, projector): sparse views, limited arc with
# det_spacing != 1, a non-square slice with the strip projector, and the line projector.
GEOMETRIES = [
    ((16, 16), np.linspace(0, 180, 8, endpoint=False), 24, 1.0, "linear"),
    ((16, 16), np.linspace(0, 90, 12, endpoint=False), 16, 1.5, "linear"),
    ((12, 20), np.linspace(10, 190, 5, endpoint=False), 30, 0.8, "strip"),
    ((16, 16), [0.0, 33.0, 91.5, 170.0], 25, 1.0, "line"),
]


def _make(geometry, cache) -> ParallelBeam:
    shape, angles, det_count, det_spacing, projector = geometry
    return ParallelBeam(shape=shape, angles_deg=angles, det_count=det_count, det_spacing=det_spacing,
                        cache_dir=cache, projector=projector)


def _disk(n: int, radius: float) -> torch.Tensor:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    return torch.from_numpy((xx**2 + yy**2 < radius**2).astype(np.float32))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["sparse8", "arc90-ds1.5", "nonsquare-strip", "line"])
def test_operator_contract(contract, gen, radon_cache, geometry) -> None:
    op = _make(geometry, radon_cache)
    x = torch.rand(3, *op.domain_shape, generator=gen)
    assert op.range_shape == (len(geometry[1]), geometry[2])
    contract.check_operator(op, x, torch.float32, gen)
    contract.check_shapes(op, x[0], op.range_shape, torch.float32)


@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=["sparse8", "arc90-ds1.5", "nonsquare-strip"])
def test_forward_matches_astra_create_sino(gen, radon_cache, geometry) -> None:
    shape, angles, det_count, det_spacing, projector = geometry
    op = _make(geometry, radon_cache)
    x = torch.rand(2, *shape, generator=gen)
    sinogram = op.A(x)
    proj_geom = astra.create_proj_geom("parallel", det_spacing, det_count, np.deg2rad(angles))
    proj_id = astra.create_projector(projector, proj_geom, astra.create_vol_geom(*shape))
    try:
        for z in range(x.shape[0]):
            sino_id, expected = astra.create_sino(x[z].numpy(), proj_id)
            astra.data2d.delete(sino_id)
            err = np.linalg.norm(sinogram[z].numpy() - expected) / np.linalg.norm(expected)
            assert err < 1e-4, f"slice {z}: relative difference {err:.2e} to astra.create_sino"
    finally:
        astra.projector.delete(proj_id)


def test_second_construction_loads_the_cache(tmp_path, monkeypatch, gen) -> None:
    geometry = GEOMETRIES[0]
    first = _make(geometry, tmp_path)
    assert first.cache_path.exists() and first.cache_path.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [first.cache_path.name]  # no temp files left

    def no_build(*args, **kwargs):
        raise AssertionError("the matrix was rebuilt instead of loaded from the cache")

    monkeypatch.setattr(radon, "build_system_matrix", no_build)
    second = _make(geometry, tmp_path)
    x = torch.rand(2, 16, 16, generator=gen)
    assert torch.equal(first.A(x), second.A(x))
    assert torch.equal(first.AT(first.A(x)), second.AT(second.A(x)))


def test_cache_key_depends_on_geometry(radon_cache) -> None:
    base = _make(GEOMETRIES[0], radon_cache)
    shape, angles, det_count, _, projector = GEOMETRIES[0]
    other = _make((shape, angles, det_count, 1.25, projector), radon_cache)
    assert base.cache_path != other.cache_path


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MBIR_CACHE", str(tmp_path / "env-cache"))
    op = ParallelBeam(shape=(8, 8), angles_deg=[0.0, 90.0], det_count=12)
    assert op.cache_path.parent == tmp_path / "env-cache" and op.cache_path.exists()


def test_fbp_inverts_a_full_scan(radon_cache) -> None:
    n = 64
    op = ParallelBeam(shape=(n, n), angles_deg=np.arange(180.0), det_count=96, cache_dir=radon_cache)
    volume = torch.stack([_disk(n, 20.0), 0.5 * _disk(n, 12.0)])
    recon = op.fbp(op.A(volume))
    interior = _disk(n, 24.0).bool()
    err = torch.linalg.vector_norm((recon - volume)[:, interior]) / torch.linalg.vector_norm(volume[:, interior])
    assert recon.shape == volume.shape
    assert float(err) < 0.1
    assert torch.allclose(op.fbp(op.A(volume[0])), recon[0], atol=1e-5)


def test_fbp_handles_det_spacing_and_sparse_views(radon_cache) -> None:
    n = 32
    op = ParallelBeam(shape=(n, n), angles_deg=np.linspace(0, 180, 60, endpoint=False), det_count=30,
                      det_spacing=1.5, cache_dir=radon_cache)
    disk = _disk(n, 10.0)
    recon = op.fbp(op.A(disk))
    interior = _disk(n, 7.0).bool()
    assert float(recon[interior].mean()) == pytest.approx(1.0, abs=0.05)


def test_normal_norm_estimate_matches_the_largest_eigenvalue(radon_cache) -> None:
    op = _make(GEOMETRIES[0], radon_cache)
    dense = radon.build_system_matrix((16, 16), GEOMETRIES[0][1], 24, 1.0, "linear").toarray()
    largest = np.linalg.eigvalsh(dense.T @ dense)[-1]
    assert op.normal_norm_estimate() == pytest.approx(largest, rel=1e-2)


def test_rejects_bad_inputs(radon_cache) -> None:
    op = _make(GEOMETRIES[0], radon_cache)
    with pytest.raises(TypeError, match="float32"):
        op.A(torch.zeros(16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected"):
        op.A(torch.zeros(2, 15, 16))
    with pytest.raises(ValueError, match="det_spacing"):
        ParallelBeam(shape=(8, 8), angles_deg=[0.0], det_count=8, det_spacing=0.0, cache_dir=radon_cache)
    with pytest.raises(ValueError, match="projector"):
        ParallelBeam(shape=(8, 8), angles_deg=[0.0], det_count=8, cache_dir=radon_cache, projector="cuda")


def test_autograd_flows_through_the_projector(radon_cache, gen) -> None:
    op = _make(GEOMETRIES[0], radon_cache)
    x = torch.rand(2, 16, 16, generator=gen, requires_grad=True)
    y = torch.rand(2, *op.range_shape, generator=gen)
    (0.5 * (op.A(x) - y).square().sum()).backward()
    assert torch.allclose(x.grad, op.AT(op.A(x.detach()) - y), atol=1e-4)


def test_cpu_and_cuda_match(contract, cuda, radon_cache, gen) -> None:
    op = _make(GEOMETRIES[1], radon_cache)
    contract.check_devices_match(op, torch.rand(3, 16, 16, generator=gen), cuda)
    op.to(cuda)
    sinogram = op.A(torch.rand(2, 16, 16, generator=gen).to(cuda))
    assert op.fbp(sinogram).device.type == "cuda"
