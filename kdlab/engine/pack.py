"""Packed cohorts: N students trained in one process from one teacher pass per batch.

A sweep of N students against one frozen teacher pays the teacher's forward pass N times when
its jobs run one by one. :class:`PackedModule` trains them together instead: every batch is
drawn once, the teacher's outputs are computed (or read from the cache) once, and each member —
a complete :class:`~kdlab.engine.module.DistillationModule` with its own student, strategy,
connectors, optimizer and schedule — then runs its forward, loss, backward and optimizer step
on that batch, one member after the other (a plain loop inside the step).

Each member stays what it would be alone:

- its **randomness** (dropout masks, a strategy's sampling) comes from a random stream of its
  own: member 0 uses the global one, members 1… swap theirs in around their part of the step,
  each starting from the state its own construction left (as a run alone would start its fit);
- its **metrics** are logged under ``m<i>/`` and routed to its own loggers without the prefix
  (:class:`PackLogger`), so its ``metrics.csv`` reads as a run alone;
- its **checkpoints** (:class:`MemberCheckpoint`) are plain student checkpoints in its own
  folder — its weights, its optimizer and schedule, its hyper-parameters, its random state —
  cut out of the pack's checkpoint as they are written (:class:`PackCheckpointIO`);
- a member whose loss stops being finite (``nonfinite_loss=stop``) stops alone, with its error;
  the others go on.

What members share: the batches (same data order and the same augmented views), and so the
teacher's outputs. Under fresh random augmentation with a live teacher
(``teacher_cache.views=0``) the random draws of each batch come from member 0's stream: members
1… then see the same images as member 0, not those they would have drawn alone.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn

from kdlab.engine.checkpoint_io import AtomicCheckpointIO
from kdlab.engine.module import (
    DistillationModule,
    backward_function,
    chunk_means,
    make_scheduler,
)
from kdlab.engine.stacked import StackedStudents
from kdlab.strategies.base import Outputs
from kdlab.util.errors import KdlabError
from kdlab.util.runtime import capture_rng, restore_rng

log = logging.getLogger(__name__)

#: state-dict keys of the (shared, frozen) teacher inside each member
TEACHER_KEY = re.compile(r"^members\.\d+\.teacher\.")
#: checkpoint keys that belong to the pack and not to a member's own checkpoint
PACK_ONLY = ("state_dict", "optimizer_states", "lr_schedulers", "hyper_parameters", "callbacks",
             "kdlab_member_rng", "kdlab_pack", "kdlab_rng")


class RngStreams:
    """One random stream per member: member 0's is the global one, the others' states are
    swapped in while they run (``states[0]`` is unused)."""

    def __init__(self, states: Sequence[Mapping[str, Any] | None]) -> None:
        self.states = [None, *[dict(s) if s is not None else None for s in states[1:]]]

    @contextmanager
    def member(self, i: int) -> Iterator[None]:
        """Run the block on member ``i``'s stream."""
        state = self.states[i] if i else None
        if state is None:
            yield
            return
        outer = capture_rng()
        restore_rng(state)
        try:
            yield
        finally:
            self.states[i] = capture_rng()
            restore_rng(outer)


