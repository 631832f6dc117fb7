"""Evaluate a network on the validation and test splits; ``kdlab-eval ckpt_path=…``.

``ckpt_path`` is a checkpoint file, or a finished run folder: then the student checkpoint whose
test accuracy the run's ``results.json`` reports (its best-validation checkpoint). A kdlab
checkpoint stores its run's resolved config, so ``kdlab-eval`` rebuilds the student and the data
from it; any key can still be overridden (``data.root=…``, ``trainer=gpu``). The run's teacher
(its ``teacher.ckpt`` or stored teacher) is evaluated beside it, and the report gives accuracy,
parameters, FLOPs, weight size and CPU latency of both with the teacher ÷ student ratios
(:mod:`kdlab.util.measure`). ``eval.json`` is written beside the run it reads,
``<run>/eval/<checkpoint>/eval.json``, or into ``out=DIR``."""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdlab.cli import friendly_errors, guard_argv
from kdlab.data.memory import InMemoryDataModule
from kdlab.modes.build import build_datamodule
from kdlab.modes.checkpoints import (
    deployed_student,
    load_run_config,
    output_folder,
    resolve_checkpoint,
    run_teacher,
)
from kdlab.modes.runner import evaluate as evaluate_on
from kdlab.util.config import CONF_DIR
from kdlab.util.files import write_json
from kdlab.util.measure import footprint, ratios
from kdlab.util.report import model_name

log = logging.getLogger(__name__)


def _entry(model: nn.Module, model_cfg: DictConfig, data: InMemoryDataModule,
           run_cfg: DictConfig, latency: DictConfig) -> dict[str, Any]:
    sizes = [int(b) for b in latency.get("batch_sizes", [latency.batch_size])]
    entry = {"model": model_name(model_cfg),
             # the whole splits, whatever trainer limits the run had
             "metrics": evaluate_on(run_cfg, model, data, limited=False),
             **footprint(model, data.input_shape, sizes, int(latency.repeats),
                         bool(run_cfg.channels_last))}
    entry["latency_ms"] = entry["latency_ms_by_batch"][max(sizes)]
    entry["latency_batch_size"] = max(sizes)
    return entry


@friendly_errors
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the checkpoint's student (and the run's teacher) and data; report accuracy,
    parameters, FLOPs, size, CPU latency and the teacher/student ratios; write ``eval.json``
    beside the run (:func:`~kdlab.modes.checkpoints.output_folder`) or into ``cfg.out``."""
    checkpoint = resolve_checkpoint(str(cfg.ckpt_path))
    out_dir = output_folder(checkpoint, cfg.get("out"), "eval", cfg.get("member"))
    log.info("kdlab-eval: %s (%s)", checkpoint.path, checkpoint.chosen)
    run_cfg = load_run_config(checkpoint.path)
    trained_in = str(run_cfg.trainer.get("precision", "32-true"))
    for key in ("data", "trainer"):  # command-line overrides of the eval config win
        if cfg.get(key):
            run_cfg[key] = OmegaConf.merge(run_cfg[key], cfg[key])
    if str(run_cfg.trainer.get("precision")) == "auto":  # e.g. trainer=gpu: the run's own
        run_cfg.trainer.precision = trained_in if trained_in != "auto" else "32-true"
        log.info("kdlab-eval: trainer.precision=auto evaluates in the precision the run "
                 "trained in: %s", run_cfg.trainer.precision)
    run_cfg.channels_last = run_cfg.get("channels_last", False)
    data = build_datamodule(run_cfg, transfer=False)
    model, model_cfg = deployed_student(run_cfg, checkpoint.path, data, cfg.get("member"))
    student = _entry(model, model_cfg, data, run_cfg, cfg.latency)
    student["checkpoint_bytes"] = checkpoint.path.stat().st_size
    result: dict[str, Any] = {"ckpt_path": str(checkpoint.path), "chosen": checkpoint.chosen,
                              "run_dir": str(checkpoint.run_dir), "student": student}
    teacher, source = run_teacher(run_cfg, str(cfg.get("with_teacher", "auto")))
    if teacher is not None:
        result["teacher"] = _entry(teacher, run_cfg.teacher.model, data, run_cfg, cfg.latency)
        result["teacher"]["source"] = source
        result["ratios"] = ratios(result["teacher"], student)
    else:
        result["teacher_skipped"] = source
    print_footprint(result, title=f"kdlab-eval {checkpoint.path}")
    out = out_dir / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    log.info("Wrote %s", out)
    return result


def print_footprint(result: dict[str, Any], title: str) -> None:
    """Teacher and student rows, then the teacher ÷ student row."""
    from rich.console import Console
    from rich.table import Table

    sizes = list(result["student"]["latency_ms_by_batch"])
    table = Table(title=title)
    for header in ["", "model", "test acc %", "params", "MFLOPs/sample", "weights KB",
                   *(f"ms @ batch {b}" for b in sizes)]:
        table.add_column(header, justify="left" if header in ("", "model") else "right")
    for role in ("teacher", "student"):
        entry = result.get(role)
        if entry is None:
            continue
        acc = entry["metrics"].get("test/acc")
        table.add_row(role, entry["model"], "—" if acc is None else f"{100 * acc:.2f}",
                      f"{entry['params']:,}", f"{entry['flops_per_sample'] / 1e6:.2f}",
                      f"{entry['state_dict_bytes'] / 1024:.0f}",
                      *(f"{entry['latency_ms_by_batch'][b]:.3f}" for b in sizes))
    if "ratios" in result:
        r = result["ratios"]
        gap = r.get("accuracy_gap_points")
        table.add_row("teacher ÷ student", "", "—" if gap is None else f"−{gap:.2f} pts",
                      f"{r['compression_params']:.1f}×",
                      "—" if r["flops_reduction"] is None else f"{r['flops_reduction']:.1f}×",
                      f"{r['compression_bytes']:.1f}×",
                      *(f"{r['speedup_by_batch'][b]:.1f}×" for b in sizes))
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _main(cfg: DictConfig) -> None:
    evaluate(cfg)


def cli() -> None:
    """``kdlab-eval ckpt_path=RUN_FOLDER|CKPT [out=DIR] [overrides]``."""
    guard_argv("eval")
    _main()
