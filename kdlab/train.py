"""``kdlab-train``: compose the config, run its mode, write ``results.json``.

The default mode (:mod:`kdlab.modes.offline`) gets a teacher, distils a student and trains the
same student without the teacher under the same budget; the other modes of :mod:`kdlab.modes`
chain, combine or replace those stages. Each stage is run by the engine
(:func:`kdlab.engine.fit.fit_stage` → :class:`kdlab.engine.module.DistillationModule`).
:func:`run` adds the config and the wall time and writes the report (:mod:`kdlab.util.report`).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, open_dict

from kdlab.cli import SWEEP, fail, friendly_errors, guard_argv
from kdlab.engine.fit import SKIPPED_WARNING
from kdlab.modes import mode_runner
from kdlab.modes.build import to_container
from kdlab.modes.checks import check_values
from kdlab.modes.generation import refuse_outside_offline
from kdlab.modes.resume import (
    continue_unfinished,
    followed_folder,
    hold_run_folder,
    prepare_run,
    resume_marker_matches,
    select_last_run,
    set_resuming,
)
from kdlab.modes.speed import resolve_precision
from kdlab.util.config import CONF_DIR
from kdlab.util.distributed import ddp_ranks_for_multirun_job, is_rank_zero
from kdlab.util.errors import KdlabError
from kdlab.util.files import finite_json, load_safely, write_atomic, write_json
from kdlab.util.report import markdown_table, print_table
from kdlab.util.runtime import RunStopped, apply_speed_settings, stop_on_signals
from kdlab.util.tracking import finish_run

log = logging.getLogger(__name__)


def execute(cfg: DictConfig) -> dict[str, Any]:
    """One run of ``cfg.mode`` (:mod:`kdlab.modes`); returns the content of ``results.json``.
    A user's mistake raises :class:`KdlabError` (:func:`run` turns it into one line and exit
    code 2, as the command line does)."""
    start = time.perf_counter()
    check_values(cfg)  # types and ranges, before anything is built or trained
    apply_speed_settings(bool(cfg.get("tune_allocator", True)))
    select_last_run(cfg)  # ckpt_path=last: the newest unfinished run of this config
    if is_rank_zero():
        if not folder_chosen():  # the plain re-run continues the newest unfinished one
            continue_unfinished(cfg, Path(cfg.paths.output_dir))
    else:  # DDP: the other ranks follow rank 0 to the folder it continued in
        follow_rank_zero(cfg)
    run_dir = writable_folder(Path(cfg.paths.output_dir), "paths.output_dir")
    check_latency(cfg)
    if cfg.ckpt_path:
        check_checkpoint(Path(cfg.ckpt_path))
    with ExitStack() as held:
        if is_rank_zero():
            held.enter_context(hold_run_folder(run_dir))  # one run per folder
            resuming = prepare_run(cfg, run_dir)  # resume the run in this folder: same config
            precision = resolve_precision(cfg, run_dir, resuming)  # trainer.precision=auto
        else:
            set_resuming(resume_marker_matches(cfg, run_dir))
            precision = None
        results = run_mode(cfg, run_dir)
        if precision is not None:
            results["precision"] = precision
        results["wall_time_s"] = time.perf_counter() - start
        results["config"] = to_container(cfg)
        if is_rank_zero():  # DDP: the other ranks ran every stage in step; rank 0 reports
            results = report(cfg, results, run_dir)
    return results


def run_mode(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The run's mode in ``run_dir``: its stages, as ``results.json`` entries."""
    mode = str((cfg.get("mode") or {}).get("name", "offline"))
    refuse_outside_offline(cfg, mode)  # on_policy / sequence_kd: options of the offline mode
    trainer = cfg.trainer
    try:
        # a multirun job with DDP starts its other ranks here (after the folder is marked)
        with ddp_ranks_for_multirun_job(str(trainer.get("strategy", "auto")),
                                        trainer.get("devices", 1), trainer.get("num_nodes", 1)):
            return {"run_dir": str(run_dir), **mode_runner(mode)(cfg, run_dir)}
    except BaseException:
        finish_run(None)  # a W&B run of this job ends as failed, not left open
        raise


