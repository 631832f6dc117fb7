"""The engine's fast training loop: several batches per Lightning training step.

Lightning's per-step machinery (hooks, progress tracking, logging, batch fetching) costs a few
hundred microseconds, as much as a whole batch of a small network on the CPU. So the engine
hands Lightning *chunks* of ``steps_per_call`` batches (:class:`ChunkedData` wraps the stage's
datamodule) and :class:`~kdlab.engine.module.DistillationModule` runs the batches of a chunk
one by one, each with its own forward, backward and optimizer step — manual optimisation, a
public Lightning API. The optimisation is the same batch for batch as with one batch per step
(a test compares the weights bit for bit).

The Trainer's arguments keep their meaning in batches (:func:`trainer_arguments`):

- ``limit_train_batches`` counts batches: the chunked loader stops after that many;
- ``val_check_interval`` counts batches: chunks end at every multiple of it, and the Trainer
  validates after as many chunks as make up one interval;
- ``max_steps`` counts optimizer steps: every optimizer step goes through Lightning's
  optimizer wrapper, which counts them (``trainer.global_step``), and a chunk stops at the limit;
- ``accumulate_grad_batches`` and ``gradient_clip_val`` / ``gradient_clip_algorithm`` are not
  given to the Trainer (Lightning refuses them under manual optimisation) but applied by the
  loop with the same meaning (:class:`~kdlab.engine.spec.LoopOptions`), through the public
  ``LightningModule.clip_gradients``;
- ``log_every_n_steps`` is divided by the chunk size (Lightning counts training steps);
- ``fast_dev_run`` runs one batch (chunks of one).

With ``steps_per_call=1`` (DDP, data streamed from disk, ``fast_dev_run``) nothing is wrapped
or translated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lightning.pytorch import LightningDataModule

from kdlab.util.errors import KdlabError


class ChunkedLoader:
    """Lists of up to ``chunk`` consecutive batches of ``loader`` (an iterable with a length).

    Args:
        loader: the training loader (batches).
        chunk: batches per item.
        limit: batches per epoch (``None``: all of the loader's).
        boundary: end a chunk at every multiple of this many batches (validation points).
    """

    def __init__(self, loader: Any, chunk: int, limit: int | None = None,
                 boundary: int | None = None) -> None:
        self.loader, self.chunk, self.boundary = loader, chunk, boundary
        self.num_batches = len(loader) if limit is None else min(limit, len(loader))
        # Lightning sets the epoch of the loader's sampler (shuffling per epoch)
        self.sampler = getattr(loader, "sampler", None)
        self.batch_sampler = getattr(loader, "batch_sampler", None)

    def sizes(self) -> list[int]:
        """Batches in each chunk of an epoch."""
        sizes, n, current = [], 0, 0
        while n < self.num_batches:
            current += 1
            n += 1
            if current == self.chunk or (self.boundary and n % self.boundary == 0) \
                    or n == self.num_batches:
                sizes.append(current)
                current = 0
        return sizes

    def __len__(self) -> int:
        return len(self.sizes())

    def __iter__(self) -> Iterator[list[Any]]:
        sizes = iter(self.sizes())
        want = next(sizes, 0)
        chunk: list[Any] = []
        for batch in self.loader:
            if want == 0:
                break
            chunk.append(batch)
            if len(chunk) == want:
                yield chunk
                chunk, want = [], next(sizes, 0)


class ChunkedData(LightningDataModule):
    """A datamodule whose training loader yields chunks (:class:`ChunkedLoader`) of the
    wrapped ``data``'s batches; validation and test loaders and the batch hooks are ``data``'s
    (a chunk's batches go through them one by one)."""

    def __init__(self, data: LightningDataModule, chunk: int, limit: int | None,
                 boundary: int | None) -> None:
        super().__init__()
        self.data, self.chunk, self.limit, self.boundary = data, chunk, limit, boundary
        self.loader: ChunkedLoader | None = None

    # Lightning attaches the trainer to the datamodule it is given: pass it on
    @property
    def trainer(self) -> Any:
        return self.data.trainer

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        if hasattr(self, "data"):
            self.data.trainer = trainer

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str) -> None:
        self.data.setup(stage)

    def teardown(self, stage: str) -> None:
        self.data.teardown(stage)

    def train_dataloader(self) -> ChunkedLoader:
        self.loader = ChunkedLoader(self.data.train_dataloader(), self.chunk, self.limit,
                                    self.boundary)
        return self.loader

    def val_dataloader(self) -> Any:
        return self.data.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.data.test_dataloader()

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, list):
            return [self.data.transfer_batch_to_device(b, device, dataloader_idx) for b in batch]
        return self.data.transfer_batch_to_device(batch, device, dataloader_idx)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, list):
            return [self.data.on_before_batch_transfer(b, dataloader_idx) for b in batch]
        return self.data.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, list):
            return [self.data.on_after_batch_transfer(b, dataloader_idx) for b in batch]
        return self.data.on_after_batch_transfer(batch, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.data.load_state_dict(state_dict)


#: Trainer arguments the loop applies itself (Lightning refuses them with manual optimisation)
LOOP_ARGUMENTS = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")


def batches_per_epoch(data: LightningDataModule) -> int:
    """The training loader's batches per epoch."""
    data.setup("fit")
    return len(data.train_dataloader())


def _count(value: Any, total: int, key: str) -> int | None:
    """A Trainer limit (an int count, a float fraction, or ``None``) in batches, as Lightning
    computes it (``int(total × fraction)``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise KdlabError(f"trainer.{key}={value!r} must be a number of batches (an integer) or "
                         "a fraction of the epoch (a float in [0, 1]), or null")
    if isinstance(value, float):
        if value > 1:
            raise KdlabError(f"trainer.{key}={value} is a fraction of the epoch: give a float "
                             "in [0, 1] or a whole number of batches")
        return int(total * value)
    return int(value)


def trainer_arguments(args: dict[str, Any], chunk: int, data: LightningDataModule
                      ) -> tuple[dict[str, Any], LightningDataModule]:
    """The Trainer's arguments and datamodule for a stage whose loop runs ``chunk`` batches
    per training step: ``args`` (in Lightning's meaning, counted in batches) translated to
    chunks, and ``data`` wrapped in :class:`ChunkedData` (see the module docstring)."""
    args = {k: v for k, v in args.items() if k not in LOOP_ARGUMENTS}
    if chunk == 1:
        return args, data
    total = batches_per_epoch(data)
    limit = _count(args.get("limit_train_batches"), total, "limit_train_batches")
    if limit == 0:  # no training at all: nothing to chunk
        return args, data
    interval = args.get("val_check_interval")
    boundary = None
    per_epoch = total if limit is None else min(limit, total)
    if interval is not None and interval != 1.0:
        boundary = _count(interval, per_epoch, "val_check_interval")
        boundary = max(1, boundary or 1)
        if isinstance(interval, int) and interval > per_epoch:
            raise KdlabError(f"trainer.val_check_interval={interval} is more batches than an "
                             f"epoch has ({per_epoch}): with steps_per_call above 1 validate "
                             "at most once per epoch, or use steps_per_call=1")
    wrapped = ChunkedData(data, chunk, limit, boundary)
    args["limit_train_batches"] = None
    if boundary is not None:
        args["val_check_interval"] = -(-boundary // chunk) if boundary > chunk else 1
    if args.get("log_every_n_steps"):
        args["log_every_n_steps"] = max(1, int(args["log_every_n_steps"]) // chunk)
    return args, wrapped
