"""The benchmarks' one harness: what every script in ``bench/`` builds on.

=================  ==============================================================================
module             what it holds
=================  ==============================================================================
``problems``       simulate a problem: phantom volumes, the sparse-view CT geometry and operator
                   (``operator_from_geometry``), a :class:`SlabProblem`, a dataset on disk (the CLI)
``denoisers``      the denoisers a benchmark runs: bundled, any model file, random-weight ones
``ranks``          the one multi-rank launcher: a function over N spawned processes (a fresh
                   process when N = 1), results back by rank, a failing rank named
``procs``          process sampling: RSS / peak RSS / CPU seconds of a process tree, over time
``timing``         synchronised timers, stopwatches, peak device memory, a time budget
``results``        writing results: the report header, markdown tables, ``<stem>.md`` + ``.json``
                   in ``bench/results/`` (and ``$OUT``)
=================  ==============================================================================

Benchmarks are scripts, not tests: they put ``bench/`` on ``sys.path`` and import this package and
``mbir_batch`` (installed, or assembled by ``bench/bare_node.py`` on a machine without an install).
Nothing here imports zarr, ray or astra at import time.
"""
