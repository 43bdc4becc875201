"""The driver's Ray session: connect or start it quietly and within a bounded time; stop on signals.

* **Quiet.** Ray's own startup messages (the token-authentication WARNING, "Started a local Ray
  instance", ...) go to the driver log, :func:`driver_log_path` (``/tmp/ray/mbir-batch-driver.log``
  unless ``MBIR_BATCH_LOG`` names another file), together with the driver's own log records. The
  terminal gets only what the user asked for: with ``dashboard=True`` the dashboard address, how to
  get its token, and the Prometheus metrics endpoint of this node.
* **Bounded.** ``address`` is probed over TCP before ``ray.init``: when nothing answers within
  ``connect_timeout_s`` the driver gives up with one line, instead of Ray retrying for minutes.
* **Private token.** Ray 2.60 turns token authentication on for a new local cluster and writes the
  token to ``~/.ray/auth_token`` with the default umask (0644). When this driver is what makes it
  appear, it is created 0600 before Ray starts (and any token file that appears during start-up
  is set to 0600), so other users of the machine cannot read it.
* **Signals.** :class:`StopSignals` turns SIGINT and SIGTERM into a clean stop: Ray's own handler,
  which prints a C++ stack dump on SIGTERM, is replaced, and the scheduling loop stops at its next
  poll (a second signal stops at once).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from mbir_batch.errors import UserError

__all__ = ["Interrupted", "StopSignals", "connect", "driver_log_path", "probe_address"]

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 20.0
TOKEN_BYTES = 32  # Ray's own tokens are 256 random bits, hex-encoded


def driver_log_path() -> Path:
    """The driver log: ``$MBIR_BATCH_LOG``, else ``mbir-batch-driver.log`` in Ray's temp folder."""
    configured = os.environ.get("MBIR_BATCH_LOG")
    if configured:
        return Path(configured)
    root = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    return Path(root) / "ray" / "mbir-batch-driver.log"


