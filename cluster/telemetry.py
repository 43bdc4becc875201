"""Observability (DESIGN.md, "Distribution"): the Ray metrics the slab workers export for the dashboard.

The CLI's progress bars are drawn from the driver's progress events (:mod:`mbir_batch.cli.progress`).

Ray metrics are recorded by the slab workers. Ray exports them with its ``ray_`` prefix
(``ray_mbir_step``, ...) on every node's Prometheus endpoint
(``http://<node>:<MetricsExportPort>/metrics``, printed by ``submit --dashboard``), about every
10 s; the dashboard's Metrics page shows them once Prometheus and Grafana run (README).

Every series is tagged with ``dataset`` (the input store's stem) and ``slab`` (e.g. ``"1[z8-16]"``).

===============================  =======  ===============================================
name                             kind     meaning
===============================  =======  ===============================================
mbir_step                        gauge    steps done (diffusion steps, or ADMM iterations)
mbir_total_steps                 gauge    steps of the whole run
mbir_slices_per_second           gauge    slice-updates per second in the last step
mbir_cg_residual                 gauge    relative CG residual of the last data step
mbir_admm_primal_residual        gauge    ADMM primal residual ||D x - z|| (global)
mbir_admm_dual_residual          gauge    ADMM dual residual rho ||z - z_prev|| (global)
mbir_checkpoint_step             gauge    last step this slab wrote to ``state/``
mbir_restarts                    counter  group restarts after a worker died (slab ``all``)
===============================  =======  ===============================================
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

__all__ = ["TAG_KEYS", "SlabMetrics", "record_restart", "slab_tag"]

TAG_KEYS = ("dataset", "slab")

_GAUGES = {
    "step": "mbir_step",
    "total": "mbir_total_steps",
    "slices_per_s": "mbir_slices_per_second",
    "cg_residual": "mbir_cg_residual",
    "primal_residual": "mbir_admm_primal_residual",
    "dual_residual": "mbir_admm_dual_residual",
    "checkpoint_step": "mbir_checkpoint_step",
}
_DESCRIPTIONS = {
    "mbir_step": "Steps done by this slab (diffusion steps or ADMM iterations).",
    "mbir_total_steps": "Steps of the whole run.",
    "mbir_slices_per_second": "Slice updates per second during the last step.",
    "mbir_cg_residual": "Relative CG residual of the last data-consistency step.",
    "mbir_admm_primal_residual": "ADMM primal residual (global over all slabs).",
    "mbir_admm_dual_residual": "ADMM dual residual (global over all slabs).",
    "mbir_checkpoint_step": "Last step this slab wrote to the output's state/ group.",
}


@cache
def _gauge(name: str) -> Any:
    from ray.util.metrics import Gauge

    return Gauge(name, description=_DESCRIPTIONS[name], tag_keys=TAG_KEYS)


@cache
def _restart_counter() -> Any:
    from ray.util.metrics import Counter

    return Counter("mbir_restarts", description="Group restarts after a slab worker died.", tag_keys=TAG_KEYS)


def slab_tag(rank: int, z0: int, z1: int) -> str:
    """The ``slab`` tag value: rank and global slice range."""
    return f"{rank}[z{z0}-{z1}]"


class SlabMetrics:
    """The gauges of one slab worker, with its tags bound.

    Parameters
    ----------
    dataset : the dataset tag (input store stem).
    slab : the slab tag, see :func:`slab_tag`.
    """

    def __init__(self, dataset: str, slab: str) -> None:
        self.tags = {"dataset": dataset, "slab": slab}

    def record(self, values: Mapping[str, float | int | None]) -> None:
        """Set every known gauge present (and not ``None``) in ``values``; other keys are ignored."""
        for key, name in _GAUGES.items():
            value = values.get(key)
            if value is not None:
                _gauge(name).set(float(value), tags=self.tags)


def record_restart(dataset: str) -> None:
    """Count one restart of a dataset's worker group (driver side)."""
    _restart_counter().inc(1.0, tags={"dataset": dataset, "slab": "all"})
