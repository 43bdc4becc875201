"""Run the project's code on a bare node (a GPU machine with Python and torch, nothing installed).

``package DEST`` assembles the import package ``mbir_batch`` from this checkout into
``DEST/mbir_batch``, exactly as ``pyproject.toml`` maps it for an install (``package-dir``,
``packages`` and ``package-data``: ``pipeline/`` -> ``mbir_batch``, ``kernels/`` ->
``mbir_batch.kernels``, the presets, the bundled model), and prints ``DEST`` to put on
``PYTHONPATH``. It prints nothing when ``mbir_batch`` already imports from this checkout (an
editable install), unless ``--force``.

``check`` imports the modules a script needs and prints their versions (and the GPU); it fails,
naming what is missing, when one is not importable or CUDA was asked for and is not there.

``where`` prints the folder ``mbir_batch`` imports from.

    PKG=$(python bench/bare_node.py package /tmp/pkg); export PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH}
    python bench/bare_node.py check --device cuda --need torch,diffusers,safetensors

Standard library only (until ``check`` imports what it checks), so it runs before anything is set up.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shutil
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setuptools_table(repo: Path) -> dict:
    pyproject = repo / "pyproject.toml"
    try:
        return tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as error:
        raise SystemExit(f"{pyproject}: cannot read [tool.setuptools] ({error})") from None


def package_sources(repo: Path = REPO) -> dict[str, Path]:
    """Each package of ``pyproject.toml`` -> the folder of the checkout it is built from."""
    table = _setuptools_table(repo)
    roots: dict[str, str] = table.get("package-dir", {})
    out = {}
    for package in table["packages"]:
        parts = package.split(".")
        for cut in range(len(parts), 0, -1):  # the longest mapped prefix decides
            prefix = ".".join(parts[:cut])
            if prefix in roots:
                out[package] = repo / roots[prefix] / Path(*parts[cut:])
                break
        else:
            out[package] = repo / Path(*parts)
    return out


def assemble(dest: Path, repo: Path = REPO) -> Path:
    """Build the installed layout of every package under ``dest`` (replacing ``dest/<top package>``)."""
    sources = package_sources(repo)
    data: dict[str, list[str]] = _setuptools_table(repo).get("package-data", {})
    for top in {package.split(".")[0] for package in sources}:
        shutil.rmtree(dest / top, ignore_errors=True)
    for package, source in sources.items():
        if not (source / "__init__.py").is_file():
            raise SystemExit(f"{source}: package {package} has no __init__.py (pyproject.toml maps it there)")
        target = dest / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        files = list(source.glob("*.py")) + [path for pattern in data.get(package, []) for path in source.glob(pattern)]
        for path in files:
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / path.relative_to(source))
    return dest


def imported_from() -> Path | None:
    """The folder ``import mbir_batch`` would load (without importing it), None when it is not importable."""
    spec = importlib.util.find_spec("mbir_batch")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).resolve().parent


def check(device: str, needs: list[str]) -> list[str]:
    """Import each of ``needs`` and print its version; return what is missing (and a missing CUDA)."""
    missing = []
    for name in needs:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            missing.append(f"{name} ({error})")
            continue
        print(f"{name} {getattr(module, '__version__', '')}".rstrip(), flush=True)
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            print(f"GPU: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}", flush=True)
        else:
            missing.append("CUDA (torch sees no CUDA device)")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    package = commands.add_parser("package", help="assemble mbir_batch under DEST; print DEST")
    package.add_argument("dest", type=Path)
    package.add_argument("--force", action="store_true", help="assemble even when mbir_batch imports from here")
    needs = commands.add_parser("check", help="import the modules a script needs; print their versions")
    needs.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    needs.add_argument("--need", default="torch", help="comma-separated module names")
    needs.add_argument("--warn-only", action="store_true", help="print what is missing, exit 0")
    commands.add_parser("where", help="print the folder mbir_batch imports from")
    args = parser.parse_args(argv)
    if args.command == "where":
        print(imported_from() or "not importable")
        return 0
    if args.command == "package":
        if not args.force and imported_from() == (REPO / "pipeline").resolve():
            return 0
        print(assemble(args.dest.resolve()))
        return 0
    missing = check(args.device, [name for name in args.need.split(",") if name])
    for item in missing:
        print(f"bare_node.py: {'WARNING: ' if args.warn_only else ''}not available: {item}", file=sys.stderr)
    return 0 if args.warn_only or not missing else 1


if __name__ == "__main__":
    raise SystemExit(main())
