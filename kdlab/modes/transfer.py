"""The transfer-learning pipeline: pretrain → fine-tune → distil → fine-tune.

1. **pretrain**: the teacher architecture learns a *source* task (``mode.source_classes``, all
   their labels) with the teacher recipe, through the teacher store (trained once).
2. **finetune**: it moves to the *target* task (``mode.target_classes``) with a new
   classifier head and ``mode.labels_per_class`` labels per class: the whole network
   (``mode.finetune=full``) or the head alone on the frozen backbone (``linear``: a linear
   probe; the backbone's weights and batch-norm statistics stay as pretrained).
3. **distil**: the student learns from the fine-tuned teacher with ``distill`` on the target
   training images — the few labelled ones plus the others as an unlabelled transfer set
   (Hinton et al. 2015, §3).
4. **student**: the distilled student is fine-tuned on the target labels alone
   (``mode.student_finetune_epochs``; 0 skips it).
5. **baseline**: the same student trained on the target labels alone for as many epochs as
   stages 3 and 4 together.

Transfer learning in the sense of Yosinski et al., NeurIPS 2014, "How transferable are features
in deep neural networks?"; the semi-supervised recipe "big pretrained model, fine-tune on few
labels, distil with unlabelled data" follows Chen et al., NeurIPS 2020, "Big Self-Supervised
Models are Strong Semi-Supervised Learners" (SimCLRv2).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, open_dict
from torch import nn

from kdlab.models.transplant import init_from_teacher
from kdlab.modes.build import (
    build_datamodule,
    build_model,
    build_strategy,
    refuse_replaced_head,
    strategy_name,
)
from kdlab.modes.runner import (
    evaluated_entry,
    frozen_copy,
    latency_args,
    model_name,
    stage_entry,
    train_stage,
)
from kdlab.modes.teacher import get_teacher
from kdlab.util.errors import KdlabError

log = logging.getLogger(__name__)
FINETUNE = ("full", "linear")


def head_path(model: nn.Module) -> str:
    """The module path of ``model``'s last ``nn.Linear``: its classifier head."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KdlabError(f"mode=transfer needs a classifier head (an nn.Linear) in "
                         f"{type(model).__name__}")
    return linears[-1]


def new_head(model: nn.Module, pretrained: nn.Module, head: str) -> dict[str, Any]:
    """Copy ``pretrained`` into ``model`` except the classifier ``head``, which keeps its fresh
    initialisation (the target classes are new); returns the copy report."""
    report = init_from_teacher(model, pretrained, "match")
    for name in list(report["copied"]):
        if name.startswith(head + "."):
            del report["copied"][name]
            report["skipped"][name] = "new classifier head for the target classes"
    dict(model.named_modules())[head].reset_parameters()
    return report


class FrozenBackbone(Callback):
    """Keeps every module outside ``head`` in eval mode while training (a linear probe: the
    backbone's batch-norm statistics must not move either).

    Why not Lightning's ``BaseFinetuning.freeze``: with ``train_bn=False`` it turns BatchNorm's
    ``track_running_stats`` off, so in training mode the frozen backbone would normalise with
    each batch's statistics instead of the pretrained ones — not the feature extractor that is
    evaluated. Keeping the backbone in eval mode uses the pretrained statistics throughout."""

    def __init__(self, model: nn.Module, head: str) -> None:
        self.modules = [m for name, m in model.named_modules()
                        if name and not (name == head or name.startswith(head + "."))
                        and not any(True for _ in m.children())]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        for module in self.modules:
            module.eval()


def task_cfg(cfg: DictConfig, classes: list[int], num_labels: int | None,
             lr: float | None = None) -> DictConfig:
    """``cfg`` for a task: ``data.classes`` and ``data.num_labels`` set, and the student
    optimizer's learning rate replaced by ``lr`` if given."""
    out = cfg.copy()
    with open_dict(out):
        out.data.classes = list(classes)
        out.data.num_labels = num_labels
        if lr is not None:
            out.optimizer.lr = lr
            if out.get("scheduler") and "max_lr" in out.scheduler:
                out.scheduler.max_lr = lr
    return out


