"""Test-time adaptation of the prior inside ``dds`` and ``mbir`` (D3IP): config, run, state, adapter.

Chung and Ye, "Deep Diffusion Image Prior for Efficient OOD Adaptation in 3D Inverse Problems",
ECCV 2024 (arXiv 2407.10641). The kernels are :mod:`mbir_batch.kernels.lora` (the adapters),
:mod:`mbir_batch.kernels.adapter_file` (their file) and :mod:`mbir_batch.kernels.adapt` (one
distributed round of AdamW steps on the measurement loss); this module puts them into a method run:

* :class:`AdaptSection` / :func:`parse_adapt`: the ``adapt:`` section of a method preset, flat
  keys (``enabled``, ``adapter``, ``lr``, ``steps``, ``every``, ``sigma_start``, ``sigma_end``,
  ``slices``, ``cg``, ``weight_decay``, ``rank``, ``alpha``, ``train_bias``, ``targets``);
* :class:`Adaptation`: a private copy of the denoiser with LoRA injected, its AdamW, and the
  ``before_step`` hook of the samplers (:mod:`mbir_batch.kernels.diffusion`) that runs a round
  before the denoiser of every planned step;
* the state: LoRA weights, AdamW moments and counters packed into ONE float32 vector
  (:data:`STATE_KEY`), which only rank 0 carries in its ``SlabState.aux`` (so a checkpoint holds
  it once, not per slab); a resumed run hands it to every rank with one all-reduce (the other
  ranks add zeros: x + 0 = x exactly);
* :class:`AdapterSnapshot`: what the last step hands to the caller, to write
  ``adapter.safetensors`` beside the volume (:func:`write_adapter`).

Absent section, or ``enabled: false`` without an ``adapter``: nothing is injected or copied, and
the run is bit-identical to a run without this module.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import SettingError

__all__ = ["ADAPT_KEYS", "STATE_KEY", "AdaptSection", "Adaptation", "AdapterSnapshot", "parse_adapt",
           "weights_sha256", "write_adapter"]

STATE_KEY = "adapt_state"
"""The ``SlabState.aux`` name (rank 0 only) of the packed adaptation state."""

_FLOATS = ("lr", "sigma_start", "sigma_end", "weight_decay", "alpha", "reg")
_INTS = ("steps", "every", "slices", "cg", "rank")
ADAPT_KEYS = ("enabled", "adapter", *_FLOATS, *_INTS, "train_bias", "targets")
"""The keys of an ``adapt:`` section."""

TUNED = {"lr": 0.003, "every": 1, "train_bias": True}
"""A section's tuned defaults (the kernel's :class:`~mbir_batch.kernels.adapt.AdaptConfig` gives the
rest): tuned on the ellipsoid family (64x64x16, seed 1), checked on training phantom 17 (README,
"Adapting the prior"). lr was tuned twice: 0.001 for the torso-only model (0.003 cost it 0.7 dB in
distribution), then 0.003 for the mixture model (+1.5..+2.4 dB on the ellipsoids over three sampler
seeds, -0.05..+0.14 dB on phantom 17). With the kernel's other defaults: 5 AdamW steps on 4 slices per
round, sigma window [0.05, 1.0], CG 1, rank 4."""


@dataclass(frozen=True)
class AdaptSection:
    """A parsed ``adapt:`` section.

    Attributes
    ----------
    enabled : run adaptation rounds (``submit --adapt`` / ``--no-adapt``).
    settings : the round settings and the LoRA layout (:class:`~mbir_batch.kernels.adapt.AdaptConfig`;
        its ``seed`` is replaced by the method's seed at run time).
    adapter : an adapter file to start from (``submit --adapter FILE``); its own LoRA layout
        (rank, targets) is used. With ``enabled: false`` it is applied as it is.
    """

    enabled: bool
    settings: Any
    adapter: str | None = None

    @property
    def in_use(self) -> bool:
        """Whether the denoiser gets LoRA at all (adapting, or a given adapter)."""
        return self.enabled or self.adapter is not None

    def to_dict(self) -> dict[str, Any]:
        """The flat section (what provenance records and what a resume compares)."""
        s, lora = self.settings, self.settings.lora
        return {"enabled": self.enabled, "adapter": self.adapter, "lr": s.lr, "steps": s.steps, "every": s.every,
                "sigma_start": s.sigma_start, "sigma_end": s.sigma_end, "slices": s.slices, "cg": s.cg,
                "weight_decay": s.weight_decay, "rank": lora.rank, "alpha": lora.alpha,
                "train_bias": lora.train_bias, "targets": list(lora.targets)}


def _number(where: str, key: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind``; YAML 1.1 reads ``1e-3`` as text, so numeric text is accepted for floats."""
    if isinstance(value, bool):
        raise SettingError(f"{where}.{key}: expected a number, got {value!r}", where)
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise SettingError(f"{where}.{key}: expected a number, got {value!r}", where) from None
    if kind is int and not isinstance(value, int):
        raise SettingError(f"{where}.{key}: expected an integer, got {value!r}", where)
    if kind is float and not isinstance(value, (int, float)):
        raise SettingError(f"{where}.{key}: expected a number, got {value!r}", where)
    return kind(value)


def parse_adapt(where: str, value: Any) -> AdaptSection | None:
    """An ``adapt:`` mapping (or ``None``, or an :class:`AdaptSection`) as an :class:`AdaptSection`.

    Missing keys take :data:`TUNED`, then :class:`~mbir_batch.kernels.adapt.AdaptConfig`'s
    defaults; ``enabled`` defaults to true. ``reg`` (the in-distribution denoising regulariser of the kernel) needs a
    bank of in-distribution slices, which a run does not have: only 0 is accepted.

    Raises
    ------
    SettingError : not a mapping, an unknown key, or a value of the wrong type or out of range.
    """
    if value is None or isinstance(value, AdaptSection):
        return value
    if not isinstance(value, Mapping):
        raise SettingError(f"{where}: expected a mapping of adaptation settings or null, got {value!r}", where)
    unknown = sorted(set(value) - set(ADAPT_KEYS))
    if unknown:
        raise SettingError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(ADAPT_KEYS))})", where)
    from ..kernels.adapt import AdaptConfig
    from ..kernels.lora import LoraConfig

    value = {**TUNED, **value}
    enabled = value.get("enabled", True)
    if not isinstance(enabled, bool):
        raise SettingError(f"{where}.enabled: expected true or false, got {enabled!r}", where)
    adapter = value.get("adapter")
    if adapter is not None and (not isinstance(adapter, (str, Path)) or not str(adapter)):
        raise SettingError(f"{where}.adapter: expected an adapter file path, got {adapter!r}", where)
    numbers = {key: _number(where, key, value[key], float if key in _FLOATS else int)
               for key in (*_FLOATS, *_INTS) if key in value and not (key == "alpha" and value[key] is None)}
    if numbers.pop("reg", 0.0) != 0.0:
        raise SettingError(f"{where}.reg: only 0 is supported in a run (the denoising regulariser needs a bank of "
                           "in-distribution slices, which the run does not have)", where)
    lora = {key: numbers.pop(key) for key in ("rank", "alpha") if key in numbers}
    if "train_bias" in value:
        lora["train_bias"] = value["train_bias"]
    if "targets" in value:
        targets = value["targets"]
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not all(
                isinstance(t, str) for t in targets):
            raise SettingError(f"{where}.targets: expected a list of regular expressions, got {targets!r}", where)
        lora["targets"] = tuple(targets)
    try:
        settings = AdaptConfig(lora=LoraConfig(**lora), **numbers)
    except ValueError as err:
        message = str(err)
        if message.startswith(("adapt: ", "lora: ")):  # a check across keys
            raise SettingError(f"{where}: {message.split(': ', 1)[1]}", where) from None
        raise SettingError(f"{where}.{message.removeprefix('adapt.').removeprefix('lora.')}", where) from None
    return AdaptSection(enabled=enabled, settings=settings, adapter=None if adapter is None else str(adapter))