def report(cfg: DictConfig, results: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Write ``results.json`` (strict JSON: NaN as null, and why) and ``results.md``, end the
    W&B run, print the table and the warnings a reader must not miss; returns what was
    written."""
    mode = str((cfg.get("mode") or {}).get("name", "offline"))
    results, nonfinite = finite_json(results)
    if nonfinite:  # strict JSON readers reject NaN: null, and why
        results["nonfinite"] = {"keys": nonfinite, "why": "these values were NaN or infinite "
                                "(e.g. nonfinite_loss=off let a diverged loss through); JSON "
                                "has no NaN, so they are written as null"}
    write_json(run_dir / "results.json", results)
    write_atomic(run_dir / "results.md", (markdown_table(results) + "\n").encode())
    finish_run(results)
    label = results.get("strategy") if mode == "offline" else mode
    print_table(results, title=f"{cfg.task_name}: {label} "
                               f"({results['wall_time_s']:.0f} s) → {run_dir}")
    warn_about_the_results(results)
    return results


def folder_chosen() -> bool:
    """Whether the user named the run's folder (``hydra.run.dir``, ``hydra.sweep.dir``,
    ``paths.output_dir``, or the Python API): then it is the run's, and a re-run resumes only
    the run in it; otherwise Hydra made a fresh one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    overrides = HydraConfig.get().overrides
    keys = ("hydra.run.dir=", "hydra.sweep.dir=", "hydra.sweep.subdir=", "paths.output_dir=")
    return any(o.lstrip("+~").startswith(keys) for o in [*overrides.hydra, *overrides.task])


def follow_rank_zero(cfg: DictConfig) -> None:
    """A DDP rank other than 0 works in the folder rank 0 continued in, if it did."""
    folder = followed_folder(Path(cfg.paths.output_dir))
    if folder is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)


def warn_about_the_results(results: dict[str, Any]) -> None:
    """The lines a reader of the table must not miss, last on stderr: stages that skipped
    more than 1% of their batches, values that were not finite."""
    for entry in results.get("stages") or []:
        fraction = (entry.get("metrics") or {}).get("skipped_fraction") or 0
        if fraction > SKIPPED_WARNING:
            log.warning("kdlab: warning: stage %s skipped %.1f%% of its training batches "
                        "(non-finite loss, nonfinite_loss=skip): its numbers are not those of "
                        "a normal training", entry.get("stage"), 100 * fraction)
    if results.get("nonfinite"):
        log.warning("kdlab: warning: %s were not finite and are null in results.json",
                    ", ".join(results["nonfinite"]["keys"]))


def run(cfg: DictConfig) -> dict[str, Any]:
    """:func:`execute` as the command line runs it: a :class:`KdlabError` is printed as one line
    on stderr and the process exits with code 2; a run stopped by SIGTERM or Ctrl-C
    (:class:`~kdlab.util.runtime.RunStopped`) exits with ``128 + signal`` after one line giving
    the command that continues it."""
    try:
        with stop_on_signals():
            return friendly_errors(execute)(cfg)
    except RunStopped as stop:
        fail(f"stopped by {stop} before the run finished (no results.json); the same command "
             f"in the same folder continues it from its last checkpoint: "
             f"{resume_command(cfg)}", code=stop.exit_code)
        raise  # unreachable: fail() exits


