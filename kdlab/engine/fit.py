"""Train and test one network (a teacher, a distilled student or a baseline) as one stage."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig
from torch import nn

from kdlab.data.memory import InMemoryDataModule
from kdlab.data.mix import check_stage
from kdlab.engine.build import build_trainer, loop_options, to_container
from kdlab.engine.cache import prepare_cache
from kdlab.engine.callbacks import Throughput
from kdlab.engine.module import DistillationModule
from kdlab.modes.resume import resume_checkpoint
from kdlab.strategies.base import Strategy
from kdlab.util.runtime import release_free_memory

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What one stage produced: metrics and where its checkpoints are."""

    module: DistillationModule
    metrics: dict[str, float] = field(default_factory=dict)
    best_ckpt: str | None = None
    last_ckpt: str | None = None
    #: training samples/s of each epoch (empty without the Throughput callback)
    samples_per_s: list[float] = field(default_factory=list)


def compile_models(cfg: DictConfig, module: DistillationModule) -> None:
    """``torch.compile`` the student and/or the live teacher per ``cfg.compile`` (in place:
    parameter names and checkpoints are unchanged)."""
    options = cfg.get("compile") or {}
    mode = options.get("mode", "default")
    mode = None if mode in (None, "default") else str(mode)
    if options.get("student"):
        module.student.compile(mode=mode)
        log.info("compile: student compiled (mode %s)", mode or "default")
    if options.get("teacher") and module.teacher is not None:
        if module.teacher_cache is not None:
            log.info("compile: teacher not compiled, its outputs come from the cache")
        else:
            module.teacher.compile(mode=mode)
            log.info("compile: teacher compiled (mode %s)", mode or "default")


def fit_stage(
    cfg: DictConfig,
    stage: str,
    stage_dir: Path,
    student: nn.Module,
    data: InMemoryDataModule,
    optimizer: DictConfig,
    scheduler: DictConfig | None,
    max_epochs: int | None = None,
    teacher: nn.Module | None = None,
    strategy: Strategy | None = None,
    ckpt_path: str | None = None,
    callbacks: Sequence[Callback] = (),
) -> StageResult:
    """Fit ``student`` (distilling from ``teacher`` with ``strategy`` if given), then test the
    checkpoint with the best validation accuracy (the last weights if there is none).
    ``callbacks`` are added to the ones of ``cfg.callbacks`` for this stage."""
    data.setup()
    check_stage(data, strategy, stage)  # mixed batches need soft targets only
    loop = loop_options(cfg, in_memory=getattr(data, "in_memory", False))
    module = DistillationModule(
        student=student,
        num_classes=data.num_classes,
        optimizer=instantiate(optimizer),
        scheduler=instantiate(scheduler) if has_target(scheduler) else None,
        teacher=teacher,
        strategy=strategy,
        channels_last=bool(cfg.channels_last),
        hparams={"stage": stage, "config": to_container(cfg)},
        example_input=data.example_input(2),
        num_train_samples=data.num_train_samples,
        loop=loop,
    )
    module.has_unlabelled = data.has_unlabelled
    if strategy is not None and strategy.needs_teacher:
        module.teacher_cache = prepare_cache(cfg, module.teacher, module.teacher_taps,
                                             getattr(data, "x_train", None), data.augment,
                                             bool(cfg.channels_last), mix=data.mix)
    compile_models(cfg, module)
    return fit_module(cfg, stage, stage_dir, module, data, max_epochs=max_epochs,
                      ckpt_path=ckpt_path, callbacks=callbacks)


def fit_module(
    cfg: DictConfig,
    stage: str,
    stage_dir: Path,
    module: DistillationModule,
    data: InMemoryDataModule,
    max_epochs: int | None = None,
    ckpt_path: str | None = None,
    callbacks: Sequence[Callback] = (),
) -> StageResult:
    """Fit an already built ``module`` (its ``loop`` options decide the loader's chunks) and
    test its best-validation checkpoint: the part of :func:`fit_stage` that modes with their own
    LightningModule (a subclass of :class:`DistillationModule`) reuse."""
    data.setup()
    loop = module.loop
    data.steps_per_call = loop.steps_per_call
    trainer = build_trainer(cfg, stage_dir, stage, max_epochs=max_epochs, loop=loop,
                            extra_callbacks=callbacks)
    log.info("[%s] %s", stage, data.describe())
    ckpt_path = ckpt_path or resume_checkpoint(stage_dir)  # a killed run continues here
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    # read the checkpoint callback before testing: restoring the best checkpoint for the test
    # also restores the callback's state as it was when that checkpoint was written
    best = last = None
    metrics: dict[str, Any] = {}
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or not callback.best_model_path:
            continue
        if callback.monitor is None:  # saves every epoch: its latest file is the last
            last = callback.best_model_path
        elif best is None:
            best = callback.best_model_path
            if callback.best_model_score is not None:
                metrics[callback.monitor] = float(callback.best_model_score)
    epochs = trainer.current_epoch
    last_acc = test_accuracy(module, data) if cfg.get("test_last") else None
    speed = next((c.history for c in trainer.callbacks if isinstance(c, Throughput)), [])
    test = trainer.test(module, datamodule=data, ckpt_path=best, verbose=False)
    metrics.update(test[0] if test else {})
    release_free_memory()  # the stage's freed activations, before the next stage allocates
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["epochs"] = epochs
    if last_acc is not None:
        metrics["last/test/acc"] = last_acc
    if getattr(module, "skipped_batches", 0):
        metrics["skipped_batches"] = module.skipped_batches
    return StageResult(module=module, metrics=metrics, best_ckpt=best, last_ckpt=last,
                       samples_per_s=list(speed))


@torch.no_grad()
def test_accuracy(module: DistillationModule, data: InMemoryDataModule) -> float:
    """Test accuracy of ``module``'s current weights (after a fit: the last epoch's), computed
    directly rather than through ``trainer.test`` so the loggers see one test per stage."""
    was_training = module.training
    module.eval()
    correct = total = 0
    for x, y, _ in data.test_dataloader():
        x, y = x.to(module.device), y.to(module.device)
        correct += int((module(x).argmax(-1) == y).sum())
        total += len(y)
    module.train(was_training)
    return correct / max(total, 1)


def has_target(node: DictConfig | None) -> bool:
    """Whether a config node builds something (``scheduler=none`` is ``{_target_: null}``)."""
    return node is not None and node.get("_target_") is not None