class PackedModule(L.LightningModule):
    """Trains ``members`` (each a :class:`DistillationModule`) together, one teacher pass per
    batch (see the module docstring).

    Args:
        members: the members, built as they would be alone, sharing one teacher object (or its
            cache) and one datamodule.
        rng_states: each member's random state when its construction ended (from
            :func:`capture_rng`); entry 0 is already the global state.
        hparams: plain containers saved in the pack's own checkpoint.
        stack: run the students as one vectorised pass (they must be :func:`stackable`);
            otherwise one after another.
    """

    def __init__(self, members: Sequence[DistillationModule],
                 rng_states: Sequence[Mapping[str, Any] | None],
                 hparams: Mapping[str, Any] | None = None, stack: bool = False) -> None:
        super().__init__()
        if not members:
            raise ValueError("a pack needs at least one member")
        teachers = {id(m.teacher) for m in members if m.teacher is not None}
        if len(teachers) > 1:
            raise ValueError("the members of a pack must share one teacher object")
        self.automatic_optimization = False
        self.members = nn.ModuleList(members)
        for i, member in enumerate(members):
            member.pack_index = i
        self.rng = RngStreams(rng_states)
        #: failed members: index -> the error that stopped them
        self.failed: dict[int, str] = {}
        self.loop = members[0].loop
        self._schedulers: list[tuple[Any, str | None]] = []
        self._slots: list[int | None] = []  # member -> index in the Trainer's lr_schedulers
        self._backward_fn: Callable[[torch.Tensor], None] | None = None
        #: the members' students as one vectorised pass (:mod:`kdlab.engine.stacked`), or None
        self.stacked = StackedStudents([m.student for m in members]) if stack else None
        self.save_hyperparameters(dict(hparams or {}))

    # -- members ---------------------------------------------------------------------------------
    def active(self) -> list[tuple[int, DistillationModule]]:
        """The members still training, with their index."""
        return [(i, m) for i, m in enumerate(self.members) if i not in self.failed]

    def is_active(self, i: int) -> bool:
        return i not in self.failed

    def fail(self, i: int, error: str) -> None:
        """Stop member ``i`` with ``error`` (its last checkpoints stay as they were)."""
        self.failed[i] = error
        log.error("packed member %d stopped: %s", i, error)
        if not self.active():
            raise KdlabError(f"every member of the pack stopped; the last: {error}")

    def setup(self, stage: str) -> None:
        for member in self.members:  # members read the epoch, the step and the checkpoints
            member.trainer = self.trainer

    def train(self, mode: bool = True) -> PackedModule:
        super().train(mode)
        for member in self.members:  # keeps each member's teacher in eval mode
            member.train(mode)
        return self

    # -- the teacher, once per batch -------------------------------------------------------------
    def teacher_outputs(self, x: torch.Tensor, index: torch.Tensor,
                        view: torch.Tensor | None) -> list[Outputs | None]:
        """The teacher's outputs for each active member: one cache lookup per distinct cache,
        at most one live forward pass (its hooks record every member's tapped features)."""
        outputs: list[Outputs | None] = []
        looked_up: dict[int, Outputs] = {}
        live = None
        for _, member in self.active():
            if member.strategy is None:
                outputs.append(None)
            elif member.teacher_cache is not None:
                key = id(member.teacher_cache)
                if key not in looked_up:
                    looked_up[key] = member.teacher_cache.lookup(index, view)
                outputs.append(looked_up[key])
            elif member.teacher is not None:
                if live is None:
                    with torch.no_grad():
                        live = member.teacher(x)
                taps = member.teacher_taps
                outputs.append(Outputs(live, taps.pop() if taps is not None else {}))
            else:
                outputs.append(member.teacher_outputs(x, index, view))
        return outputs

    # -- training --------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            raise KdlabError(f"trainer.precision={self.trainer.precision}: a packed cohort "
                             "has no loss scaler per member; use bf16-mixed or 32-true")
        self._backward_fn = backward_function(self)
        optimizers = self._optimizers()
        for member, optimizer, (_, interval) in zip(self.members, optimizers, self._schedulers):
            member.use_optimizer(optimizer, interval)

    def _optimizers(self) -> list[Any]:
        optimizers = self.optimizers()
        return list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]

    def on_train_epoch_start(self) -> None:
        for logger in self.trainer.loggers:
            logger.save()
        for _, member in self.active():
            if member.strategy is not None:
                member.strategy.on_epoch_start(self.current_epoch)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Each batch of the chunk: the teacher once, then every active member's forward,
        loss, backward and optimizer step on its own random stream; logs each member's chunk
        mean of every term under ``m<i>/train/``."""
        batches = batch if isinstance(batch, list) else [batch]
        optimizers = self._optimizers()
        accumulate = self.loop.accumulate_grad_batches
        backward = self._backward_fn or backward_function(self)
        check = self.loop.nonfinite_loss != "off"
        trainer = self.trainer
        logged: dict[int, tuple[list[str], list[torch.Tensor], list[int]]] = {}
        for one in batches:
            if trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
                break
            x, y, index, *view = one
            x = self.members[0]._input(x)
            teachers = self.teacher_outputs(x, index, view[0] if view else None)
            active = self.active()
            if self.stacked is not None:
                students = self.stacked.forward(x, [i for i, _ in active])
            else:
                students = [None] * len(active)
            losses: list[tuple[int, DistillationModule, torch.Tensor, dict[str, Any]]] = []
            stepped = False  # one Lightning optimizer step per batch advances global_step
            for (i, member), teacher, student in zip(active, teachers, students):
                with self.rng.member(i):
                    if student is not None:
                        student = Outputs(student, {})
                    terms = member.terms_given(x, y, index, teacher, student)
                    loss = functools.reduce(operator.add, terms.values())
                    member.count_batch()
                    if check and not math.isfinite(loss.item()):
                        try:
                            member._non_finite(terms, one)  # raises, or counts the skip
                        except KdlabError as e:
                            self.fail(i, str(e))
                        continue
                    if self.stacked is None:  # one member after the other
                        stepped |= self._step(i, member, loss, optimizers, backward,
                                              wrapped=not stepped)
                losses.append((i, member, loss, terms))
            if self.stacked is not None and losses:  # one backward for every member
                backward(functools.reduce(operator.add, [loss for _, _, loss, _ in losses]) /
                         accumulate)
                for i, member, _, _ in losses:
                    stepped |= self._step(i, member, None, optimizers, backward,
                                          wrapped=not stepped)
            for i, _, loss, terms in losses:
                names, values, sizes = logged.setdefault(i, ([], [], []))
                if not names:
                    names.extend(terms)
                elif list(terms) != names:  # a pre-stage ended: log what this chunk had
                    continue
                values.append(loss.detach())
                values.extend(v.detach() for v in terms.values())
                sizes.append(len(one[1]))
        for i, (names, values, sizes) in logged.items():
            if not sizes:
                continue
            for name, mean in zip(["loss", *names], chunk_means(values, sizes)):
                self.log(f"m{i}/train/{name}", mean, on_step=True, on_epoch=True,
                         batch_size=sum(sizes), prog_bar=name == "loss" and i < 4)
            for name, value in self.members[i].strategy_values().items():
                self.log(f"m{i}/train/{name}", value, on_step=True, on_epoch=True,
                         batch_size=sum(sizes))

    def _step(self, i: int, member: DistillationModule, loss: torch.Tensor | None,
              optimizers: list[Any], backward: Callable[[torch.Tensor], None],
              wrapped: bool) -> bool:
        """Member ``i``'s :meth:`~DistillationModule.backward_and_step` with its own optimizer
        — Lightning's (``wrapped``: the first member that steps in a batch, so that
        ``global_step`` counts batches) or the plain one — and its per-step scheduler."""
        optimizer = optimizers[i] if wrapped else optimizers[i].optimizer
        scheduler, interval = self._schedulers[i]
        return member.backward_and_step(loss, backward, optimizer,
                                        scheduler if interval == "step" else None)

    def on_train_epoch_end(self) -> None:
        optimizers = self._optimizers()
        for i, member in self.active():
            member.end_epoch_steps(optimizers[i].optimizer, *self._schedulers[i])

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y, _ = batch
        for i, member in self.active():
            logits = member(x)
            member.val_acc.update(logits, y)
            self.log(f"m{i}/val/loss", F.cross_entropy(logits, y), on_epoch=True,
                     sync_dist=True)
            self.log(f"m{i}/val/acc", member.val_acc, on_epoch=True, prog_bar=i < 4)

    def configure_optimizers(self) -> list[dict[str, Any]]:
        """Each member's own optimizer and schedule (:meth:`DistillationModule.make_optimizer`,
        :func:`~kdlab.engine.module.make_scheduler`), in member order."""
        configs: list[dict[str, Any]] = []
        self._schedulers, self._slots = [], []
        slot = 0
        for member in self.members:
            optimizer = member.make_optimizer()
            scheduler, interval = make_scheduler(member.scheduler_factory, optimizer,
                                                 member.optimizer_steps)
            self._schedulers.append((scheduler, interval if scheduler is not None else None))
            if scheduler is None:
                configs.append({"optimizer": optimizer})
                self._slots.append(None)
            else:
                configs.append({"optimizer": optimizer,
                                "lr_scheduler": {"scheduler": scheduler, "interval": interval}})
                self._slots.append(slot)
                slot += 1
        return configs

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the teacher; keep every member's random stream and the failed members."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if TEACHER_KEY.match(k)]:
            del state[key]
        checkpoint["kdlab_rng"] = capture_rng()
        checkpoint["kdlab_member_rng"] = list(self.rng.states)
        checkpoint["kdlab_epoch_done"] = bool(self.trainer.is_last_batch)
        checkpoint["kdlab_pack"] = {"failed": dict(self.failed), "slots": list(self._slots)}
        for logger in self.trainer.loggers:
            logger.save()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "kdlab_rng" in checkpoint:
            restore_rng(checkpoint["kdlab_rng"])
        if "kdlab_member_rng" in checkpoint:
            self.rng.states = list(checkpoint["kdlab_member_rng"])
        self.failed = {int(k): v for k, v in
                       (checkpoint.get("kdlab_pack") or {}).get("failed", {}).items()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign=False):
        state = dict(state_dict)
        for i, member in enumerate(self.members):
            if member.teacher is not None:
                prefix = f"members.{i}.teacher."
                for key, value in member.teacher.state_dict(prefix=prefix).items():
                    state.setdefault(key, value)
        return super().load_state_dict(state, strict=strict, assign=assign)

    def member_checkpoint(self, checkpoint: Mapping[str, Any], i: int) -> dict[str, Any]:
        """Member ``i``'s own checkpoint cut out of the pack's: a plain student checkpoint (its
        state dict, optimizer, schedule, hyper-parameters, random state and checkpoint
        callbacks' states, as a run alone writes them)."""
        prefix = f"members.{i}."
        out = {k: v for k, v in checkpoint.items() if k not in PACK_ONLY}
        out["state_dict"] = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
                             if k.startswith(prefix)}
        out["optimizer_states"] = [checkpoint["optimizer_states"][i]]
        slot = self._slots[i] if i < len(self._slots) else None
        out["lr_schedulers"] = [checkpoint["lr_schedulers"][slot]] if slot is not None else []
        out["hyper_parameters"] = dict(self.members[i].hparams)
        states = checkpoint.get("kdlab_member_rng") or []
        rng = checkpoint.get("kdlab_rng") if i == 0 else (states[i] if i < len(states) else None)
        if rng is not None:
            out["kdlab_rng"] = rng
        own = f"[member {i}]"
        callbacks = {}
        for key, value in (checkpoint.get("callbacks") or {}).items():
            if key.endswith(own):
                callbacks[key[: -len(own)]] = value
            elif not re.search(r"\[(member \d+|pack)\]$", key):
                callbacks[key] = value
        out["callbacks"] = callbacks
        return out


