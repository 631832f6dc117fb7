"""What every mode shares: a network's name, its ``results.json`` entry, teachers as stages."""

from __future__ import annotations

import copy
import statistics
from typing import Any

from omegaconf import DictConfig
from torch import nn

from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.evaluate import evaluate_model
from kdlab.engine.fit import StageResult
from kdlab.engine.module import freeze
from kdlab.util.measure import describe_model
from kdlab.util.report import model_name  # noqa: F401 - re-exported


def latency_args(cfg: DictConfig, data: InMemoryDataModule) -> tuple:
    """The arguments :func:`kdlab.util.report.describe_model` needs after the model."""
    return (data.input_shape, cfg.latency, bool(cfg.channels_last))


def evaluate(cfg: DictConfig, model: nn.Module, data: InMemoryDataModule) -> dict[str, float]:
    """Validation and test accuracy and loss of ``model`` on ``data``, on the run's accelerator
    and precision (``cfg.trainer``)."""
    return evaluate_model(model, data, data.num_classes,
                          accelerator=cfg.trainer.get("accelerator", "auto"),
                          precision=cfg.trainer.get("precision", "32-true"),
                          channels_last=bool(cfg.get("channels_last", False)))


def stage_entry(stage: str, name: str, model: nn.Module, result: StageResult,
                latency: tuple, **extra: Any) -> dict[str, Any]:
    """One network's entry of ``results.json``: its stage, model, metrics, checkpoints, training
    speed, parameters and CPU latency (plus ``extra`` keys)."""
    speed = result.samples_per_s
    return {"stage": stage, "model": name, "metrics": result.metrics,
            "best_ckpt": result.best_ckpt, "last_ckpt": result.last_ckpt,
            "train_samples_per_s": {
                "per_epoch": speed,
                "median": statistics.median(speed[1:] or speed) if speed else None},
            **describe_model(model, *latency), **extra}


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen (eval mode, no gradients) copy of a trained stage's network, to teach the next
    stage while the original stays as it is."""
    return freeze(copy.deepcopy(model))


def evaluated_entry(cfg: DictConfig, stage: str, name: str, model: nn.Module,
                    data: InMemoryDataModule, **extra: Any) -> dict[str, Any]:
    """The entry of a network that this stage did not train (a given or stored teacher, an
    ensemble): evaluated on ``data``'s validation and test splits, with parameters and CPU
    latency (plus ``extra`` keys)."""
    return {"stage": stage, "model": name, **extra,
            "metrics": evaluate(cfg, model, data),
            **describe_model(model, *latency_args(cfg, data))}
