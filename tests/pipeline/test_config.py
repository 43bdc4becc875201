"""Tests for pipeline/config.py: the layering rule (overrides > file > task preset > defaults), the
refusal of NaN / inf and of keys a method does not have, at load time and programmatically."""

from __future__ import annotations

import math
from importlib import resources

import dataclasses

import pytest
import yaml

from mbir_batch.config import load_config, preset_names
from mbir_batch.errors import ConfigError
from mbir_batch.methods import METHODS, get, names

FLOAT_KEYS = ("rho", "lam", "lam_xy", "sigma_min", "sigma_max", "eta", "snr")


def method_with(key: str) -> str:
    """The first method (table order) whose config has the setting ``key``."""
    return next(name for name, method in METHODS.items()
                if key in {item.name for item in dataclasses.fields(method.config_type)})


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


def _holds(cfg, key: str, value) -> bool:
    """Whether ``cfg`` has ``value`` for ``key``; a nested section (``adapt:``) holds each of its keys."""
    if isinstance(value, dict):
        recorded = cfg.to_dict()[key]
        return all(recorded[k] == v for k, v in value.items())
    return getattr(cfg, key) == value


@pytest.mark.parametrize(("preset", "method"), [("svct-8view", "admm-tv"), ("svct-4view", "dds"),
                                                ("csmri-4x", "mbir"), ("lact-90", "mbir")])
def test_a_file_with_only_steps_keeps_the_task_presets_settings(write_yaml, preset, method):
    expected = _preset_section(preset, method)
    steps_key = get(method).steps_key  # "iters" for admm-tv
    defaults = get(method).config_type()
    # else this test could not tell the preset layer from the defaults
    assert any(getattr(defaults, key) != value for key, value in expected.items() if key != steps_key)
    cfg = load_config(write_yaml(f"{method}:\n  {steps_key}: 7\n"), method, base_preset=preset)
    assert getattr(cfg, steps_key) == 7
    for key, value in expected.items():
        if key != steps_key:
            assert _holds(cfg, key, value), key


def test_without_a_base_preset_missing_keys_take_the_defaults(write_yaml):
    cfg = load_config(write_yaml("dds:\n  steps: 7\n"), "dds")
    defaults = get("dds").config_type()
    assert cfg.steps == 7 and cfg.lam == defaults.lam and cfg.rho == defaults.rho


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
        for method in names():
            assert load_config(name, method).method == method


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("literal", [".nan", ".NaN", ".inf", "-.inf", ".Inf"])
def test_nan_and_inf_in_a_file_are_refused_at_load_time(write_yaml, key, literal):
    method = method_with(key)
    path = write_yaml(f"{method}:\n  {key}: {literal}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: {method}\.{key}: must be a finite number, got -?(nan|inf)$"):
        load_config(path, method, base_preset="svct-8view")


def test_nan_in_the_base_preset_file_names_that_file(write_yaml):
    base = write_yaml("dds:\n  lam: .nan\n", name="base.yaml")
    with pytest.raises(ConfigError, match=rf"^{base}: dds\.lam: must be a finite number"):
        load_config(write_yaml("dds:\n  steps: 3\n"), "dds", base_preset=str(base))


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_overrides_are_refused(key, value):
    method = method_with(key)
    with pytest.raises(ConfigError, match=rf"^override: {method}\.{key}: must be a finite number"):
        load_config("svct-8view", method, **{key: value})


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_method_configs_refuse_non_finite_floats(key, value):
    config_type = get(method_with(key)).config_type
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number"):
        config_type(**{key: value})
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number"):
        config_type().replace(**{key: value})


@pytest.mark.parametrize("key", ["steps", "iters", "cg_iters", "batch", "seed"])
@pytest.mark.parametrize("value", [math.nan, math.inf, 2.0, True])
def test_method_configs_refuse_non_integers_for_counts(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: expected an integer"):
        get(method_with(key)).config_type(**{key: value})


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


@pytest.mark.parametrize(("method", "key"), [("admm-tv", "eta"), ("admm-tv", "steps"), ("slice2d", "lam"),
                                             ("fbp", "cg_iters"), ("dds", "snr"), ("mbir", "lam_xy")])
def test_a_key_the_method_does_not_have_is_refused_naming_file_and_key(write_yaml, method, key):
    path = write_yaml(f"{method}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: {method}\.{key}: unknown key \(known: "):
        load_config(path, method, base_preset="svct-8view")
    if key != "steps":  # as an override, steps= sets the method's step count (the test below)
        with pytest.raises(ConfigError, match=rf"^override: {method}\.{key}: unknown key"):
            load_config("svct-8view", method, **{key: 1})


def test_steps_and_iters_overrides_set_the_methods_step_count():
    assert load_config("svct-8view", "admm-tv", steps=7).iters == 7
    assert load_config("svct-8view", "dds", iters=7).steps == 7
    assert load_config("svct-8view", "mbir", steps=7, iters=7).steps == 7
    assert load_config("svct-8view", "fbp", steps=7) == load_config("svct-8view", "fbp")  # no steps to set
    with pytest.raises(ConfigError, match=r"^override: dds\.steps: steps=7 and iters=8 disagree"):
        load_config("svct-8view", "dds", steps=7, iters=8)
    with pytest.raises(ConfigError, match=r"^override: admm-tv\.iters: must be >= 1, got 0"):
        load_config("svct-8view", "admm-tv", steps=0)


def test_an_unknown_method_lists_the_registry():
    with pytest.raises(ConfigError, match=r"^unknown method 'tv'; choose one of fbp, admm-tv, slice2d, dds, mbir$"):
        load_config("svct-8view", "tv")


def test_every_preset_section_is_a_method_section_with_only_its_keys():
    """The shipped presets carry no key a method ignores (each section loads on its own)."""
    for name in preset_names():
        document = yaml.safe_load((resources.files("mbir_batch.configs") / f"{name}.yaml").read_text())
        assert set(document) - {"description"} <= set(names()), name
        for method in names():
            section = document.get(method) or {}
            cfg = get(method).config_type.from_mapping(f"preset {name}", section)
            assert all(_holds(cfg, key, value) for key, value in section.items()), (name, method)


def test_the_paper_presets_hold_the_papers_settings():
    """configs/dds-aapm256.yaml and diffusionmbir-aapm256.yaml: the values of the papers' own scripts."""
    dds = load_config("dds-aapm256", "dds")
    assert (dds.steps, dds.schedule, dds.eta, dds.rho, dds.lam, dds.cg_iters) == (50, "model", 0.85, 10.0, 0.04, 5)
    mbir = load_config("diffusionmbir-aapm256", "mbir")
    assert (mbir.steps, mbir.schedule, mbir.snr, mbir.rho, mbir.lam, mbir.cg_iters) == (2000, "model", 0.16, 10.0,
                                                                                      0.04, 1)
    assert mbir.nfe == 4000 and dds.nfe == 50


def test_model_config_resolves_files_and_shipped_names(tmp_path):
    import json

    from mbir_batch.config import model_config_path, shipped_model_configs

    assert "ncsnpp-aapm256" in shipped_model_configs()
    shipped = model_config_path("ncsnpp-aapm256")
    doc = json.loads(shipped.read_text())
    assert doc["model"]["nf"] == 128 and doc["data"]["image_size"] == 256
    own = tmp_path / "ncsnpp-aapm256"
    own.write_text("{}")
    assert model_config_path(own) == own  # an existing file wins
    with pytest.raises(ConfigError, match=r"^nope\.json: model config not found .*ncsnpp-aapm256"):
        model_config_path("nope.json")
