"""DistillationModule: a trainable student, an optional frozen teacher and a strategy."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kdlab.data.memory import UNLABELLED
from kdlab.strategies.base import Batch, Outputs, Strategy
from kdlab.taps import Taps

TEACHER_PREFIX = "teacher."
# the frozen teacher is in eval mode on purpose when training starts
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode for ``model`` (returned for chaining)."""
    model.requires_grad_(False)
    return model.eval()


class DistillationModule(L.LightningModule):
    """Trains ``student`` with cross-entropy plus the terms of ``strategy`` against ``teacher``.

    The teacher is frozen three ways: its parameters have ``requires_grad=False``; it stays in
    eval mode whenever :meth:`train` is called (by Lightning or by the user); and it is left out
    of the optimizer and of checkpoints (``on_save_checkpoint`` drops its keys, and
    :meth:`load_state_dict` fills them back from the live teacher, so loading stays strict).

    Without a teacher (``teacher=None, strategy=None``) this is plain supervised training: the
    same machinery trains teachers and no-teacher baselines.

    Every loss term is logged by name as ``train/<name>`` (already weighted; ``train/loss`` is
    their sum). Validation and test log ``val/acc``, ``val/loss``, ``test/acc``, ``test/loss``.

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
    ) -> None:
        super().__init__()
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
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.channels_last = channels_last
        self.ce_weight = strategy.ce_weight if strategy is not None else 1.0
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
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
        strategy.setup(student, teacher, samples)

    @staticmethod
    def _outputs(model: nn.Module, taps: Taps | None, x: torch.Tensor) -> Outputs:
        logits = model(x)
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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign=False):
        state = dict(state_dict)
        if self.teacher is not None:
            for key, value in self.teacher.state_dict(prefix=TEACHER_PREFIX).items():
                state.setdefault(key, value)
        return super().load_state_dict(state, strict=strict, assign=assign)

    # -- steps -----------------------------------------------------------------------------------
    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(self._input(x))

    def on_train_epoch_start(self) -> None:
        if self.strategy is not None:
            self.strategy.on_epoch_start(self.current_epoch)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        x = self._input(x)
        student = self._outputs(self.student, self.student_taps, x)
        if self.strategy is None:
            terms = {"ce": self._cross_entropy(student.logits, y)}
        else:
            teacher = Outputs(torch.empty(0))
            if self.teacher is not None:
                with torch.no_grad():
                    teacher = self._outputs(self.teacher, self.teacher_taps, x)
            batch_ = Batch(x, y, index)
            if self.current_epoch < self.strategy.init_epochs:  # the method's pre-stage
                terms = dict(self.strategy.init_loss(student, teacher, batch_))
            else:
                terms = {}
                if self.ce_weight > 0:
                    terms["ce"] = self._cross_entropy(student.logits, y)
                terms.update(self.strategy(student, teacher, batch_))
        loss = torch.stack(list(terms.values())).sum()
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``ce_weight ×`` cross-entropy averaged over the labelled samples (0 if none)."""
        labelled = (y != UNLABELLED).sum().clamp_min(1)
        ce = F.cross_entropy(logits, y, ignore_index=UNLABELLED, reduction="sum")
        return self.ce_weight * ce / labelled

    def _evaluate(self, batch: tuple[torch.Tensor, ...], split: str, metric) -> None:
        x, y, _ = batch
        logits = self(x)
        metric.update(logits, y)
        self.log(f"{split}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log(f"{split}/acc", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=list(self.trainable_parameters()))
        if self.scheduler_factory is None:
            return optimizer
        kwargs, interval = {}, "epoch"
        accepted = inspect.signature(self.scheduler_factory).parameters
        keywords = getattr(self.scheduler_factory, "keywords", {})
        for name in ("total_steps", "T_max"):
            if name in accepted and keywords.get(name) is None:
                kwargs[name] = int(self.trainer.estimated_stepping_batches)
                interval = "step"
        scheduler = self.scheduler_factory(optimizer, **kwargs)
        schedule = {"scheduler": scheduler, "interval": interval}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
