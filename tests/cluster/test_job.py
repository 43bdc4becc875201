"""End to end on CPU: run_jobs with 1, 2 and 3 slab workers agree; a killed worker is restarted."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mbir_batch.cluster.group import ProgressEvent
from mbir_batch.cluster.job import run_jobs
from mbir_batch.cluster.plan import JobSpec
from mbir_batch.cluster.plan import ShardPlanError
from mbir_batch.config import load_config
from mbir_batch.errors import OutputError, UserError
from mbir_batch.locking import lock_path
from mbir_batch.output import OutputStore, output_status


def _volume(path) -> np.ndarray:
    return OutputStore.open(path, mode="r").read_volume()


def _check_provenance(path, cfg, workers: int) -> None:
    store = OutputStore.open(path, mode="r")
    attrs = store.attrs
    assert store.complete and attrs["method"] == cfg.method and attrs["seed"] == cfg.seed
    assert attrs["config"] == cfg.to_dict() and attrs["version"]
    assert set(attrs["metrics"]) == {"axial", "coronal", "sagittal"}
    assert attrs["timings"]["solve_s"] > 0 and len(attrs["slabs"]) == workers and attrs["restarts"] == 0
    assert not list(store._group["state"].groups())  # checkpoints are dropped once complete


def test_admm_tv_one_two_three_workers_agree(admm_runs, admm_cfg):
    volumes = {workers: _volume(path) for workers, path in admm_runs.items()}
    assert np.isfinite(volumes[1]).all() and np.abs(volumes[1]).max() > 0
    for workers, path in admm_runs.items():
        _check_provenance(path, admm_cfg, workers)
        np.testing.assert_array_equal(volumes[workers], volumes[1])  # bit-identical on CPU


def test_dds_one_two_three_workers_agree(ray_session, ct_dataset, tiny_denoiser, tmp_path):
    cfg = load_config("svct-8view", "dds", steps=3, cg_iters=5)
    outputs = {workers: tmp_path / f"dds-{workers}.zarr" for workers in (1, 2, 3)}
    run_jobs([JobSpec(ct_dataset, out, cfg, tiny_denoiser, workers=w) for w, out in outputs.items()],
             checkpoint_every=2)
    volumes = {workers: _volume(path) for workers, path in outputs.items()}
    assert np.isfinite(volumes[1]).all()
    for workers, path in outputs.items():
        _check_provenance(path, cfg, workers)
        np.testing.assert_array_equal(volumes[workers], volumes[1])  # bit-identical on CPU


def test_lam_auto_is_split_invariant_and_recorded(ray_session, ct_dataset, tiny_denoiser, tmp_path):
    """lam: auto through the Ray job: 1 and 2 workers choose the same weight and give the same volume,
    and the choice is in the provenance attrs and the completion line."""
    cfg = load_config("svct-8view", "dds", steps=3, cg_iters=5, lam="auto")
    outputs = {workers: tmp_path / f"auto-{workers}.zarr" for workers in (1, 2)}
    said: list[str] = []
    run_jobs([JobSpec(ct_dataset, out, cfg, tiny_denoiser, workers=w) for w, out in outputs.items()],
             checkpoint_every=2, message=said.append)
    choices = [OutputStore.open(path, mode="r").attrs["lam_auto"] for path in outputs.values()]
    assert choices[0] == {**choices[1], "lam_auto_s": choices[0]["lam_auto_s"]}
    lam = choices[0]["lam"]
    assert min(float(k[len("lam_cv_error["):-1]) for k in choices[0] if k.startswith("lam_cv_error[")) <= lam
    np.testing.assert_array_equal(_volume(outputs[2]), _volume(outputs[1]))
    assert sum(f"lam {lam:.4g} chosen by lam: auto" in line for line in said) == 2


ADAPT = {"sigma_start": 10.0, "sigma_end": 0.001, "every": 1, "steps": 2, "slices": 4, "lr": 0.01, "rank": 2}


def test_adaptation_survives_a_killed_worker_and_keeps_its_adapter(ray_session, ct_dataset, tiny_denoiser, tmp_path):
    """Test-time adaptation through the Ray job: 2 workers, one killed after the first checkpoint,
    give the volume and adapter of 1 worker; the adapter is kept beside the volume, recorded in the
    attrs and the completion line, and a later run reuses it."""
    from mbir_batch.kernels.adapter_file import read_adapter
    from mbir_batch.methods.adaptation import weights_sha256

    ray = ray_session
    cfg = load_config("svct-8view", "dds", steps=4, cg_iters=5, adapt=ADAPT)
    one, two = tmp_path / "adapt1.zarr", tmp_path / "adapt2.zarr"
    said: list[str] = []
    run_jobs([JobSpec(ct_dataset, one, cfg, tiny_denoiser)], workers=1, message=said.append)
    killed: list[int] = []

    def kill_rank1_after_first_checkpoint(event: ProgressEvent) -> None:
        if not killed and event.checkpoint_step is not None and event.phase == "running":
            ray.kill(ray.get_actor("mbir:tiny:adapt2:slab1[z16-24]", namespace="mbir-batch"), no_restart=True)
            killed.append(event.checkpoint_step)

    [summary] = run_jobs([JobSpec(ct_dataset, two, cfg, tiny_denoiser)], workers=2, checkpoint_every=1,
                         progress=kill_rank1_after_first_checkpoint, poll_s=0.05, message=said.append)
    assert killed and summary["restarts"] == 1 and summary["resumed_from"] >= killed[0]
    np.testing.assert_array_equal(_volume(two), _volume(one))
    base = weights_sha256(tiny_denoiser)
    kept = [read_adapter(path / "adapter.safetensors", base_sha256=base) for path in (one, two)]
    assert kept[0].weights.keys() == kept[1].weights.keys()
    assert all(torch.equal(kept[0].weights[k], kept[1].weights[k]) for k in kept[0].weights)
    record = OutputStore.open(two, mode="r").attrs["adapter"]
    assert record["file"] == "adapter.safetensors" and record["base_sha256"] == base and record["rank"] == 2
    assert record["rounds"] == kept[1].provenance["rounds"] >= 3 and record["start"] is None
    assert sum(f"prior adapted in {record['rounds']} rounds, adapter.safetensors kept" in line for line in said) == 2
    # the next volume from the same scanner starts from it; --no-adapt uses it as it is
    reuse = cfg.replace(adapt={**cfg.adapt.to_dict(), "enabled": False, "adapter": str(one / "adapter.safetensors")})
    run_jobs([JobSpec(ct_dataset, tmp_path / "reuse.zarr", reuse, tiny_denoiser)], message=said.append)
    attrs = OutputStore.open(tmp_path / "reuse.zarr", mode="r").attrs
    assert attrs["adapter"]["rounds"] == 0 and attrs["adapter"]["start"] == str(one / "adapter.safetensors")
    assert f"prior adapted by {one / 'adapter.safetensors'}" in said[-1]


def test_an_adapter_for_another_model_is_refused_before_ray(ct_dataset, tiny_denoiser, tmp_path, monkeypatch):
    from mbir_batch.kernels.denoiser import Denoiser, DenoiserConfig
    from mbir_batch.kernels.adapter_file import save_adapter
    from mbir_batch.kernels.lora import LoraConfig, inject_lora

    other = Denoiser(DenoiserConfig(resolution=16, channels=(8, 16), layers_per_block=1, norm_groups=4,
                                    attention_levels=(False, False)))
    inject_lora(other, LoraConfig(rank=2))
    save_adapter(tmp_path / "other.safetensors", other, LoraConfig(rank=2), base_sha256="0" * 64)
    monkeypatch.setattr("mbir_batch.cluster.job.ray", None)  # reaching Ray would be an AttributeError
    cfg = load_config("svct-8view", "dds", adapt={"adapter": str(tmp_path / "other.safetensors")})
    with pytest.raises(UserError, match=r"other\.safetensors: made for the base model with weights sha256 000000"):
        run_jobs([JobSpec(ct_dataset, tmp_path / "never.zarr", cfg, tiny_denoiser)])
    assert not (tmp_path / "never.zarr").exists()


def test_killed_worker_restarts_from_checkpoint(ray_session, ct_dataset, admm_runs, admm_cfg, tmp_path):
    ray = ray_session
    out = tmp_path / "killed.zarr"
    killed: list[int] = []

    def kill_rank1_after_first_checkpoint(event: ProgressEvent) -> None:
        if not killed and event.checkpoint_step is not None and event.phase == "running":
            ray.kill(ray.get_actor("mbir:tiny:killed:slab1[z16-24]", namespace="mbir-batch"), no_restart=True)
            killed.append(event.checkpoint_step)

    [summary] = run_jobs([JobSpec(ct_dataset, out, admm_cfg)], workers=2, checkpoint_every=2,
                         progress=kill_rank1_after_first_checkpoint, poll_s=0.05)
    assert killed, "the run finished before the test could kill a worker"
    assert summary["restarts"] == 1 and summary["resumed_from"] >= killed[0]
    np.testing.assert_array_equal(_volume(out), _volume(admm_runs[2]))


def test_bad_requests_fail_before_anything_is_written(ray_session, ct_dataset, admm_cfg, tmp_path):
    out = tmp_path / "never.zarr"
    with pytest.raises(ShardPlanError, match="at most 3"):
        run_jobs([JobSpec(ct_dataset, out, admm_cfg)], workers=4)
    with pytest.raises(UserError, match="GPUs were requested .* has none"):
        run_jobs([JobSpec(ct_dataset, out, admm_cfg)], workers=1, gpus_per_worker=1)
    with pytest.raises(UserError, match="named twice"):
        run_jobs([JobSpec(ct_dataset, out, admm_cfg)] * 2)
    assert output_status(out) == "missing"


def test_complete_output_is_skipped_or_refused(admm_runs, admm_cfg, ct_dataset):
    [again] = run_jobs([JobSpec(ct_dataset, admm_runs[1], admm_cfg)], workers=1)
    assert again["status"] == "skipped"
    with pytest.raises(OutputError, match="another method/config"):
        run_jobs([JobSpec(ct_dataset, admm_runs[1], load_config("svct-8view", "fbp"))], workers=1)


def test_worker_exception_is_reported_with_its_traceback(ray_session, ct_dataset, tiny_denoiser, tmp_path):
    cfg = load_config("svct-8view", "dds", steps=2)
    with pytest.raises(UserError, match="needs a denoiser model"):
        run_jobs([JobSpec(ct_dataset, tmp_path / "no-model.zarr", cfg)])
    # A card that passes the pre-launch check (format, sha256, resolution) but names another
    # architecture than its weights: only building the network finds it, inside the workers.
    card = json.loads(Path(tiny_denoiser).read_text())
    card["config"]["layers_per_block"] = 2
    model = tmp_path / "mismatched.json"
    model.write_text(json.dumps(card))
    shutil.copy(Path(tiny_denoiser).with_suffix(".safetensors"), tmp_path / card["weights"])
    with pytest.raises(RuntimeError, match="mismatched") as failure:
        run_jobs([JobSpec(ct_dataset, tmp_path / "bad-model.zarr", cfg, model)], workers=1)
    assert "DenoiserLoadError" in str(failure.value) and "worker traceback" in str(failure.value)
    assert "load_denoiser" in str(failure.value)
    assert output_status(tmp_path / "bad-model.zarr") == "incomplete"


def _corrupt_weights(model: Path, folder: Path) -> Path:
    card = json.loads(model.read_text())
    copy = folder / "corrupt.json"
    copy.write_text(json.dumps(card))
    weights = bytearray(model.with_suffix(".safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (folder / card["weights"]).write_bytes(bytes(weights))
    return copy


def test_a_model_that_cannot_work_is_refused_before_ray(ct_dataset, make_ct, tiny_denoiser, tmp_path, monkeypatch):
    """Wrong slice size, damaged card, corrupted weights: one ModelError, before any lock, output or Ray."""
    from mbir_batch.cluster import job
    from mbir_batch.errors import ModelError

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the model was checked")

    monkeypatch.setattr(job, "connect", no_ray)
    cfg = load_config("svct-8view", "dds", steps=2)
    wide = tmp_path / "wide.zarr"
    make_ct(wide, depth=8, size=24)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"format": "mbir-batch-denoiser", ')
    cases = {
        "24x24 slices": (wide, tiny_denoiser, r"trained on 16x16 slices, but .*wide.zarr has 24x24 slices; "
                                               r"train a model of that size \(mbir-batch train --resolution 24"),
        "bad card": (ct_dataset, bad_json, r"bad.json: not valid JSON"),
        "corrupt": (ct_dataset, _corrupt_weights(Path(tiny_denoiser), tmp_path), r"corrupted \(its sha256"),
        "missing": (ct_dataset, tmp_path / "missing.json", r"missing.json: denoiser description file not found"),
    }
    for name, (dataset, model, message) in cases.items():
        out = tmp_path / f"{name}.zarr"
        with pytest.raises(ModelError, match=message) as info:
            run_jobs([JobSpec(dataset, out, cfg, model)])
        assert "--method admm-tv" in str(info.value) and "\n" not in str(info.value), name
        assert output_status(out) == "missing" and not lock_path(out).exists(), name


def test_restart_after_a_death_falls_back_past_a_damaged_checkpoint(ray_session, ct_dataset, admm_runs, admm_cfg,
                                                                    tmp_path):
    """A worker dies after the newest recorded checkpoint was damaged: the restart resumes from the one before."""
    ray = ray_session
    out = tmp_path / "damaged.zarr"
    recorded: list[int] = []
    said = io.StringIO()

    def damage_then_kill(event: ProgressEvent) -> None:
        if event.phase != "running" or event.checkpoint_step is None or len(recorded) == 2:
            return
        if not recorded or event.checkpoint_step > recorded[-1]:
            recorded.append(event.checkpoint_step)
        if len(recorded) == 2:
            chunk = out / "state" / "slab_z0-16" / f"step_{recorded[-1]:08d}" / "x" / "c" / "1" / "0" / "0"
            chunk.unlink()
            ray.kill(ray.get_actor("mbir:tiny:damaged:slab1[z16-24]", namespace="mbir-batch"), no_restart=True)

    [summary] = run_jobs([JobSpec(ct_dataset, out, admm_cfg)], workers=2, checkpoint_every=2,
                         progress=damage_then_kill, poll_s=0.05, message=lambda line: said.write(line + "\n"))
    assert len(recorded) == 2, "the run finished before the test could damage a checkpoint"
    assert summary["restarts"] == 1 and summary["resumed_from"] == recorded[0]
    assert f"checkpoint of step {recorded[1]} is damaged" in said.getvalue(), said.getvalue()
    np.testing.assert_array_equal(_volume(out), _volume(admm_runs[2]))


def test_the_workers_loader_gives_the_v1_loaders_volumes(ct_dataset, tiny_denoiser):
    """Workers load every model through kernels.priors; an own v1 model reconstructs bit-identically to
    the v1 loader it used before (the EDM adapter over [0, 1] adds no arithmetic)."""
    from mbir_batch.dataset import open_dataset
    from mbir_batch.kernels import denoiser as own_v1
    from mbir_batch.kernels.comm import LocalComm
    from mbir_batch.kernels.priors import load_denoiser
    from mbir_batch.solve import SlabProblem, reconstruct

    problem = SlabProblem.from_dataset(open_dataset(ct_dataset, verify_data=False), 0, 8)
    for method in ("dds", "mbir"):
        cfg = load_config("svct-8view", method, steps=2, cg_iters=2)
        volumes = [reconstruct(problem, cfg, comm=LocalComm(), denoiser=model)
                   for model in (own_v1.load_denoiser(tiny_denoiser), load_denoiser(tiny_denoiser))]
        assert torch.equal(*volumes), method
