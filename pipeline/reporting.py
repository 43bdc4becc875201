"""`mbir-batch report`: metrics tables and the orthogonal-planes figure for finished outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError


def _method_name(path: Path, attrs: dict) -> str:
    method = attrs.get("method") or path.name
    names = {"fbp": "FBP", "admm-tv": "ADMM-TV", "dds": "DDS", "mbir": "DiffusionMBIR", "slice2d": "slice2d"}
    return names.get(method, str(method))


def build_report(outputs: list[Path], *, png: Path | None = None, reference: Path | None = None,
                 markdown: Path | None = None) -> str:
    """Score complete outputs of one dataset against its reference; return a markdown table.

    The reference comes from ``reference`` or else from the dataset recorded in the first
    output's attrs. All outputs must share its volume shape.
    """
    from .dataset import open_dataset
    from .output import open_output
    from .metrics import format_metrics_table, psnr_ssim_per_axis

    volumes: dict[str, np.ndarray] = {}
    input_path = reference
    voxel_size = (1.0, 1.0, 1.0)
    for path in outputs:
        store = open_output(path)
        name = _method_name(path, store.attrs)
        if name in volumes:
            name = f"{name} ({path.name})"
        volumes[name] = store.read_volume()
        if input_path is None and store.attrs.get("input"):
            input_path = Path(store.attrs["input"])
    ref = None
    if input_path is not None:
        dataset = open_dataset(input_path)
        voxel_size = tuple(dataset.meta.voxel_size_mm)
        if dataset.has_reference:
            ref = np.asarray(dataset.read_reference(0, dataset.meta.volume_shape[0]))
    for name, volume in volumes.items():
        if ref is not None and volume.shape != ref.shape:
            raise UserError(f"{name}: volume shape {volume.shape} does not match the reference {ref.shape}")
    if ref is None:
        table = "no reference in the dataset: nothing to score\n"
    else:
        rows = {name: psnr_ssim_per_axis(ref, volume) for name, volume in volumes.items()}
        table = format_metrics_table(rows)
    if markdown is not None:
        markdown.write_text(table)
    if png is not None:
        from .report import make_report_png

        make_report_png(ref, volumes, png, voxel_size=voxel_size)
    return table
