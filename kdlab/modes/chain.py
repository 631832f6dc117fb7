"""Chains of offline distillations, each stage the teacher of the next.

- **Born-again networks** (Furlanello et al., ICML 2018, "Born-Again Neural Networks"): one
  architecture, generation 0 trained on the labels, generation k distilled from generation
  k − 1 (``mode=born_again``). The report lists every generation and the ensemble of all of them
  (the paper's BAN ensemble); generation 0 is the no-teacher baseline.
- **Teacher-assistant distillation** (TAKD; Mirzadeh et al., AAAI 2020, "Improved Knowledge
  Distillation via Teacher Assistant"): teacher → assistant(s) → student (``mode=takd``), where
  the assistants bridge the capacity gap. Trained assistants are kept in the teacher store under
  a hash of everything that made them, so a sweep over students trains each assistant once. With
  ``mode.direct=true`` the student is also distilled straight from the teacher, for the
  comparison the paper makes.

Every distillation stage uses ``distill`` (a fresh strategy per stage: connectors are per pair)
on the data of ``data`` (with its transfer set), with ``optimizer``, ``scheduler`` and
``trainer.max_epochs``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch import nn

from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.fit import accuracy
from kdlab.engine.teachers import TeacherStore
from kdlab.modes.baseline import train_baseline
from kdlab.modes.build import (
    build_datamodule,
    build_model,
    build_strategy,
    refuse_replaced_head,
    strategy_name,
)
from kdlab.modes.ensemble import TeacherEnsemble
from kdlab.modes.offline import single_teacher
from kdlab.modes.runner import (
    evaluated_entry,
    frozen_copy,
    latency_args,
    model_name,
    stage_entry,
    train_stage,
)
from kdlab.modes.teacher import identity_key, plain, training_identity
from kdlab.util.errors import KdlabError
from kdlab.util.files import tensor_digest

log = logging.getLogger(__name__)


def _strategy(cfg: DictConfig):
    refuse_replaced_head(cfg, f"mode={cfg.mode.name}", "each stage's student teaches the next "
                         "stage as a bare network, so its reused classifier would be lost")
    strategy = build_strategy(cfg)
    if strategy is None or not strategy.needs_teacher:
        raise KdlabError(f"mode={cfg.mode.name} distils every stage from the previous one: "
                         f"distill={strategy_name(cfg)} uses no teacher (pick e.g. "
                         "distill=kd)")
    return strategy


def distil(cfg: DictConfig, run_dir: Path, stage: str, model_cfg: DictConfig,
           teacher: nn.Module, seed: int, latency: tuple) -> tuple[nn.Module, dict[str, Any]]:
    """Distil a new ``model_cfg`` network (initialised with ``seed``) from ``teacher``; returns
    it with its best-validation weights and its ``results.json`` entry."""
    strategy = _strategy(cfg)
    data = build_datamodule(cfg, transfer=True)
    L.seed_everything(seed, workers=True, verbose=False)
    model = build_model(model_cfg, data, f"mode.{stage}")
    result = train_stage(cfg, stage, run_dir / stage, model, data, cfg.optimizer,
                         cfg.get("scheduler"), teacher=teacher, strategy=strategy)
    return model, stage_entry(stage, model_name(model_cfg), model, result, latency)


def ensemble_accuracy(models: list[nn.Module], data: InMemoryDataModule,
                      channels_last: bool = False) -> float:
    """Test accuracy of the mean of the models' softmax outputs (the BAN ensemble)."""
    ensemble = TeacherEnsemble(models, combine="mean").eval()
    return accuracy(ensemble, data.test_dataloader(), data.num_classes,
                    channels_last=channels_last)


