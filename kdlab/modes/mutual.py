"""Deep Mutual Learning (Zhang et al., CVPR 2018): a cohort trained together, no teacher.

``kdlab-train mode=mutual`` trains ``mode.members`` copies of ``student.model`` (or one network
per entry of ``mode.models``) with :class:`kdlab.modes.cohort.CohortModule`, then evaluates every
member from its own best-validation checkpoint and, with ``baseline: true``, trains member 0's
network alone with cross-entropy under the same budget.

Initialisation: member ``i`` is built right after ``seed_everything(seed + 1000·i)``, so member
0 starts from exactly the baseline's weights (the comparison isolates the mutual terms) and the
members of one run never share an initialisation with those of another seed below 1000.
All members see the same batches in the same order (``data.shuffle_seed``), as in the paper.

Data: ``mode.transfer`` decides ``data.transfer``. ``false`` (the default) trains on the
labelled images only, repeated to fill each epoch like the baseline's; ``true`` keeps the
unlabelled images of ``data.num_labels`` in the batches, where they feed only the KL terms.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.fit import StageResult
from kdlab.modes.build import (
    build_datamodule,
    build_model,
    compile_options,
    has_target,
    instantiate_node,
    loop_options,
    to_container,
)
from kdlab.modes.cohort import CohortModule, check_cohort
from kdlab.modes.runner import (
    evaluate,
    latency_args,
    model_name,
    stage_entry,
    train_module,
    train_stage,
)
from kdlab.util.config import CONF_DIR, group_options
from kdlab.util.errors import KdlabError

log = logging.getLogger(__name__)

#: member ``i`` is initialised after ``seed_everything(seed + MEMBER_SEED_STRIDE * i)``
MEMBER_SEED_STRIDE = 1000


def member_configs(cfg: DictConfig) -> list[DictConfig]:
    """One model config per member: ``mode.models`` if given (each entry a model config with
    ``_target_``, or the name of a ``conf/student`` option such as ``cnn`` or ``mlp``), else
    ``mode.members`` copies of ``student.model``. Checks the cohort's hyper-parameters."""
    mode = cfg.mode
    models = mode.get("models")
    if models is None:
        configs = [cfg.student.model] * int(mode.get("members", 2))
    else:
        if not isinstance(models, ListConfig):
            raise KdlabError(f"mode.models={models} must be a list of model configs or "
                             "conf/student names, e.g. mode.models=[cnn,mlp]")
        configs = [_model_config(entry, f"mode.models[{k}]") for k, entry in enumerate(models)]
        if len(configs) < 2:
            raise KdlabError(f"mode.models has {len(configs)} entry: a cohort needs >= 2 "
                             "(or mode.models=null and mode.members=N)")
    # the list, when given, sets the cohort's size (mode.members is not used)
    check_cohort(len(configs), mode.get("temperature", 1.0), mode.get("kl_weight", 1.0))
    return configs


def _model_config(entry: Any, key: str) -> DictConfig:
    if isinstance(entry, str):
        options = group_options("student")
        if entry not in options:
            raise KdlabError(f"{key}={entry} is not a conf/student option: choose one of "
                             f"{', '.join(options)}, or give a model config with a _target_")
        return OmegaConf.load(CONF_DIR / "student" / f"{entry}.yaml").model
    if isinstance(entry, DictConfig) and "_target_" in entry:
        return entry
    raise KdlabError(f"{key} must be a model config with a _target_ or a conf/student name "
                     f"(cnn, mlp), not {entry!r}")


class _BestCheckpoints(Callback):
    """Remembers each member's best checkpoint when fitting ends (testing the cohort's best
    checkpoint afterwards restores the callbacks' older state)."""

    def __init__(self, checkpoints: dict[int, ModelCheckpoint]) -> None:
        self.checkpoints = checkpoints
        self.paths: dict[int, str | None] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.paths = {i: c.best_model_path or None for i, c in self.checkpoints.items()}


def _member_checkpoints(stage_dir: Path, members: int) -> dict[int, ModelCheckpoint]:
    """Best-``val/acc_m{i}`` checkpoints of members 1…N-1 (member 0's is the run's
    ``val/acc`` one)."""
    return {i: ModelCheckpoint(dirpath=str(stage_dir / "checkpoints"), monitor=f"val/acc_m{i}",
                               mode="max", save_top_k=1, auto_insert_metric_name=False,
                               filename=f"member{i}-best-epoch{{epoch:02d}}-acc{{val/acc_m{i}:.4f}}")
            for i in range(1, members)}


