"""The stage runner every mode shares: a stage trained from the config (spec → engine), a
network's ``results.json`` entry, networks evaluated as stages."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import nn

from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.evaluate import evaluate_model
from kdlab.engine.fit import StageResult, fit_module, fit_stage
from kdlab.engine.module import DistillationModule, freeze
from kdlab.engine.spec import OnPolicyOptions, StageSpec
from kdlab.modes.build import (
    cache_options,
    compile_options,
    loop_options,
    recipe,
    stage_callbacks,
    stage_loggers,
    to_container,
    trainer_args,
)
from kdlab.modes.resume import history_callback, resume_checkpoint
from kdlab.strategies.base import Strategy
from kdlab.util.inputs import TokenShape
from kdlab.util.measure import describe_model
from kdlab.util.report import model_name  # noqa: F401 - re-exported


def stage_spec(cfg: DictConfig, name: str, folder: Path, student: nn.Module,
               data: InMemoryDataModule, optimizer: DictConfig, scheduler: DictConfig | None,
               max_epochs: int | None = None, teacher: nn.Module | None = None,
               strategy: Strategy | None = None, ckpt_path: str | None = None,
               callbacks: Sequence[Callback] = (), optimizer_key: str = "optimizer",
               monitor: str = "val/acc", on_policy: OnPolicyOptions | None = None) -> StageSpec:
    """The engine's description of one stage from the run's config: the trainer, callbacks
    and loggers of ``cfg`` for ``folder``, the recipe from ``optimizer`` / ``scheduler`` /
    ``max_epochs`` (default ``trainer.max_epochs``), the loop options, the cache and compile
    options (``on_policy``: the share of batches the student generates, off by default). A
    resumed run continues the stage from ``<folder>/checkpoints/last.ckpt``."""
    epochs = cfg.trainer.max_epochs if max_epochs is None else max_epochs
    resume = ckpt_path or resume_checkpoint(folder)
    loggers = stage_loggers(cfg, folder, name)
    history = history_callback(loggers, resume)  # the metrics logged before a stop
    return StageSpec(
        name=name, folder=folder, student=student, data=data,
        recipe=recipe(optimizer, scheduler, epochs, optimizer_key),
        loop=loop_options(cfg, in_memory=getattr(data, "in_memory", False)),
        teacher=teacher, strategy=strategy, trainer=trainer_args(cfg),
        callbacks=[*stage_callbacks(cfg, folder, monitor), *callbacks,
                   *([history] if history else [])],
        loggers=loggers, cache=cache_options(cfg), compile=compile_options(cfg, data),
        channels_last=bool(cfg.get("channels_last", False)),
        hparams=to_container(cfg), ckpt_path=resume,
        test_last=bool(cfg.get("test_last", False)), monitor=monitor,
        on_policy=on_policy or OnPolicyOptions())


def train_stage(cfg: DictConfig, name: str, folder: Path, student: nn.Module,
                data: InMemoryDataModule, optimizer: DictConfig, scheduler: DictConfig | None,
                **options: Any) -> StageResult:
    """Train ``student`` as stage ``name`` in ``folder`` with the run's trainer, loop,
    callbacks and loggers, and test its best-validation checkpoint: the config becomes a
    :class:`~kdlab.engine.spec.StageSpec` (:func:`stage_spec`, whose keyword ``options`` —
    ``teacher``, ``strategy``, ``max_epochs``, ``callbacks``, ``monitor`` … — it takes) that
    the engine runs."""
    return fit_stage(stage_spec(cfg, name, folder, student, data, optimizer, scheduler,
                                **options))


def train_module(cfg: DictConfig, name: str, folder: Path, module: DistillationModule,
                 data: InMemoryDataModule, ckpt_path: str | None = None,
                 callbacks: Sequence[Callback] = ()) -> StageResult:
    """Train a module a mode built itself (a cohort) as stage ``name``; its optimizer and
    schedule are the module's own."""
    spec = stage_spec(cfg, name, folder, module.student, data, cfg.optimizer,
                      cfg.get("scheduler"), ckpt_path=ckpt_path, callbacks=callbacks)
    return fit_module(spec, module)


def latency_args(cfg: DictConfig, data: InMemoryDataModule) -> tuple:
    """The arguments :func:`kdlab.util.report.describe_model` needs after the model."""
    return (data.input_shape, cfg.latency, bool(cfg.channels_last))


#: the trainer options that limit an evaluation's batches
EVAL_LIMITS = ("fast_dev_run", "limit_val_batches", "limit_test_batches")


def evaluate(cfg: DictConfig, model: nn.Module, data: InMemoryDataModule,
             limited: bool = True) -> dict[str, float]:
    """Validation and test accuracy and loss of ``model`` on ``data``, on the run's accelerator
    and precision, and on the batches its trainer's limits allow (``cfg.trainer``:
    ``fast_dev_run``, ``limit_val_batches``, ``limit_test_batches``), as the trained networks
    are measured; ``limited=False``: the whole splits, whatever the limits (``kdlab-eval``)."""
    limits = {key: cfg.trainer[key] for key in EVAL_LIMITS
              if limited and cfg.trainer.get(key) is not None}
    return evaluate_model(model, data, data.num_classes,
                          accelerator=cfg.trainer.get("accelerator", "auto"),
                          precision=cfg.trainer.get("precision", "32-true"),
                          channels_last=bool(cfg.get("channels_last", False)), limits=limits)


def stage_entry(stage: str, name: str, model: nn.Module, result: StageResult,
                latency: tuple, **extra: Any) -> dict[str, Any]:
    """One network's entry of ``results.json``: its stage, model, metrics, checkpoints, training
    speed, parameters and CPU latency (plus ``extra`` keys)."""
    speed = result.samples_per_s
    rates = {"train_samples_per_s": _rates(speed)}
    if isinstance(latency[0], TokenShape):  # a sample is a window of tokens
        rates["train_tokens_per_s"] = _rates([s * latency[0][0] for s in speed])
    return {"stage": stage, "model": name, "metrics": result.metrics,
            "best_ckpt": result.best_ckpt, "last_ckpt": result.last_ckpt, **rates,
            **describe_model(model, *latency), **extra}


def _rates(per_epoch: list[float]) -> dict[str, Any]:
    """Per-epoch training rates and their median (the first epoch, a warm-up, left out when
    there are more)."""
    return {"per_epoch": per_epoch,
            "median": statistics.median(per_epoch[1:] or per_epoch) if per_epoch else None}


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
