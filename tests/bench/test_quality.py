"""bench/quality.py: families in and out of distribution, --set values, --save-volumes, merged tables."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
from ood_phantoms import OOD_FAMILIES, make_brain_phantom  # noqa: E402

from mbir_batch.phantoms import make_phantom  # noqa: E402


def test_families_are_torso_in_distribution_and_the_ood_families_out_of_it():
    assert list(quality.FAMILIES) == ["torso", *OOD_FAMILIES]
    assert {name: f.distribution for name, f in quality.FAMILIES.items()} == {
        "torso": "in-distribution", **dict.fromkeys(OOD_FAMILIES, "out-of-distribution")}
    assert np.array_equal(quality.FAMILIES["torso"].make(9100, 16, 3), make_phantom(9100, 16, 3))
    assert np.array_equal(quality.FAMILIES["brain"].make(4, 16, 3), make_brain_phantom(4, 16, 3))
    rules = "\n".join(quality.seed_rules(["torso", "brain"]))
    assert "seeds >= 9000 are held out" in rules and "brain (out-of-distribution)" in rules and "never tune" in rules


@pytest.mark.parametrize("text, value", [("3", 3), ("0.2", 0.2), ("-1e-3", -1e-3), ("auto", "auto")])
def test_set_values_are_numbers_when_they_parse_and_text_otherwise(text, value):
    parsed = quality.parse_overrides([f"dds.lam={text}"])["dds"]["lam"]
    assert parsed == value and type(parsed) is type(value)


def test_a_text_value_the_config_does_not_take_is_one_line_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^quality.py: override: admm-tv.lam: expected a number, got 'auto'$"):
        quality.main(["--size", "16", "--depth", "2", "--tasks", "svct-8view", "--methods", "admm-tv",
                      "--set", "admm-tv.lam=auto", "--no-png", "--out", str(tmp_path)])


def test_run_groups_families_saves_volumes_and_prints_the_seed_rules(tmp_path, capsys):
    out, volumes = tmp_path / "res", tmp_path / "vol"
    quality.main(["--size", "16", "--depth", "3", "--seeds", "9100", "--family", "brain,torso", "--tasks",
                  "svct-8view,csmri-4x", "--methods", "fbp", "--no-png", "--threads", "1", "--out", str(out),
                  "--tag", "t", "--save-volumes", str(volumes)])
    printed = capsys.readouterr().out
    assert "torso (in-distribution): seeds < 9000 are training phantoms" in printed
    rows = json.loads((out / "t.json").read_text())
    assert [(r["family"], r["distribution"], r["task"]) for r in rows] == [
        ("brain", "out-of-distribution", "svct-8view"), ("brain", "out-of-distribution", "csmri-4x"),
        ("torso", "in-distribution", "svct-8view"), ("torso", "in-distribution", "csmri-4x")]
    # the saved volume is the FBP of the family's phantom: the operator's direct inverse of its sinogram
    problem = quality.build_problem(make_brain_phantom(9100, 16, 3), "svct-8view", 0.0, 9100, "cpu")
    saved = np.load(volumes / "brain-9100-svct-8view-fbp.npy")
    assert np.array_equal(saved, problem.operator.direct_inverse(problem.measurements).numpy())
    assert sorted(p.name for p in volumes.iterdir()) == sorted(
        f"{f}-9100-{t}-fbp.npy" for f in ("brain", "torso") for t in ("svct-8view", "csmri-4x"))
    table = [line for line in (out / "t.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[:3] for line in table[1:]] == [
        ["| torso", "in-distribution", "svct-8view"], ["| torso", "in-distribution", "csmri-4x"],
        ["| brain", "out-of-distribution", "svct-8view"], ["| brain", "out-of-distribution", "csmri-4x"]]


def _row(psnr: float, **key) -> dict:
    return {"seed": 9100, "task": "svct-8view", "method": "fbp", "nfe": 0, "wall_s": 1.0, "config": {"lam": psnr},
            **{f"{a}_{m}": psnr for a in quality.AXES for m in ("psnr", "ssim")}, **key}


def test_merge_keys_rows_by_family_and_reads_rows_without_one_as_torso(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([_row(10.0), _row(11.0, family="brain")]))
    (tmp_path / "b.json").write_text(json.dumps([_row(12.0, family="torso")]))
    quality.merge([tmp_path / "a.json", tmp_path / "b.json"], tmp_path, "m")
    rows = json.loads((tmp_path / "m.json").read_text())
    assert sorted((quality.family_of(r), r["axial_psnr"]) for r in rows) == [("brain", 11.0), ("torso", 12.0)]
    text = (tmp_path / "m.md").read_text()
    assert "torso 9100 svct-8view fbp: replaced by b.json" in text and "lam': '10.0 -> 12.0'" in text


def test_a_set_variant_is_its_own_row_and_a_lam_auto_choice_counts_in_nfe(tmp_path):
    """Rows run with --set are told apart from the preset's (table, merge), and a lam: auto run's
    cross-validation NFE and chosen weight are in its row."""
    from mbir_batch.config import load_config

    volume = make_phantom(9100, 16, 3)
    preset = load_config("svct-8view", "dds")
    auto = load_config("svct-8view", "dds", lam="auto")
    info = {"lam": 0.0158, "lam_auto_s": 3.0, "lam_auto_nfe": 75.0, "lam_cv_error[0.01]": 1e-3}
    rows = [quality.score(volume, volume, preset, 1.0, {}, family="torso", seed=9100, task="svct-8view", variant=""),
            quality.score(volume, volume, auto, 2.0, info, family="torso", seed=9100, task="svct-8view",
                          variant=quality.variant_of({"lam": "auto"}))]
    assert [r["nfe"] for r in rows] == [preset.nfe, preset.nfe + 75] and rows[0]["lam_auto"] is None
    assert rows[1]["lam_auto"] == info and rows[1]["variant"] == "lam=auto"
    table = [line.split(" | ")[3] for line in quality.summarise(rows).splitlines()[2:]]
    assert table == ["dds", "dds [lam=auto]"]
    for name, row in (("a", rows[0]), ("b", rows[1])):
        (tmp_path / f"{name}.json").write_text(json.dumps([row]))
    quality.merge([tmp_path / "a.json", tmp_path / "b.json"], tmp_path, "m")
    merged = json.loads((tmp_path / "m.json").read_text())
    assert [r.get("variant") for r in merged] == ["", "lam=auto"]
