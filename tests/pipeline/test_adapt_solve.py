"""Test-time adaptation in the product (issue 13 items 1-4): the ``adapt:`` section, runs that are
bit-identical when it is off, the same LoRA weights and volume for any slab split, an exact resume
from a checkpointed state held by rank 0 only, and an adapter kept and reused."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from mbir_batch.config import load_config
from mbir_batch.errors import ConfigError
from mbir_batch.kernels.adapter_file import read_adapter
from mbir_batch.kernels.lora import inject_lora, load_lora_state_dict, lora_active
from mbir_batch.methods.adaptation import STATE_KEY, write_adapter
from mbir_batch.solve import SlabProblem, SlabState
from slab_threads import run_threads

DEPTH, CHUNK = 8, 2
SPLITS = {1: [(0, 8)], 2: [(0, 4), (4, 8)], 3: [(0, 2), (2, 6), (6, 8)]}  # chunk-aligned, as the jobs cut
ADAPT = {"sigma_start": 10.0, "sigma_end": 0.001, "every": 1, "steps": 2, "slices": 3, "lr": 0.01, "rank": 2}
"""Every step of a 4-step run adapts (the window covers the schedule), 2 AdamW steps on 3 slices."""

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors run faster on one thread


def problems(ct, pieces: int) -> list[SlabProblem]:
    operator, sinogram = ct
    return [SlabProblem(z0, z1, DEPTH, operator, sinogram[z0:z1], chunk_z=CHUNK) for z0, z1 in SPLITS[pieces]]


def config(method: str = "dds", steps: int = 4, **adapt):
    """The svct-8view preset with 3 CG iterations and the ``adapt`` section ``ADAPT`` updated with
    ``adapt``; ``off=True``: no section at all (as before adaptation existed)."""
    cfg = load_config("svct-8view", method, steps=steps, seed=5).replace(cg_iters=3)
    if adapt.get("off"):
        return dataclasses.replace(cfg, adapt=None)
    return cfg.replace(adapt={**ADAPT, **adapt})


# -- config -------------------------------------------------------------------------------------

def test_the_section_layers_key_by_key_and_round_trips(tmp_path):
    path = tmp_path / "adapt.yaml"
    path.write_text("dds:\n  adapt:\n    lr: 1e-3\n    rank: 8\n    train_bias: true\n")
    cfg = load_config(path, "dds")
    section = cfg.adapt
    assert section.enabled and section.adapter is None
    assert (section.settings.lr, section.settings.lora.rank, section.settings.lora.train_bias) == (0.001, 8, True)
    # an override (submit --no-adapt) keeps the file's other keys
    off = load_config(path, "dds", adapt={"enabled": False})
    assert not off.adapt.enabled and off.adapt.settings == section.settings
    # what provenance records builds the same config again
    assert load_config("svct-8view", "dds", adapt=cfg.to_dict()["adapt"]).adapt == section
    # null in a higher layer removes the section; no section at all is None
    assert load_config(path, "dds", adapt=None).adapt == section  # None overrides are "not given"
    path.write_text("dds:\n  adapt: null\n")
    assert load_config(path, "dds").adapt is None and load_config(path, "dds", base_preset="svct-8view").adapt is None
    assert load_config("dds-aapm256", "dds").adapt is None  # a preset without the section


@pytest.mark.parametrize("section, problem", [
    ("{lr: 0}", "dds.adapt.lr: must be a finite number > 0, got 0.0"),
    ("{rnak: 4}", "dds.adapt.rnak: unknown key"),
    ("{steps: 2.5}", "dds.adapt.steps: expected an integer, got 2.5"),
    ("{enabled: maybe}", "dds.adapt.enabled: expected true or false, got 'maybe'"),
    ("{reg: 1.0}", "dds.adapt.reg: only 0 is supported in a run"),
    ("{sigma_start: 0.1, sigma_end: 0.5}", "dds.adapt: sigma_end 0.5 is above sigma_start 0.1"),
    ("[1, 2]", "dds.adapt: expected a mapping of adaptation settings or null"),
])
def test_bad_sections_are_one_line_naming_the_file_and_key(tmp_path, section, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(f"dds:\n  adapt: {section}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, "dds")
    assert str(caught.value).startswith(f"{path}: {problem}")
    assert "\n" not in str(caught.value)


def test_methods_without_a_prior_have_no_adapt_section():
    with pytest.raises(ConfigError, match=r"admm-tv\.adapt: unknown key"):
        load_config("svct-8view", "admm-tv", adapt={"lr": 0.01})


# -- runs ---------------------------------------------------------------------------------------

def test_off_or_outside_its_window_the_run_is_bit_identical(ct, tiny_denoiser):
    plain, _ = run_threads(problems(ct, 1), config(off=True), tiny_denoiser)
    disabled, events = run_threads(problems(ct, 1), config(enabled=False), tiny_denoiser)
    assert torch.equal(disabled, plain) and events[0].adapter is None and "adapt_rounds" not in events[0].info
    # on, but no step falls in the window: LoRA is injected and never computed
    idle, events = run_threads(problems(ct, 1), config(sigma_start=1e-3, sigma_end=1e-3), tiny_denoiser)
    assert torch.equal(idle, plain)
    assert events[0].info["adapt_rounds"] == 0 and not any(t.abs().max() > 0 for name, t in
                                                           events[0].adapter.weights.items() if ".up." in name)


@pytest.mark.parametrize("method", ["dds", "mbir"])
def test_adaptation_changes_the_prior_and_any_split_agrees_exactly(ct, tiny_denoiser, method):
    steps = 4 if method == "dds" else 2
    plain, _ = run_threads(problems(ct, 1), config(method, steps, off=True), tiny_denoiser)
    whole, events = run_threads(problems(ct, 1), config(method, steps), tiny_denoiser)
    snapshot = events[0].adapter
    assert snapshot.rounds == events[0].info["adapt_rounds"] >= steps - 1
    assert snapshot.adam_steps == 2 * snapshot.rounds
    assert any(t.abs().max() > 0 for name, t in snapshot.weights.items() if ".up." in name)  # B moved off zero
    assert not torch.equal(whole, plain) and torch.isfinite(whole).all()
    for pieces in (2, 3):
        volume, slab_events = run_threads(problems(ct, pieces), config(method, steps), tiny_denoiser)
        assert torch.equal(volume, whole)
        for event in slab_events:  # every rank holds the same adapter
            assert all(torch.equal(event.adapter.weights[k], v) for k, v in snapshot.weights.items())
    # the denoiser the caller passed is never changed
    assert not any("lora" in type(m).__name__.lower() for m in tiny_denoiser.modules())


def test_the_state_is_kept_once_by_rank_0_and_a_resume_is_exact(ct, tiny_denoiser):
    cfg = config()
    saved: dict[tuple[int, int], dict[str, np.ndarray]] = {}  # (rank, step) -> what a checkpoint holds

    def keep(rank, event):
        saved[rank, event.step] = event.state.to_numpy()

    whole, events = run_threads(problems(ct, 2), cfg, tiny_denoiser, keep=keep)
    assert STATE_KEY in saved[0, 2] and STATE_KEY not in saved[1, 2]
    for step in (1, 2):  # after the first round (AdamW moments exist) and later
        states = [SlabState.from_numpy(saved[rank, step]) for rank in (0, 1)]
        resumed, later = run_threads(problems(ct, 2), cfg, tiny_denoiser, states=states)
        assert torch.equal(resumed, whole)
        assert later[0].adapter.rounds == events[0].adapter.rounds
        assert all(torch.equal(later[1].adapter.weights[k], v) for k, v in events[0].adapter.weights.items())
    # a state without the adaptation state is refused on every rank, not resumed with fresh LoRA
    states = [SlabState.from_numpy({k: v for k, v in saved[rank, 2].items() if k != STATE_KEY}) for rank in (0, 1)]
    with pytest.raises(ValueError, match="holds no adaptation state"):
        run_threads(problems(ct, 2), cfg, tiny_denoiser, states=states)


def test_a_kept_adapter_is_reused_as_the_prior(ct, tiny_denoiser, tmp_path):
    _, events = run_threads(problems(ct, 1), config(), tiny_denoiser)
    record = write_adapter(tmp_path / "adapter.safetensors", events[0].adapter, base_sha256="ab" * 32,
                           provenance={"dataset": "test"})
    assert record["rank"] == ADAPT["rank"] and record["rounds"] == events[0].adapter.rounds
    adapter = read_adapter(tmp_path / "adapter.safetensors", base_sha256="ab" * 32)
    assert adapter.provenance["dataset"] == "test" and adapter.provenance["rounds"] == record["rounds"]
    # independent expectation: the base network with the adapter loaded by hand, no adapt section
    by_hand = copy.deepcopy(tiny_denoiser)
    inject_lora(by_hand, adapter.lora)
    load_lora_state_dict(by_hand, adapter.weights)
    assert lora_active(by_hand)
    expected, _ = run_threads(problems(ct, 1), config(off=True), by_hand)
    frozen, frozen_events = run_threads(problems(ct, 2),
                                        config(enabled=False, adapter=str(tmp_path / "adapter.safetensors")),
                                        tiny_denoiser)
    assert torch.equal(frozen, expected)
    assert frozen_events[0].adapter.rounds == 0 and frozen_events[0].adapter.start.endswith("adapter.safetensors")
    # starting from it and adapting further runs rounds on top of it
    further, further_events = run_threads(problems(ct, 1), config(adapter=str(tmp_path / "adapter.safetensors")),
                                          tiny_denoiser)
    assert further_events[0].adapter.rounds > 0 and not torch.equal(further, frozen)
