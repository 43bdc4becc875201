"""``mbir-batch model inspect`` and ``model convert`` through the CLI, on the pretrained fixtures."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from mbir_batch.cli import app
from mbir_batch.kernels.priors import load_denoiser
from typer.testing import CliRunner

PRETRAINED = Path(__file__).resolve().parents[1] / "fixtures" / "pretrained"
ADM, ADM_CONFIG = PRETRAINED / "adm-tiny" / "model.pt", PRETRAINED / "adm-tiny" / "AAPM32_tiny.yml"
NCSNPP = PRETRAINED / "ncsnpp-tiny" / "checkpoint.pth"
runner = CliRunner()


def cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.mark.parametrize("model, options, expected", [
    (ADM, ["--model-config", ADM_CONFIG], ["format: adm", "predicts: vp-epsilon", "parameters: 983,746",
                                           "resolution: 32x32", "data range: [0, 1]"]),
    (NCSNPP, [], ["format: score_sde", "predicts: ve-score", "resolution: 32x32", "weights: ema (W from model)"]),
], ids=["adm", "score_sde"])
def test_inspect_reports_the_fixture(model, options, expected):
    result = cli("model", "inspect", model, *options)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for line in expected:
        assert line in lines, (line, lines)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()  # independent of the loader's own hashing
    assert f"sha256 ({model.name}): {digest}" in lines


def test_convert_writes_a_model_that_denoises_identically(tmp_path):
    out = tmp_path / "converted"
    result = cli("model", "convert", NCSNPP, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"{out}.json" in result.stdout and f"{out}.safetensors" in result.stdout
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        original = load_denoiser(NCSNPP)(x, 0.3)
        converted = load_denoiser(out)(x, 0.3)
    assert torch.equal(original, converted)
    again = cli("model", "inspect", f"{out}.json")
    assert again.exit_code == 0 and "format: own" in again.stdout.splitlines()


@pytest.mark.parametrize("args, fragment", [
    (["model", "inspect", "missing.pt"], "missing.pt: model file not found"),
    (["model", "inspect", ADM, "--model-data-range", "1,0"], "--model-data-range: LO must be below HI"),
    (["model", "inspect", ADM, "--model-data-range", "a,b"], "--model-data-range: expected LO,HI"),
    (["model", "inspect", NCSNPP, "--model-config", "no-such-config"], "no-such-config: model config not found"),
    # the shipped full-size config is found by name and used strictly: the tiny checkpoint does not fit it
    (["model", "inspect", NCSNPP, "--model-config", "ncsnpp-aapm256"], "does not match the architecture"),
])
def test_inspect_errors_are_one_line(args, fragment):
    result = cli(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0] and "Traceback" not in result.output


def test_inspect_shows_an_adapters_base_model_and_rank(tmp_path):
    """#13 item 4: an adapter file is recognised by its header and shows what it adapts, at which rank."""
    from mbir_batch.kernels.adapter_file import save_adapter
    from mbir_batch.kernels.lora import LoraConfig, inject_lora

    model = load_denoiser(ADM, config=ADM_CONFIG)
    layers = inject_lora(model, LoraConfig(rank=2, alpha=4.0))
    base = hashlib.sha256(ADM.read_bytes()).hexdigest()
    path = save_adapter(tmp_path / "adapter.safetensors", model, LoraConfig(rank=2, alpha=4.0), base_sha256=base,
                        provenance={"volume": "ct.zarr"})
    result = cli("model", "inspect", path)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"base model weights sha256: {base}" in out and "rank: 2" in out and "alpha: 4.0 (scale 2)" in out
    assert f"layers: {len(layers)}," in out and "provenance volume: ct.zarr" in out
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:-100])
    broken = cli("model", "inspect", damaged)
    assert broken.exit_code == 2 and "Traceback" not in broken.output
