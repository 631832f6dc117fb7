"""Lightning's ``CSVLogger`` with a ``metrics.csv`` that a stop cannot tear.

Lightning's writer appends rows under the header it first wrote; when a new metric appears it
records the wider header, then reads the file and writes it again in place. A stop (SIGTERM,
Ctrl-C) that lands between the two leaves a file whose last rows have more values than its
header, and a rewrite cut short leaves a truncated one: a resumed run then could not read its
history (:mod:`kdlab.engine.history`). Here a wider header is written with every row into a
temporary file that replaces the old one (:func:`~kdlab.util.files.write_atomic`), the header
is recorded only once that succeeded, and each save is one block that a stop does not cut in
two (:func:`~kdlab.util.runtime.signals_deferred`). Files on other filesystems (``s3://``, …)
keep Lightning's writer.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.utilities import rank_zero_only

from kdlab.util.files import write_atomic
from kdlab.util.runtime import signals_deferred


def _rows_text(fieldnames: list[str], rows: list[dict], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class CSVLogger(LightningCSVLogger):
    """:class:`lightning.pytorch.loggers.CSVLogger` (same arguments, same files) whose
    :meth:`save` never leaves a torn ``metrics.csv``."""

    @rank_zero_only
    def save(self) -> None:
        """Write the rows held in memory: appended under the same header, or, when a metric
        is new (or the file is new), the whole file written again atomically."""
        writer = self.experiment
        if not isinstance(get_filesystem(self.log_dir), LocalFileSystem):
            super().save()
            return
        if not writer.metrics:
            return
        with signals_deferred():
            path = Path(writer.metrics_file_path)
            keys = sorted(set(writer.metrics_keys).union(*writer.metrics))
            exists = path.is_file()
            if exists and keys == writer.metrics_keys:
                with path.open("a", newline="") as handle:
                    handle.write(_rows_text(keys, writer.metrics, header=False))
            else:
                old: list[dict] = []
                if exists:
                    with path.open(newline="") as handle:
                        old = list(csv.DictReader(handle))
                write_atomic(path, _rows_text(keys, old + writer.metrics, header=True).encode())
            writer.metrics_keys = keys
            writer.metrics = []
