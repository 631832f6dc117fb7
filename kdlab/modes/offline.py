"""Offline (sequential) distillation — Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network": a frozen teacher, then a student trained on its outputs, then (``baseline: true``) the
same student trained without the teacher under the same budget.

For language models the student stage may also train on generated text
(:mod:`kdlab.modes.generation`): a share of batches written by the student itself
(``on_policy.fraction``, GKD) or, instead of the corpus, the teacher's continuations of each
training window (``sequence_kd.enabled``, Kim & Rush 2016); the baseline trains on the corpus."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.on_policy import check_on_policy
from kdlab.models.transplant import init_from_teacher
from kdlab.modes.baseline import train_baseline
from kdlab.modes.build import (
    build_datamodule,
    build_model,
    build_strategy,
    deployed_network,
    refuse_replaced_head,
    strategy_name,
)
from kdlab.modes.compress import Compression
from kdlab.modes.generation import (
    check_sequence_kd,
    on_policy_options,
    reads_features,
    sequence_kd_options,
    train_on_teacher_windows,
)
from kdlab.modes.runner import evaluated_entry, latency_args, model_name, stage_entry, train_stage
from kdlab.modes.samples import text_samples
from kdlab.modes.teacher import get_teacher

log = logging.getLogger(__name__)
TeacherSource = Callable[[DictConfig, Path, InMemoryDataModule, tuple],
                         tuple[nn.Module, list[dict[str, Any]]]]


def single_teacher(cfg: DictConfig, run_dir: Path, data: InMemoryDataModule,
                   latency: tuple) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The frozen teacher of ``teacher`` (given, or from the store) and its entry."""
    teacher, source = get_teacher(cfg, run_dir)
    return teacher, [evaluated_entry(cfg, "teacher", model_name(cfg.teacher.model), teacher,
                                     data, source=source)]


def run(cfg: DictConfig, run_dir: Path, teachers: TeacherSource = single_teacher
        ) -> dict[str, Any]:
    """Teacher(s), distilled student, baseline. ``teachers(cfg, run_dir, data, latency)``
    returns the frozen teacher and the stage entries describing it (the last one is the
    teacher the student learns from)."""
    strategy = build_strategy(cfg)
    compress = Compression(cfg)  # compress=none: does nothing (kdlab/modes/compress.py)
    if compress.active:
        parts = [k for k in ("prune", "quantize") if (cfg.get("compress") or {}).get(k)]
        refuse_replaced_head(cfg, f"compress ({', '.join(parts) or 'set'})",
                             "compression prunes and fine-tunes the bare student (its "
                             "fine-tuning would build a new projector)")
    needs_teacher = strategy is not None and strategy.needs_teacher
    data = build_datamodule(cfg, transfer=needs_teacher)
    data.setup()
    on_policy = on_policy_options(cfg)  # checked now, before a teacher is trained
    check_on_policy(on_policy, data, strategy, reads_features(strategy))
    sequence = sequence_kd_options(cfg)
    if sequence is not None:
        check_sequence_kd(sequence, data)
    latency = latency_args(cfg, data)
    results: dict[str, Any] = {"mode": "offline", "strategy": strategy_name(cfg),
                               "stages": []}

    init = cfg.student.get("init_from_teacher")
    teacher = None
    if needs_teacher or init or sequence is not None:
        build_model(cfg.student.model, data, "student.model")  # a bad student fails first
        teacher, entries = teachers(cfg, run_dir, data, latency)
        results["teacher"] = entries[-1]
        results["stages"] += entries
    if sequence is not None:  # the student's training windows: the teacher's continuations
        results["sequence_kd"] = train_on_teacher_windows(cfg, sequence, teacher, data)

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    student = build_model(cfg.student.model, data, "student.model")
    if init:
        init = OmegaConf.to_container(init) if isinstance(init, DictConfig) else init
        results["student_init"] = init_from_teacher(student, teacher, init)
    if not needs_teacher:
        teacher = None  # fetched for the initialisation only
    stage = train_stage(cfg, "student", run_dir, student, data, cfg.optimizer, cfg.get("scheduler"),
                        teacher=teacher, strategy=strategy, ckpt_path=cfg.ckpt_path,
                        callbacks=compress.callbacks(), monitor=compress.monitor,
                        on_policy=on_policy)
    # the network the stage delivers: SimKD's student + projector + teacher classifier
    results["student"] = stage_entry("student", model_name(cfg.student.model),
                                     deployed_network(strategy, student), stage, latency)
    results["stages"].append(results["student"])
    if samples := text_samples(deployed_network(strategy, student), data, int(cfg.seed)):
        results["student"]["samples"] = samples  # a few continuations, for text
        if teacher is not None:
            results["teacher"]["samples"] = text_samples(teacher, data, int(cfg.seed))
    compress.run(results, run_dir, student, data, teacher, latency)

    if (strategy is not None or sequence is not None) and cfg.baseline:
        results["baseline"] = train_baseline(cfg, run_dir, latency)
        results["stages"].append(results["baseline"])
    return results

