"""Train and test one network (a teacher, a distilled student or a baseline) as one stage."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch import nn

from kdlab.build import build_trainer, to_container
from kdlab.data.memory import InMemoryDataModule
from kdlab.module import DistillationModule
from kdlab.strategies.base import Strategy

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What one stage produced: metrics and where its checkpoints are."""

    module: DistillationModule
    metrics: dict[str, float] = field(default_factory=dict)
    best_ckpt: str | None = None
    last_ckpt: str | None = None


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
) -> StageResult:
    """Fit ``student`` (distilling from ``teacher`` with ``strategy`` if given), then test the
    checkpoint with the best validation accuracy (the last weights if there is none)."""
    module = DistillationModule(
        student=student,
        num_classes=data.num_classes,
        optimizer=instantiate(optimizer),
        scheduler=instantiate(scheduler) if scheduler is not None else None,
        teacher=teacher,
        strategy=strategy,
        channels_last=bool(cfg.channels_last),
        hparams={"stage": stage, "config": to_container(cfg)},
    )
    trainer = build_trainer(cfg, stage_dir, stage, max_epochs=max_epochs)
    data.setup()
    log.info("[%s] %s", stage, data.describe())
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    checkpoint = trainer.checkpoint_callback
    best = None
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
        best = checkpoint.best_model_path
    test = trainer.test(module, datamodule=data, ckpt_path=best, verbose=False)
    metrics: dict[str, Any] = dict(test[0]) if test else {}
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_score is not None:
        metrics["val/acc"] = float(checkpoint.best_model_score)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["epochs"] = trainer.current_epoch
    last = checkpoint.last_model_path if isinstance(checkpoint, ModelCheckpoint) else None
    return StageResult(module=module, metrics=metrics, best_ckpt=best, last_ckpt=last or None)
