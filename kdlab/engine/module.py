"""DistillationModule: a trainable student, an optional frozen teacher and a strategy."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import operator
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kdlab.data.memory import UNLABELLED
from kdlab.engine.heads import HeadAccuracy, averaged_heads
from kdlab.engine.loop import ChunkedLoader
from kdlab.engine.on_policy import generated_windows, on_policy_draw
from kdlab.engine.spec import LoopOptions, OnPolicyOptions
from kdlab.engine.taps import Taps
from kdlab.optim.dot import DOT
from kdlab.strategies.base import Batch, Outputs, Strategy
from kdlab.util.errors import KdlabError
from kdlab.util.runtime import capture_rng, restore_rng

TEACHER_PREFIX = "teacher."

log = logging.getLogger(__name__)


# the frozen teacher is in eval mode on purpose when training starts
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode for ``model`` (returned for chaining)."""
    model.requires_grad_(False)
    return model.eval()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A language model's per-position outputs ``[N, T, V]`` (or targets ``[N, T]``) as one row
    per token, ``[N·T, V]`` (``[N·T]``): every strategy and metric then treats a token as a
    sample. Image logits ``[N, C]`` and targets ``[N]`` are returned as they are."""
    if t.dim() == 3 or (t.dim() == 2 and not t.is_floating_point()):
        return t.flatten(0, 1)
    return t


@torch.no_grad()
def output_classes(model: nn.Module, num_classes: int, example: torch.Tensor | None) -> int:
    """The classes a network's accuracy is counted over: the data's ``num_classes``, except for
    a language model (token-id ``example``) whose vocabulary is wider than its tokenizer's (a
    padded embedding table, or a teacher built on another vocabulary), counted over its own
    outputs, found by one forward pass of a window of ``example`` (eval mode)."""
    if example is None or example.is_floating_point():
        return num_classes
    was_training = model.training
    model.eval()
    try:
        width = int(model(example[:1]).shape[-1])
    finally:
        model.train(was_training)
    return max(num_classes, width)


class DistillationModule(L.LightningModule):
    """Trains ``student`` with cross-entropy plus the terms of ``strategy`` against ``teacher``.

    The teacher is frozen three ways: its parameters have ``requires_grad=False``; it stays in
    eval mode whenever :meth:`train` is called (by Lightning or by the user); and it is left out
    of the optimizer and of checkpoints (``on_save_checkpoint`` drops its keys, and
    :meth:`load_state_dict` fills them back from the live teacher, so loading stays strict).

    Without a teacher (``teacher=None, strategy=None``) this is plain supervised training: the
    same machinery trains teachers and no-teacher baselines.

    Every loss term is logged by name as ``train/<name>`` (already weighted; ``train/loss`` is
    their sum). Validation and test log ``val/acc``, ``val/loss``, ``test/acc``, ``test/loss``
    of :attr:`deployed`: the student, or the network a head-replacing strategy delivers. A
    student that answers with the average of several heads (a ViT with DeiT's distillation
    token) also logs each head's own accuracy, ``{split}/acc_<head>``
    (:mod:`kdlab.engine.heads`).

    Args:
        student: the network to train.
        teacher: the frozen network to distill from, or ``None``.
        strategy: the distillation strategy (needs ``teacher``), or ``None``.
        optimizer: ``params -> torch.optim.Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler`` or ``None``. A ``total_steps`` or ``T_max``
            argument left unset is filled with the number of optimizer steps of the run, and
            the scheduler then steps every batch.
        num_classes: classes of the task, for the accuracy metrics.
        channels_last: feed convolutional nets NHWC tensors (faster on CPU and tensor cores).
        hparams: plain-container hyper-parameters stored in checkpoints (the resolved config).
        example_input: a batch shaped like the data, for the dry forward pass that probes the
            shapes of the layers a strategy reads (needed by feature-based strategies).
        num_train_samples: size of the training split (memory banks of contrastive methods).
        loop: steps per call, gradient accumulation and clipping (see :class:`LoopOptions`).
        teacher_cache: precomputed teacher outputs looked up by sample index instead of running
            the teacher (see :mod:`kdlab.engine.cache`), or ``None`` for a live teacher.
        on_policy: a fraction of the training batches generated by the student and scored by
            the live teacher (:mod:`kdlab.engine.on_policy`); ``None``: off.

    Optimisation is manual (``automatic_optimization = False``): each training step runs the
    batches of its chunk one by one — forward, loss, backward, optimizer step, scheduler step —
    and logs the chunk's sample-weighted mean of every term.
    """

    def __init__(
        self,
        student: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        teacher: nn.Module | None = None,
        strategy: Strategy | None = None,
        channels_last: bool = False,
        hparams: Mapping[str, Any] | None = None,
        example_input: torch.Tensor | None = None,
        num_train_samples: int = 0,
        loop: LoopOptions | None = None,
        teacher_cache: Any = None,
        on_policy: OnPolicyOptions | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.loop = loop or LoopOptions()
        self.teacher_cache = teacher_cache
        #: on-policy distillation's options (None: every batch comes from the data)
        self.on_policy = on_policy if on_policy is not None and on_policy.fraction > 0 else None
        self.on_policy_batches = 0  # training batches generated by the student (this stage)
        self._micro_batches = 0  # batches since the last optimizer step (accumulation)
        self._batches_seen = 0  # training batches of this fit, skipped ones included
        self.skipped_batches = 0  # batches whose loss was not finite (nonfinite_loss: skip)
        #: this module's place in a packed cohort (:mod:`kdlab.engine.pack`), None alone
        self.pack_index: int | None = None
        self._scheduler_interval: str | None = None
        self._backward_fn: Callable[[torch.Tensor], None] | None = None  # set at train start
        self._stepped: list[nn.Parameter] = []  # the optimizer's parameters, set at train start
        self._dot: DOT | None = None  # optimizer=dot: two backward passes a step (train start)
        #: whether training targets may be UNLABELLED (-1); False allows the plain mean CE
        self.has_unlabelled = True
        #: text data: per split, the bytes of the text each window's targets cover (indexed by
        #: the batch's sample index), for ``{split}/bits_per_byte``; None: not logged
        self.target_bytes: Mapping[str, torch.Tensor] | None = None
        if strategy is not None and strategy.needs_teacher and teacher is None:
            raise ValueError(f"{type(strategy).__name__} needs a teacher")
        if teacher is not None and strategy is None:
            raise ValueError("a teacher needs a strategy")
        self.student = student
        self.teacher = freeze(teacher) if teacher is not None else None
        self.strategy = strategy
        self.student_taps = self.teacher_taps = None
        if strategy is not None:
            self._connect(strategy, example_input, num_train_samples)
        #: the network validated and tested (a tuple: not registered twice as a submodule)
        self._deployed = (strategy.deployed(student) if strategy is not None else student,)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.channels_last = channels_last
        self.ce_weight = strategy.ce_weight if strategy is not None else 1.0
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        #: a student whose eval output averages heads (DeiT's): each head's own accuracy
        heads = averaged_heads(student)
        self.head_acc = HeadAccuracy(heads, num_classes) if heads else None
        self.save_hyperparameters(dict(hparams or {}))
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _connect(self, strategy: Strategy, example: torch.Tensor | None, samples: int) -> None:
        """Hook the layers the strategy reads, probe their shapes with one dry forward pass of
        ``example`` (eval mode, no gradients) and let the strategy build its connectors."""
        student_paths, teacher_paths = strategy.resolve(self.student, self.teacher)
        self.student_taps = Taps(self.student, student_paths)
        self.teacher_taps = Taps(self.teacher, teacher_paths) if self.teacher is not None else None
        if example is None:
            if student_paths or teacher_paths:
                raise ValueError("a strategy that reads features needs an example_input")
            strategy.setup(Outputs(torch.empty(0)), Outputs(torch.empty(0)), samples)
            return
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            student = self._outputs(self.student, self.student_taps, example)
            teacher = (self._outputs(self.teacher, self.teacher_taps, example)
                       if self.teacher is not None else Outputs(torch.empty(0)))
        self.student.train(was_training)
        if self.teacher is not None:
            check_vocabularies(strategy, student.logits.shape[-1], teacher.logits.shape[-1])
        strategy.setup(student, teacher, samples)

    @staticmethod
    def _outputs(model: nn.Module, taps: Taps | None, x: torch.Tensor) -> Outputs:
        logits = as_rows(model(x))
        return Outputs(logits, taps.pop() if taps is not None else {})

    # -- the teacher stays frozen ----------------------------------------------------------------
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student and strategy (connector) parameters: everything but the teacher."""
        for name, p in self.named_parameters():
            if not name.startswith(TEACHER_PREFIX) and p.requires_grad:
                yield p

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign=False):
        state = dict(state_dict)
        if self.teacher is not None:
            for key, value in self.teacher.state_dict(prefix=TEACHER_PREFIX).items():
                state.setdefault(key, value)
        return super().load_state_dict(state, strict=strict, assign=assign)

    # -- steps -----------------------------------------------------------------------------------
    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:  # images; token ids [N, T] stay as they are
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @property
    def deployed(self) -> nn.Module:
        """The network this stage delivers: the student, or what the strategy deploys in its
        place (:meth:`Strategy.deployed`, e.g. SimKD's student with the teacher's classifier).
        Validation, test and :meth:`forward` run it."""
        return self._deployed[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._deployed[0](self._input(x))

    def on_train_epoch_start(self) -> None:
        self.flush_logs()  # the previous epoch's rows logged after its checkpoint
        if self.strategy is not None:
            self.strategy.on_epoch_start(self.current_epoch)

    def _terms(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
               view: torch.Tensor | None = None,
               strong: torch.Tensor | None = None) -> dict[str, Any]:
        """The weighted loss terms of one batch, by name (``view``: the stored augmented views
        the batch shows, see :mod:`kdlab.data.views`; ``strong``: the batch's strong view, for
        a strategy with ``views = 2``: the live teacher runs on it too)."""
        teacher = self.teacher_outputs(x, index, view) if self.strategy is not None else None
        if strong is not None and teacher is not None and self.teacher is not None:
            with torch.no_grad():
                teacher.strong = self._outputs(self.teacher, self.teacher_taps, strong)
        return self.terms_given(x, y, index, teacher, strong=strong)

    def teacher_outputs(self, x: torch.Tensor, index: torch.Tensor,
                        view: torch.Tensor | None = None) -> Outputs:
        """The teacher's outputs for the batch: read from the cache, or a live forward pass
        without gradients (empty for a strategy that needs no teacher)."""
        if self.teacher_cache is not None:
            return self.teacher_cache.lookup(index, view)
        if self.teacher is not None:
            with torch.no_grad():
                return self._outputs(self.teacher, self.teacher_taps, x)
        return Outputs(torch.empty(0))

    def terms_given(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                    teacher: Outputs | None, student: Outputs | None = None,
                    strong: torch.Tensor | None = None) -> dict[str, Any]:
        """The weighted loss terms of one batch given the teacher's outputs (a packed cohort
        computes them once for all its members, :mod:`kdlab.engine.pack`) and, when already
        computed (a pack's vectorised pass), the student's. ``strong``: the batch's strong
        view (``Strategy.views = 2``), on which the student runs too (``student.strong``)."""
        if student is None:
            student = self._outputs(self.student, self.student_taps, x)
        y = as_rows(y)
        strategy = self.strategy
        if strategy is None:
            return {"ce": self._cross_entropy(student.logits, y)}
        assert teacher is not None
        batch = Batch(x, y, index)
        init_epochs = strategy.init_epochs
        if init_epochs and self.current_epoch < init_epochs:  # the method's pre-stage
            return dict(strategy.init_loss(student, teacher, batch))
        student = strategy.student_outputs(student)  # a replaced head's logits (SimKD)
        if strong is not None:  # a second forward pass: its own batch-norm statistics
            student.strong = self._outputs(self.student, self.student_taps, strong)
        terms = {}
        if self.ce_weight > 0:
            terms["ce"] = self._cross_entropy(student.logits, y)
        terms.update(strategy(student, teacher, batch))
        return terms

    def batch_loss(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The total loss of one ``(x, y, index)`` batch (``(x, y, index, view)`` when it shows
        stored augmented views, ``(x, y, index, None, strong)`` when it carries a strong view
        for a two-view strategy) and its weighted terms by name."""
        x, y, index, *rest = batch
        view = rest[0] if rest else None
        if self.on_policy is not None:
            seed = self._on_policy_seed()
            if seed is not None:
                terms = self.on_policy_terms(self._input(x), index, seed)
                return functools.reduce(operator.add, terms.values()), terms
        if len(rest) > 1 and rest[1] is not None:
            terms = self._terms(self._input(x), y, index, view, strong=self._input(rest[1]))
        else:
            terms = self._terms(self._input(x), y, index, view)
        return functools.reduce(operator.add, terms.values()), terms

    def _on_policy_seed(self) -> int | None:
        """The seed of this batch's on-policy sample, or ``None`` for a batch from the data: a
        pure function of ``on_policy.seed``, the optimizer step and the batch's place in a
        gradient accumulation, so a resumed run draws what the uninterrupted one drew. The
        pre-stage of a strategy (``init_epochs``) trains on the data."""
        strategy = self.strategy
        if strategy is None or (strategy.init_epochs and self.current_epoch < strategy.init_epochs):
            return None
        return on_policy_draw(self.on_policy, self.global_step, self._micro_batches)

    def on_policy_terms(self, x: torch.Tensor, index: torch.Tensor,
                        seed: int) -> dict[str, torch.Tensor]:
        """The strategy's terms on a batch the student generated (GKD's on-policy data,
        Agarwal et al. 2024): each window keeps its first ``on_policy.prompt`` tokens, the
        student samples the rest (:func:`~kdlab.engine.on_policy.generated_windows`, seeded by
        ``seed``), the live teacher — never the cache, which holds no output for generated
        text — and the student score it, and the strategy compares them on the positions that
        predict generated tokens only (``prompt - 1 …``). No cross-entropy: the student's own
        samples are no labels."""
        options = self.on_policy
        assert options is not None and self.strategy is not None and self.teacher is not None
        generator = torch.Generator(device=x.device).manual_seed(seed)
        inputs, targets = generated_windows(self.student, x, options, generator)
        keep = options.prompt - 1  # the first position that predicts a generated token
        student = Outputs(as_rows(self.student(inputs)[:, keep:]))
        with torch.no_grad():
            teacher = Outputs(as_rows(self.teacher(inputs)[:, keep:]))
        for taps in (self.student_taps, self.teacher_taps):  # no strategy here reads them
            if taps is not None:
                taps.pop()
        student = self.strategy.student_outputs(student)
        self.on_policy_batches += 1
        return dict(self.strategy(student, teacher,
                                  Batch(inputs, as_rows(targets[:, keep:]), index)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One optimizer step per batch of the chunk; logs the chunk's mean of every term."""
        batches = batch if isinstance(batch, list) else [batch]
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers() if self._scheduler_interval == "step" else None
        backward = self._backward_fn or self._backward()
        check = self.loop.nonfinite_loss != "off"
        trainer = self.trainer
        max_steps = trainer.max_steps
        losses: list[torch.Tensor] = []
        batch_terms: list[dict[str, torch.Tensor]] = []
        sizes: list[int] = []
        on_policy = self.on_policy_batches
        for one in batches:
            if max_steps >= 0 and trainer.global_step >= max_steps:  # counts batches here
                break
            loss, terms = self.batch_loss(one)
            self._batches_seen += 1
            # a Python float test: a twentieth of the cost of bool(torch.isfinite(loss))
            if check and not math.isfinite(loss.item()):
                self._non_finite(terms, one)  # raises, or skips this batch
                continue
            if self._dot is not None:  # optimizer=dot: a backward pass per kind of gradient
                self.dot_backward(terms, backward)
                self.backward_and_step(None, backward, optimizer, scheduler)
            else:
                self.backward_and_step(loss, backward, optimizer, scheduler)
            losses.append(loss.detach())
            batch_terms.append({k: v.detach() for k, v in terms.items()})
            sizes.append(len(one[1]))
        if not losses:  # every batch of the chunk was skipped
            return None
        total = sum(sizes)
        means = term_means(losses, batch_terms, sizes)
        for name, (mean, size) in means.items():
            self.log(f"train/{name}", mean, on_step=True, on_epoch=True, batch_size=size,
                     prog_bar=name == "loss")
        for name, value in self.strategy_values().items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=total)
        if self.on_policy is not None:  # the share of the chunk's batches the student wrote
            self.log("train/on_policy", (self.on_policy_batches - on_policy) / len(losses),
                     on_step=True, on_epoch=True, batch_size=total)
        return means["loss"][0]

    def strategy_values(self) -> dict[str, Any]:
        """What the strategy logs besides its loss terms (:meth:`Strategy.logged`)."""
        return self.strategy.logged() if self.strategy is not None else {}

    def _non_finite(self, terms: dict[str, torch.Tensor], batch: tuple[torch.Tensor, ...]) -> None:
        """Stop the run (``nonfinite_loss: stop``) or count the skipped batch (``skip``)."""
        bad = [f"{name} = {float(value):g}" for name, value in terms.items()
               if not bool(torch.isfinite(value))]
        where = (f"epoch {self.current_epoch}, optimizer step {self.trainer.global_step}, "
                 f"batch {self._batches_seen}")
        inputs = "" if bool(torch.isfinite(batch[0]).all()) else " (the batch's inputs are not " \
                                                                "finite: check the data)"
        if self.loop.nonfinite_loss == "skip":
            self.skipped_batches += 1
            if self.skipped_batches <= 3 or self.skipped_batches % 100 == 0:
                log.warning("non-finite loss at %s: %s%s; batch skipped (%d so far)", where,
                            ", ".join(bad), inputs, self.skipped_batches)
            return
        last = self._last_checkpoint()
        ckpt = f"the last good checkpoint is {last} (left as it was)" if last else \
            "no checkpoint was written before it"
        raise KdlabError(f"non-finite loss at {where}: {', '.join(bad)}{inputs}; {ckpt}; lower "
                         "optimizer.lr, clip gradients (trainer.gradient_clip_val=1.0), or set "
                         "nonfinite_loss=skip to skip such batches")

    def _last_checkpoint(self) -> str:
        """The newest checkpoint file of this fit ("" if none was written yet)."""
        paths = []
        for callback in self.trainer.checkpoint_callbacks:
            if self.pack_index is not None and getattr(callback, "member", None) != \
                    self.pack_index:  # a packed member names its own checkpoints only
                continue
            for path in (getattr(callback, "last_model_path", ""),
                         getattr(callback, "best_model_path", "")):
                if path and os.path.isfile(path):
                    paths.append(path)
        return max(paths, key=os.path.getmtime, default="")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the teacher (it is never part of a student checkpoint) and keep the RNG state
        (dropout masks, CRD's negatives …) so that a resumed run draws what the uninterrupted
        one would have drawn."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]
        checkpoint["kdlab_rng"] = capture_rng()
        if self.on_policy is not None:
            checkpoint["kdlab_on_policy_batches"] = self.on_policy_batches
        # written at the end of an epoch (the resumed run starts the next one) or inside it
        checkpoint["kdlab_epoch_done"] = bool(self.trainer.is_last_batch)
        self.flush_logs()  # the rows up to this checkpoint are on disk if the run is killed

    def flush_logs(self) -> None:
        """Write what the loggers hold (the CSV logger keeps up to 100 rows in memory): called
        at each checkpoint and epoch start, so a killed run loses no row a resume would not
        log again (:mod:`kdlab.engine.history`)."""
        for logger in self.trainer.loggers:
            logger.save()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("kdlab_rng")
        if rng is not None:
            restore_rng(rng)
        self.on_policy_batches = int(checkpoint.get("kdlab_on_policy_batches", 0))

    def on_train_start(self) -> None:
        self._backward_fn = self._backward()
        self._stepped = [p for optimizer in self.trainer.optimizers
                         for group in optimizer.param_groups for p in group["params"]]
        clip = self.loop.gradient_clip_val
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self._dot = self.dot_optimizer(self.trainer.optimizers, scaler is not None)
        if clip is not None and scaler is not None:
            # Lightning's clip_gradients would clip the loss-scaled gradients of 16-mixed
            raise KdlabError(f"trainer.gradient_clip_val={clip} with "
                             f"trainer.precision={self.trainer.precision}: kdlab's loop cannot "
                             "clip gradients scaled for float16; use bf16-mixed or 32-true")

    def dot_optimizer(self, optimizers: list[Any], scaled: bool) -> DOT | None:
        """The :class:`~kdlab.optim.DOT` optimizer this module steps, or ``None``; one that the
        loop cannot drive (accumulation, clipping, a float16 loss scaler) fails in one line."""
        dot = next((o for o in optimizers if isinstance(o, DOT)), None)
        if dot is None:
            return None
        loop = self.loop
        for bad, why in ((loop.accumulate_grad_batches > 1,
                          f"trainer.accumulate_grad_batches={loop.accumulate_grad_batches}"),
                         (loop.gradient_clip_val is not None,
                          f"trainer.gradient_clip_val={loop.gradient_clip_val}"),
                         (scaled, "a float16 loss scaler (trainer.precision=16-mixed)")):
            if bad:
                raise KdlabError(f"optimizer=dot steps after two backward passes per batch and "
                                 f"does not support {why}; remove it or use optimizer=sgd")
        return dot

    def dot_backward(self, terms: dict[str, torch.Tensor],
                     backward: Callable[..., None]) -> None:
        """DOT's two backward passes: the distillation terms' (their gradients stashed as the
        distillation gradient), then the cross-entropy's (``ce``, the task gradient)."""
        assert self._dot is not None
        task = terms.get("ce")
        distill = [value for name, value in terms.items() if name != "ce"]
        if distill:
            backward(functools.reduce(operator.add, distill), retain_graph=task is not None)
            self._dot.stash_distillation_gradients()
        if task is not None:
            backward(task)

    def _backward(self) -> Callable[[torch.Tensor], None]:
        """:func:`backward_function` for this module."""
        return backward_function(self)

    def use_optimizer(self, optimizer: Any, scheduler_interval: str | None) -> None:
        """Step ``optimizer`` (whose parameters' gradients are reset after each step) with a
        scheduler stepped every ``step`` or ``epoch`` (``None``: no scheduler): what
        ``on_train_start`` and ``configure_optimizers`` set up alone, for a member of a pack
        (whose Trainer holds every member's optimizer)."""
        self._stepped = [p for group in optimizer.param_groups for p in group["params"]]
        self._scheduler_interval = scheduler_interval

    def count_batch(self) -> None:
        """One more training batch seen (its loss computed, finite or not)."""
        self._batches_seen += 1

    def backward_and_step(self, loss: torch.Tensor | None,
                          backward: Callable[[torch.Tensor], None], optimizer: Any,
                          scheduler: Any) -> bool:
        """The backward pass of ``loss`` (divided by ``accumulate_grad_batches``; ``None``: a
        pack's one backward for every member was done already) and, once the accumulation is
        complete, the optimizer step (:meth:`_optimizer_step`, with ``scheduler`` stepped after
        it). Returns whether the optimizer stepped."""
        accumulate = self.loop.accumulate_grad_batches
        if accumulate == 1:
            if loss is not None:
                backward(loss)
            self._optimizer_step(optimizer, scheduler)
            return True
        if loss is not None:
            backward(loss / accumulate)
        self._micro_batches += 1
        if self._micro_batches < accumulate:
            return False
        self._optimizer_step(optimizer, scheduler)
        return True

    def end_epoch_steps(self, optimizer: Any, scheduler: Any, interval: str | None) -> None:
        """At the end of a training epoch: the optimizer step of an incomplete accumulation,
        and the step of a scheduler that steps once per epoch."""
        if self._micro_batches:  # gradients left over from an incomplete accumulation
            self._optimizer_step(optimizer, scheduler if interval == "step" else None)
        if interval == "epoch" and scheduler is not None:
            scheduler.step()

    def _optimizer_step(self, optimizer: Any, scheduler: Any) -> None:
        """Clip (``trainer.gradient_clip_*``), step through Lightning's optimizer wrapper (which
        counts ``trainer.global_step`` and runs the ``on_before_optimizer_step`` hooks), reset
        the gradients, step a per-step LR schedule."""
        if self.loop.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.loop.gradient_clip_val,
                                gradient_clip_algorithm=self.loop.gradient_clip_algorithm)
        optimizer.step()
        for param in self._stepped:  # what zero_grad(set_to_none=True) does, without its
            param.grad = None  # profiler scope and param-group walk (~10 µs a step on CPU)
        if self._micro_batches:  # (an nn.Module attribute write costs ~2 µs: skip it at 0)
            self._micro_batches = 0
        if scheduler is not None:
            scheduler.step()

    def on_train_epoch_end(self) -> None:
        interval = self._scheduler_interval
        self.end_epoch_steps(self.optimizers(), self.lr_schedulers() if interval else None,
                             interval)

    def _cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``ce_weight ×`` cross-entropy averaged over the labelled samples (0 if none)."""
        if not self.has_unlabelled:  # every target is a label: the plain mean
            ce = F.cross_entropy(logits, y)
            return ce if self.ce_weight == 1 else self.ce_weight * ce
        labelled = (y != UNLABELLED).sum().clamp_min(1)
        ce = F.cross_entropy(logits, y, ignore_index=UNLABELLED, reduction="sum")
        return self.ce_weight * ce / labelled

    def _evaluate(self, batch: tuple[torch.Tensor, ...], split: str, metric) -> None:
        x, y, index = batch
        if self.head_acc is None:
            logits = self(x)
        else:
            with self.head_acc.recording(self.student) as heads:
                logits = self(x)
        logits, y = as_rows(logits), as_rows(y)
        metric.update(logits, y)
        if self.head_acc is not None:
            for name, head in self.head_acc.update(heads.pop(), y, split).items():
                self.log(name, head, on_epoch=True)
        loss = F.cross_entropy(logits, y)
        self.log(f"{split}/loss", loss, on_epoch=True, sync_dist=True)
        self.log(f"{split}/acc", metric, on_epoch=True, prog_bar=True)
        if x.dim() == 2 and not x.is_floating_point():  # token ids: the loss in bits per token
            self.log(f"{split}/bits_per_token", loss / math.log(2), on_epoch=True,
                     sync_dist=True)
            self._log_bits_per_byte(split, loss, y.numel(), index)
            if split == "test" and self.teacher is not None:
                self._log_teacher_kl(x, logits, split)

    def _log_teacher_kl(self, x: torch.Tensor, logits: torch.Tensor, split: str) -> None:
        """``{split}/teacher_kl``: the mean per-token ``KL(teacher ‖ student)`` in nats on
        held-out text (how far the student's next-token distributions are from the teacher's;
        not logged when their vocabularies differ)."""
        with torch.no_grad():
            teacher = as_rows(self.teacher(x)).float()
        if teacher.shape != logits.shape:
            return
        p = F.log_softmax(teacher, dim=1)
        kl = (p.exp() * (p - F.log_softmax(logits.float(), dim=1))).sum(1).mean()
        self.log(f"{split}/teacher_kl", kl, on_epoch=True, sync_dist=True)

    def _log_bits_per_byte(self, split: str, loss: torch.Tensor, tokens: int,
                           index: torch.Tensor) -> None:
        """``{split}/bits_per_byte``: the batch's summed nats over ``ln 2`` times the bytes of
        text its targets cover, logged with those bytes as its weight, so the epoch's value is
        the split's total nats over ``ln 2`` times its total bytes (exact for any tokenizer;
        equal to bits per token for bytes)."""
        counts = self.target_bytes.get(split) if self.target_bytes else None
        if counts is None:
            return
        n_bytes = int(counts[index.cpu()].sum())
        if n_bytes > 0:
            self.log(f"{split}/bits_per_byte", loss * tokens / (math.log(2) * n_bytes),
                     on_epoch=True, sync_dist=True, batch_size=n_bytes)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    # -- optimisation ----------------------------------------------------------------------------
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole fit: training batches per epoch (after
        ``limit_train_batches``; a chunked loader counts its batches, not its chunks) over
        ``accumulate_grad_batches``, times the epochs, capped by ``max_steps``."""
        trainer = self.trainer
        calls = trainer.estimated_stepping_batches  # loads the train loader: calls × epochs
        per_call = max(1, trainer.num_training_batches)
        epochs = max(1, round(calls / per_call))
        loader = trainer.train_dataloader
        per_epoch = loader.num_batches if isinstance(loader, ChunkedLoader) else per_call
        steps = -(-per_epoch // self.loop.accumulate_grad_batches) * epochs
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            steps = min(steps, trainer.max_steps)
        return int(steps)

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of the trainable parameters (:meth:`trainable_parameters`); a config
        that does not fit its ``_target_`` fails in one line."""
        try:
            return self.optimizer_factory(params=list(self.trainable_parameters()))
        except TypeError as e:  # e.g. `fused` given to an optimizer without a fused kernel
            raise KdlabError(f"the optimizer config does not fit its _target_: {e}; drop the "
                             "key it does not accept (e.g. ~optimizer.fused, or "
                             "~teacher.train.optimizer.fused for the teacher)") from None
        except ValueError as e:  # torch's own checks: "Invalid learning rate: -1" …
            raise KdlabError(f"optimizer (or teacher.train.optimizer): {e}; fix that "
                             "hyper-parameter") from None

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer()
        scheduler, interval = make_scheduler(self.scheduler_factory, optimizer,
                                             self.optimizer_steps)
        if scheduler is None:
            return optimizer
        self._scheduler_interval = interval
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": interval}}


def check_vocabularies(strategy: Strategy, student: int, teacher: int) -> None:
    """Refuse a teacher and a student of different output widths (vocabularies of language
    models) unless ``strategy`` compares distributions of any widths (ULD)."""
    if student != teacher and not strategy.any_vocabulary:
        names = getattr(strategy, "names", None) or [type(strategy).__name__]
        raise KdlabError(
            f"the teacher predicts {teacher} classes (its vocabulary) and the student "
            f"{student}: distill={'+'.join(names)} compares the two distributions class by "
            "class, so both need one vocabulary; use distill=uld, built for different "
            "vocabularies, or models of one vocabulary")


def backward_function(module: L.LightningModule) -> Callable[[torch.Tensor], None]:
    """``Tensor.backward`` when that is all ``manual_backward`` would do — one device, a
    precision without loss scaling, and no ``on_before_backward`` / ``on_after_backward``
    hook overridden by ``module`` or a callback (checked through the public
    ``trainer.strategy``, ``trainer.precision_plugin`` and ``trainer.callbacks``) —
    ``module.manual_backward`` otherwise. Its hook dispatch costs ~0.1 ms per batch on CPU."""
    trainer = module.trainer
    hooks = ("on_before_backward", "on_after_backward")
    overridden = any(
        getattr(type(obj), hook) is not getattr(base, hook)
        for obj, base in [(module, L.LightningModule)]
        + [(callback, L.Callback) for callback in trainer.callbacks]
        for hook in hooks
    )
    plain = (not overridden and isinstance(trainer.strategy, SingleDeviceStrategy)
             and type(trainer.precision_plugin) in (Precision, MixedPrecision)
             and getattr(trainer.precision_plugin, "scaler", None) is None)
    return torch.Tensor.backward if plain else module.manual_backward


def make_scheduler(factory: Callable[..., Any] | None, optimizer: torch.optim.Optimizer,
                   steps: Callable[[], int]) -> tuple[Any, str]:
    """The LR scheduler of ``factory`` for ``optimizer`` and its interval: a ``total_steps``
    or ``T_max`` argument left unset is filled with ``steps()`` (the fit's optimizer steps),
    and the scheduler then steps every optimizer step (``step``), otherwise every epoch.
    ``(None, "epoch")`` without a factory."""
    if factory is None:
        return None, "epoch"
    kwargs, interval = {}, "epoch"
    accepted = inspect.signature(factory).parameters
    keywords = getattr(factory, "keywords", {})
    for name in ("total_steps", "T_max"):
        if name in accepted and keywords.get(name) is None:
            kwargs[name] = steps()
            interval = "step"
    return factory(optimizer, **kwargs), interval


def term_means(losses: list[torch.Tensor], terms: list[dict[str, torch.Tensor]],
               sizes: list[int]) -> dict[str, tuple[torch.Tensor, int]]:
    """The sample-weighted mean over a chunk's batches of the loss and of every term, with the
    samples it covers: ``{"loss": (mean, samples), <term>: …}``. When every batch has the same
    terms this is one :func:`chunk_means`; a term only some batches have (the cross-entropy,
    absent from on-policy batches) is averaged over those."""
    names = list(terms[0])
    if all(list(t) == names for t in terms[1:]):
        values = [v for loss, t in zip(losses, terms) for v in (loss, *t.values())]
        means = chunk_means(values, sizes)
        return {name: (mean, sum(sizes)) for name, mean in zip(["loss", *names], means)}
    out = {"loss": (chunk_means(losses, sizes)[0], sum(sizes))}
    for name in dict.fromkeys(k for t in terms for k in t):
        have = [i for i, t in enumerate(terms) if name in t]
        out[name] = (chunk_means([terms[i][name] for i in have], [sizes[i] for i in have])[0],
                     sum(sizes[i] for i in have))
    return out


def chunk_means(values: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """The sample-weighted mean over a chunk's batches of each logged value: ``values`` holds,
    batch after batch, the loss and then every term (flat), ``sizes`` each batch's samples. A
    few tensor ops, however many batches."""
    stacked = torch.stack(values).view(len(sizes), -1)
    weights = torch.tensor(sizes, dtype=stacked.dtype, device=stacked.device) / sum(sizes)
    return (stacked * weights[:, None]).sum(0)

