"""Weights & Biases for ``logger=wandb``: one W&B run per job, named, grouped and tagged.

A job's stages (teacher, student, baseline, generations …) log into the same W&B run, each
stage but the student under its own prefix (``baseline-val/acc``); accuracies get a ``max``
summary, and at the end of the job the run gets the job's comparison table (a ``wandb.Table``
with a row per stage) and is finished, so the next job of a multirun starts a new run. The run
is grouped by experiment (``task_name``; a multirun adds its sweep folder's name) and tagged
with the strategy, teacher, student and mode. Without an API key it runs offline with a warning
that says how to upload it later; it never prompts.
"""

from __future__ import annotations

import logging
import netrc
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.util.errors import KdlabError

log = logging.getLogger(__name__)

#: metrics summarised by their best value rather than their last one
MAX_SUMMARY = ("val/acc", "test/acc")


def is_wandb(node: Mapping[str, Any]) -> bool:
    """Whether a logger config node builds a ``WandbLogger``."""
    return str(node.get("_target_", "")).endswith("WandbLogger")


def _has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(node: Mapping[str, Any]) -> dict[str, str]:
    """``{"mode": "offline"}`` (with a warning) when W&B would go online without an API key,
    so a run never stops at a login prompt; ``{}`` otherwise."""
    if node.get("mode", "online") != "online" or _has_key():
        return {}
    log.warning("logger=wandb: no W&B API key (WANDB_API_KEY or `wandb login`), so logging "
                "offline; upload later with `wandb sync <run folder>/wandb/offline-run-*`")
    return {"mode": "offline"}


def _hydra_job() -> tuple[str | None, int | None]:
    """(sweep folder name, job number) of a Hydra multirun job, else ``(None, None)``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # not under @hydra.main (tests, the API)
        return None, None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None, None
    return Path(hydra_cfg.sweep.dir).name, int(hydra_cfg.job.num)


@dataclass(frozen=True)
class RunLabels:
    """What names, groups and tags a job's W&B run: the experiment (``task_name``), the
    strategy label (``kd``, ``kd+at``, ``none``), the seed, the teacher's, student's and mode's
    names, and the job's output folder."""

    task: str
    strategy: str
    seed: int
    teacher: str
    student: str
    mode: str
    folder: str


def run_tags(labels: RunLabels) -> list[str]:
    """``strategy:kd``, ``teacher:CNN``, ``student:MLP``, ``mode:offline``."""
    return [f"strategy:{labels.strategy}", f"teacher:{labels.teacher}",
            f"student:{labels.student}", f"mode:{labels.mode}"]


def stage_prefix(stage: str) -> str:
    """The key prefix of a stage's metrics in the job's W&B run (none for the student)."""
    return "" if stage == "student" else stage


def wandb_kwargs(labels: RunLabels, node: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """Constructor arguments of a stage's ``WandbLogger`` (``node``: its config): the job's run
    when one is open (so stages share it), otherwise name, group, tags and folder of a new one;
    the stage's key prefix; offline mode without an API key."""
    import wandb

    kwargs: dict[str, Any] = {"prefix": stage_prefix(stage)}
    if wandb.run is not None:
        kwargs["experiment"] = wandb.run
        return kwargs
    sweep, num = _hydra_job()
    kwargs["save_dir"] = labels.folder
    if node.get("name") is None:
        job = f"-{num}" if num is not None else ""
        kwargs["name"] = f"{labels.task}{job}-{labels.strategy}-seed{labels.seed}"
    if node.get("group") is None:
        kwargs["group"] = f"{labels.task}-{sweep}" if sweep else labels.task
    kwargs["tags"] = [*run_tags(labels), *(node.get("tags") or [])]
    kwargs.update(wandb_mode(node))
    return kwargs


def start_run(logger: Any, prefix: str = "") -> None:
    """Open the logger's run now and summarise its accuracy keys (with the stage's key
    ``prefix``) by their maximum. (The resolved config reaches the run as the module's
    hyper-parameters.)"""
    try:
        experiment = logger.experiment
    except Exception as e:  # noqa: BLE001 - wandb's CommError / UsageError / timeouts
        if not type(e).__module__.startswith("wandb"):
            raise
        detail = " ".join(str(e).split())[:200]
        raise KdlabError(f"logger=wandb could not start a W&B run ({type(e).__name__}: "
                         f"{detail}): check the network, WANDB_BASE_URL and the API key, or log "
                         "offline with WANDB_MODE=offline (then `wandb sync`) or use "
                         "logger=csv") from None
    for key in MAX_SUMMARY:
        experiment.define_metric(f"{prefix}-{key}" if prefix else key, summary="max")


def finish_run(results: Mapping[str, Any] | None) -> None:
    """Log the job's comparison table and final per-stage accuracies to the open W&B run and
    finish it (a failed job, ``results=None``, finishes with exit code 1). No-op without one."""
    wandb = sys.modules.get("wandb")  # never imported: no run to finish
    run = getattr(wandb, "run", None)
    if run is None:
        return
    if results is None:
        wandb.finish(exit_code=1)
        return
    from kdlab.util.report import HEADERS, table_rows

    rows = table_rows(results)
    run.log({"comparison": wandb.Table(columns=HEADERS, data=rows)})
    for entry in results.get("stages") or []:
        for key in ("test/acc", "val/acc"):
            value = (entry.get("metrics") or {}).get(key)
            if value is not None:
                run.summary[f"final/{entry['stage']}/{key}"] = value
    wandb.finish()
