"""``mbir-batch report``: PSNR/SSIM per axis of finished outputs, and the orthogonal-planes figure."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mbir_batch.cli.common import console

__all__ = ["report"]


def report(
    outputs: list[Path] = typer.Argument(..., help="Output stores of one dataset."),
    png: Optional[Path] = typer.Option(None, "--png", help="Write the orthogonal-planes figure here."),
    reference: Optional[Path] = typer.Option(None, "--reference",
                                             help="Dataset with the reference (default: the outputs' input)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the metrics table here."),
) -> None:
    """PSNR/SSIM per axis (axial, coronal, sagittal) and a PNG of the three mid-planes."""
    from mbir_batch.report import build_report

    table = build_report(outputs, png=png, reference=reference, markdown=markdown)
    console.print(table, soft_wrap=True)
    if png is not None:
        console.print(f"wrote {png}")
