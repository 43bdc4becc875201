"""Tests for kernels/lora.py and kernels/adapt.py: LoRA on every loaded network, the adapter file,
the split-invariant slice choice and the distributed adaptation round (tiny networks)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from mbir_batch.kernels.adapt import (AdaptConfig, adapt_round, adapt_state, adaptation_steps, choose_slices,
                                      load_adapt_state, make_optimizer, slab_share)
from mbir_batch.kernels.denoiser import Denoiser, DenoiserConfig, DenoiserLoadError, save_denoiser
from mbir_batch.kernels.adapter_file import read_adapter, save_adapter
from mbir_batch.kernels.lora import (AdapterLoadError, LoraConfig, LoraLayer, inject_lora, load_lora_state_dict,
                                     lora_active, lora_parameters, lora_state_dict, set_lora_active)
from mbir_batch.kernels.model_card import read_model_card
from mbir_batch.kernels.mri import CartesianMRI
from mbir_batch.kernels.priors import load_denoiser

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pretrained"
RES, DEPTH, MEASUREMENTS = 16, 6, 96


@pytest.fixture(scope="module")
def own_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny own-format v1 model (the bundled architecture, random weights), saved once."""
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(resolution=RES, channels=(32, 32), norm_groups=8, attention_head_dim=8))
    json_path, _ = save_denoiser(model, tmp_path_factory.mktemp("own") / "tiny", {"data": "test"})
    return json_path


def load(path: Path) -> torch.nn.Module:
    return load_denoiser(path)


class DenseOperator:
    """y = M x per slice with a fixed random M (MEASUREMENTS, H W): a small differentiable A with its adjoint."""

    def __init__(self, shape: tuple[int, int], seed: int = 5) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.domain_shape, self.range_shape = shape, (MEASUREMENTS,)
        self.matrix = torch.randn(MEASUREMENTS, shape[0] * shape[1], generator=gen) / shape[0]

    def A(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1) @ self.matrix.T

    def AT(self, y: Tensor) -> Tensor:
        return (y @ self.matrix).reshape(y.shape[0], *self.domain_shape)


def problem(depth: int = DEPTH, sigma: float = 0.2) -> tuple[DenseOperator, Tensor, Tensor]:
    """(operator, x_t, y): a smooth random volume, its measurements, and a noisy sample of it."""
    gen = torch.Generator().manual_seed(3)
    truth = torch.nn.functional.avg_pool2d(torch.rand(depth, 1, RES + 4, RES + 4, generator=gen), 5, 1)[:, 0]
    operator = DenseOperator((RES, RES))
    return operator, truth + sigma * torch.randn(truth.shape, generator=gen), operator.A(truth)


# -- 1. zero-initialised LoRA is bit-identical, for every network the project loads ---------------

