"""The CLI end to end on a 32^3 phantom: simulate -> submit (through Ray) -> report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr
from typer.testing import CliRunner

from mbir_batch.cli import app
from mbir_batch.dataset import open_dataset
from mbir_batch.output import is_complete, open_output

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_simulate_submit_report_end_to_end(ray_session, tmp_path):
    data = tmp_path / "ct.zarr"
    invoke("simulate", "--phantom", 9004, "--size", 32, "--task", "svct", "--views", 8, "--out", data)
    dataset = open_dataset(data)
    assert dataset.meta.volume_shape == (32, 32, 32) and len(dataset.meta.geometry["angles_deg"]) == 8

    outputs = []
    for method in ("fbp", "admm-tv"):
        out = tmp_path / f"ct.{method}.zarr"
        invoke("submit", data, "--method", method, "--out", out, "--workers", 2, "--steps", 30)
        assert is_complete(out)
        store = open_output(out)
        assert store.attrs["method"] == method and store.attrs["complete"] is True
        assert "metrics" in json.dumps(dict(store.attrs))
        outputs.append(out)

    png, table = tmp_path / "report.png", tmp_path / "report.md"
    result = invoke("report", *outputs, "--png", png, "--markdown", table)
    assert png.stat().st_size > 10_000
    rows = {line.split("|")[1].strip(): line for line in table.read_text().splitlines()[2:]}
    assert set(rows) == {"FBP", "ADMM-TV"}
    psnr = {name: [float(c) for c in row.split("|")[2:5]] for name, row in rows.items()}
    assert all(a > f for a, f in zip(psnr["ADMM-TV"], psnr["FBP"]))
    assert "ADMM-TV" in result.output

    # The input store is untouched by all of it: no new arrays, attrs unchanged.
    group = zarr.open_group(str(data), mode="r")
    assert sorted(group.array_keys()) == ["reference", "sinogram"]
    reference = np.asarray(group["reference"])
    assert np.allclose(reference, open_output(outputs[1]).read_volume(), atol=0.5)


def test_submit_refuses_a_complete_output_without_overwrite(ray_session, tmp_path):
    data = tmp_path / "ct.zarr"
    invoke("simulate", "--phantom", 9005, "--size", 16, "--depth", 8, "--out", data)
    out = tmp_path / "out.zarr"
    invoke("submit", data, "--method", "fbp", "--out", out)
    again = runner.invoke(app, ["submit", str(data), "--method", "admm-tv", "--out", str(out)])
    assert again.exit_code == 2
    assert str(out) in again.output and "Traceback" not in again.output


PRETRAINED = Path(__file__).resolve().parents[1] / "fixtures" / "pretrained"
ADM, ADM_CONFIG = PRETRAINED / "adm-tiny" / "model.pt", PRETRAINED / "adm-tiny" / "AAPM32_tiny.yml"


def test_submit_runs_dds_with_an_adm_checkpoint(ray_session, tmp_path):
    """#14: `submit --model model.pt --model-config AAPM32_tiny.yml` through Ray equals the adapter run in-process."""
    import torch

    from mbir_batch.config import load_config
    from mbir_batch.kernels.comm import LocalComm
    from mbir_batch.kernels.priors import load_denoiser
    from mbir_batch.solve import SlabProblem, reconstruct

    data, out = tmp_path / "ct32.zarr", tmp_path / "ct32.dds.zarr"
    invoke("simulate", "--phantom", 9006, "--size", 32, "--depth", 8, "--views", 8, "--out", data)
    result = invoke("submit", data, "--method", "dds", "--steps", 3, "--model", ADM, "--model-config", ADM_CONFIG,
                    "--out", out)
    assert "complete" in result.output
    store = open_output(out)
    assert store.attrs["model"] == str(ADM) and store.attrs["model_config"] == str(ADM_CONFIG)
    assert store.attrs["job"]["model"] == str(ADM.resolve())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one CPU worker ran it
    try:
        dataset = open_dataset(data)
        expected = reconstruct(SlabProblem.from_dataset(dataset, 0, 8), load_config("svct-8view", "dds", steps=3),
                               comm=LocalComm(), denoiser=load_denoiser(ADM, config=ADM_CONFIG))
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(store.read_volume(), expected.numpy())


def test_an_adm_checkpoint_of_another_size_is_one_line_before_ray(ct_dataset, tmp_path):
    out = tmp_path / "o.zarr"
    result = runner.invoke(app, ["submit", str(ct_dataset), "--method", "dds", "--model", str(ADM),
                                 "--model-config", str(ADM_CONFIG), "--out", str(out)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"{ADM}: the denoiser was trained on 32x32 slices" in lines[0] and "16x16" in lines[0]
    assert not out.exists()


def test_submit_opens_each_dataset_once_in_the_driver(ray_session, tmp_path, monkeypatch):
    """#12: the CLI opens (and verifies) each dataset once; the plan, the output and the scores reuse it."""
    import zarr as zarr_module

    data = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    for seed, path in zip((9007, 9008), data):
        invoke("simulate", "--phantom", seed, "--size", 16, "--depth", 8, "--out", path)
    opened: list[str] = []
    real_open = zarr_module.open_group

    def counting_open(store=None, *args, **kwargs):
        opened.append(str(Path(store).resolve()) if isinstance(store, (str, Path)) else repr(store))
        return real_open(store, *args, **kwargs)

    monkeypatch.setattr(zarr_module, "open_group", counting_open)
    invoke("submit", *data, "--method", "admm-tv", "--steps", 2)
    for path in data:
        assert opened.count(str(path.resolve())) == 1, opened
        assert is_complete(path.with_name(path.name.replace(".zarr", ".admm-tv.zarr")))
