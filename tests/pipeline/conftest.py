"""Shared fixtures for the pipeline tests: tiny datasets, file hashing, the CLI runner."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from mbir_batch.dataset import DatasetMeta, create_dataset


def hash_tree(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), keyed by relative path."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def tree_hash() -> Callable[[Path], dict[str, str]]:
    """`hash_tree` as a fixture: compare before/after to prove a store was not written."""
    return hash_tree


@pytest.fixture
def ct_meta() -> Callable[..., DatasetMeta]:
    """Factory for the `DatasetMeta` of the tiny CT datasets of `make_ct_dataset`."""
    return tiny_ct_meta


def tiny_ct_meta(depth: int = 12, size: int = 8, views: int = 4, det_count: int = 13) -> DatasetMeta:
    angles = [180.0 * k / views for k in range(views)]
    return DatasetMeta(modality="ct", volume_shape=(depth, size, size), voxel_size_mm=(2.0, 0.5, 0.5),
                       geometry={"kind": "parallel", "angles_deg": angles, "det_count": det_count,
                                 "det_spacing": 1.0})


@pytest.fixture
def make_ct_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a tiny CT dataset (random sinogram, no projector needed); returns its path."""

    def make(name: str = "ct.zarr", *, depth: int = 12, chunk_z: int = 4, reference: bool = True) -> Path:
        meta = tiny_ct_meta(depth=depth)
        rng = np.random.default_rng(0)
        sinogram = rng.random(meta.measurement_shape, dtype=np.float32)
        volume = rng.random(meta.volume_shape, dtype=np.float32) if reference else None
        create_dataset(tmp_path / name, meta, sinogram=sinogram, reference=volume, chunk_z=chunk_z)
        return tmp_path / name

    return make


@pytest.fixture
def make_mri_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a tiny MRI dataset with a 2D (or 3D) mask; returns its path."""

    def make(name: str = "mri.zarr", *, depth: int = 6, size: int = 8, mask_3d: bool = False) -> Path:
        meta = DatasetMeta(modality="mri", volume_shape=(depth, size, size),
                           geometry={"kind": "cartesian", "mask": "mask"})
        rng = np.random.default_rng(1)
        mask = rng.random((depth, size, size) if mask_3d else (size, size)) < 0.4
        kspace = (rng.standard_normal((depth, size, size)) + 1j * rng.standard_normal((depth, size, size))) * mask
        create_dataset(tmp_path / name, meta, kspace=kspace, mask=mask, chunk_z=4)
        return tmp_path / name

    return make


def _cli_app():
    try:
        from mbir_batch.cli import app
    except ImportError:
        return None
    return app


@pytest.fixture
def run_cli() -> Callable[..., tuple[int, str]]:
    """Run ``mbir-batch ARGS`` in-process; returns (exit code, stderr). Skips if the CLI is absent."""
    app = _cli_app()
    if app is None:
        pytest.skip("mbir_batch.cli is not available")
    from typer.testing import CliRunner

    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, [str(a) for a in args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stderr

    return run