@pytest.mark.parametrize("which", ["own", "adm", "ncsnpp"])
def test_zero_init_lora_is_bit_identical_for_every_format(which: str, own_model_path: Path) -> None:
    path = {"own": own_model_path, "adm": FIXTURES / "adm-tiny" / "model.pt",
            "ncsnpp": FIXTURES / "ncsnpp-tiny" / "checkpoint.pth"}[which]
    base, adapted = load(path), load(path)
    names = inject_lora(adapted, LoraConfig(rank=2, train_bias=True))
    kinds = {type(adapted.get_submodule(n).base).__name__ for n in names}
    assert {"Conv2d", "Linear"} <= kinds, f"{which}: wrapped only {kinds}"
    attention = [block for block, module in base.named_modules()        # every format's attention too
                 if type(module).__name__ in ("Attention", "AttentionBlock", "AttnBlock")]
    assert attention and all(any(n.startswith(block + ".") for n in names) for block in attention), which
    res = base.resolution
    x = torch.rand(2, 1, res, res, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = base(x, 0.3)
        assert not lora_active(adapted)
        assert torch.equal(adapted(x, 0.3), want)          # branch skipped
        set_lora_active(adapted, True)
        assert torch.equal(adapted(x, 0.3), want)          # branch computed, B = 0
    adapted(x, 0.3).square().sum().backward()              # ... and B gets a gradient through it
    assert any(bool(p.grad.abs().sum() > 0) for n, p in lora_parameters(adapted) if n.endswith("up.weight"))


@pytest.mark.parametrize("which", ["own", "adm", "ncsnpp"])
def test_merged_weights_without_autograd_match_the_branch(which: str, own_model_path: Path) -> None:
    """The sampler's path (no autograd: one call with W + s B A, b + delta_b) gives the adaptation
    loss's path (autograd: base + s up(down(x)) + delta_b) up to float32 rounding, every layer kind."""
    path = {"own": own_model_path, "adm": FIXTURES / "adm-tiny" / "model.pt",
            "ncsnpp": FIXTURES / "ncsnpp-tiny" / "checkpoint.pth"}[which]
    model = load(path)
    names = inject_lora(model, LoraConfig(rank=3, alpha=6.0, train_bias=True))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, param in lora_parameters(model):
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    set_lora_active(model, True)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 1, model.resolution, model.resolution, generator=gen)
    calls: list[str] = []
    for name in names:
        model.get_submodule(name).down.register_forward_hook(lambda *_, n=name: calls.append(n))
    with torch.no_grad():
        merged = model(x, 0.3)
        assert not torch.allclose(merged, load(path)(x, 0.3), atol=1e-3)    # the adapter does act
    assert calls == []                                                      # ... through merged weights
    branch = model(x, 0.3).detach()
    assert set(calls) == set(names)                                         # autograd: every branch runs
    torch.testing.assert_close(merged, branch, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # merging writes nothing
    kinds = {type(model.get_submodule(n).base).__name__ for n in names}
    assert "Conv2d" in kinds and (which != "ncsnpp" or "NIN" in kinds), kinds


# -- 2. only LoRA trains; an adaptation round leaves the base weights alone ----------------------

def test_only_lora_parameters_train_and_the_base_is_unchanged(own_model_path: Path) -> None:
    model = load(own_model_path)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    names = inject_lora(model, LoraConfig(rank=2, train_bias=True))
    assert len(names) > 10 and all(isinstance(model.get_submodule(n), LoraLayer) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora_parameters(model)}
    operator, x, y = problem()
    cfg = AdaptConfig(lr=1e-2, steps=2, slices=3, lora=LoraConfig(rank=2, train_bias=True))
    adapt_round(model, make_optimizer(model, cfg), x, 0.2, step=0, first_slice=0, depth=DEPTH,
                operator=operator, y=y, cfg=cfg)
    after = model.state_dict()
    for key, value in base_before.items():
        wrapped = key.rsplit(".", 1)
        key_after = key if key in after else f"{wrapped[0]}.base.{wrapped[1]}"
        assert torch.equal(after[key_after], value), key
    assert any(bool(v.abs().sum() > 0) for k, v in lora_state_dict(model).items() if k.endswith("up.weight"))


# -- 3. the adapter file ------------------------------------------------------------------------

def test_adapter_round_trip_and_refusals(own_model_path: Path, tmp_path: Path) -> None:
    sha = read_model_card(own_model_path)["weights_sha256"]
    lora = LoraConfig(rank=3, alpha=6.0, train_bias=True, seed=4)
    model = load(own_model_path)
    inject_lora(model, lora)
    operator, x, y = problem()
    cfg = AdaptConfig(steps=2, slices=2, lora=lora)
    adapt_round(model, make_optimizer(model, cfg), x, 0.2, step=1, first_slice=0, depth=DEPTH,
                operator=operator, y=y, cfg=cfg)
    path = save_adapter(tmp_path / "adapter.safetensors", model, lora, base_sha256=sha, provenance={"run": "t"})

    adapter = read_adapter(path, base_sha256=sha, rank=3)
    saved = lora_state_dict(model)
    assert adapter.lora == lora and adapter.base_sha256 == sha and adapter.provenance == {"run": "t"}
    assert set(adapter.weights) == set(saved) and all(torch.equal(adapter.weights[k], v) for k, v in saved.items())
    fresh = load(own_model_path)
    inject_lora(fresh, adapter.lora)
    load_lora_state_dict(fresh, adapter.weights, source=str(path))
    assert all(torch.equal(saved[k], v) for k, v in lora_state_dict(fresh).items())
    probe = torch.rand(2, 1, RES, RES, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(probe, 0.1), fresh(probe, 0.1))

    def refused(match: str, call) -> None:
        with pytest.raises(AdapterLoadError, match=match) as info:
            call()
        assert isinstance(info.value, DenoiserLoadError) and "\n" not in str(info.value)

    refused("sha256", lambda: read_adapter(path, base_sha256="0" * 64))
    refused("rank is 3", lambda: read_adapter(path, rank=8))
    other_rank = load(own_model_path)
    inject_lora(other_rank, LoraConfig(rank=8, train_bias=True))
    refused("shape", lambda: load_lora_state_dict(other_rank, adapter.weights, source=str(path)))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused("truncated.safetensors", lambda: read_adapter(truncated))
    refused("not found", lambda: read_adapter(tmp_path / "missing.safetensors"))


# -- 4. the slice choice is split-invariant -------------------------------------------------------

@pytest.mark.parametrize("pieces", [1, 2, 3, 5])
def test_choose_slices_depends_on_global_indices_only(pieces: int, bounds) -> None:
    depth, count = 37, 5
    for draw in range(20):
        chosen = choose_slices(11, draw, depth, count)
        assert chosen == sorted(set(chosen)) and len(chosen) == count and all(0 <= z < depth for z in chosen)
        taken = []
        for z0, z1 in bounds(depth, pieces):
            share = slab_share(chosen, z0, z1 - z0)
            assert [z0 + local for _, local in share] == [z for z in chosen if z0 <= z < z1]
            taken += [(row, z0 + local) for row, local in share]
        assert taken == list(enumerate(chosen))      # every chosen slice exactly once, in order
    assert choose_slices(11, 3, depth, count) != choose_slices(11, 4, depth, count)
    assert choose_slices(11, 3, depth, count) != choose_slices(12, 3, depth, count)
    assert choose_slices(0, 0, 3, 4) == [0, 1, 2]
    picks = torch.tensor([z for d in range(400) for z in choose_slices(0, d, 16, 2)])
    counts = torch.bincount(picks, minlength=16)
    assert int(counts.min()) > 25 and int(counts.max()) < 75    # uniform: 50 expected per slice


def test_adaptation_steps_follow_the_window_and_every() -> None:
    sigmas = [10.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.01, 0.0]
    assert adaptation_steps(sigmas, AdaptConfig(sigma_start=1.0, sigma_end=0.05, every=2)) == [2, 4, 6]
    assert adaptation_steps(sigmas, AdaptConfig(sigma_start=1.0, sigma_end=0.05, every=1)) == [2, 3, 4, 5, 6]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"steps": 0}, "adapt.steps"), ({"lr": -1.0}, "adapt.lr"), ({"slices": 2.5}, "adapt.slices"),
    ({"sigma_start": 0.1, "sigma_end": 0.5}, "sigma_end"), ({"reg": float("nan")}, "adapt.reg"),
])
def test_bad_adapt_config_is_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        AdaptConfig(**kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="lora.rank"):
        LoraConfig(rank=0)


