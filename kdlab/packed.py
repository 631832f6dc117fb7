"""``hydra/launcher=packed``: a multirun whose jobs share a teacher run as packed cohorts.

The launcher (``hydra_plugins/kdlab_packed_launcher``) composes and prepares every job as Hydra
does (its folder, ``.hydra/`` configs and log), then hands them here: :func:`launch` groups them
(:func:`kdlab.modes.pack.plan_packs`), runs each pack in this process (:func:`execute_pack`) and
every other job as the basic launcher would, and returns one Hydra ``JobReturn`` per job, in job
order. A job that fails — in a pack or alone — is reported in one line and in the sweep's
``failed_jobs.json``, and the sweep goes on (:mod:`kdlab.train`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdlab.cli import SWEEP, fail
from kdlab.modes import pack as packing
from kdlab.modes.build import to_container
from kdlab.modes.checks import check_values
from kdlab.modes.resume import hold_run_folder, prepare_run
from kdlab.modes.speed import CHOICE, resolve_precision, set_precision
from kdlab.train import check_latency, report, writable_folder
from kdlab.util.errors import KdlabError
from kdlab.util.files import write_json
from kdlab.util.runtime import RunStopped, apply_speed_settings, stop_on_signals

log = logging.getLogger(__name__)


def execute_pack(cfgs: Sequence[DictConfig], folder: Path, stack: bool | str = "auto"
                 ) -> list[dict[str, Any] | Exception]:
    """Run the jobs ``cfgs`` (resolved configs, each with its own ``paths.output_dir``) as one
    pack whose own checkpoint lives in ``folder`` (``stack``: see
    :func:`kdlab.engine.fit_pack.fit_pack`); write each job's ``results.json`` and return its
    content, or the error that stopped that job."""
    start = time.perf_counter()
    outcome: list[dict[str, Any] | Exception | None] = [None] * len(cfgs)
    dirs: list[Path | None] = [None] * len(cfgs)
    for i, cfg in enumerate(cfgs):
        try:
            check_values(cfg)
            check_latency(cfg)
            dirs[i] = writable_folder(Path(cfg.paths.output_dir), "paths.output_dir")
        except KdlabError as e:
            outcome[i] = e
    apply_speed_settings(bool(cfgs[0].get("tune_allocator", True)))
    with ExitStack() as held:
        live, resuming = [], []
        choice = None
        for i, cfg in enumerate(cfgs):
            if outcome[i] is None:
                try:
                    held.enter_context(hold_run_folder(dirs[i]))
                    resuming.append(prepare_run(cfg, dirs[i]))
                    live.append(i)
                except KdlabError as e:
                    outcome[i] = e
        if live:
            try:  # trainer.precision=auto: one choice for the pack (members share its Trainer)
                choice = resolve_precision(cfgs[live[0]], dirs[live[0]],
                                           bool(resuming) and resuming[0])
                if choice is not None:
                    for i in live[1:]:
                        set_precision(cfgs[i], choice["choice"])
                        write_json(dirs[i] / CHOICE, choice)
            except KdlabError as e:
                for i in live:
                    outcome[i] = e
                live = []
        if live:
            try:
                results = packing.run([cfgs[i] for i in live], [dirs[i] for i in live], folder,
                                      resume=bool(resuming) and all(resuming), stack=stack)
            except (KdlabError, Exception) as e:  # noqa: BLE001 - the pack as a whole failed
                if not isinstance(e, KdlabError):
                    log.exception("the pack failed")
                results = [e] * len(live)
            for i, result in zip(live, results):
                if isinstance(result, Exception):
                    outcome[i] = result
                    continue
                result["wall_time_s"] = time.perf_counter() - start
                result["config"] = to_container(cfgs[i])
                if choice is not None:
                    result["precision"] = choice
                outcome[i] = report(cfgs[i], result, dirs[i])
    return [o if o is not None else KdlabError("not run") for o in outcome]


def error_line(error: Exception) -> str:
    """One line for a failed job."""
    if isinstance(error, KdlabError):
        return str(error)
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def check_options(max_members: Any, stack: Any) -> None:
    """``hydra.launcher.max_members`` and ``hydra.launcher.stack`` are valid, else one line and
    exit code 2 (before any job is prepared)."""
    if isinstance(max_members, bool) or not isinstance(max_members, int) or max_members < 2:
        fail(f"hydra.launcher.max_members={max_members} must be an integer >= 2 (the most jobs "
             "in one pack)")
    if stack not in (True, False, "auto"):
        fail(f"hydra.launcher.stack={stack} must be auto, true or false")


def launch(jobs: Sequence[dict[str, Any]], run_alone: Callable[[int], Any],
           max_members: int, sweep_dir: Path, stack: bool | str = "auto") -> list[Any]:
    """Run the prepared ``jobs`` (each ``{"num", "overrides", "cfg", "return"}``: its job
    number, overrides, resolved config and the Hydra ``JobReturn`` of its preparation): packs
    of those that can share a teacher pass, ``run_alone(position)`` for the others. Returns the
    ``JobReturn`` of every job, in order."""
    from hydra.core.utils import JobStatus

    cfgs = [job["cfg"] for job in jobs]
    packs, alone = packing.plan_packs(cfgs, [job["overrides"] for job in jobs], max_members)
    for pos, reason in sorted(alone.items()):
        log.info("job %d runs alone: %s", jobs[pos]["num"], reason)
    for members in packs:
        log.info("pack of %d: jobs %s", len(members), ", ".join(str(jobs[p]["num"])
                                                              for p in members))
    returns: list[Any] = [None] * len(jobs)
    for pos in sorted(alone):
        returns[pos] = run_alone(pos)
    for members in packs:
        folder = sweep_dir / ("pack-" + "-".join(str(jobs[p]["num"]) for p in members))
        for p in members:
            SWEEP["jobs"].append(list(jobs[p]["overrides"]))
        try:
            with stop_on_signals():
                outcomes = execute_pack([cfgs[p] for p in members], folder, stack)
        except RunStopped as stop:
            fail(f"stopped by {stop} during the pack of jobs "
                 f"{', '.join(str(jobs[p]['num']) for p in members)} (no results.json); each "
                 "job's folder holds its last checkpoint", code=stop.exit_code)
        for p, result in zip(members, outcomes):
            ret = jobs[p]["return"]
            ret.status = JobStatus.COMPLETED
            if isinstance(result, Exception):
                record_failure(jobs[p], cfgs[p], result, sweep_dir)
                ret.return_value = float("nan")
            else:
                ret.return_value = float(result["student"]["metrics"].get("val/acc",
                                                                          float("nan")))
            returns[p] = ret
    return returns


def record_failure(job: dict[str, Any], cfg: DictConfig, error: Exception,
                   sweep_dir: Path) -> None:
    """Print a failed job's line and add it to the sweep's summary and ``failed_jobs.json``."""
    line = error_line(error)
    print(f"kdlab: error: job {job['num']} ({' '.join(job['overrides'])}): {line}",
          file=sys.stderr, flush=True)
    SWEEP["failed"].append({"job": job["num"], "overrides": list(job["overrides"]),
                            "sweep_dir": str(sweep_dir), "folder": str(cfg.paths.output_dir),
                            "error": line})
    write_json(sweep_dir / "failed_jobs.json", SWEEP["failed"])


__all__ = ["execute_pack", "launch"]
