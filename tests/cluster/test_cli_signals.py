"""`mbir-batch submit` as its own process: quiet by default, and SIGTERM / Ctrl-C stop it cleanly."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from mbir_batch.locking import lock_path
from mbir_batch.output import OutputStore, output_status


def _wait_for_checkpoint(output, process, timeout_s: float = 180.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            step = OutputStore.open(output, mode="r").checkpoints.last_recorded
            if step is not None:
                return step
        except Exception:  # noqa: BLE001 - not created yet, or its attrs are being rewritten
            pass
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no checkpoint recorded in time:\n{process.communicate()}")


def test_sigterm_stops_cleanly_quietly_and_stays_resumable(ct_dataset, tmp_path):
    """A fresh HOME and no terminal: no Ray WARNING, no ANSI, a 0600 token; SIGTERM is like Ctrl-C."""
    from mbir_batch.cluster.plan import JobSpec, plan_output
    from mbir_batch.config import load_config

    home, log, out = tmp_path / "home", tmp_path / "driver.log", tmp_path / "term.zarr"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "RAY_AUTH_MODE")}
    env.update(HOME=str(home), MBIR_BATCH_LOG=str(log), COLUMNS="120")
    command = [sys.executable, "-c", "from mbir_batch.cli import app; app()", "submit", str(ct_dataset),
               "--method", "admm-tv", "--steps", "5000", "--checkpoint-every", "5", "--out", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    recorded = _wait_for_checkpoint(out, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "interrupted at step" in stderr and "run the same command to resume" in stderr, stderr
    for text in (stdout, stderr):
        assert "SIGTERM received" not in text and "Traceback" not in text
        assert "WARNING" not in text and "Token authentication" not in text
        assert "\x1b[" not in text  # not a terminal: no colour or cursor codes
    assert "Token authentication" in log.read_text()  # Ray's start-up messages went to the driver log
    token = home / ".ray" / "auth_token"
    assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text()) == 64

    assert output_status(out) == "incomplete" and not lock_path(out).exists()
    cfg = load_config("svct-8view", "admm-tv", iters=5000)
    slabs, step, create = plan_output(JobSpec(ct_dataset, out, cfg), 1, False, lambda message: None)
    assert step is not None and step >= recorded and not create


def test_stop_signals_defer_the_first_signal_inside_the_loop():
    from mbir_batch.cluster.session import Interrupted, StopSignals

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    with StopSignals() as signals:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs between bytecodes: nothing was raised
            assert signals.received == signal.SIGINT
            with pytest.raises(Interrupted) as second:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            assert second.value.exit_code == 143
        with pytest.raises(Interrupted) as outside:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert outside.value.exit_code == 130 and "SIGINT" in str(outside.value)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_while_ray_starts_is_an_interruption_and_stops_what_ray_started(ct_dataset, tmp_path, monkeypatch):
    """ray.init replaces the SIGTERM handler with sys.exit(signum) while it starts: a SIGTERM in that
    window (an early scancel) must still end as Interrupted (exit 143), and ray.shutdown must run to
    stop the processes ray.init had started even though it never finished."""
    import sys as _sys

    import ray

    from mbir_batch.cluster.job import run_jobs
    from mbir_batch.cluster.plan import JobSpec
    from mbir_batch.cluster.session import Interrupted
    from mbir_batch.config import load_config

    def init_cut_short(**kwargs):  # what Ray's core worker does, then the signal arrives
        signal.signal(signal.SIGTERM, lambda signum, frame: _sys.exit(signum))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        raise AssertionError("SIGTERM did not arrive")

    shutdowns = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init_cut_short)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(True))
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "early.zarr"
    with pytest.raises(Interrupted) as stopped:
        run_jobs([JobSpec(ct_dataset, out, load_config("svct-8view", "admm-tv", iters=5))])
    assert stopped.value.exit_code == 128 + signal.SIGTERM and shutdowns == [True]
    assert signal.getsignal(signal.SIGTERM) is before and not lock_path(out).exists() and not out.exists()
