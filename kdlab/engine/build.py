"""Turn config nodes into objects: datamodules, models, strategies, trainers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

import kdlab.util.config  # noqa: F401 - registers ${scaled_lr:...}
from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.module import LoopOptions
from kdlab.strategies.base import Strategy
from kdlab.strategies.composite import Composite, qualify
from kdlab.util.errors import KdlabError
from kdlab.util.tracking import RunLabels, is_wandb, stage_prefix, start_run, wandb_kwargs

log = logging.getLogger(__name__)


def _instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose failures name the config key; our own errors pass."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, KdlabError):
            raise cause from None
        detail = " ".join(str(cause or e).split())[:300]  # hydra's first line ends in ':'
        if isinstance(cause, TypeError) and "unexpected keyword" in detail:
            raise KdlabError(f"{key}: {detail} (check the keys under {key})") from None
        raise KdlabError(f"{key} could not be built: {detail}") from None


def build_datamodule(cfg: DictConfig, **overrides: Any) -> InMemoryDataModule:
    """The datamodule of ``cfg.data`` with some constructor arguments replaced."""
    return _instantiate(cfg.data, "data", **overrides)


def build_model(model_cfg: DictConfig, data: InMemoryDataModule, key: str) -> nn.Module:
    """Build a model; ``input_shape`` and ``num_classes`` come from ``data`` unless set.

    The model is probed with one dry forward pass, and a wrong number of outputs is reported
    against ``key`` (``teacher.model`` or ``student.model``).
    """
    kwargs = {}
    if "input_shape" not in model_cfg:
        kwargs["input_shape"] = list(data.input_shape)
    if "num_classes" not in model_cfg:
        kwargs["num_classes"] = data.num_classes
    try:
        model = _instantiate(model_cfg, key, **kwargs)
    except KdlabError as e:  # zoo errors say model.name=…: name the teacher's or student's
        if str(e).startswith("model."):
            raise KdlabError(f"{key.rsplit('.', 1)[0]}.{e}") from None
        raise
    was_training = model.training
    model.eval()
    with torch.no_grad():
        try:
            out = model(torch.zeros(2, *data.input_shape))
        except RuntimeError as e:
            raise KdlabError(
                f"{key} does not accept {data.name} inputs of shape {list(data.input_shape)}: "
                f"{str(e).splitlines()[0]}"
            ) from None
    model.train(was_training)
    check_num_classes(out.shape[-1], data, key)
    return model


def check_num_classes(outputs: int, data: InMemoryDataModule, key: str) -> None:
    """Fail with one line if a model's number of outputs disagrees with the data's classes."""
    if outputs != data.num_classes:
        raise KdlabError(
            f"{key} outputs {outputs} classes but data={data.name} has {data.num_classes}: "
            f"drop {key}.num_classes (it defaults to the data's) or choose matching data"
        )


def strategy_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The strategies of ``cfg.distill`` by name (``{}`` for ``distill=none``): each option of
    the ``distill`` group sits under its own name (``# @package distill.<name>``), so
    ``distill=[kd,at]`` composes ``distill.kd`` and ``distill.at``."""
    node = cfg.get("distill")
    if node is None:
        return {}
    if not isinstance(node, DictConfig):
        raise KdlabError(f"distill={node} is not a strategy: pick an option of conf/distill "
                         "(distill=kd) or a list of them (distill=[kd,at])")
    if "_target_" in node:
        raise KdlabError("distill._target_: a strategy's config sits under its name "
                         "(distill.<name>._target_); start a conf/distill/<name>.yaml with "
                         "'# @package distill.<name>'")
    members = {}
    for name, member in node.items():
        if not isinstance(member, DictConfig) or member.get("_target_") is None:
            raise KdlabError(f"distill.{name} has no _target_, so it is not a strategy: a "
                             "misspelt strategy name, or settings for a strategy that is not "
                             "selected (select them with distill=[...])")
        members[str(name)] = member
    return members


def strategy_name(cfg: DictConfig) -> str:
    """``kd``, ``kd+at`` (a composition) or ``none``: the label of a run's strategies."""
    return "+".join(strategy_configs(cfg)) or "none"


def build_strategy(cfg: DictConfig) -> Strategy | None:
    """The strategies of ``cfg.distill`` as one :class:`Composite` (``None`` for
    ``distill=none``). A member's mistakes are named ``distill.<member>.<key>``."""
    members = {}
    for name, node in strategy_configs(cfg).items():
        try:
            member = _instantiate(node, f"distill.{name}")
        except KdlabError as e:
            raise KdlabError(qualify(str(e), name)) from None
        if not isinstance(member, Strategy):
            raise KdlabError(f"distill.{name}._target_={node._target_} is not a kdlab Strategy "
                             "(a subclass of kdlab.Strategy)")
        members[name] = member
    return Composite(**members) if members else None


def _model_label(node: Any) -> str:
    target = node.get("_target_") if hasattr(node, "get") else None
    return str(target).rsplit(".", 1)[-1] if target else "none"


def run_labels(cfg: DictConfig) -> RunLabels:
    """The job's labels for W&B: experiment, strategy, seed, networks, mode, folder."""
    return RunLabels(task=str(cfg.task_name), strategy=strategy_name(cfg), seed=int(cfg.seed),
                     teacher=_model_label((cfg.get("teacher") or {}).get("model")),
                     student=_model_label((cfg.get("student") or {}).get("model")),
                     mode=str((cfg.get("mode") or {}).get("name", "offline")),
                     folder=str(cfg.paths.output_dir))


