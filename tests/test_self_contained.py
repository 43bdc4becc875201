"""The project stands on its own: nothing it runs or tests reads a folder beside the clone.

A user's clone has no sibling ``shared`` folder, so no file of the package, its tests, benchmarks or
SLURM scripts may refer to one: not as a relative path, not as the absolute path of the development
machine, and not joined from path parts (the repository's parent plus that name). The patterns are
assembled from pieces, and the comments give no literal example, so that this file does not match itself.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("pipeline", "kernels", "cluster", "tests", "bench", "slurm", "configs", "Makefile", "pyproject.toml")
GENERATED = {"__pycache__", ".pytest_cache", ".ruff_cache"}

_SIBLING = "sha" + "red"
SIBLING_REFERENCES = re.compile("|".join((
    re.escape(".." + "/" + _SIBLING),                                # up one level, then into it
    re.escape("/work/" + _SIBLING),                                  # the development machine's absolute path
    r"""parents?(?:\[\d+\])?\s*/\s*["']""" + _SIBLING + r"""["']""",  # pathlib: .parent or .parents[i] / NAME
    r"""["']\.\.["']\s*,\s*["']""" + _SIBLING + r"""["']""",          # os.path.join(..., "..", NAME)
)).encode())


def _files() -> list[Path]:
    files = []
    for name in CHECKED:
        top = REPO / name
        candidates = [top] if top.is_file() else sorted(top.rglob("*"))
        files += [path for path in candidates
                  if path.is_file() and not GENERATED.intersection(path.relative_to(REPO).parts)]
    return files


def sibling_references(files: list[Path], root: Path = REPO) -> list[str]:
    """``file:line: text`` (``file`` relative to ``root``) for each reference to the sibling folder."""
    found = []
    for path in files:
        data = path.read_bytes()
        for match in SIBLING_REFERENCES.finditer(data):
            line_no = data.count(b"\n", 0, match.start()) + 1
            start = data.rfind(b"\n", 0, match.start()) + 1
            end = data.find(b"\n", match.end())
            text = data[start:end if end >= 0 else len(data)].decode("utf-8", "replace").strip()
            found.append(f"{path.relative_to(root)}:{line_no}: {text[:200]}")
    return found


def test_the_patterns_catch_each_kind_of_reference(tmp_path):
    sibling = "sha" + "red"
    lines = [f"see ../{sibling}/slurm_local.sh", f"open('/work/{sibling}/DESIGN.md')",
             f'SLURM_LOCAL = REPO.parent / "{sibling}" / "x.sh"', f"p = Path(__file__).parents[2] / '{sibling}'",
             f'os.path.join(here, "..", "{sibling}", "x")',
             "a shared helper; shared/ memory; self.shared = 1"]  # the word alone is fine
    probe = tmp_path / "probe.py"
    probe.write_text("\n".join(lines) + "\n")
    found = sibling_references([probe], root=tmp_path)
    assert [entry.split(":")[:2] for entry in found] == [["probe.py", str(n)] for n in range(1, 6)], found


def test_no_file_refers_to_a_folder_beside_the_clone():
    files = _files()
    assert any(path.name == "test_self_contained.py" for path in files), "the scan missed tests/"
    offending = sibling_references(files)
    assert not offending, ("these files refer to a folder beside the clone, which a user's clone does not have "
                           "(copy what they need into the repository):\n" + "\n".join(offending))
