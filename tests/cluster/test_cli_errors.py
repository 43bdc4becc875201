"""What a user sees from `mbir-batch` when things go wrong, in-process (CliRunner, the shared Ray).

Every failing command must exit 2 with one ``error:`` line on stderr, no traceback, nothing left
behind, and its input store byte-identical.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mbir_batch.cli import app
from mbir_batch.locking import lock_path
from mbir_batch.output import OutputStore, output_status

runner = CliRunner()
GLOO = ("RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] "
        "Connection closed by peer [192.0.2.2]:48211")


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


def cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- markup -----------------------------------------------------------------------------------------


def test_foreign_text_is_printed_as_is_not_as_markup(capsys):
    """gloo's ``[/__w/.../pair.cc:537]`` made rich raise MarkupError in the driver (issue 11, item 2)."""
    import typer

    from mbir_batch.cli import user_errors
    from mbir_batch.cli.progress import ProgressBars, printer
    from mbir_batch.cluster.group import ProgressEvent
    from mbir_batch.errors import UserError

    buffer = io.StringIO()
    console = Console(file=buffer, width=400)
    say = printer(console)
    say(f"ct: a worker died (RayActorError: died; {GLOO}); restart 1/3 from step 10")
    assert GLOO in buffer.getvalue()

    with ProgressBars(console) as bars:  # a dataset whose name looks like markup
        bars.add("k", "ct[/b].zarr admm-tv x2")
        bars.update("k", ProgressEvent("ct[/b].zarr", "o", "running", 3, 20, None, 0, [{"slices_per_s": 7.0}]))
    assert "ct[/b].zarr admm-tv x2" in buffer.getvalue() and "3/20" in buffer.getvalue()

    @user_errors
    def failing() -> None:
        raise UserError(f"out[/x].zarr: {GLOO}")

    with pytest.raises(typer.Exit) as stop:
        failing()
    assert stop.value.exit_code == 2
    assert f"error: out[/x].zarr: {GLOO}" in capsys.readouterr().err


def test_kill_9_of_one_of_two_workers_restarts_and_matches(ray_session, ct_dataset, tmp_path):
    """Issue 11 item 2 through the CLI (a console, a real SIGKILL): the group restarts, the volume is exact.

    Rank 1 is killed once it has written its first checkpoint, mid-solve whatever the machine's speed;
    the restart is from the step the driver had recorded by then (or from the start).
    """
    ray, before = ray_session, tree_hash(ct_dataset)
    args = ["submit", ct_dataset, "--method", "admm-tv", "--steps", 30, "--workers", 2, "--checkpoint-every", 1]
    clean = cli(*args, "--out", tmp_path / "clean.zarr")
    assert clean.exit_code == 0, clean.output

    out, killed = tmp_path / "killed.zarr", []

    def kill_rank1_after_its_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            try:
                actor = ray.get_actor("mbir:tiny:killed:slab1[z16-24]", namespace="mbir-batch")
                if ray.get(actor.progress.remote()).get("checkpoint_step") is not None:
                    os.kill(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())), 9)
                    killed.append(True)
            except Exception:  # noqa: BLE001 - not launched yet: poll again
                time.sleep(0.01)

    watcher = threading.Thread(target=kill_rank1_after_its_first_checkpoint, daemon=True)
    watcher.start()
    result = cli(*args, "--out", out)
    watcher.join(timeout=5)
    assert killed, "the run finished before the test could kill a worker"
    assert result.exit_code == 0, result.output
    assert "a worker died" in result.output and "restart 1/3" in result.output
    assert "Traceback" not in result.output and "MarkupError" not in result.output
    attrs = OutputStore.open(out, mode="r").attrs
    assert attrs["complete"] is True and attrs["restarts"] == 1
    np.testing.assert_array_equal(OutputStore.open(out, mode="r").read_volume(),
                                  OutputStore.open(tmp_path / "clean.zarr", mode="r").read_volume())
    assert tree_hash(ct_dataset) == before


def test_progress_bar_steps_rate_eta_and_final_count():
    from mbir_batch.cli.progress import ProgressBars
    from mbir_batch.cluster.group import ProgressEvent

    buffer = io.StringIO()
    console = Console(file=buffer, width=200)
    with ProgressBars(console) as bars:
        bars.add("k", "ct.zarr dds x2")
        console.print(bars.progress.get_renderable())  # before any step: no count, no rate
        bars.update("k", ProgressEvent("ct.zarr", "o", "running", 5, 20, 4, 0,
                                       [{"slices_per_s": 3.0}, {"slices_per_s": 4.5}]))
        console.print(bars.progress.get_renderable())
        bars.update("k", ProgressEvent("ct.zarr", "o", "done", 20, 20, 4, 0, []))
    launching, running, *_ = [line for line in buffer.getvalue().splitlines() if "ct.zarr dds x2" in line]
    assert "-/-" in launching and "launching" in launching and "slices/s" not in launching
    assert "5/20" in running and "7.5 slices/s" in running and "ETA" in running and "ckpt 4" in running
    assert "20/20" in buffer.getvalue().splitlines()[-1] and "done" in buffer.getvalue().splitlines()[-1]