def build_trainer(
    cfg: DictConfig, stage_dir: Path, stage: str, max_epochs: int | None = None,
    loop: LoopOptions | None = None,
    extra_callbacks: Sequence[Callback] = (),
) -> L.Trainer:
    """A Trainer for one stage (``teacher``, ``student``, ``baseline``) writing to ``stage_dir``:
    its checkpoints in ``stage_dir/checkpoints``, its logs in ``stage_dir/logs``. Its callbacks
    are those of ``cfg.callbacks`` followed by ``extra_callbacks``."""
    callbacks: list[Callback] = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        if not cfg.trainer.get("enable_progress_bar", True) and "ProgressBar" in node._target_:
            continue
        kwargs = {"dirpath": str(stage_dir / "checkpoints")} if _is(node, ModelCheckpoint) else {}
        callbacks.append(_instantiate(node, f"callbacks.{name}", **kwargs))
    callbacks += list(extra_callbacks)
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None or "_target_" not in node:
            continue
        if is_wandb(node):  # one W&B run per job, shared by its stages (kdlab/util/tracking.py)
            logger = _instantiate(node, f"logger.{name}",
                                  **wandb_kwargs(run_labels(cfg), node, stage))
            start_run(logger, stage_prefix(stage))
            loggers.append(logger)
            continue
        kwargs: dict[str, Any] = {"save_dir": str(stage_dir / "logs")}
        if "name" in node and node.name is None:
            kwargs["name"] = f"{cfg.task_name}-{stage}"
        loggers.append(_instantiate(node, f"logger.{name}", **kwargs))
    trainer_cfg = cfg.trainer.copy()
    with open_dict(trainer_cfg):
        if max_epochs is not None:
            trainer_cfg.max_epochs = max_epochs
        for key in LOOP_KEYS:  # kdlab's training step does these (manual optimisation)
            trainer_cfg.pop(key, None)
        steps = (loop or loop_options(cfg)).steps_per_call
        if steps > 1 and trainer_cfg.get("log_every_n_steps"):
            # Lightning counts training-step calls: keep step logs every ~n batches
            trainer_cfg.log_every_n_steps = max(1, int(trainer_cfg.log_every_n_steps) // steps)
    return _instantiate(
        trainer_cfg,
        "trainer",
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(stage_dir),
    )


#: Trainer arguments that kdlab's training step implements itself (see :func:`loop_options`)
LOOP_KEYS = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")
#: ``steps_per_call: auto`` for in-memory data on one device (measured in docs/BENCHMARKS.md)
AUTO_STEPS_PER_CALL = 64


def loop_options(cfg: DictConfig, in_memory: bool = True) -> LoopOptions:
    """The training step's options from ``cfg.steps_per_call`` and ``cfg.trainer``.

    ``steps_per_call: auto`` is :data:`AUTO_STEPS_PER_CALL` for data held in memory
    (``in_memory``) on one device, and 1 under DDP (one backward per forward), with
    ``trainer.fast_dev_run`` (one batch means one batch), or for data streamed from disk, whose
    batches are large and slow next to Lightning's per-call overhead (a chunk holds all of its
    batches at once)."""
    trainer = cfg.trainer
    value = cfg.get("steps_per_call", 1)
    distributed = str(trainer.get("strategy", "auto")).startswith(("ddp", "fsdp", "deepspeed")) \
        or trainer.get("devices", 1) not in (1, "1") or int(trainer.get("num_nodes", 1)) > 1
    if value == "auto":
        # fast_dev_run means "one batch": a chunk would be AUTO_STEPS_PER_CALL of them
        quick = bool(trainer.get("fast_dev_run"))
        steps = 1 if distributed or not in_memory or quick else AUTO_STEPS_PER_CALL
    else:
        try:
            steps = int(value)
        except (TypeError, ValueError):
            raise KdlabError(f"steps_per_call={value!r} must be a positive integer or auto") \
                from None
        if steps < 1:
            raise KdlabError(f"steps_per_call={steps} must be >= 1 (or auto)")
        if steps > 1 and distributed:
            raise KdlabError(f"steps_per_call={steps} needs a single device (DDP runs one "
                             "backward per forward): use steps_per_call=1 or auto")
    accumulate = trainer.get("accumulate_grad_batches")
    accumulate = 1 if accumulate is None else int(accumulate)
    if accumulate < 1:
        raise KdlabError(f"trainer.accumulate_grad_batches={accumulate} must be >= 1")
    clip = trainer.get("gradient_clip_val")
    algorithm = str(trainer.get("gradient_clip_algorithm") or "norm")
    if algorithm not in ("norm", "value"):
        raise KdlabError(f"trainer.gradient_clip_algorithm={algorithm} must be norm or value")
    nonfinite = str(cfg.get("nonfinite_loss", "stop"))
    if nonfinite not in NONFINITE_CHOICES:
        raise KdlabError(f"nonfinite_loss={nonfinite} must be one of "
                         f"{', '.join(NONFINITE_CHOICES)}")
    return LoopOptions(steps_per_call=steps, accumulate_grad_batches=accumulate,
                       gradient_clip_val=float(clip) if clip is not None else None,
                       gradient_clip_algorithm=algorithm, nonfinite_loss=nonfinite)


#: what a NaN / infinite training loss does (LoopOptions.nonfinite_loss)
NONFINITE_CHOICES = ("stop", "skip", "off")


def _is(node: DictConfig, cls: type) -> bool:
    target = str(node.get("_target_", ""))
    return target.rsplit(".", 1)[-1] == cls.__name__


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain dicts and lists (safe for ``weights_only`` checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
