"""``kdlab-train``: compose the config, get a teacher, distill a student, train the same student
without the teacher under the same budget, evaluate all three and write ``results.json``.

Read top to bottom, :func:`run` is the whole run: teacher (:mod:`kdlab.teachers`), student and
baseline (:func:`kdlab.fit.fit_stage` → :class:`kdlab.module.DistillationModule`), report
(:mod:`kdlab.report`).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig
from torch import nn

from kdlab.build import build_datamodule, build_model, build_strategy, to_container
from kdlab.cli import CONF_DIR, friendly_errors, guard_argv
from kdlab.errors import KdlabError
from kdlab.evaluate import evaluate_model
from kdlab.fit import StageResult, fit_stage
from kdlab.launch import apply_speed_settings
from kdlab.report import describe_model, markdown_table, print_table, write_json
from kdlab.teachers import get_teacher

log = logging.getLogger(__name__)


def _name(model_cfg: DictConfig) -> str:
    return str(model_cfg._target_).rsplit(".", 1)[-1]


def _entry(cfg: DictConfig, model: nn.Module, stage: StageResult, latency_args: tuple) -> dict:
    """A student's (or baseline's) line of results.json."""
    speed = stage.samples_per_s
    return {"model": _name(cfg.student.model), "metrics": stage.metrics,
            "best_ckpt": stage.best_ckpt, "last_ckpt": stage.last_ckpt,
            "train_samples_per_s": {
                "per_epoch": speed,
                "median": statistics.median(speed[1:] or speed) if speed else None},
            **describe_model(model, *latency_args)}


@friendly_errors
def run(cfg: DictConfig) -> dict[str, Any]:
    """One run; returns the content of ``results.json``."""
    start = time.perf_counter()
    apply_speed_settings(bool(cfg.get("tune_allocator", True)))
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise KdlabError(f"ckpt_path={cfg.ckpt_path} does not exist: give a last.ckpt to resume")
    strategy = build_strategy(cfg)
    needs_teacher = strategy is not None and strategy.needs_teacher
    data = build_datamodule(cfg, transfer=needs_teacher)
    data.setup()
    latency_args = (data.input_shape, cfg.latency, bool(cfg.channels_last))
    results: dict[str, Any] = {"run_dir": str(run_dir), "strategy": cfg.distill.get("name")}

    teacher = None
    if needs_teacher:
        teacher, source = get_teacher(cfg, run_dir)
        results["teacher"] = {"model": _name(cfg.teacher.model), "source": source,
                              "metrics": evaluate_model(teacher, data, cfg),
                              **describe_model(teacher, *latency_args)}

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    student = build_model(cfg.student.model, data, "student.model")
    stage = fit_stage(cfg, "student", run_dir, student, data, cfg.optimizer, cfg.get("scheduler"),
                      teacher=teacher, strategy=strategy, ckpt_path=cfg.ckpt_path)
    results["student"] = _entry(cfg, student, stage, latency_args)

    if strategy is not None and cfg.baseline:
        log.info("Baseline: the same student without the teacher, same budget")
        base_data = build_datamodule(cfg, transfer=False)
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # the student's init
        baseline = build_model(cfg.student.model, base_data, "student.model")
        stage = fit_stage(cfg, "baseline", run_dir / "baseline", baseline, base_data,
                          cfg.optimizer, cfg.get("scheduler"))
        results["baseline"] = _entry(cfg, baseline, stage, latency_args)

    results["wall_time_s"] = time.perf_counter() - start
    results["config"] = to_container(cfg)
    write_json(run_dir / "results.json", results)
    (run_dir / "results.md").write_text(markdown_table(results) + "\n")
    print_table(results, title=f"{cfg.task_name}: {results['strategy']} "
                               f"({results['wall_time_s']:.0f} s) → {run_dir}")
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _main(cfg: DictConfig) -> float:
    results = run(cfg)
    return float(results["student"]["metrics"].get("val/acc", float("nan")))


def cli() -> None:
    """``kdlab-train [overrides]`` — see ``conf/train.yaml``."""
    guard_argv()
    _main()


if __name__ == "__main__":
    cli()