def resume_command(cfg: DictConfig) -> str:
    """``kdlab-train <the job's overrides> hydra.run.dir=<its folder>``: the command that
    continues this run (a multirun job as a single run in its folder)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
    else:  # the Python API: the run's config is the composed one
        overrides = []
    folder = str(cfg.paths.output_dir)
    overrides = [o for o in overrides if not o.startswith(("hydra.run.dir=", "paths.output_dir="))]
    return " ".join(["kdlab-train", *(shlex.quote(o) for o in overrides),
                     shlex.quote(f"hydra.run.dir={folder}")])


def check_checkpoint(path: Path) -> None:
    """``ckpt_path`` is a kdlab (Lightning) checkpoint that loads with ``weights_only=True``:
    a missing file, a folder, a file of another kind or one that would run code is one line."""
    ckpt = load_safely(path, "ckpt_path", missing="give a last.ckpt to resume, or "
                       "ckpt_path=last", folder="give the last.ckpt inside its checkpoints/ to "
                       "resume, or ckpt_path=last")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
        raise KdlabError(f"ckpt_path={path} is not a Lightning checkpoint (no state_dict and "
                         "epoch): give a run's checkpoints/last.ckpt")


def writable_folder(folder: Path, key: str) -> Path:
    """``folder``, created if needed, after checking that a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".kdlab-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise KdlabError(f"{key}={folder} is not a writable folder ({e.strerror}): choose "
                         "another one, e.g. paths.log_dir=./outputs") from None
    return folder


def check_latency(cfg: DictConfig) -> None:
    """``latency.batch_size`` and ``latency.repeats`` are positive integers."""
    for key in ("batch_size", "repeats"):
        value = (cfg.get("latency") or {}).get(key, 1)
        if not isinstance(value, int) or value < 1:
            raise KdlabError(f"latency.{key}={value} must be a positive integer")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _main(cfg: DictConfig) -> float:
    job = multirun_job()
    if job is None:
        results = run(cfg)
    else:  # one failed job of a sweep must not cancel the others
        SWEEP["jobs"].append(job["overrides"])
        results = run_job(cfg, job)
        if results is None:
            return float("nan")
    return float(results["student"]["metrics"].get("val/acc", float("nan")))


def multirun_job() -> dict[str, Any] | None:
    """This job's number, overrides and the sweep's folder when it is a job of a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    config = HydraConfig.get()
    return {"job": config.job.num, "overrides": list(config.overrides.task),
            "sweep_dir": config.sweep.dir}


def run_job(cfg: DictConfig, job: dict[str, Any]) -> dict[str, Any] | None:
    """One job of a multirun: its results, or ``None`` when it failed — then its error line
    is printed and kept for the sweep's summary, and the sweep goes on. A stop (SIGTERM,
    Ctrl-C) still ends the whole sweep with the command that continues it."""
    folder = str(cfg.paths.output_dir)
    try:
        with stop_on_signals():
            return execute(cfg)
    except RunStopped as stop:
        fail(f"stopped by {stop} during job {job['job']} of the sweep (no results.json); the "
             f"same command continues every unfinished job: the plain re-run picks up each "
             f"one's folder", code=stop.exit_code)
    except KdlabError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - a bug in one job is reported, the sweep goes on
        log.exception("job %s failed", job["job"])
        error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    print(f"kdlab: error: job {job['job']} ({' '.join(job['overrides'])}): {error}",
          file=sys.stderr, flush=True)
    SWEEP["failed"].append({**job, "folder": folder, "error": error})
    write_json(Path(job["sweep_dir"]) / "failed_jobs.json", SWEEP["failed"])
    return None


def sweep_summary() -> str | None:
    """The lines that end a sweep with failed jobs (``None`` when none failed)."""
    failed = SWEEP["failed"]
    if not failed:
        return None
    jobs = SWEEP["jobs"]
    shared = set.intersection(*map(set, jobs)) if len(jobs) > 1 else set()
    lines = [f"{len(failed)} of {len(jobs)} jobs of the sweep failed (the others finished; "
             f"the list is in {Path(failed[0]['sweep_dir']) / 'failed_jobs.json'}):"]
    for job in failed:  # the overrides that make the job differ from the others
        own = " ".join(o for o in job["overrides"] if o not in shared)
        lines.append(f"  job {job['job']} [{own}] in {job['folder']}: {job['error']}")
    return "\n".join(lines)


def cli() -> None:
    """``kdlab-train [overrides]`` — see ``conf/train.yaml``. A multirun whose jobs failed ends
    with their summary and exit code 1."""
    guard_argv()
    _main()
    summary = sweep_summary()
    if summary is not None:
        fail(summary, code=1)


if __name__ == "__main__":
    cli()