class MemberCheckpoint(ModelCheckpoint):
    """A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` of one member of a pack: it
    reads the member's metrics (``m<i>/val/acc`` as ``val/acc``), writes into the member's
    folder (where :class:`PackCheckpointIO` cuts the member's checkpoint out of the pack's),
    and stops with the member."""

    def __init__(self, member: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.member = member
        self.init_args = dict(kwargs)

    def alone(self) -> ModelCheckpoint:
        """The same checkpoint callback as a run alone has it (to test the member with)."""
        return ModelCheckpoint(**self.init_args)

    @property
    def state_key(self) -> str:
        # a run alone names it ModelCheckpoint{...}: the member's checkpoint keeps that name
        key = super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)
        return f"{key}[member {self.member}]"

    def _monitor_candidates(self, trainer: L.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        prefix = f"m{self.member}/"
        shared = {k: v for k, v in candidates.items() if not re.match(r"m\d+/", k)}
        own = {k[len(prefix):]: v for k, v in candidates.items() if k.startswith(prefix)}
        return {**shared, **own}

    def _stopped(self, pl_module: L.LightningModule) -> bool:
        return isinstance(pl_module, PackedModule) and not pl_module.is_active(self.member)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._stopped(pl_module):
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._stopped(pl_module):
            super().on_train_epoch_end(trainer, pl_module)


class PackCheckpoint(ModelCheckpoint):
    """The pack's own ``last.ckpt`` (every member, to continue the pack), kept out of the
    members' checkpoints."""

    @property
    def state_key(self) -> str:
        return f"{super().state_key}[pack]"


class PackCheckpointIO(AtomicCheckpointIO):
    """Atomic checkpoint writes where a file written into a member's checkpoint folder holds
    that member's own checkpoint (:meth:`PackedModule.member_checkpoint`), and any other file
    (the pack's ``last.ckpt``) the whole pack."""

    def __init__(self, module: PackedModule, folders: Mapping[Path, int]) -> None:
        super().__init__()
        self.module = module
        self.folders = {Path(f).resolve(): i for f, i in folders.items()}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        member = self.folders.get(Path(path).resolve().parent)
        if member is not None:
            checkpoint = self.module.member_checkpoint(checkpoint, member)
        super().save_checkpoint(checkpoint, path, storage_options)


class PackLogger(Logger):
    """The pack's one Lightning logger: metrics logged under ``m<i>/`` go to member ``i``'s own
    loggers without the prefix, the others (``epoch``, ``speed/samples_per_s``) to every
    member's; hyper-parameters are each member's own."""

    def __init__(self, members: Sequence[Sequence[Logger]],
                 hparams: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self.member_loggers = [list(m) for m in members]
        self.member_hparams = [dict(h) for h in hparams]

    @property
    def name(self) -> str:
        return "pack"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        for loggers, hparams in zip(self.member_loggers, self.member_hparams):
            for logger in loggers:
                logger.log_hyperparams(hparams)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        shared = {k: v for k, v in metrics.items() if not re.match(r"m\d+/", k)}
        for i, loggers in enumerate(self.member_loggers):
            prefix = f"m{i}/"
            own = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
            if not own and set(shared) <= {"epoch"}:
                continue
            for logger in loggers:
                logger.log_metrics({**shared, **own}, step)

    def save(self) -> None:
        for loggers in self.member_loggers:
            for logger in loggers:
                logger.save()

    def finalize(self, status: str) -> None:
        for loggers in self.member_loggers:
            for logger in loggers:
                logger.finalize(status)


@dataclass
class PackResult:
    """What fitting a pack produced: the fitted module, the Trainer, the training samples/s
    of each epoch, and the members that stopped (index -> error)."""

    module: PackedModule
    trainer: L.Trainer
    samples_per_s: list[float] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