@dataclass(frozen=True)
class AdapterSnapshot:
    """The adapter at the end of a run (handed to the last step's callback).

    Attributes
    ----------
    weights : ``{name: float32 CPU tensor}``, :func:`~mbir_batch.kernels.lora.lora_state_dict`.
    lora : the LoRA layout (:class:`~mbir_batch.kernels.lora.LoraConfig`).
    rounds : adaptation rounds this run took (a resumed run counts the earlier ones too).
    adam_steps : AdamW steps in all.
    start : the adapter file it started from, or None.
    """

    weights: dict[str, Any]
    lora: Any
    rounds: int
    adam_steps: int
    start: str | None


class Adaptation:
    """LoRA adaptation during one method run on one slab (see the module docstring).

    Parameters
    ----------
    section : the method's ``adapt:`` section (``in_use``).
    denoiser : the run's denoiser; it is copied, never changed (``lam: auto`` and other runs keep
        the base network).
    problem : the slab.
    comm : the run's communicator (every rank builds its Adaptation together: a resumed run's
        state is all-reduced).
    seed : the method's seed (slice choice of the rounds).
    sigmas : the sampler's schedule (the rounds' window).
    aux : the starting state's aux; :data:`STATE_KEY` is taken out of it.
    start : the first sampler step of this run (> 0: a resumed run, whose state rank 0 holds).
    """

    def __init__(self, section: AdaptSection, denoiser: Any, problem: Any, comm: Any, *, seed: int, sigmas: Any,
                 aux: dict[str, Any], start: int) -> None:
        from ..kernels.adapt import adaptation_steps, make_optimizer
        from ..kernels.adapter_file import read_adapter
        from ..kernels.lora import inject_lora, lora_parameters

        self.section, self.problem, self.comm = section, problem, comm
        start_adapter = read_adapter(section.adapter) if section.adapter is not None else None
        lora = start_adapter.lora if start_adapter is not None else section.settings.lora
        self.cfg = dataclasses.replace(section.settings, lora=lora, seed=seed)
        self.model = copy.deepcopy(denoiser)
        inject_lora(self.model, lora)
        self.params = lora_parameters(self.model)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.plan = set(adaptation_steps(sigmas, self.cfg)) if section.enabled else set()
        self.rounds = self.adam_steps = 0
        self.seconds, self.loss = 0.0, float("nan")
        packed = aux.pop(STATE_KEY, None)
        if start > 0:
            self._restore(packed, start)
        elif start_adapter is not None:
            from ..kernels.lora import load_lora_state_dict

            load_lora_state_dict(self.model, start_adapter.weights, source=section.adapter)

    # -- the sampler hook ------------------------------------------------------------------

    def before_step(self, step: int, x: Any, sigma: float) -> None:
        """A round of :func:`~mbir_batch.kernels.adapt.adapt_round` before the denoiser of a planned step."""
        if step not in self.plan:
            return
        from ..kernels.adapt import adapt_round

        started = time.perf_counter()
        info = adapt_round(self.model, self.optimizer, x, sigma, step=step, first_slice=self.problem.z0,
                           depth=self.problem.depth, operator=self.problem.operator, y=self.problem.measurements,
                           cfg=self.cfg, all_reduce=self.comm.all_reduce_sum)
        self.rounds += 1
        self.adam_steps += len(info.losses)
        self.loss = info.losses[-1]
        self.seconds += time.perf_counter() - started

    @property
    def info(self) -> dict[str, float]:
        """Step-event info: ``adapt_rounds``, ``adapt_s`` (this run's seconds in rounds) and
        ``adapt_loss`` (the data term before the last AdamW step)."""
        return {"adapt_rounds": float(self.rounds), "adapt_s": self.seconds, "adapt_loss": self.loss}

    # -- state -----------------------------------------------------------------------------

    def aux(self) -> dict[str, Any]:
        """``{STATE_KEY: packed}`` on rank 0, ``{}`` elsewhere (the state is the same on every rank)."""
        return {STATE_KEY: self._pack()} if self.comm.rank == 0 else {}

    def snapshot(self) -> AdapterSnapshot:
        from ..kernels.lora import lora_state_dict

        return AdapterSnapshot(weights=lora_state_dict(self.model), lora=self.cfg.lora, rounds=self.rounds,
                               adam_steps=self.adam_steps, start=self.section.adapter)

    def _pack(self) -> Any:
        """[LoRA | AdamW exp_avg | exp_avg_sq | AdamW step | rounds | adam steps | active], float32 on the host.

        float32 holds the counters exactly (far below 2^24)."""
        import torch

        from ..kernels.lora import lora_active

        flat = [p.detach().float().cpu().reshape(-1) for _, p in self.params]
        moments = [self.optimizer.state.get(p, {}) for _, p in self.params]
        for key in ("exp_avg", "exp_avg_sq"):
            flat += [m[key].detach().float().cpu().reshape(-1) if m else torch.zeros(p.numel())
                     for m, (_, p) in zip(moments, self.params)]
        adam = float(moments[0]["step"]) if moments and moments[0] else 0.0
        tail = [adam, float(self.rounds), float(self.adam_steps), float(lora_active(self.model))]
        return torch.cat(flat + [torch.tensor(tail, dtype=torch.float32)])

    def _restore(self, packed: Any, start: int) -> None:
        """Every rank: the packed state rank 0 holds, handed over by one all-reduce, loaded exactly."""
        import torch

        from ..kernels.adapt import load_adapt_state
        from ..kernels.lora import set_lora_active

        sizes = [p.numel() for _, p in self.params]
        total = 3 * sum(sizes) + 4
        mine = self.comm.rank == 0 and packed is not None and packed.numel() == total
        buffer = packed.float().cpu().clone() if mine else torch.zeros(total)
        holder = torch.tensor([1.0 if mine else 0.0])
        device = self.problem.measurements.device
        holders = float(self.comm.all_reduce_sum(holder.to(device)).cpu()[0])
        if holders != 1.0:  # every rank raises together, before the state's all-reduce
            raise ValueError(f"adapt: the state at step {start} holds no adaptation state of this model's LoRA "
                             f"layout ({total} values); it is not a state of this adapt run")
        buffer = self.comm.all_reduce_sum(buffer.to(device)).cpu()
        lora, avg, avg_sq, tail = torch.split(buffer, [sum(sizes)] * 3 + [4])
        names = [name for name, _ in self.params]
        state = {}
        for prefix, part in (("lora.", lora), ("exp_avg.", avg), ("exp_avg_sq.", avg_sq)):
            state.update((prefix + name, t.view_as(p)) for name, t, (_, p) in
                         zip(names, torch.split(part, sizes), self.params))
        if float(tail[0]) > 0:
            state["adam_step"] = tail[0].clone()
        else:
            state = {k: v for k, v in state.items() if k.startswith("lora.")}
        load_adapt_state(self.model, self.optimizer, state, source=f"checkpoint of step {start}")
        set_lora_active(self.model, bool(tail[3] > 0))
        self.rounds, self.adam_steps = int(tail[1]), int(tail[2])


