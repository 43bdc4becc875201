"""bench/bare_node.py: the package assembled for a bare node is the one pyproject.toml installs."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import bare_node  # noqa: E402


def test_every_package_and_data_file_of_pyproject_is_assembled(tmp_path):
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    bare_node.assemble(tmp_path)
    for package in table["packages"]:
        assert (tmp_path / Path(*package.split(".")) / "__init__.py").is_file(), package
    assert (tmp_path / "mbir_batch" / "kernels" / "priors" / "load_own.py").is_file()
    assert (tmp_path / "mbir_batch" / "configs" / "svct-8view.yaml").is_file()
    models = REPO / "pipeline" / "models"
    for path in models.glob("*.json"):
        assert (tmp_path / "mbir_batch" / "models" / path.name).read_bytes() == path.read_bytes()
    assert not list(tmp_path.rglob("__pycache__"))


def test_the_assembled_package_is_what_python_imports_from_pythonpath(tmp_path):
    dest = Path(subprocess.run([sys.executable, str(REPO / "bench" / "bare_node.py"), "package", str(tmp_path),
                                "--force"], check=True, capture_output=True, text=True).stdout.strip())
    env = dict(os.environ, PYTHONPATH=str(dest))
    where = subprocess.run([sys.executable, str(REPO / "bench" / "bare_node.py"), "where"], check=True,
                           capture_output=True, text=True, env=env).stdout.strip()
    assert Path(where) == (tmp_path / "mbir_batch").resolve()


def test_package_prints_nothing_when_mbir_batch_imports_from_this_checkout(tmp_path):
    if bare_node.imported_from() != (REPO / "pipeline").resolve():
        import pytest

        pytest.skip("mbir_batch is not installed in editable mode from this checkout")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bare_node.py"), "package", str(tmp_path)],
                          check=True, capture_output=True, text=True)
    assert done.stdout == "" and not list(tmp_path.iterdir())


def test_check_names_what_is_missing():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bare_node.py"), "check", "--need",
                           "json,no_such_module_here"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "not available: no_such_module_here" in done.stderr
