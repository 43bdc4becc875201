"""Tests for pipeline/train.py: EDM training learns, resumes exactly, exports strictly."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from mbir_batch.errors import ConfigError
from mbir_batch.kernels.denoiser import Denoiser, DenoiserConfig, load_denoiser
from mbir_batch.phantoms import PHANTOM_VERSION, make_phantom
from mbir_batch.cli import app
from mbir_batch.train import SlicePool, heldout_denoising_mse, train_denoiser
from mbir_batch.training_cli import prepare_training
from tiny_models import TINY
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_denoiser_learns_to_denoise(tmp_path):
    """~10 s of training beats the identity by > 3 dB at sigma 0.2 on held-out seeds >= 9000."""
    steps_seen = []
    result = train_denoiser(TINY, out=tmp_path / "tiny", steps=120, batch=16, lr=2e-3, warmup=10,
                            phantoms_per_pool=2, refresh_every=40, report_every=20, resume=False,
                            progress=lambda step, loss, rate: steps_seen.append((step, loss, rate)))
    assert result.steps == 120 and [s for s, _, _ in steps_seen] == [20, 40, 60, 80, 100, 120]
    assert steps_seen[-1][1] < steps_seen[0][1] and all(r > 0 for _, _, r in steps_seen)
    model = load_denoiser(result.json_path, expect=TINY)
    mse_denoised, mse_noisy = heldout_denoising_mse(model, sigmas=(0.2,))[0.2]
    assert mse_denoised < 0.5 * mse_noisy
    torch.manual_seed(0)
    untrained, _ = heldout_denoising_mse(Denoiser(TINY), sigmas=(0.2,))[0.2]
    assert untrained > mse_noisy  # the test above is not passed by the preconditioning alone

    card = json.loads(result.json_path.read_text())["training"]
    assert card["steps"] == 120 and card["wall_time_s"] > 0 and card["machine"]["torch"]
    assert card["data"]["phantoms"] == {"module": "mbir_batch.phantoms", "version": PHANTOM_VERSION, "size": 16,
                                        "count": 6, "seeds": "0..5"}
    assert card["command"] and card["loss_curve"][-1][0] == 120


def run_short(tmp_path, name, steps, **kw):
    return train_denoiser(TINY, out=tmp_path / name, steps=steps, batch=4, lr=1e-3, warmup=2,
                          phantoms_per_pool=1, refresh_every=3, checkpoint_every=2, **kw)


def test_killed_run_resumes_where_it_stopped(tmp_path):
    straight = run_short(tmp_path, "straight", 7, resume=False)
    run_short(tmp_path, "split", 4, resume=False)        # as if killed after step 4
    resumed = run_short(tmp_path, "split", 7)
    assert resumed.steps == 7
    a, b = load_denoiser(straight.json_path), load_denoiser(resumed.json_path)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), key
    assert not list(tmp_path.glob("*.tmp"))


def test_export_every_exports_at_checkpoints_before_the_end_and_once_at_the_end(tmp_path, monkeypatch):
    """export_every=k: every checkpoint at a multiple of k before ``steps`` is exported, then the end state once."""
    import mbir_batch.train as train

    exported, save = [], train.save_denoiser
    monkeypatch.setattr(train, "save_denoiser",
                        lambda model, out, meta: exported.append(meta["steps"]) or save(model, out, meta))
    run_short(tmp_path, "a", 6, resume=False, export_every=4)   # checkpoints at 2, 4, 6
    assert exported == [4, 6]
    exported.clear()
    run_short(tmp_path, "b", 4, resume=False, export_every=2)   # step 4 is the end: exported once
    assert exported == [2, 4]
    exported.clear()
    run_short(tmp_path, "c", 4, resume=False)
    assert exported == [4]


def test_resume_refuses_other_architecture(tmp_path):
    run_short(tmp_path, "m", 2, resume=False)
    other = DenoiserConfig(resolution=16, channels=(4, 8), layers_per_block=1, norm_groups=4)
    with pytest.raises(ConfigError, match=r"m\.ckpt\.pt.*different architecture.*new --out, or delete .*m\.ckpt\.pt"):
        train_denoiser(other, out=tmp_path / "m", steps=3, batch=2)


def test_cli_resume_with_other_channels_names_the_real_options(tmp_path):
    """#11: the message offers what a user can do (a new --out, or delete the checkpoint), not resume=False."""
    base = ["--out", str(tmp_path / "m"), "--resolution", "16", "--steps", "2", "--batch", "2", "--threads", "1",
            "--phantoms-per-pool", "1", "--layers-per-block", "1", "--norm-groups", "4", "--device", "cpu"]
    first = CliRunner().invoke(app, ["train", *base, "--channels", "8,16"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, ["train", *base, "--channels", "4,8"])
    err = again.stderr
    assert again.exit_code == 2 and err.count("\n") == 1 and "Traceback" not in again.output
    assert "channels [8, 16] (asked for [4, 8])" in err and "use a new --out, or delete" in err
    assert "resume=False" not in err and "(or pass --no-resume)" in err
    fresh = CliRunner().invoke(app, ["train", *base, "--channels", "4,8", "--no-resume"])  # the option it names works
    assert fresh.exit_code == 0, fresh.output


@pytest.mark.parametrize("resolution", [30, 4, 0])
def test_cli_bad_resolution_is_one_line_before_any_work(tmp_path, resolution):
    """#11: --resolution not divisible by 2**(levels-1) names the option and valid values; nothing is written."""
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "m"), "--resolution", str(resolution),
                                      "--steps", "1"])
    err = result.stderr
    assert result.exit_code == 2 and err.count("\n") == 1 and "Traceback" not in result.output
    assert "train" not in result.stdout  # checked before the progress bar is drawn
    assert f"--resolution {resolution}: must be a positive multiple of 8" in err
    if resolution == 30:
        assert "nearest valid values are 24 and 32" in err
    assert not list(tmp_path.iterdir())


