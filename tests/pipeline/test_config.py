"""Tests for pipeline/config.py: the layering rule (overrides > file > task preset > defaults) and
the refusal of NaN / inf, at load time and programmatically."""

from __future__ import annotations

import math
from importlib import resources

import pytest
import yaml

from mbir_batch.config import METHODS, SolverConfig, load_config, preset_names
from mbir_batch.errors import ConfigError

FLOAT_KEYS = ("rho", "lam", "lam_xy", "sigma_min", "sigma_max", "eta", "snr")


def _preset_section(name: str, method: str) -> dict:
    """The ``method`` section of a shipped preset, read straight from its YAML (the expectation)."""
    text = (resources.files("mbir_batch.configs") / f"{name}.yaml").read_text()
    return yaml.safe_load(text)[method]


@pytest.fixture
def write_yaml(tmp_path):
    def write(text: str, name: str = "solver.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


@pytest.mark.parametrize(("preset", "method"), [("svct-8view", "admm-tv"), ("svct-4view", "dds"),
                                                ("csmri-4x", "mbir"), ("lact-90", "mbir")])
def test_a_file_with_only_steps_keeps_the_task_presets_settings(write_yaml, preset, method):
    expected = _preset_section(preset, method)
    defaults = SolverConfig()
    # else this test could not tell the preset layer from the defaults
    assert any(getattr(defaults, key) != value for key, value in expected.items() if key != "steps")
    cfg = load_config(write_yaml(f"{method}:\n  steps: 7\n"), method, base_preset=preset)
    assert cfg.steps == 7
    for key, value in expected.items():
        if key != "steps":
            assert getattr(cfg, key) == value, key


def test_without_a_base_preset_missing_keys_take_the_defaults(write_yaml):
    cfg = load_config(write_yaml("dds:\n  steps: 7\n"), "dds")
    assert cfg.steps == 7 and cfg.lam == SolverConfig().lam and cfg.rho == SolverConfig().rho


def test_file_values_win_over_the_preset_and_overrides_win_over_both(write_yaml):
    path = write_yaml("dds:\n  lam: 0.5\n  cg_iters: 3\n  steps: 9\n")
    cfg = load_config(path, "dds", base_preset="svct-8view", steps=4, seed=11, lam=None)
    assert (cfg.lam, cfg.cg_iters, cfg.steps, cfg.seed) == (0.5, 3, 4, 11)
    assert cfg.sigma_max == _preset_section("svct-8view", "dds")["sigma_max"]


def test_a_file_without_the_methods_section_takes_the_whole_preset_section(write_yaml):
    cfg = load_config(write_yaml("description: only fbp here\nfbp: {}\n"), "dds", base_preset="csmri-4x")
    assert cfg == load_config("csmri-4x", "dds")


def test_a_preset_over_itself_is_the_preset():
    assert load_config("lact-90", "mbir", base_preset="lact-90") == load_config("lact-90", "mbir")


def test_an_unknown_base_preset_is_named():
    with pytest.raises(ConfigError, match="svct-99view: no such config file or preset"):
        load_config("svct-8view", "dds", base_preset="svct-99view")


def test_every_preset_loads_for_every_method():
    for name in preset_names():
        for method in METHODS:
            assert load_config(name, method).method == method


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("literal", [".nan", ".NaN", ".inf", "-.inf", ".Inf"])
def test_nan_and_inf_in_a_file_are_refused_at_load_time(write_yaml, key, literal):
    path = write_yaml(f"dds:\n  {key}: {literal}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: dds\.{key}: must be a finite number, got -?(nan|inf)$"):
        load_config(path, "dds", base_preset="svct-8view")


def test_nan_in_the_base_preset_file_names_that_file(write_yaml):
    base = write_yaml("dds:\n  lam: .nan\n", name="base.yaml")
    with pytest.raises(ConfigError, match=rf"^{base}: dds\.lam: must be a finite number"):
        load_config(write_yaml("dds:\n  steps: 3\n"), "dds", base_preset=str(base))


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_overrides_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"^override: dds\.{key}: must be a finite number"):
        load_config("svct-8view", "dds", **{key: value})


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_solver_config_refuses_non_finite_floats(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number"):
        SolverConfig(**{key: value})
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number"):
        SolverConfig().replace(**{key: value})


@pytest.mark.parametrize("key", ["steps", "iters", "cg_iters", "batch", "seed"])
@pytest.mark.parametrize("value", [math.nan, math.inf, 2.0, True])
def test_solver_config_refuses_non_integers_for_counts(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: expected an integer"):
        SolverConfig(**{key: value})


def test_range_errors_name_the_layer_the_value_came_from(write_yaml):
    path = write_yaml("dds:\n  lam: -1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: dds\.lam: must be >= 0, got -1"):
        load_config(path, "dds", base_preset="svct-8view")
    with pytest.raises(ConfigError, match=r"^override: dds\.steps: must be >= 1, got 0"):
        load_config("svct-8view", "dds", steps=0)
    # across fields: the file's sigma_min against the preset's sigma_max names the file
    crossed = write_yaml("dds:\n  sigma_min: 20.0\n", name="crossed.yaml")
    with pytest.raises(ConfigError, match=rf"^{crossed}: dds\.sigma_min \(20\.0\) must be below sigma_max"):
        load_config(crossed, "dds", base_preset="svct-8view")


def test_unknown_keys_and_wrong_types_name_the_file_and_key(write_yaml):
    path = write_yaml("dds:\n  cg_itres: 5\n")
    with pytest.raises(ConfigError, match=rf"^{path}: dds\.cg_itres: unknown key"):
        load_config(path, "dds", base_preset="svct-8view")
    path = write_yaml("dds:\n  steps: ten\n")
    with pytest.raises(ConfigError, match=rf"^{path}: dds\.steps: expected an integer, got 'ten'"):
        load_config(path, "dds", base_preset="svct-8view")