def _check(cfg: DictConfig) -> None:
    mode = cfg.mode
    source, target = list(mode.source_classes), list(mode.target_classes)
    if set(source) & set(target):
        raise KdlabError(f"mode.source_classes={source} and mode.target_classes={target} "
                         "overlap: the target task must be new to the teacher")
    if mode.finetune not in FINETUNE:
        raise KdlabError(f"mode.finetune={mode.finetune} must be one of {', '.join(FINETUNE)}")
    for key in ("labels_per_class", "finetune_epochs"):
        if int(mode[key]) < 1:
            raise KdlabError(f"mode.{key}={mode[key]} must be >= 1")
    if int(mode.student_finetune_epochs) < 0:
        raise KdlabError(f"mode.student_finetune_epochs={mode.student_finetune_epochs} "
                         "must be >= 0")
    refuse_replaced_head(cfg, "mode=transfer", "its last stage fine-tunes the distilled "
                         "student as a plain classifier on the target labels")
    strategy = build_strategy(cfg)
    if strategy is None or not strategy.needs_teacher:
        raise KdlabError(f"mode=transfer distils the fine-tuned teacher: distill="
                         f"{strategy_name(cfg)} uses no teacher (pick e.g. distill=kd)")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The five stages; ``student`` is the fine-tuned distilled student."""
    _check(cfg)
    mode = cfg.mode
    target = list(mode.target_classes)
    labels = int(mode.labels_per_class) * len(target)
    entries: list[dict[str, Any]] = []

    # 1. pretrain on the source task (teacher store)
    source_cfg = task_cfg(cfg, list(mode.source_classes), None)
    source_data = build_datamodule(source_cfg, transfer=False)
    source_data.setup()
    pretrained, info = get_teacher(source_cfg, run_dir / "pretrain")
    entries.append(evaluated_entry(cfg, "pretrain", model_name(cfg.teacher.model), pretrained,
                                   source_data, source=info,
                                   task=f"classes {list(mode.source_classes)}, all labels"))

    # 2. fine-tune on the target labels: new head, full or linear probe
    lr = mode.get("finetune_lr")
    target_cfg = task_cfg(cfg, target, labels, lr=float(lr) if lr is not None else None)
    data = build_datamodule(target_cfg, transfer=False)
    data.setup()
    latency = latency_args(cfg, data)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    teacher = build_model(cfg.teacher.model, data, "teacher.model")
    head = head_path(teacher)
    init = new_head(teacher, pretrained, head)
    callbacks: list[Callback] = []
    if mode.finetune == "linear":
        for name, p in teacher.named_parameters():
            p.requires_grad_(name.startswith(head + "."))
        callbacks.append(FrozenBackbone(teacher, head))
    result = train_stage(target_cfg, "finetune", run_dir / "finetune", teacher, data,
                         target_cfg.optimizer, target_cfg.get("scheduler"),
                         max_epochs=int(mode.finetune_epochs), callbacks=callbacks)
    teacher.requires_grad_(True)
    entries.append(stage_entry("finetune", model_name(cfg.teacher.model), teacher, result,
                               latency, task=f"classes {target}, {labels} labels",
                               finetune=str(mode.finetune), copied=len(init["copied"])))
    teacher = frozen_copy(teacher)

    # 3. distil into the student on the target images (labels + transfer set)
    distil_cfg = task_cfg(cfg, target, labels)
    distil_data = build_datamodule(distil_cfg, transfer=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    student = build_model(cfg.student.model, distil_data, "student.model")
    result = train_stage(distil_cfg, "distil", run_dir / "distil", student, distil_data,
                         cfg.optimizer, cfg.get("scheduler"), teacher=teacher,
                         strategy=build_strategy(cfg))
    entries.append(stage_entry("distil", model_name(cfg.student.model), student, result,
                               latency))

    # 4. fine-tune the student on the target labels
    epochs = int(mode.student_finetune_epochs)
    if epochs:
        result = train_stage(target_cfg, "student", run_dir / "student", student, data,
                             target_cfg.optimizer, target_cfg.get("scheduler"), max_epochs=epochs)
        entries.append(stage_entry("student", model_name(cfg.student.model), student, result,
                                   latency))

    # 5. the student on the target labels alone, as many epochs as stages 3 + 4
    if cfg.baseline:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        baseline = build_model(cfg.student.model, data, "student.model")
        total = int(cfg.trainer.max_epochs) + epochs
        result = train_stage(distil_cfg, "baseline", run_dir / "baseline", baseline, data,
                             cfg.optimizer, cfg.get("scheduler"), max_epochs=total)
        entries.append(stage_entry("baseline", model_name(cfg.student.model), baseline,
                                   result, latency))
    by_stage = {e["stage"]: e for e in entries}
    results: dict[str, Any] = {"mode": "transfer", "strategy": strategy_name(cfg),
                               "stages": entries, "teacher": by_stage["finetune"],
                               "student": by_stage.get("student", by_stage["distil"])}
    if "baseline" in by_stage:
        results["baseline"] = by_stage["baseline"]
    return results
