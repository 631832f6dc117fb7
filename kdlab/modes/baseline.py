"""The no-teacher baseline, trained once per identity and reused: the baseline store.

Every offline run with ``baseline: true`` trains its student without the teacher under the same
budget. In a sweep over strategies (``-m distill=kd,dkd,at``) that baseline is the same network
in every job, so it is kept in a store like the teacher store
(``<paths.teacher_store>/baselines/<model>-<hash12>/baseline.pt``, verified by size and SHA-256)
and reused: trained by the first job, loaded by the others, shown once by ``kdlab-compare``.

Its identity is the whole resolved config except what a baseline never reads — the strategy
(``distill``), the teacher and its cache, compression, where files go and how progress is
shown, and the student stage's generated text (``on_policy``, ``sequence_kd``: the baseline
trains on the corpus) — plus a digest of the training data's content. Anything else that
differs (seed, student, optimizer, schedule, epochs, batch size, data options, Trainer
settings) gives another baseline: leaving a key in costs a retraining at worst, leaving one out
would reuse a wrong one.
``baseline_store: false`` trains it in every run; ``trainer.fast_dev_run`` never stores it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from kdlab.engine.teachers import TeacherStore
from kdlab.modes.build import build_datamodule, build_model
from kdlab.modes.runner import model_name, stage_entry, train_stage
from kdlab.modes.teacher import STORE_FORMAT, identity_key, model_label, plain

log = logging.getLogger(__name__)

#: top-level config keys a baseline never reads
IGNORED = ("distill", "teacher", "teacher_cache", "compress", "paths", "logger", "latency",
           "task_name", "ckpt_path", "resume", "hydra", "baseline", "baseline_store", "mode",
           "tune_allocator", "on_policy", "sequence_kd")
#: nested keys a baseline never reads: where data is read from (its content is in the
#: identity), progress display, and the student's initialisation from the teacher
IGNORED_NESTED = (("data", "root"), ("data", "download_dir"), ("data", "download"),
                  ("trainer", "enable_progress_bar"), ("trainer", "enable_model_summary"),
                  ("student", "init_from_teacher"))


def baseline_identity(cfg: DictConfig, data: Any) -> dict[str, Any]:
    """What defines the run's baseline (see the module docstring)."""
    config = plain(cfg)
    for key in IGNORED:
        config.pop(key, None)
    for parent, key in IGNORED_NESTED:
        (config.get(parent) or {}).pop(key, None)
    return {"format": STORE_FORMAT, "role": "baseline", "config": config,
            "data": data.identity()}


def train_baseline(cfg: DictConfig, run_dir: Path, latency: tuple) -> dict[str, Any]:
    """The student alone — same initialisation (``seed``), same number of optimizer steps, the
    labelled images only — and its ``results.json`` entry (stage ``baseline``, with its store
    ``key``, and ``reused: true`` when it came from the store)."""
    data = build_datamodule(cfg, transfer=False)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # the student's init
    baseline = build_model(cfg.student.model, data, "student.model")

    def train() -> dict[str, Any]:
        log.info("Baseline: the same student without the teacher, same budget")
        stage = train_stage(cfg, "baseline", run_dir / "baseline", baseline, data,
                            cfg.optimizer, cfg.get("scheduler"))
        return stage_entry("baseline", model_name(cfg.student.model), baseline, stage, latency)

    quick = bool(cfg.trainer.get("fast_dev_run"))
    if not cfg.get("baseline_store", True):
        return train()
    identity = baseline_identity(cfg, data)
    key = identity_key(identity, model_label(cfg.student.model))
    store = TeacherStore(Path(cfg.paths.teacher_store) / "baselines", name="baseline")
    info = store.get_or_train(key, identity, baseline, train, "Baseline", store=not quick)
    entry = dict(info["metrics"])
    entry["key"] = key
    if info["source"] == "store":
        entry["reused"] = True
        entry["stored"] = info["path"]
    return entry
