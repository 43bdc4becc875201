"""Writing results: the environment header, markdown tables and ``<stem>.md`` + ``<stem>.json``.

A benchmark's result is a JSON-able dict (the measured numbers) and a markdown rendering of it
(tables and the numbers, no interpretation: what the numbers mean is in ``bench/README.md``).
Both go to ``bench/results/`` (or ``--out``), and a copy to ``$OUT`` when it is set (the GPU
machine hands back what is written there).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parents[1]
RESULTS_DIR = BENCH_DIR / "results"


def today() -> str:
    """The date as ``YYYY-MM-DD`` (the results' file names)."""
    return date.today().isoformat()


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """``python bench/<script> <arguments>``: how the result was made, for its header."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"bench/{script}", *arguments])


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions and hardware for a report's header (GPU name, CUDA, cuDNN and TF32 flags on CUDA)."""
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "cores": os.cpu_count(), "machine": platform.machine()}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = "NOT INSTALLED"
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
    env["commit"] = _commit()
    return env


def _commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                              text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def header(title: str, env: dict[str, Any], command: str | None = None) -> list[str]:
    """The first lines of every report: title, environment, the command that made it."""
    lines = [f"# {title}", "", "env: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return lines + ([f"command: `{command}`", ""] if command else [])


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 4 significant digits, None and NaN print as ``-``."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if not math.isfinite(value) else f"{value:.4g}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(stem: Path, markdown: str, data: Any, *, also_to_out: bool = True) -> list[Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` (and copies into ``$OUT`` when set); return the paths."""
    folders = [Path(stem).parent]
    out = os.environ.get("OUT")
    if also_to_out and out and Path(out).resolve() != folders[0].resolve():
        folders.append(Path(out))
    written = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        md, js = folder / f"{Path(stem).name}.md", folder / f"{Path(stem).name}.json"
        md.write_text(markdown)
        js.write_text(json.dumps(data, indent=2, default=jsonable) + "\n")
        written += [md, js]
    return written


def publish(stem: Path, markdown: str, data: Any, *, also_to_out: bool = True) -> None:
    """Print the markdown, write the report (:func:`write_report`) and say where it went."""
    print(markdown)
    for path in write_report(stem, markdown, data, also_to_out=also_to_out):
        print(f"wrote {path}")


def rerender(path: Path, render: Callable[[dict[str, Any]], str], out: Path | None = None) -> None:
    """``--render JSON``: rebuild the markdown of an earlier result (after the rendering changed)."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"--render {path}: cannot read the result ({error})") from None
    publish(out or path.with_suffix(""), render(result), result, also_to_out=False)


def jsonable(value: Any) -> Any:
    """``json.dumps`` default: numpy scalars as numbers, paths and anything else as text."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    return str(value)


class SectionReport:
    """A report built section by section and rewritten after each one (a check that stops half-way
    still leaves the sections it finished)."""

    def __init__(self, stem: Path, title: str, env: dict[str, Any]) -> None:
        self.stem, self.env = stem, env
        self.parts = header(title, env)
        self.data: dict[str, Any] = {"environment": env, "sections": {}}

    def section(self, name: str, lines: list[str], data: Any = None) -> None:
        """Add ``## name`` with ``lines`` (printed too) and its data, and rewrite the files."""
        self.parts += [f"## {name}", "", *lines, ""]
        self.data["sections"][name] = data
        print("\n".join([f"## {name}", *lines]), flush=True)
        write_report(self.stem, "\n".join(self.parts), self.data)
