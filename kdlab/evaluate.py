"""Evaluate a network on the validation and test splits; ``kdlab-eval ckpt_path=…``.

A kdlab checkpoint stores its run's resolved config, so ``kdlab-eval`` rebuilds the student and
the data from it; any key can still be overridden (``data.root=…``, ``trainer=gpu``). The run's
teacher (its ``teacher.ckpt`` or stored teacher) is evaluated beside it, and the report gives
accuracy, parameters, FLOPs, weight size and CPU latency of both with the teacher ÷ student
ratios (:mod:`kdlab.footprint`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdlab.build import build_datamodule, build_model
from kdlab.cli import CONF_DIR, friendly_errors, guard_argv
from kdlab.data.memory import InMemoryDataModule
from kdlab.errors import KdlabError
from kdlab.footprint import footprint, ratios
from kdlab.module import DistillationModule
from kdlab.report import model_name, write_json
from kdlab.teachers import get_teacher, load_into, load_weights

log = logging.getLogger(__name__)


def evaluate_model(
    model: nn.Module, data: InMemoryDataModule, cfg: DictConfig, splits=("val", "test")
) -> dict[str, float]:
    """Accuracy and loss of ``model`` on the given splits (``val/acc``, ``test/acc`` …)."""
    module = DistillationModule(
        student=model,
        num_classes=data.num_classes,
        optimizer=torch.optim.SGD,
        channels_last=bool(cfg.get("channels_last", False)),
    )
    trainer = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        precision=cfg.trainer.get("precision", "32-true"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    metrics: dict[str, float] = {}
    if "val" in splits:
        metrics.update(trainer.validate(module, datamodule=data, verbose=False)[0])
    if "test" in splits:
        metrics.update(trainer.test(module, datamodule=data, verbose=False)[0])
    return {k: float(v) for k, v in metrics.items()}


def load_run_config(ckpt_path: str) -> DictConfig:
    """The resolved config stored in a kdlab checkpoint."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise KdlabError(f"ckpt_path={ckpt_path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    config = ckpt.get("hyper_parameters", {}).get("config")
    if not config:
        raise KdlabError(f"ckpt_path={ckpt_path} is not a kdlab checkpoint (no stored config)")
    return OmegaConf.create(config)


def checkpoint_student(run_cfg: DictConfig, ckpt_path: str, data: InMemoryDataModule,
                       member: int | None = None) -> tuple[nn.Module, DictConfig]:
    """The network a kdlab checkpoint holds, rebuilt from its stored config, and its model
    config: the student, or member ``member`` (default 0) of a ``mode=mutual`` cohort, whose
    checkpoints hold every member under ``student.<i>.``."""
    mode = str((run_cfg.get("mode") or {}).get("name", "offline"))
    if mode != "mutual":
        if member not in (None, 0):
            raise KdlabError(f"member={member}: {ckpt_path} is a {mode} run's checkpoint, not a "
                             "cohort's; drop member")
        model = build_model(run_cfg.student.model, data, "student.model")
        load_into(model, load_weights(ckpt_path), f"ckpt_path={ckpt_path}")
        return model, run_cfg.student.model
    from kdlab.modes.mutual import member_configs

    configs = member_configs(run_cfg)
    index = 0 if member is None else int(member)
    if not 0 <= index < len(configs):
        raise KdlabError(f"member={index}: the cohort of {ckpt_path} has members "
                         f"0..{len(configs) - 1}")
    model = build_model(configs[index], data, f"member {index}")
    prefix = f"{index}."  # load_weights has already dropped the checkpoint's "student."
    state = {k[len(prefix):]: v for k, v in load_weights(ckpt_path).items()
             if k.startswith(prefix)}
    load_into(model, state, f"ckpt_path={ckpt_path} (member {index})")
    return model, configs[index]


def run_teacher(run_cfg: DictConfig, want: str) -> tuple[nn.Module | None, str]:
    """The teacher the checkpoint's run distilled from (its ``teacher.ckpt`` or its stored
    teacher; never trained here) and where it came from, or ``None`` when ``want`` is
    ``false``, or ``auto`` and there is no single stored teacher for this run."""
    if want in ("false", "False", "none"):
        return None, "not asked for (with_teacher=false)"
    mode = str((run_cfg.get("mode") or {}).get("name", "offline"))
    problem = None
    if mode != "offline":
        problem = f"the run's mode is {mode}, not offline (no single teacher)"
    elif (run_cfg.get("distill") or {}).get("_target_") is None:
        problem = "the run distilled nothing (distill=none)"
    if problem is None:
        cfg = run_cfg.copy()
        with open_dict(cfg):
            cfg.teacher.train_if_missing = False
        try:
            model, info = get_teacher(cfg, Path(cfg.paths.output_dir))
            return model, str(info.get("path") or info.get("key") or info["source"])
        except KdlabError as e:
            problem = str(e)
    if want in ("true", "True"):
        raise KdlabError(f"with_teacher=true but the teacher cannot be evaluated: {problem}")
    log.info("kdlab-eval: no teacher row (%s)", problem)
    return None, problem


def _entry(model: nn.Module, model_cfg: DictConfig, data: InMemoryDataModule,
           run_cfg: DictConfig, latency: DictConfig) -> dict[str, Any]:
    sizes = [int(b) for b in latency.get("batch_sizes", [latency.batch_size])]
    entry = {"model": model_name(model_cfg),
             "metrics": evaluate_model(model, data, run_cfg),
             **footprint(model, data.input_shape, sizes, int(latency.repeats),
                         bool(run_cfg.channels_last))}
    entry["latency_ms"] = entry["latency_ms_by_batch"][max(sizes)]
    entry["latency_batch_size"] = max(sizes)
    return entry


@friendly_errors
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the checkpoint's student (and the run's teacher) and data; report accuracy,
    parameters, FLOPs, size, CPU latency and the teacher/student ratios; write ``eval.json``."""
    run_cfg = load_run_config(cfg.ckpt_path)
    for key in ("data", "trainer"):  # command-line overrides of the eval config win
        if cfg.get(key):
            run_cfg[key] = OmegaConf.merge(run_cfg[key], cfg[key])
    run_cfg.channels_last = run_cfg.get("channels_last", False)
    data = build_datamodule(run_cfg, transfer=False)
    model, model_cfg = checkpoint_student(run_cfg, cfg.ckpt_path, data, cfg.get("member"))
    student = _entry(model, model_cfg, data, run_cfg, cfg.latency)
    student["checkpoint_bytes"] = Path(cfg.ckpt_path).stat().st_size
    result: dict[str, Any] = {"ckpt_path": str(cfg.ckpt_path), "student": student}
    teacher, source = run_teacher(run_cfg, str(cfg.get("with_teacher", "auto")))
    if teacher is not None:
        result["teacher"] = _entry(teacher, run_cfg.teacher.model, data, run_cfg, cfg.latency)
        result["teacher"]["source"] = source
        result["ratios"] = ratios(result["teacher"], student)
    else:
        result["teacher_skipped"] = source
    print_footprint(result, title=f"kdlab-eval {cfg.ckpt_path}")
    out = Path(cfg.paths.output_dir) / "eval.json"
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
    """``kdlab-eval ckpt_path=PATH [overrides]``."""
    guard_argv()
    _main()
