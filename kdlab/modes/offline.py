"""Offline (sequential) distillation — Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network": a frozen teacher, then a student trained on its outputs, then (``baseline: true``) the
same student trained without the teacher under the same budget."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from kdlab.build import build_datamodule, build_model, build_strategy
from kdlab.compress import Compression
from kdlab.evaluate import evaluate_model
from kdlab.fit import fit_stage
from kdlab.report import describe_model
from kdlab.stages import latency_args, model_name, stage_entry
from kdlab.teachers import get_teacher

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Teacher (given or from the store), distilled student, baseline."""
    strategy = build_strategy(cfg)
    compress = Compression(cfg)  # compress=none: does nothing (kdlab/compress.py)
    needs_teacher = strategy is not None and strategy.needs_teacher
    data = build_datamodule(cfg, transfer=needs_teacher)
    data.setup()
    latency = latency_args(cfg, data)
    results: dict[str, Any] = {"mode": "offline", "strategy": cfg.distill.get("name"),
                               "stages": []}

    teacher = None
    if needs_teacher:
        teacher, source = get_teacher(cfg, run_dir)
        results["teacher"] = {"stage": "teacher", "model": model_name(cfg.teacher.model),
                              "source": source, "metrics": evaluate_model(teacher, data, cfg),
                              **describe_model(teacher, *latency)}
        results["stages"].append(results["teacher"])

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    student = build_model(cfg.student.model, data, "student.model")
    stage = fit_stage(cfg, "student", run_dir, student, data, cfg.optimizer, cfg.get("scheduler"),
                      teacher=teacher, strategy=strategy, ckpt_path=cfg.ckpt_path,
                      callbacks=compress.callbacks())
    results["student"] = stage_entry("student", model_name(cfg.student.model), student, stage,
                                     latency)
    results["stages"].append(results["student"])
    compress.run(results, run_dir, student, data, teacher, latency)

    if strategy is not None and cfg.baseline:
        results["baseline"] = train_baseline(cfg, run_dir, latency)
        results["stages"].append(results["baseline"])
    return results


def train_baseline(cfg: DictConfig, run_dir: Path, latency: tuple) -> dict[str, Any]:
    """The student alone — same initialisation (``seed``), same number of optimizer steps, the
    labelled images only — and its ``results.json`` entry (stage ``baseline``)."""
    log.info("Baseline: the same student without the teacher, same budget")
    data = build_datamodule(cfg, transfer=False)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # the student's init
    baseline = build_model(cfg.student.model, data, "student.model")
    stage = fit_stage(cfg, "baseline", run_dir / "baseline", baseline, data, cfg.optimizer,
                      cfg.get("scheduler"))
    return stage_entry("baseline", model_name(cfg.student.model), baseline, stage, latency)