@contextmanager
def logs_to_file(path: Path) -> Iterator[Path | None]:
    """Send the ``ray`` logger to ``path`` instead of the terminal, and ``mbir_batch``'s too, for the block.

    Where the process has not configured logging (the CLI), the driver's INFO records go to the
    file as well and its warnings also to stderr, as Python would print them anyway; a program
    that configured logging keeps its levels and handlers for ``mbir_batch``. If the file cannot be
    opened, Ray keeps its own handler (its messages stay visible rather than being lost) and None
    is yielded.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        yield None
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ray_logger, own_logger = logging.getLogger("ray"), logging.getLogger("mbir_batch")
    saved = ray_logger.handlers[:], ray_logger.propagate, own_logger.level
    ray_logger.handlers, ray_logger.propagate = [handler], False
    added = [handler]
    if not logging.getLogger().handlers:
        warnings_to_stderr = logging.StreamHandler()
        warnings_to_stderr.setLevel(logging.WARNING)
        added.append(warnings_to_stderr)
        if own_logger.getEffectiveLevel() > logging.INFO:
            own_logger.setLevel(logging.INFO)
    for extra in added:
        own_logger.addHandler(extra)
    try:
        yield path
    finally:
        ray_logger.handlers, ray_logger.propagate = saved[0], saved[1]
        for extra in added:
            own_logger.removeHandler(extra)
        own_logger.setLevel(saved[2])
        handler.close()


def _split_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; None for Ray's names (``auto``)."""
    bare = address.removeprefix("ray://")
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def probe_address(address: str, timeout_s: float) -> None:
    """Wait until something accepts TCP connections at ``address``, for at most ``timeout_s`` seconds.

    Raises
    ------
    UserError
        Nothing answered in time, or the host name does not resolve: one line naming the address,
        the bound and what to do.
    """
    target = _split_address(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(target, timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except socket.gaierror as error:
            raise UserError(f"--address {address}: unknown host ({error.strerror})") from None
        except OSError as error:
            reason = error.strerror or type(error).__name__
        if time.monotonic() + 0.5 >= deadline:
            raise UserError(f"--address {address}: no Ray cluster answered within {timeout_s:g} s ({reason}); "
                            f"start one there (ray start --head --port {target[1]}), raise --connect-timeout, "
                            f"or leave out --address to run on an embedded Ray")
        time.sleep(0.5)


def _token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def _ray_would_create_token() -> bool:
    """Ray 2.60 creates ``~/.ray/auth_token`` for a new local cluster unless auth is off or set elsewhere."""
    mode = os.environ.get("RAY_AUTH_MODE")
    explicit = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    return (mode is None or mode.lower() == "token") and not explicit and not _token_path().exists()


def _create_private_token() -> bool:
    """Create ``~/.ray/auth_token`` with mode 0600 (exclusive create); return whether it was created."""
    path = _token_path()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False  # exists already (another driver won the race) or HOME is not writable: Ray decides
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(TOKEN_BYTES))
    return True


def connect(address: str | None, *, num_cpus: int | None, largest: int, object_store_memory: int,
            dashboard: bool, say: Callable[[str], None], connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
            signals: StopSignals | None = None) -> bool:
    """Attach to ``address`` or start an embedded Ray; return whether this call started it.

    Call it inside :func:`logs_to_file`, which keeps Ray's start-up messages off the terminal.
    The embedded Ray has ``num_cpus`` CPUs (default: this machine's cores), raised to ``largest``
    (the biggest group's CPUs) with a note, so that e.g. ``--workers 4`` runs on a 2-core laptop.
    """
    import ray

    if address is not None:
        probe_address(address, connect_timeout_s)
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    token_existed = _token_path().exists()
    if address is None and _ray_would_create_token():
        _create_private_token()
    try:
        if address is not None:
            try:
                context = ray.init(address=address, namespace="mbir-batch", log_to_driver=False)
            except ConnectionError as error:
                raise UserError(f"--address {address}: cannot attach to a Ray cluster "
                                f"({' '.join(str(error).split())})") from None
        else:
            cores = num_cpus or os.cpu_count() or 1
            if largest > cores:
                say(f"embedded Ray: {largest} worker CPUs on {cores} cores (oversubscribed; slower, same result)")
            context = ray.init(address="local", num_cpus=max(cores, largest), namespace="mbir-batch",
                               object_store_memory=object_store_memory, include_dashboard=dashboard,
                               log_to_driver=False)
    except SystemExit as stop:
        # Ray's core worker replaces the SIGTERM handler during ray.init with one that calls
        # sys.exit(signum): a SIGTERM in that window (an early scancel) is still our interruption.
        if signals is not None and stop.code == signal.SIGTERM:
            raise Interrupted(signal.SIGTERM) from None
        raise
    if not token_existed and _token_path().exists():
        os.chmod(_token_path(), 0o600)
    if signals is not None:
        signals.install()  # after ray.init: Ray's core worker installed its own SIGTERM handler
    if dashboard:
        for line in dashboard_lines(context):
            say(line)
    return True


def dashboard_lines(context: Any) -> list[str]:
    """What ``--dashboard`` prints: the dashboard, its token, this node's metrics endpoint."""
    import ray

    lines = []
    if getattr(context, "dashboard_url", None):
        lines.append(f"Ray dashboard: http://{context.dashboard_url} (token: run `ray get-auth-token`, "
                     f"or set RAY_AUTH_MODE=disabled on a trusted single-user machine)")
    else:
        lines.append("Ray dashboard: not running (it needs ray[default]; with --address, the cluster's own)")
    here = ray.util.get_node_ip_address()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
    nodes.sort(key=lambda n: n.get("NodeManagerAddress") != here)
    if nodes:
        node = nodes[0]
        lines.append(f"Prometheus metrics (ray_mbir_*): http://{node['NodeManagerAddress']}:"
                     f"{node['MetricsExportPort']}/metrics; the dashboard's Metrics page needs Prometheus and "
                     f"Grafana, see the README")
    return lines


class Interrupted(KeyboardInterrupt):
    """The driver was stopped by SIGINT (Ctrl-C) or SIGTERM; ``str()`` says where and how to resume."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message or f"interrupted by {signal.Signals(self.signum).name}"

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + self.signum


class StopSignals:
    """SIGINT and SIGTERM handlers for the driver, for a ``with`` block (main thread only).

    Outside :meth:`deferred` blocks a signal raises :class:`Interrupted` at once. Inside one, the
    first signal is only recorded in :attr:`received` and the loop stops at its next poll, so a
    checkpoint record or the final attributes are never cut half-written; a second one raises at
    once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = False
        self._saved: dict[int, Any] = {}
        self._active = False

    def __enter__(self) -> StopSignals:
        self._active = threading.current_thread() is threading.main_thread()
        if self._active:
            self._saved = {signum: signal.getsignal(signum) for signum in self.SIGNALS}
            self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._active:
            for signum, handler in self._saved.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            self._active = False

    def install(self) -> None:
        if self._active:
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._deferring and self.received is None:
            self.received = signum
            return
        raise Interrupted(signum)
