"""Accuracy and loss of a trained network on the validation and test splits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch import LightningDataModule
from torch import nn

from kdlab.engine.module import DistillationModule, output_classes


def evaluate_model(model: nn.Module, data: LightningDataModule, num_classes: int,
                   accelerator: str = "cpu", precision: str | int = "32-true",
                   channels_last: bool = False, splits: Sequence[str] = ("val", "test"),
                   limits: Mapping[str, Any] | None = None) -> dict[str, float]:
    """``val/acc``, ``val/loss``, ``test/acc``, ``test/loss`` (text: ``bits_per_token``,
    ``bits_per_byte``) of ``model`` (for the ``splits``
    asked for), through a Trainer on one device of ``accelerator`` at ``precision``. ``limits``
    are the run's ``fast_dev_run`` / ``limit_val_batches`` / ``limit_test_batches`` (Trainer
    arguments), so every network of a run is measured on the same batches."""
    example = data.example_input(1) if hasattr(data, "example_input") else None
    module = DistillationModule(student=model,
                                num_classes=output_classes(model, num_classes, example),
                                optimizer=torch.optim.SGD, channels_last=channels_last)
    module.target_bytes = getattr(data, "target_bytes", None)
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **dict(limits or {}))
    metrics: dict[str, float] = {}
    if "val" in splits:
        metrics.update(trainer.validate(module, datamodule=data, verbose=False)[0])
    if "test" in splits:
        metrics.update(trainer.test(module, datamodule=data, verbose=False)[0])
    return {k: float(v) for k, v in metrics.items()}