# --- model, output path, address ---------------------------------------------------------------------


def test_model_of_another_resolution_is_one_line_before_ray(ct_dataset, make_ct, tiny_denoiser, tmp_path):
    wide = tmp_path / "ct24.zarr"
    make_ct(wide, depth=8, size=24)
    before = tree_hash(wide)
    out = tmp_path / "dds.zarr"
    line = assert_one_line_error(cli("submit", wide, "--out", out, "--model", tiny_denoiser),
                                 "trained on 16x16 slices", "24x24", "mbir-batch train --resolution 24",
                                 "--method admm-tv")
    assert str(tiny_denoiser) in line
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_one_line_error(cli("submit", ct_dataset, "--out", out, "--model", bad), str(bad), "not valid JSON")
    assert output_status(out) == "missing" and not lock_path(out).exists()
    assert tree_hash(wide) == before


def test_bundled_model_on_a_dataset_of_another_size(make_ct, tmp_path):
    """The default method (dds) with the bundled 64^2 model on 16^2 slices: what a bare `submit` hits."""
    data = tmp_path / "ct16.zarr"
    make_ct(data, depth=8, size=16)
    before = tree_hash(data)
    assert_one_line_error(cli("submit", data, "--out", tmp_path / "o.zarr"), "trained on 64x64 slices",
                          "--resolution 16", "--method admm-tv")
    assert output_status(tmp_path / "o.zarr") == "missing" and tree_hash(data) == before