def run_born_again(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Generation 0 on the labels, then ``mode.generations`` distilled generations."""
    generations = int(cfg.mode.generations)
    if generations < 1:
        raise KdlabError(f"mode.generations={generations} must be >= 1")
    model_cfg = cfg.mode.model or cfg.student.model
    _strategy(cfg)  # fail before training anything
    data = build_datamodule(cfg, transfer=False)
    data.setup()
    latency = latency_args(cfg, data)
    seed = int(cfg.seed)
    L.seed_everything(seed, workers=True, verbose=False)
    model = build_model(model_cfg, data, "mode.model")
    result = train_stage(cfg, "gen0", run_dir / "gen0", model, data, cfg.optimizer,
                         cfg.get("scheduler"))
    entries = [stage_entry("gen0", model_name(model_cfg), model, result, latency, seed=seed)]
    models = [model]
    for k in range(1, generations + 1):
        log.info("Born-again: generation %d of %d, distilled from generation %d",
                 k, generations, k - 1)
        model, entry = distil(cfg, run_dir, f"gen{k}", model_cfg, frozen_copy(models[-1]),
                              seed + k, latency)
        entry["seed"] = seed + k
        entries.append(entry)
        models.append(model)
    ensemble = ensemble_accuracy(models, data, bool(cfg.channels_last))
    return {"mode": "born_again", "strategy": strategy_name(cfg), "stages": entries,
            "student": entries[-1], "baseline": entries[0],
            "ensemble": {"members": [e["stage"] for e in entries], "test/acc": ensemble}}


def assistant_identity(cfg: DictConfig, previous: dict[str, Any], model_cfg: DictConfig,
                       seed: int, data: InMemoryDataModule) -> dict[str, Any]:
    """Everything that defines a trained assistant (:func:`kdlab.modes.teacher.
    training_identity`): its model, the data it is distilled on (content, split, labelled
    subset), the run's student recipe and strategies, its seed, and its teacher (by
    identity)."""
    recipe = {"max_epochs": plain(cfg.trainer.max_epochs), "batch_size": plain(cfg.data.batch_size),
              "optimizer": plain(cfg.optimizer), "scheduler": plain(cfg.get("scheduler"))}
    labels = {"num_labels": plain(cfg.data.get("num_labels")),
              "label_seed": plain(cfg.data.get("label_seed")), "transfer": True}
    return training_identity(cfg, data, model_cfg, recipe, seed, kind="assistant",
                             teacher=previous, distill=plain(cfg.distill), labels=labels)


def _assistant(cfg: DictConfig, run_dir: Path, stage: str, node: DictConfig,
               teacher: nn.Module, seed: int, identity: dict[str, Any],
               data: InMemoryDataModule, latency: tuple) -> tuple[nn.Module, dict[str, Any]]:
    """One assistant, from the teacher store when ``mode.store_assistants`` and stored."""
    model = build_model(node, data, f"mode.{stage}")
    trained: dict[str, Any] = {}

    def train() -> dict[str, float]:
        fitted, trained["entry"] = distil(cfg, run_dir, stage, node, teacher, seed, latency)
        model.load_state_dict(fitted.state_dict())
        return trained["entry"]["metrics"]

    if cfg.mode.store_assistants:
        key = identity_key(identity, f"assistant-{model_name(node)}")
        info = TeacherStore(cfg.paths.teacher_store).get_or_train(
            key, identity, model, train, f"TAKD {stage}",
            store=not cfg.trainer.get("fast_dev_run"))
    else:
        info = {"source": "trained", "stored": False, "metrics": train()}
    entry = trained.get("entry") or evaluated_entry(cfg, stage, model_name(node),
                                                    frozen_copy(model), data)
    entry["source"] = {k: v for k, v in info.items() if k != "metrics"}
    return model, entry


def run_takd(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Teacher → ``mode.assistants`` → student, plus the direct teacher → student stage
    (``mode.direct``) and the baseline (``baseline``)."""
    assistants = list(cfg.mode.assistants or [])
    if not assistants:
        raise KdlabError("mode.assistants is empty: give at least one assistant model "
                         "(a model config with _target_), or use mode=offline")
    for i, node in enumerate(assistants):
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise KdlabError(f"mode.assistants[{i}] must be a model config with _target_")
    _strategy(cfg)
    data = build_datamodule(cfg, transfer=True)
    data.setup()
    latency = latency_args(cfg, data)
    teacher, entries = single_teacher(cfg, run_dir, data, latency)
    # the teacher by its weights: the same whether stored, given by hand or pretrained
    state = teacher.state_dict()
    identity: dict[str, Any] = {"weights": tensor_digest(*state.values(), extra=",".join(state))}
    current = teacher
    for i, node in enumerate(assistants):
        stage, seed = f"assistant{i}", int(cfg.seed) + 100 + i
        identity = assistant_identity(cfg, identity, node, seed, data)
        model, entry = _assistant(cfg, run_dir, stage, node, current, seed, identity, data,
                                  latency)
        entries.append(entry)
        current = frozen_copy(model)
    student, entry = distil(cfg, run_dir, "student", cfg.student.model, current, int(cfg.seed),
                            latency)
    entries.append(entry)
    results: dict[str, Any] = {"mode": "takd", "strategy": strategy_name(cfg),
                               "teacher": entries[0], "stages": entries, "student": entry}
    if cfg.mode.direct:
        log.info("TAKD: the same student distilled straight from the teacher, for comparison")
        _, direct = distil(cfg, run_dir, "direct", cfg.student.model, teacher, int(cfg.seed),
                           latency)
        results["direct"] = direct
        entries.append(direct)
    if cfg.baseline:
        results["baseline"] = train_baseline(cfg, run_dir, latency)
        entries.append(results["baseline"])
    return results
