"""``python -m mbir_batch.cli``: the ``mbir-batch`` command."""
from mbir_batch.cli import app

app(prog_name="mbir-batch")