def _load_member(member: nn.Module, index: int, ckpt: str) -> None:
    prefix = f"student.{index}."
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    member.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                            if k.startswith(prefix)})


def fit_cohort(cfg: DictConfig, stage_dir: Path, members: list[nn.Module],
               data: InMemoryDataModule) -> list[StageResult]:
    """Train ``members`` together and return one result per member: its own best-validation
    checkpoint, evaluated alone on the validation and test splits."""
    data.setup()
    loop = loop_options(cfg, in_memory=getattr(data, "in_memory", False))
    options = compile_options(cfg, data)
    if options.student:
        for member in members:
            member.compile(mode=options.mode)
    module = CohortModule(
        members, num_classes=data.num_classes,
        temperature=float(cfg.mode.get("temperature", 1.0)),
        kl_weight=float(cfg.mode.get("kl_weight", 1.0)),
        optimizer=instantiate_node(cfg.optimizer, "optimizer"),
        scheduler=instantiate_node(cfg.scheduler, "scheduler")
        if has_target(cfg.get("scheduler")) else None,
        channels_last=bool(cfg.channels_last),
        hparams={"stage": "cohort", "config": to_container(cfg)},
        loop=loop,
    )
    module.has_unlabelled = data.has_unlabelled
    checkpoints = _member_checkpoints(stage_dir, len(members))
    best = _BestCheckpoints(checkpoints)
    result = train_module(cfg, "cohort", stage_dir, module, data, ckpt_path=cfg.ckpt_path,
                        callbacks=[*checkpoints.values(), best])
    results = []
    for i, member in enumerate(members):
        ckpt = result.best_ckpt if i == 0 else best.paths.get(i)
        if ckpt:
            _load_member(member, i, ckpt)
        metrics = evaluate(cfg, member, data)
        metrics["epochs"] = result.metrics.get("epochs", 0)
        results.append(dataclasses.replace(result, metrics=metrics, best_ckpt=ckpt))
    return results


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The cohort's members (each a stage, member 0 the student) and the baseline."""
    configs = member_configs(cfg)
    if str(cfg.data.get("mix") or "none") != "none":  # mixed images have no single label
        raise KdlabError(f"data.mix={cfg.data.mix} is not supported by mode=mutual (each "
                         "member's cross-entropy needs a label): use data.mix=none")
    transfer = bool(cfg.mode.get("transfer", False))
    data = build_datamodule(cfg, transfer=transfer)
    data.setup()
    latency = latency_args(cfg, data)
    results: dict[str, Any] = {"mode": "mutual", "stages": []}

    members = []
    for i, model_cfg in enumerate(configs):
        L.seed_everything(int(cfg.seed) + MEMBER_SEED_STRIDE * i, workers=True, verbose=False)
        key = "student.model" if cfg.mode.get("models") is None else f"mode.models[{i}]"
        members.append(build_model(model_cfg, data, key))
    log.info("Mutual learning: a cohort of %d (%s), T=%s, kl_weight=%s", len(members),
             ", ".join(model_name(c) for c in configs), cfg.mode.get("temperature"),
             cfg.mode.get("kl_weight"))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    member_results = fit_cohort(cfg, run_dir, members, data)
    for i, (model_cfg, member, result) in enumerate(zip(configs, members, member_results)):
        entry = stage_entry(f"member{i}", model_name(model_cfg), member, result, latency,
                            member=i, seed=int(cfg.seed) + MEMBER_SEED_STRIDE * i)
        results["stages"].append(entry)
    results["student"] = results["stages"][0]

    if cfg.baseline:
        log.info("Baseline: member 0's network trained alone with cross-entropy, same budget")
        base_data = build_datamodule(cfg, transfer=False)
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # member 0's init
        baseline = build_model(configs[0], base_data, "student.model")
        stage = train_stage(cfg, "baseline", run_dir / "baseline", baseline, base_data,
                            cfg.optimizer, cfg.get("scheduler"))
        results["baseline"] = stage_entry("baseline", model_name(configs[0]), baseline, stage,
                                          latency)
        results["stages"].append(results["baseline"])
    return results