def weights_sha256(model: str | Path) -> str:
    """SHA-256 identifying a model's weights, for an adapter's ``base_sha256``.

    The own format: the weights file its card names (``.safetensors`` beside the ``.json``); a
    ``.pth`` / ``.pt`` checkpoint: the file itself; a diffusers folder: the SHA-256 of the
    sorted ``<relative path> <sha256>`` lines of its ``.safetensors`` / ``.bin`` files.
    """
    import hashlib
    import json

    from ..kernels.model_card import card_paths, card_weights, file_sha256

    path = Path(model)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))
        lines = "".join(f"{p.relative_to(path)} {file_sha256(p)}\n" for p in files)
        return hashlib.sha256(lines.encode()).hexdigest()
    card, _ = card_paths(path)
    if path.suffix in (".json", ".safetensors") or (not path.exists() and card.is_file()):
        return file_sha256(card_weights(card, json.loads(card.read_text())))
    return file_sha256(path)


def write_adapter(path: str | Path, snapshot: AdapterSnapshot, *, base_sha256: str,
                  provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``adapter.safetensors`` (atomically) and return its record for the output's attrs:
    ``file``, ``sha256``, ``base_sha256``, ``rank``, ``rounds``, ``adam_steps``, ``start``."""
    from ..kernels.adapter_file import save_adapter
    from ..kernels.model_card import file_sha256

    record = {"rounds": snapshot.rounds, "adam_steps": snapshot.adam_steps, "start": snapshot.start}
    written = save_adapter(path, snapshot.weights, snapshot.lora, base_sha256=base_sha256,
                           provenance={**provenance, **record})
    return {"file": Path(written).name, "sha256": file_sha256(Path(written)), "base_sha256": base_sha256,
            "rank": snapshot.lora.rank, **record}
