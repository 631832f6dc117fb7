"""A resumed stage keeps the metrics it logged before it was stopped.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when a stage starts again in its
folder, so a resumed run would lose the curve up to the interruption. :func:`rows_to_keep`
reads that file before the Trainer exists, keeps the rows the resumed training will not log
again (those up to the checkpoint it continues from), and saves them beside it
(``metrics.csv.before-resume``, written atomically, so a second stop loses nothing either);
:class:`ReplayHistory` logs them again through the logger's public ``log_metrics`` when the fit
starts, so the new ``metrics.csv`` begins with the history, then removes the copy when the
stage ends.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger

from kdlab.util.files import write_atomic

log = logging.getLogger(__name__)

BACKUP_SUFFIX = ".before-resume"


def csv_metrics_files(loggers: list[Logger]) -> list[Path]:
    """The ``metrics.csv`` of each CSV logger (where it will write; nothing is created)."""
    return [Path(lg.log_dir) / "metrics.csv" for lg in loggers if isinstance(lg, CSVLogger)]


def _read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of ``path`` whose values match its header. A row with more values (written
    under a wider header that never reached the file) or fewer (cut short) is torn: Lightning's
    own writer leaves such rows when a stop lands while it widens the header. They are left
    out, with a warning naming the file and how many."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error):
        return []
    whole = [r for r in rows if None not in r and None not in r.values()]
    if len(whole) < len(rows):
        log.warning("%s: left out %d torn row(s) whose values do not match its header "
                    "(a stop during a write); kept %d", path, len(rows) - len(whole), len(whole))
    return whole


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def rows_to_keep(metrics: Path, epoch: int, epoch_done: bool) -> list[dict[str, str]]:
    """The rows of ``metrics`` (or of its ``.before-resume`` copy, when a stop came before the
    history was written again) logged up to a checkpoint of ``epoch``: every row of an earlier
    epoch, and of that epoch too when the checkpoint was written at its end (a resumed run
    starts the next one). They are saved in the copy before the logger deletes the file."""
    backup = metrics.with_name(metrics.name + BACKUP_SUFFIX)
    rows = _read_rows(metrics) or _read_rows(backup)
    keep = [r for r in rows if r.get("epoch") not in (None, "")
            and (_number(r["epoch"]) < epoch or (epoch_done and _number(r["epoch"]) == epoch))]
    if keep:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(keep[0].keys()))
        writer.writeheader()
        writer.writerows(keep)
        write_atomic(backup, buffer.getvalue().encode())
    return keep


class ReplayHistory(Callback):
    """Log ``rows`` (read by :func:`rows_to_keep`) to every CSV logger when the fit starts
    and write them out at once; remove ``backup`` when the fit ends.

    Args:
        rows: the rows of the stage's earlier ``metrics.csv`` to keep, as read from it.
        backup: their saved copy (``metrics.csv.before-resume``).
        loggers: the loggers to replay them to (a packed member's own); ``None``: the
            Trainer's.
    """

    def __init__(self, rows: list[dict[str, str]], backup: Path,
                 loggers: list[Logger] | None = None) -> None:
        self.rows = rows
        self.backup = backup
        self.loggers = loggers

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in self.loggers if self.loggers is not None else trainer.loggers:
            if not isinstance(logger, CSVLogger):
                continue
            for row in self.rows:
                values: dict[str, Any] = {k: _number(v) for k, v in row.items()
                                          if k != "step" and v not in (None, "")}
                logger.log_metrics(values, step=int(_number(row.get("step") or "0")))
            logger.save()
        log.info("Kept %d rows of metrics logged before the stop (%s)", len(self.rows),
                 self.backup.with_suffix(""))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.backup.unlink(missing_ok=True)
