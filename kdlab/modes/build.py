"""The config turned into objects: datamodules, models, strategies, callbacks, loggers, and the
engine's stage spec (:class:`~kdlab.engine.spec.StageSpec`).

Only the modes read the config; this is where they turn it into what the engine takes. Every
instantiation error names the config key it came from."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from torch import nn

import kdlab.util.config  # noqa: F401 - registers ${scaled_lr:...}
from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.spec import (
    NONFINITE_CHOICES,
    CacheOptions,
    CompileOptions,
    LoopOptions,
    Recipe,
)
from kdlab.engine.speed import auto_compile, device_type
from kdlab.strategies.base import Strategy
from kdlab.strategies.composite import Composite, qualify
from kdlab.util.errors import KdlabError
from kdlab.util.inputs import TokenShape, example_inputs
from kdlab.util.tracking import RunLabels, is_wandb, stage_prefix, start_run, wandb_kwargs

log = logging.getLogger(__name__)


def instantiate_node(node: DictConfig, key: str, **kwargs: Any) -> Any:
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
    return instantiate_node(cfg.data, "data", **overrides)


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
        model = instantiate_node(model_cfg, key, **kwargs)
    except KdlabError as e:  # zoo errors say model.name=…: name the teacher's or student's
        if str(e).startswith("model."):
            raise KdlabError(f"{key.rsplit('.', 1)[0]}.{e}") from None
        raise
    was_training = model.training
    model.eval()
    with torch.no_grad():
        try:
            out = model(example_inputs(data.input_shape, 2, zeros=True))
        except RuntimeError as e:
            raise KdlabError(
                f"{key} does not accept {data.name} inputs of shape {list(data.input_shape)}: "
                f"{str(e).splitlines()[0]}"
            ) from None
    model.train(was_training)
    check_num_classes(out.shape[-1], data, key)
    return model


def check_num_classes(outputs: int, data: InMemoryDataModule, key: str) -> None:
    """Fail with one line if a model's number of outputs disagrees with the data's classes.

    A language model (token inputs) may predict more tokens than the data's tokenizer has — a
    padded embedding table, or a teacher of another vocabulary for ``distill=uld`` (the engine
    refuses a teacher and a student of different vocabularies for any other strategy) — but
    not fewer: it must read and predict every token id of the data."""
    if isinstance(data.input_shape, TokenShape):
        if outputs < data.num_classes:
            tokenizer = getattr(getattr(data, "tokenizer", None), "name", "?")
            raise KdlabError(
                f"{key} predicts {outputs} tokens but data={data.name}'s tokenizer "
                f"(data.tokenizer={tokenizer}) has {data.num_classes}: the model cannot read "
                f"or predict every token id; use the model's own tokenizer (data.tokenizer="
                "hf:<name>) or a model of that vocabulary")
        return
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
                             "selected (select them with distill=[...]; an experiment's "
                             f"settings for it are dropped by the override '~distill.{name}')")
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
            member = instantiate_node(node, f"distill.{name}")
        except KdlabError as e:
            raise KdlabError(qualify(str(e), name)) from None
        if not isinstance(member, Strategy):
            raise KdlabError(f"distill.{name}._target_={node._target_} is not a kdlab Strategy "
                             "(a subclass of kdlab.Strategy)")
        members[name] = member
    warn_about_long_warmups(members, cfg.trainer.get("max_epochs"))
    warn_about_long_pre_stages(members, cfg.trainer.get("max_epochs"))
    return Composite(**members) if members else None


def head_replacing_members(cfg: DictConfig) -> list[str]:
    """The names of the run's strategies that replace the student's head
    (:attr:`Strategy.replaces_head`, e.g. ``simkd``), read from their classes without building
    them."""
    from hydra.utils import get_class

    names = []
    for name, node in strategy_configs(cfg).items():
        try:
            cls = get_class(str(node._target_))
        except Exception:  # noqa: BLE001 - build_strategy reports a bad _target_ in one line
            continue
        if getattr(cls, "replaces_head", False):
            names.append(name)
    return names


def refuse_replaced_head(cfg: DictConfig, what: str, why: str) -> None:
    """Fail in one line when a strategy of the run replaces the student's head and ``what``
    (``mode=born_again``, ``compress=prune`` …) cannot handle it, for the reason ``why``."""
    names = head_replacing_members(cfg)
    if names:
        raise KdlabError(f"{what} does not support distill={strategy_name(cfg)}: "
                         f"{', '.join(names)} replaces the student's classifier with the "
                         f"teacher's (the trained network is the student + projector + teacher "
                         f"classifier), and {why}; use mode=offline and compress=none with it, "
                         "or another distill")


def deployed_network(strategy: Strategy | None, student: nn.Module) -> nn.Module:
    """The network a trained stage delivers: the student, or what ``strategy`` deploys in its
    place (:meth:`Strategy.deployed`)."""
    return student if strategy is None else strategy.deployed(student)


def _warn_each(members: dict[str, Strategy], max_epochs: Any,
               line: Callable[[str, Strategy, int], str | None]) -> list[str]:
    """The warning ``line(name, member, max_epochs)`` gives for each member (``None``: none),
    logged and returned; nothing when ``max_epochs`` is not a positive whole number."""
    if not isinstance(max_epochs, int) or max_epochs < 1:
        return []
    lines = [text for name, member in members.items()
             if (text := line(name, member, max_epochs)) is not None]
    for text in lines:
        log.warning(text)
    return lines


def _long_warmup(name: str, member: Strategy, max_epochs: int) -> str | None:
    warmup = getattr(member, "warmup", 0)
    if not (isinstance(warmup, int) and warmup > max_epochs):
        return None
    return (f"kdlab: warning: distill.{name}.warmup={warmup} epochs is longer than "
            f"the schedule (trainer.max_epochs={max_epochs}): its loss reaches only "
            f"{max_epochs}/{warmup} = {max_epochs / warmup:.0%} of its weight in "
            f"the last epoch; set distill.{name}.warmup={max_epochs} or less for a "
            "full-weight phase (the authors warm up over 20 of 240 epochs)")


def _long_pre_stage(name: str, member: Strategy, max_epochs: int) -> str | None:
    if member.init_epochs < max_epochs:
        return None
    return (f"kdlab: warning: distill.{name}.init_epochs={member.init_epochs} "
            f"epochs of pre-stage fill the schedule (trainer.max_epochs="
            f"{max_epochs}): the run ends before the method's main stage; write "
            "trainer.max_epochs as ${after_pre_stage:N} (N epochs after the "
            f"pre-stage), lower distill.{name}.init_epochs, or pick protocol=none")


def warn_about_long_warmups(members: dict[str, Strategy], max_epochs: Any) -> list[str]:
    """One warning line for each member whose warm-up (DKD, ReviewKD: 20 epochs, from the
    authors' 240-epoch CIFAR schedule) is longer than the run's schedule: its loss would never
    reach its full weight. The value is kept — it is the researcher's to change — but never
    silently. Returns the lines."""
    return _warn_each(members, max_epochs, _long_warmup)


def warn_about_long_pre_stages(members: dict[str, Strategy], max_epochs: Any) -> list[str]:
    """One warning line for each member whose pre-stage (``init_epochs``) takes the whole
    schedule: the run would end before the method's main stage (for RepDistiller's AB and FSP,
    before the student's classifier trains at all). Kept, never silent. Returns the lines."""
    return _warn_each(members, max_epochs, _long_pre_stage)


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


def is_target(node: DictConfig, cls: type) -> bool:
    """Whether a config node's ``_target_`` names ``cls`` (by class name)."""
    target = str(node.get("_target_", ""))
    return target.rsplit(".", 1)[-1] == cls.__name__


def stage_callbacks(cfg: DictConfig, folder: Path, monitor: str = "val/acc") -> list[Callback]:
    """The callbacks of ``cfg.callbacks`` for one stage: checkpoints in
    ``<folder>/checkpoints`` (a best-``val/acc`` one monitors ``monitor`` instead); progress
    bars left out when ``trainer.enable_progress_bar`` is false."""
    callbacks: list[Callback] = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        if not cfg.trainer.get("enable_progress_bar", True) and "ProgressBar" in node._target_:
            continue
        kwargs: dict[str, Any] = {}
        if is_target(node, ModelCheckpoint):
            kwargs["dirpath"] = str(folder / "checkpoints")
            if node.get("monitor") == "val/acc" and monitor != "val/acc":
                kwargs["monitor"] = monitor
        callbacks.append(instantiate_node(node, f"callbacks.{name}", **kwargs))
    return callbacks


def stage_loggers(cfg: DictConfig, folder: Path, stage: str) -> list[Logger]:
    """The loggers of ``cfg.logger`` for one stage: files in ``<folder>/logs``; one W&B run
    per job, shared by its stages (:mod:`kdlab.util.tracking`)."""
    loggers: list[Logger] = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None or "_target_" not in node:
            continue
        if is_wandb(node):
            logger = instantiate_node(node, f"logger.{name}",
                                      **wandb_kwargs(run_labels(cfg), node, stage))
            start_run(logger, stage_prefix(stage))
            loggers.append(logger)
            continue
        kwargs: dict[str, Any] = {"save_dir": str(folder / "logs")}
        if "name" in node and node.name is None:
            kwargs["name"] = f"{cfg.task_name}-{stage}"
        loggers.append(instantiate_node(node, f"logger.{name}", **kwargs))
    return loggers


#: ``steps_per_call: auto`` for in-memory data on one device (measured in docs/BENCHMARKS.md)
AUTO_STEPS_PER_CALL = 128
#: Lightning's Trainer, as ``trainer._target_`` may name it
TRAINERS = ("lightning.pytorch.Trainer", "lightning.Trainer", "pytorch_lightning.Trainer",
            "lightning.pytorch.trainer.trainer.Trainer")


def trainer_args(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.trainer`` as plain Trainer arguments (Lightning's meaning; ``max_epochs`` comes
    from each stage's recipe)."""
    args = OmegaConf.to_container(cfg.trainer, resolve=True)
    target = args.pop("_target_", TRAINERS[0])
    if target not in TRAINERS:
        raise KdlabError(f"trainer._target_={target}: kdlab runs Lightning's Trainer "
                         f"({TRAINERS[0]}); set its arguments under trainer")
    return args


def is_distributed(trainer: DictConfig) -> bool:
    """Whether ``trainer`` runs several processes (DDP and the like, devices or nodes > 1)."""
    return str(trainer.get("strategy", "auto")).startswith(("ddp", "fsdp", "deepspeed")) \
        or trainer.get("devices", 1) not in (1, "1") or int(trainer.get("num_nodes", 1)) > 1


def loop_options(cfg: DictConfig, in_memory: bool = True) -> LoopOptions:
    """The loop's options from ``cfg.steps_per_call``, ``cfg.nonfinite_loss`` and
    ``cfg.trainer`` (accumulation, clipping).

    ``steps_per_call: auto`` is :data:`AUTO_STEPS_PER_CALL` for data held in memory
    (``in_memory``) on one device, and 1 under DDP (one backward per forward), with
    ``trainer.fast_dev_run`` (one batch means one batch), or for data streamed from disk, whose
    batches are large and slow next to Lightning's per-call overhead (a chunk holds all of its
    batches at once)."""
    trainer = cfg.trainer
    value = cfg.get("steps_per_call", 1)
    distributed = is_distributed(trainer)
    quick = bool(trainer.get("fast_dev_run"))
    if value == "auto":
        steps = 1 if distributed or not in_memory or quick else AUTO_STEPS_PER_CALL
    else:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KdlabError(f"steps_per_call={value!r} must be a positive integer or auto")
        steps = int(value)
        if steps < 1:
            raise KdlabError(f"steps_per_call={steps} must be >= 1 (or auto)")
        if steps > 1 and distributed:
            raise KdlabError(f"steps_per_call={steps} needs a single device (DDP runs one "
                             "backward per forward): use steps_per_call=1 or auto")
        if quick:  # fast_dev_run means "one batch"
            steps = 1
    accumulate = trainer.get("accumulate_grad_batches")
    accumulate = 1 if accumulate is None else accumulate
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise KdlabError(f"trainer.accumulate_grad_batches={accumulate} must be >= 1")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                             or clip < 0):
        raise KdlabError(f"trainer.gradient_clip_val={clip} must be a number >= 0 or null")
    algorithm = str(trainer.get("gradient_clip_algorithm") or "norm")
    if algorithm not in ("norm", "value"):
        raise KdlabError(f"trainer.gradient_clip_algorithm={algorithm} must be norm or value")
    nonfinite = str(cfg.get("nonfinite_loss", "stop"))
    if nonfinite not in NONFINITE_CHOICES:
        raise KdlabError(f"nonfinite_loss={nonfinite} must be one of "
                         f"{', '.join(NONFINITE_CHOICES)}")
    return LoopOptions(steps_per_call=steps, accumulate_grad_batches=accumulate,
                       gradient_clip_val=float(clip) if clip else None,
                       gradient_clip_algorithm=algorithm, nonfinite_loss=nonfinite)


def cache_options(cfg: DictConfig) -> CacheOptions:
    """``cfg.teacher_cache`` checked; cache files live in ``<paths.teacher_store>/cache``."""
    options = cfg.get("teacher_cache") or {}
    enabled = options.get("enabled", "auto")
    if enabled not in (True, False, "auto"):
        raise KdlabError(f"teacher_cache.enabled={enabled} must be true, false or auto")
    max_mb = options.get("max_mb", 1024)
    if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or max_mb < 0:
        raise KdlabError(f"teacher_cache.max_mb={max_mb} must be a number >= 0")
    views = options.get("views", 8)
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise KdlabError(f"teacher_cache.views={views} must be an integer >= 0 (0: under "
                         "augmentation the teacher runs live)")
    view_seed = options.get("view_seed", 0)
    if isinstance(view_seed, bool) or not isinstance(view_seed, int):
        raise KdlabError(f"teacher_cache.view_seed={view_seed} must be an integer")
    topk = options.get("topk")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise KdlabError(f"teacher_cache.topk={topk} must be a number of classes >= 1, or null "
                         "for every logit")
    folder = Path(cfg.paths.teacher_store) / "cache" if options.get("disk", True) else None
    progress = (cfg.get("trainer") or {}).get("enable_progress_bar", True) is not False
    return CacheOptions(enabled=enabled, dtype=str(options.get("dtype", "float16")),
                        folder=folder, max_mb=float(max_mb), views=views, view_seed=view_seed,
                        progress=progress, topk=topk)


#: the ``compile: auto`` lines already logged in this process (one line per choice, not per stage)
_LOGGED: set[str] = set()


def compile_options(cfg: DictConfig, data: Any = None) -> CompileOptions:
    """``cfg.compile``: which networks ``torch.compile`` compiles, and its mode, with ``auto``
    resolved for the trainer's device (:func:`kdlab.engine.speed.auto_compile`): CUDA graphs on
    one GPU when every training batch of ``data`` has one shape, nothing compiled off a GPU."""
    options = cfg.get("compile") or {}
    mode = options.get("mode", "default")
    student, teacher = options.get("student", False), options.get("teacher", False)
    dynamic = None
    if data is not None and not getattr(data, "in_memory", False):
        dynamic = (f"data {type(data).__name__} is read batch by batch, so its batch shapes "
                   "are not known to be fixed")
    fraction = float((cfg.get("on_policy") or {}).get("fraction", 0.0) or 0.0)
    if fraction > 0:
        dynamic = "on_policy.fraction > 0 runs the student on sequences that grow"
    trainer = cfg.get("trainer") or {}
    resolved, lines = auto_compile(
        student if student == "auto" else bool(student),
        teacher if teacher == "auto" else bool(teacher),
        None if mode in (None, "default") else str(mode),
        device_type(str(trainer.get("accelerator", "auto"))), is_distributed(trainer), dynamic)
    for line in lines:
        if line not in _LOGGED:
            _LOGGED.add(line)
            log.info(line)
    return resolved


def has_target(node: DictConfig | None) -> bool:
    """Whether a config node builds something (``scheduler=none`` is ``{_target_: null}``)."""
    return node is not None and node.get("_target_") is not None


def recipe(optimizer: DictConfig, scheduler: DictConfig | None, max_epochs: int,
           key: str = "optimizer") -> Recipe:
    """A stage's :class:`~kdlab.engine.spec.Recipe` from optimizer and scheduler configs
    (Hydra ``_partial_`` nodes)."""
    scheduler_key = "scheduler" if key == "optimizer" else key.replace("optimizer", "scheduler")
    return Recipe(optimizer=instantiate_node(optimizer, key),
                  scheduler=instantiate_node(scheduler, scheduler_key)
                  if has_target(scheduler) else None,
                  max_epochs=int(max_epochs))


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain dicts and lists (safe for ``weights_only`` checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
