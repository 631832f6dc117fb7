"""What every mode shares: a network's name, its ``results.json`` entry, teachers as stages."""

from __future__ import annotations

import copy
import statistics
from typing import Any

from omegaconf import DictConfig
from torch import nn

from kdlab.data.memory import InMemoryDataModule
from kdlab.evaluate import evaluate_model
from kdlab.fit import StageResult
from kdlab.module import freeze
from kdlab.report import describe_model, model_name  # noqa: F401 - re-exported


def latency_args(cfg: DictConfig, data: InMemoryDataModule) -> tuple:
    """The arguments :func:`kdlab.report.describe_model` needs after the model."""
    return (data.input_shape, cfg.latency, bool(cfg.channels_last))


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
            "metrics": evaluate_model(model, data, cfg),
            **describe_model(model, *latency_args(cfg, data))}