# -- 5. the round split over 2 and 3 simulated ranks equals one rank ------------------------------

@pytest.mark.parametrize("pieces", [2, 3])
def test_split_round_gives_the_weights_of_one_rank(pieces: int, own_model_path: Path, sharded, bounds) -> None:
    lora = LoraConfig(rank=2, train_bias=True)
    cfg = AdaptConfig(lr=3e-3, steps=2, slices=4, cg=1, reg=0.5, lora=lora)
    operator, x, y = problem()
    bank = torch.rand(3, RES, RES, generator=torch.Generator().manual_seed(9))

    def run(z0: int, z1: int, all_reduce) -> dict[str, Tensor]:
        model = load(own_model_path)
        inject_lora(model, lora)
        optimizer = make_optimizer(model, cfg)
        for step in (3, 4):
            adapt_round(model, optimizer, x[z0:z1], 0.2, step=step, first_slice=z0, depth=DEPTH, operator=operator,
                        y=y[z0:z1], cfg=cfg, bank=bank, all_reduce=all_reduce)
        return lora_state_dict(model)

    one = run(0, DEPTH, lambda t: t)
    cuts = bounds(DEPTH, pieces)
    for state in sharded(lambda comm: run(*cuts[comm.rank], comm.all_reduce_sum), pieces):
        assert set(state) == set(one)
        worst = max(float((state[k] - one[k]).abs().max()) for k in one)
        assert worst <= 1e-6, f"{pieces} ranks: LoRA weights differ by {worst}"
        # per-slice gradient rows make it exact; a local sum before the all-reduce gave 5e-7 here
        assert all(torch.equal(state[k], one[k]) for k in one), f"{pieces} ranks: not bit-identical ({worst})"
    assert any(bool(v.abs().sum() > 0) for k, v in one.items() if k.endswith("up.weight"))


