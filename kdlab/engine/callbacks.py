"""Callbacks kdlab adds to every Trainer (see ``conf/callbacks/default.yaml``)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from kdlab.engine.loop import ChunkedLoader


class Throughput(Callback):
    """Training samples per second, one value per epoch, logged as ``speed/samples_per_s``.

    The clock runs from the start of an epoch to the end of its last training batch, so
    validation and checkpointing are not counted (they are the same work however fast the
    loop is). Samples are counted from the batches themselves (the first tensor's length; a
    chunk's batches summed).

    Why not Lightning's ``ThroughputMonitor``: it writes windowed rates to the loggers and keeps
    no per-epoch history, while ``results.json`` and the benchmarks need one training rate per
    epoch with validation and checkpointing left out; it also synchronises CUDA after every
    training step and warns unless the module defines ``flops_per_batch``.
    """

    def __init__(self) -> None:
        self.history: list[float] = []
        self._start = self._last = 0.0
        self._samples = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._samples = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._samples += batch_size(batch)
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = self._last - self._start
        if self._samples and elapsed > 0:
            rate = self._samples / elapsed
            self.history.append(rate)
            pl_module.log("speed/samples_per_s", rate, on_epoch=True)

    def median(self, skip_first: bool = True) -> float | None:
        """Median samples/s over the epochs, without the first (warm-up) when there are more."""
        values = self.history[1:] if skip_first and len(self.history) > 1 else self.history
        return statistics.median(values) if values else None


def batch_size(batch: Any) -> int:
    """Samples in a batch: a tensor, or a tuple/list whose first item is one (or is a list of
    batches, as the chunked loader yields)."""
    while isinstance(batch, (tuple, list)):
        if not batch:
            return 0
        if isinstance(batch[0], (tuple, list)):
            return sum(batch_size(b) for b in batch)
        batch = batch[0]
    return len(batch)


class BatchProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar counting training *batches* when the loop runs chunks of
    them (``steps_per_call``), as Lightning counts them with one batch per step; everything
    else is ``TQDMProgressBar``'s (``refresh_rate`` counts batches too)."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._done = 0

    @property
    def total_train_batches(self) -> int | float:
        loader = self.trainer.train_dataloader
        if isinstance(loader, ChunkedLoader):
            return loader.num_batches
        return super().total_train_batches

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._done = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if not isinstance(trainer.train_dataloader, ChunkedLoader):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        before = self._done
        self._done += len(batch)
        bar = self.train_progress_bar
        total = self.total_train_batches
        if bar is None or bar.disable or not self.is_enabled:
            return None
        if self._done // self.refresh_rate > before // self.refresh_rate or self._done >= total:
            bar.n = self._done
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))
        return None