def test_prepare_training_checks_options_before_reading_volumes(tmp_path):
    """The typer command's glue: a bad --resolution / --channels / --objective fails before any input is read."""
    common = dict(out=tmp_path / "m", steps=1, batch=2, lr=1e-3, volumes=[tmp_path / "missing.nii"], phantoms=True,
                  checkpoint_every=1, max_minutes=None, device="cpu", threads=1, command="test")
    with pytest.raises(ConfigError, match=r"^--resolution 30: .*--channels 32,64,128,128 .*24 and 32$"):
        prepare_training(resolution=30, channels="32,64,128,128", **common)
    with pytest.raises(ConfigError, match=r"^--channels 8,12: .*norm_groups 8"):
        prepare_training(resolution=16, channels="8,12", **common)
    with pytest.raises(ConfigError, match=r"^--channels: expected comma-separated integers"):
        prepare_training(resolution=16, channels="8;16", **common)
    with pytest.raises(ConfigError, match=r"^--objective 'vp'"):
        prepare_training(resolution=16, channels="8,16", objective="vp", **common)
    with pytest.raises(ConfigError, match=r"^--init-from: .*nope\.json: denoiser description file not found"):
        prepare_training(resolution=16, channels="8,16", init_from=tmp_path / "nope.json", **common)
    assert not list(tmp_path.iterdir())


def test_user_volumes_only(tmp_path):
    vol = make_phantom(9100, 24, depth=6)                 # larger than 16: random crops
    pool = SlicePool(resolution=16, seeds=[], phantoms_per_pool=0, volumes=[vol])
    assert pool.get(0).shape == (6, 16, 16) and not np.array_equal(pool.get(0), pool.get(1))
    result = train_denoiser(TINY, out=tmp_path / "user", steps=3, batch=2, phantoms_per_pool=0, volumes=[vol])
    assert json.loads(result.json_path.read_text())["training"]["data"]["user_volumes"] == [[6, 24, 24]]
    with pytest.raises(ValueError, match="volume 0.*H, W >= 16"):
        SlicePool(resolution=16, seeds=[], phantoms_per_pool=0, volumes=[np.zeros((4, 8, 8), np.float32)])
    with pytest.raises(ValueError, match="volume 0.*\\[0, 1\\]"):
        SlicePool(resolution=16, seeds=[], phantoms_per_pool=0, volumes=[np.full((4, 16, 16), 300.0)])


def test_cli_help_and_light_import_chain():
    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "160"})
    assert help_text.exit_code == 0
    for option in ("--max-minutes", "--objective", "--phantom-set", "--init-from", "--export-every", "--bf16",
                   "--first-seed", "--no-resume", "--checkpoint", "--workers", "--heldout"):
        assert option in help_text.output, option
    code = ("import sys, mbir_batch.train; "
            "print([m for m in ('zarr', 'ray', 'astra', 'typer') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
