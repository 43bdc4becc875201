"""bench/peers.py and its helpers: ASTRA SIRT/CGLS (always), mbirjax and deepinv wrappers (``peers`` extra).

The ASTRA wrappers are checked against independent implementations of the same iterations on
astra's own system matrix (scipy LSQR for CGLS, the SIRT formula in numpy). The mbirjax and
deepinv parts skip cleanly when the ``peers`` extra is not installed (CI does not have it).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import peers_env  # noqa: E402

peers_env.prepare()  # before anything imports jax, diffusers or deepinv

from peers_astra import AstraSettings, astra_reconstruct  # noqa: E402

from mbir_batch.kernels.radon import ParallelBeam, build_system_matrix  # noqa: E402

SIZE = 16


def geometry(views: int = 6, arc: float = 180.0) -> dict:
    return {"angles_deg": [arc * k / views for k in range(views)], "det_count": 24, "det_spacing": 1.0}


def phantom(depth: int = 2) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = ((yy - 7.5) ** 2 + (xx - 8.0) ** 2 <= 36).astype(np.float32)
    square = ((abs(yy - 6) <= 2) & (abs(xx - 9) <= 1)).astype(np.float32)
    return np.stack([0.6 * disc + 0.3 * square * (z + 1) for z in range(depth)]).astype(np.float32)


def system(g: dict):
    return build_system_matrix((SIZE, SIZE), g["angles_deg"], g["det_count"], g["det_spacing"], "linear")


def sinogram(volume: np.ndarray, g: dict) -> np.ndarray:
    op = ParallelBeam(shape=(SIZE, SIZE), **g, cache_dir=None)
    return op.A(torch.from_numpy(volume)).numpy()


# -- ASTRA (core dependency: always tested) ---------------------------------------------------------


def test_cgls_equals_lsqr_on_astra_matrix(tmp_path, monkeypatch):
    """CGLS from zero and LSQR build the same Krylov iterates; on astra's matrix they must agree.

    4 iterations: astra iterates in float32, and on this ill-conditioned 6-view system its
    iterates drift from the float64 ones by ~1 % after 8 iterations (one iteration more or
    less differs by 3-50 %, so 1e-3 still pins the geometry and the iteration count)."""
    monkeypatch.setenv("MBIR_CACHE", str(tmp_path))
    g, volume = geometry(), phantom()
    sino = sinogram(volume, g)
    out = astra_reconstruct(sino, shape=(SIZE, SIZE), algorithm="cgls", settings=AstraSettings(iters=4), **g)
    matrix = system(g)
    for z in range(volume.shape[0]):
        expected = spla.lsqr(matrix, sino[z].ravel().astype(np.float64), iter_lim=4, atol=0, btol=0, conlim=0)[0]
        assert np.linalg.norm(out[z].ravel() - expected) <= 1e-3 * np.linalg.norm(expected)


def test_sirt_follows_its_formula_and_bound(tmp_path, monkeypatch):
    """SIRT: x <- x + C A^T R (y - A x) (R, C inverse row / column sums); MinConstraint clips below."""
    monkeypatch.setenv("MBIR_CACHE", str(tmp_path))
    g, volume = geometry(views=4), phantom(1)
    sino = sinogram(volume, g)
    matrix = system(g)
    rows, cols = np.asarray(matrix.sum(axis=1)).ravel(), np.asarray(matrix.sum(axis=0)).ravel()
    inv_rows = np.divide(1.0, rows, out=np.zeros_like(rows), where=rows > 1e-6)
    inv_cols = np.divide(1.0, cols, out=np.zeros_like(cols), where=cols > 1e-6)
    y = sino[0].ravel().astype(np.float64)
    for bound in (None, 0.0):
        x = np.zeros(SIZE * SIZE)
        for _ in range(6):
            x = x + inv_cols * (matrix.T @ (inv_rows * (y - matrix @ x)))
            if bound is not None:
                x = np.maximum(x, bound)
        out = astra_reconstruct(sino, shape=(SIZE, SIZE), algorithm="sirt",
                                settings=AstraSettings(iters=6, min_constraint=bound), **g)
        assert np.linalg.norm(out[0].ravel() - x) <= 1e-4 * np.linalg.norm(x)
        if bound is not None:
            assert out.min() >= 0.0


def test_astra_wrapper_rejects_bad_input():
    g = geometry()
    with pytest.raises(ValueError, match="sinogram must be"):
        astra_reconstruct(np.zeros((1, 5, 24), np.float32), shape=(SIZE, SIZE), algorithm="sirt",
                          settings=AstraSettings(iters=1), **g)
    with pytest.raises(ValueError, match="SIRT option"):
        astra_reconstruct(np.zeros((1, 6, 24), np.float32), shape=(SIZE, SIZE), algorithm="cgls",
                          settings=AstraSettings(iters=1, min_constraint=0.0), **g)
    with pytest.raises(ValueError, match="iters"):
        AstraSettings(iters=0)


# -- the script (ASTRA peers only: no extra needed) -------------------------------------------------


def test_peers_script_astra_rows_and_na_rows(tmp_path, monkeypatch):
    import peers

    monkeypatch.setenv("MBIR_CACHE", str(tmp_path / "cache"))
    code = peers.main(["--tasks", "svct-8view,csmri-4x", "--seeds", "17", "--size", "16", "--depth", "4",
                       "--peers", "sirt,cgls", "--set", "sirt.iters=5,20", "--out", str(tmp_path), "--tag", "t"])
    assert code == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    ct = [r for r in rows if r["task"] == "svct-8view"]
    tuned_cgls = peers.TUNED["cgls"]["svct-8view"]["iters"]  # no --set for cgls: its tuned value
    assert [(r["method"], r["settings"].get("iters")) for r in ct] == [("sirt", 5), ("sirt", 20), ("cgls", tuned_cgls)]
    assert all(r["status"] == "ok" and math.isfinite(r["axial_psnr"]) for r in ct)
    mri = [r for r in rows if r["task"] == "csmri-4x"]
    assert [r["method"] for r in mri] == ["sirt", "cgls"] and all(r["status"].startswith("n/a") for r in mri)
    assert "n/a" in (tmp_path / "t.md").read_text() and (tmp_path / "t-svct-8view.png").is_file()
    assert peers.main(["--merge", str(tmp_path / "t.json"), str(tmp_path / "t.json"), "--out", str(tmp_path),
                       "--tag", "m"]) == 0
    assert len(json.loads((tmp_path / "m.json").read_text())["rows"]) == 2 * len(rows)


def test_our_rows_from_a_quality_json_and_the_dds_verdict(tmp_path):
    from peers_report import dds_comparison, rows_from_quality_json

    def quality_row(method, psnr):
        return {"seed": 9100, "task": "svct-8view", "method": method, "nfe": 50, "wall_s": 1.0, "config": {},
                **{f"{a}_psnr": v for a, v in zip(("axial", "coronal", "sagittal"), psnr)},
                **{f"{a}_ssim": 0.9 for a in ("axial", "coronal", "sagittal")}}

    path = tmp_path / "q.json"
    path.write_text(json.dumps([quality_row("dds", (30, 31, 32)), quality_row("fbp", (10, 10, 10)),
                                {**quality_row("dds", (1, 1, 1)), "seed": 17},
                                {**quality_row("dds", (2, 2, 2)), "family": "brain"}]))
    ours = rows_from_quality_json(path, [9100], ["svct-8view"], None)
    assert [r["method"] for r in ours] == ["dds", "fbp"] and all(r["source"] == "ours-file" for r in ours)
    peer = {**ours[1], "method": "sirt", "source": "peer", "settings": {"iters": 5}}
    close = {**peer, "method": "cgls", "coronal_psnr": 31.5}
    lines = dds_comparison(ours + [peer, close]).splitlines()
    assert "sirt" in lines[0] and "every axis: yes" in lines[0]
    assert "cgls" in lines[1] and "every axis: no" in lines[1] and "-0.50" in lines[1]
    with pytest.raises(SystemExit, match="no rows"):
        rows_from_quality_json(path, [1], ["svct-8view"], None)


def test_peers_script_runs_our_methods_beside_the_peers(tmp_path, monkeypatch):
    """--run-ours goes through the same presets and solver as bench/quality.py; DDS is compared per axis."""
    import peers

    monkeypatch.setenv("MBIR_CACHE", str(tmp_path / "cache"))
    assert peers.main(["--tasks", "svct-8view", "--seeds", "17", "--size", "16", "--depth", "4", "--peers", "cgls",
                       "--run-ours", "fbp,admm-tv", "--no-png", "--out", str(tmp_path), "--tag", "o"]) == 0
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    ours = {r["method"]: r for r in rows if r["source"] == "ours-run"}
    assert set(ours) == {"fbp", "admm-tv"} and ours["admm-tv"]["config"]["method"] == "admm-tv"
    assert ours["admm-tv"]["axial_psnr"] > ours["fbp"]["axial_psnr"]  # TV beats FBP on 8 views


def test_peers_script_without_the_extra_says_how_to_install(monkeypatch, capsys):
    import peers

    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    assert peers.main(["--tasks", "svct-8view", "--peers", "mbirjax,dps"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[peers]'" in err[0]


def test_grid_settings_are_the_product_of_the_set_values():
    import peers

    grid = peers.parse_grid(["dps.weight=0.5,2", "dps.schedule=vp,ve", "sirt.min_constraint=none"])
    combos = peers.settings_grid("dps", "svct-8view", grid)
    assert len(combos) == 4 and {(c["weight"], c["schedule"]) for c in combos} == {
        (0.5, "vp"), (0.5, "ve"), (2, "vp"), (2, "ve")}
    assert peers.settings_grid("sirt", "lact-90", grid)[0]["min_constraint"] is None
    with pytest.raises(SystemExit, match="PEER.KEY"):
        peers.parse_grid(["nope.x=1"])


# -- mbirjax (peers extra) ------------------------------------------------------------------------


def test_mbirjax_forward_projection_matches_our_sinogram(tmp_path, monkeypatch):
    """The mapping of bench/peers_mbirjax.py (angles in radians, (views, Z, det), (H, W, Z), unit
    spacings, no offset) reproduces our astra sinogram."""
    pytest.importorskip("mbirjax")
    from peers_mbirjax import forward_project

    from mbir_batch.phantoms import make_phantom

    monkeypatch.setenv("MBIR_CACHE", str(tmp_path))
    volume = make_phantom(17, 32, 4)
    g = {"angles_deg": [22.5 * k for k in range(8)], "det_count": 47, "det_spacing": 1.0}
    ours = ParallelBeam(shape=(32, 32), **g).A(torch.from_numpy(volume)).numpy()
    theirs = forward_project(volume, **g)
    assert theirs.shape == ours.shape
    assert np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.999


# -- deepinv wrappers (peers extra) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dinv_modules():
    pytest.importorskip("deepinv")
    import peers_deepinv

    return peers_deepinv


def tiny_model():
    from mbir_batch.kernels.denoiser import Denoiser, DenoiserConfig

    torch.manual_seed(0)
    return Denoiser(DenoiserConfig(resolution=SIZE, channels=(8, 16), layers_per_block=1, norm_groups=4)).eval()


def operators(tmp_path):
    from mbir_batch.kernels.mri import CartesianMRI, gaussian_1d_mask

    ct = ParallelBeam(shape=(SIZE, SIZE), **geometry(), cache_dir=tmp_path)
    mri = CartesianMRI(gaussian_1d_mask((SIZE, SIZE), 4.0, seed=3))
    return {"ct": ct, "mri": mri}


@pytest.mark.parametrize("kind", ["ct", "mri"])
def test_linear_physics_is_our_operator_and_its_adjoint(dinv_modules, tmp_path, kind):
    op = operators(tmp_path)[kind]
    physics = dinv_modules.slice_physics(op)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, SIZE, SIZE, generator=gen)
    ax = physics.A(x)
    assert torch.equal(ax[:, 0], op.A(x[:, 0]))
    y = torch.randn(ax.shape, generator=gen, dtype=ax.dtype)
    lhs = float((ax.conj() * y).real.sum()) if ax.is_complex() else float((ax * y).sum())
    rhs = float((x * physics.A_adjoint(y)).sum())
    assert abs(lhs - rhs) <= 1e-4 * abs(lhs)
    if not ax.is_complex():  # deepinv's own test uses the complex inner product, which a real-to-complex A fails
        assert float(physics.adjointness_test(x)) < 1e-5


@pytest.mark.parametrize("kind", ["ct", "mri"])
def test_svd_physics_reproduces_our_operator(dinv_modules, tmp_path, kind):
    op = operators(tmp_path)[kind]
    physics = dinv_modules.svd_physics(op, (SIZE, SIZE))
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    rebuilt = physics.U(physics.mask * physics.V_adjoint(x))
    expected = op.A(x[:, 0]).unsqueeze(1)
    assert torch.linalg.vector_norm(rebuilt - expected) <= 1e-4 * torch.linalg.vector_norm(expected)
    assert torch.allclose(physics.V(physics.V_adjoint(x)), x, atol=1e-4)  # V is orthonormal on the whole image


def test_denoiser_wrapper_is_our_d_on_the_unit_range(dinv_modules):
    model = tiny_model()
    wrapped = dinv_modules.OurDenoiser(model)
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(x, 0.2)
        assert torch.allclose(wrapped(x, 0.2), ours, atol=1e-6)
        assert torch.allclose(wrapped(x, torch.tensor(0.2, dtype=torch.float64)), ours, atol=1e-6)
        assert torch.allclose(wrapped(x, torch.tensor([0.2, 0.05])[:, None][:, 0]),
                              torch.cat([ours[:1], model(x[1:], 0.05)]), atol=1e-6)
        # deepinv's [-1, 1] samplers wrap it like this: x -> (x + 1) / 2, sigma -> sigma / 2
        minus_one_one = dinv_modules.dinv.models.MinusOneOneDenoiserWrapper(wrapped)
        assert torch.allclose(minus_one_one(2 * x - 1, torch.tensor(0.4)), 2 * ours - 1, atol=1e-5)
    assert wrapped.calls == 4


@pytest.mark.parametrize("sampler, extra", [("diffpir", {}), ("dps", {}), ("dps", {"schedule": "ve"}),
                                            ("ddrm", {"sigma_max": 1.0})])
def test_samplers_run_slice_by_slice_at_the_asked_nfe(dinv_modules, tmp_path, sampler, extra):
    op = operators(tmp_path)["ct"]
    volume = torch.from_numpy(phantom(3))
    settings = dinv_modules.SamplerSettings(nfe=4, extra=extra)
    recon, info = dinv_modules.run_sampler(sampler, tiny_model(), op, op.A(volume), settings=settings, batch=2)
    assert recon.shape == (3, SIZE, SIZE) and np.isfinite(recon).all()
    assert info["nfe"] == 4


def test_ddrm_is_told_the_simulated_noise_on_the_operators_scale(dinv_modules, tmp_path):
    """DDRM needs the measurement noise std (sigma_y); with --noise it gets noise / ||A|| unless set."""
    op = operators(tmp_path)["ct"]
    scale = dinv_modules.operator_norm(op)
    settings = dinv_modules.SamplerSettings(nfe=4, extra={})
    wrapped = dinv_modules.OurDenoiser(tiny_model())
    _, told = dinv_modules._make_sampler("ddrm", wrapped, settings, (SIZE, SIZE), op, scale, noise=0.1)
    assert float(told.noise_model.sigma) == pytest.approx(0.1 / scale)
    fixed = dinv_modules.SamplerSettings(nfe=4, extra={"sigma_y": 0.02})
    _, chosen = dinv_modules._make_sampler("ddrm", wrapped, fixed, (SIZE, SIZE), op, scale, noise=0.1)
    assert float(chosen.noise_model.sigma) == pytest.approx(0.02)