def test_full_disk_at_the_lock_is_one_line_and_leaves_no_lock(ct_dataset, tmp_path, monkeypatch):
    import errno

    from mbir_batch.locking import OutputLock

    real_write, out = os.write, tmp_path / "full.zarr"

    def full_disk(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    before = tree_hash(ct_dataset)
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", full_disk)
        result = cli("submit", ct_dataset, "--method", "fbp", "--out", out)
    assert_one_line_error(result, str(lock_path(out)), "No space left on device")
    assert not lock_path(out).exists() and output_status(out) == "missing"
    with OutputLock(out) as lock:  # the retry is not refused by a 0-byte lock
        assert lock.held
    assert tree_hash(ct_dataset) == before


def test_unwritable_output_folder_is_one_line(ct_dataset):
    if not os.path.isdir("/sys/fs"):
        pytest.skip("no /sys/fs here (a folder that refuses new files even to root)")
    before = tree_hash(ct_dataset)
    assert_one_line_error(cli("submit", ct_dataset, "--method", "fbp", "--out", "/sys/fs/out.zarr"),
                          "/sys/fs/out.zarr.lock", "Permission denied")
    assert tree_hash(ct_dataset) == before


def test_missing_parent_folders_of_out_are_created(ray_session, ct_dataset, tmp_path):
    out = tmp_path / "nodir" / "sub" / "out.zarr"
    result = cli("submit", ct_dataset, "--method", "fbp", "--out", out)
    assert result.exit_code == 0, result.output
    assert output_status(out) == "complete" and not lock_path(out).exists()


def test_address_without_a_cluster_gives_up_within_the_bound(ct_dataset, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    result = cli("submit", ct_dataset, "--method", "fbp", "--out", tmp_path / "o.zarr",
                 "--address", f"127.0.0.1:{port}", "--connect-timeout", 1.5)
    assert time.monotonic() - started < 10
    assert_one_line_error(result, f"--address 127.0.0.1:{port}", "within 1.5 s")
    assert output_status(tmp_path / "o.zarr") == "missing" and not lock_path(tmp_path / "o.zarr").exists()


# --- small volumes, bad sizes, help ------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--size", "--depth"])
def test_simulate_size_or_depth_zero_is_one_line(flag, tmp_path):
    out = tmp_path / "sim.zarr"
    assert_one_line_error(cli("simulate", "--out", out, flag, 0), flag, "got 0")
    assert not out.exists()


def test_two_slices_are_reconstructed_and_scored_where_scores_apply(ray_session, tmp_path):
    data, out = tmp_path / "thin.zarr", tmp_path / "thin.out.zarr"
    assert cli("simulate", "--out", data, "--size", 16, "--depth", 2).exit_code == 0
    before = tree_hash(data)
    result = cli("submit", data, "--method", "admm-tv", "--steps", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert "SSIM" in result.output and "n/a" in result.output
    assert "4/4" in result.output  # a job faster than the first poll still ends at steps/steps
    metrics = OutputStore.open(out, mode="r").attrs["metrics"]
    assert metrics["axial"]["ssim"] > 0 and metrics["coronal"]["ssim"] is None
    assert "2x16" in metrics["coronal"]["ssim_skipped"] and metrics["sagittal"]["psnr"] > 10
    assert tree_hash(data) == before


def test_resuming_with_other_workers_says_so(ray_session, ct_dataset, tmp_path):
    from mbir_batch.cluster.plan import JobSpec, create_output, plan_slabs
    from mbir_batch.config import load_config

    out = tmp_path / "resumed.zarr"  # an output started with 2 workers, killed before any checkpoint
    create_output(JobSpec(ct_dataset, out, load_config("svct-8view", "admm-tv", iters=3)), plan_slabs(24, 8, 2),
                  overwrite=False)
    result = cli("submit", ct_dataset, "--method", "admm-tv", "--steps", 3, "--workers", 1, "--out", out)
    assert result.exit_code == 0, result.output
    assert "resuming with the 2 slabs it was started with (not --workers 1)" in result.output
    assert OutputStore.open(out, mode="r").attrs["workers"] == 2


@pytest.mark.parametrize("command", ["", "simulate", "submit", "report", "train", "import", "export", "model",
                                     "model inspect", "model convert"])
def test_help_shows_no_bool_type_on_flags(command):
    result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0 and "--help" in result.output
    assert "<bool>" not in result.output


def test_dashboard_lines_name_the_metrics_endpoint(ray_session):
    import urllib.request

    from mbir_batch.cluster.session import dashboard_lines

    class NoDashboard:
        dashboard_url = None

    lines = dashboard_lines(NoDashboard())
    [endpoint] = [line for line in lines if "Prometheus metrics" in line]
    url = endpoint.split(": ", 1)[1].split(";")[0]
    assert url.startswith("http://") and url.endswith("/metrics")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200 and b"ray_" in response.read()


def test_a_config_file_lacking_keys_falls_back_to_the_task_preset(ray_session, ct_dataset, tmp_path):
    """file > the dataset's task preset (svct-8view here: lam 0.04) > global defaults (lam 0.1)."""
    from mbir_batch.config import load_config
    from mbir_batch.methods import get

    preset = load_config("svct-8view", "admm-tv")
    assert preset.lam != get("admm-tv").config_type().lam  # the case the rule is about
    config = tmp_path / "mine.yaml"
    config.write_text("admm-tv:\n  cg_iters: 3\n")
    out = tmp_path / "cfg.zarr"
    result = cli("submit", ct_dataset, "--method", "admm-tv", "--steps", 2, "--config", config, "--out", out)
    assert result.exit_code == 0, result.output
    used = OutputStore.open(out, mode="r").attrs["config"]
    assert used["cg_iters"] == 3 and used["iters"] == 2
    assert used["lam"] == preset.lam and used["rho"] == preset.rho


def test_adaptation_flags_are_checked_before_ray(ct_dataset, tiny_denoiser, tmp_path):
    """--adapt on a method without a prior, and an adapter that is missing or not an adapter, are one
    line each; nothing is written and the input is unchanged."""
    before = tree_hash(ct_dataset)
    out = tmp_path / "o.zarr"
    assert_one_line_error(cli("submit", ct_dataset, "--out", out, "--method", "admm-tv", "--adapt"),
                          "--adapt: method 'admm-tv' has no prior to adapt", "dds and mbir")
    missing = tmp_path / "nowhere.safetensors"
    assert_one_line_error(cli("submit", ct_dataset, "--out", out, "--model", tiny_denoiser, "--adapter", missing),
                          f"{missing}: adapter file not found", "drop --adapter")
    assert_one_line_error(cli("submit", ct_dataset, "--out", out, "--model", tiny_denoiser, "--adapter",
                              tiny_denoiser.with_suffix(".safetensors")), "not an mbir-batch-lora v1 adapter")
    assert output_status(out) == "missing" and not lock_path(out).exists() and tree_hash(ct_dataset) == before


def test_adapt_flags_switch_the_presets_adaptation():
    from mbir_batch.cli.submit import with_adaptation
    from mbir_batch.config import load_config
    from mbir_batch.methods.adaptation import TUNED

    ct, mri, paper = (load_config(name, "dds") for name in ("svct-8view", "csmri-4x", "dds-aapm256"))
    assert ct.adapt.enabled and not mri.adapt.enabled and paper.adapt is None  # what the presets say
    assert with_adaptation(ct, None, None) is ct
    off = with_adaptation(ct, False, None)  # --no-adapt keeps the settings, runs no round, injects nothing
    assert not off.adapt.in_use and off.adapt.settings == ct.adapt.settings
    on = with_adaptation(mri, True, None)
    assert on.adapt.enabled and on.adapt.settings == mri.adapt.settings
    tuned = with_adaptation(paper, True, None).adapt.settings  # no section: the tuned defaults
    assert (tuned.lr, tuned.every, tuned.lora.train_bias) == (TUNED["lr"], TUNED["every"], TUNED["train_bias"])
    frozen = with_adaptation(mri, None, Path("kept.safetensors"))  # the preset does not adapt: used as it is
    assert not frozen.adapt.enabled and frozen.adapt.adapter == str(Path("kept.safetensors").resolve())
    further = with_adaptation(ct, None, Path("kept.safetensors"))  # it does: adapts further from the file
    assert further.adapt.enabled and further.adapt.adapter == frozen.adapt.adapter