# -- 6. a round lowers the data loss ----------------------------------------------------------------

def test_round_lowers_the_data_loss(own_model_path: Path) -> None:
    operator, x, y = problem(depth=4)
    sigma = 0.2

    def data_loss(model) -> float:
        """(1 / Z) sum_z mean_m (A D(x_z, sigma) - y_z)_m^2, slice by slice, no autograd."""
        with torch.no_grad():
            x0 = torch.cat([model(x[z].reshape(1, 1, RES, RES), sigma)[:, 0] for z in range(x.shape[0])])
        return float((operator.A(x0) - y).square().mean())

    model = load(own_model_path)
    inject_lora(model, LoraConfig(rank=4))
    before = data_loss(model)
    cfg = AdaptConfig(lr=3e-3, steps=6, slices=4, cg=0)
    info = adapt_round(model, make_optimizer(model, cfg), x, sigma, step=0, first_slice=0, depth=4,
                       operator=operator, y=y, cfg=cfg)
    assert info.losses[0] == pytest.approx(before, rel=1e-5)     # the round's loss is this loss
    assert info.forwards == info.backwards == 6 * 4
    after = data_loss(model)
    assert after < before, f"data loss {before:.5g} -> {after:.5g}"


# -- resume: LoRA weights and AdamW state from a checkpoint continue exactly -----------------------

def test_resumed_adaptation_is_identical(own_model_path: Path) -> None:
    lora = LoraConfig(rank=2, train_bias=True)
    cfg = AdaptConfig(lr=3e-3, steps=2, slices=3, lora=lora)
    operator, x, y = problem()

    def start() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = load(own_model_path)
        inject_lora(model, lora)
        return model, make_optimizer(model, cfg)

    def round_at(model, optimizer, step: int) -> None:
        adapt_round(model, optimizer, x, 0.2, step=step, first_slice=0, depth=DEPTH, operator=operator, y=y, cfg=cfg)

    straight, straight_opt = start()
    for step in (3, 4):
        round_at(straight, straight_opt, step)
    killed, killed_opt = start()
    round_at(killed, killed_opt, 3)
    on_disk = {k: v.numpy().copy() for k, v in adapt_state(killed, killed_opt).items()}   # a checkpoint holds numpy
    assert "adam_step" in on_disk and any(k.startswith("exp_avg_sq.") for k in on_disk)
    resumed, resumed_opt = start()
    load_adapt_state(resumed, resumed_opt, {k: torch.from_numpy(v) for k, v in on_disk.items()})
    round_at(resumed, resumed_opt, 4)
    want, got = lora_state_dict(straight), lora_state_dict(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(AdapterLoadError, match="ckpt: no AdamW moment"):
        load_adapt_state(*start(), {k: torch.from_numpy(v) for k, v in on_disk.items()
                                    if not k.startswith("exp_avg.")}, source="ckpt")


def test_per_slice_mri_masks_are_used_slice_by_slice(own_model_path: Path) -> None:
    """A (Z, H, W) k-space mask: each slice's loss uses its own mask (complex residuals, real and imaginary)."""
    gen = torch.Generator().manual_seed(4)
    depth, sigma = 3, 0.2
    operator = CartesianMRI(torch.rand(depth, RES, RES, generator=gen) < 0.4)
    truth = torch.rand(depth, RES, RES, generator=gen)
    x, y = truth + sigma * torch.randn(truth.shape, generator=gen), operator.A(truth)
    model = load(own_model_path)
    inject_lora(model, LoraConfig(rank=2))
    with torch.no_grad():
        x0 = torch.cat([model(x[z].reshape(1, 1, RES, RES), sigma)[:, 0] for z in range(depth)])
    residual = torch.view_as_real(operator.A(x0) - y)
    want = float(residual.square().mean(dim=(1, 2, 3)).mean())
    cfg = AdaptConfig(lr=1e-3, steps=1, slices=depth, cg=0)
    info = adapt_round(model, make_optimizer(model, cfg), x, sigma, step=0, first_slice=0, depth=depth,
                       operator=operator, y=y, cfg=cfg)
    assert info.losses[0] == pytest.approx(want, rel=1e-5)
