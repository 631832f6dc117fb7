"""Networks rebuilt from a kdlab checkpoint: which checkpoint a ``ckpt_path`` means (a file, or
a run folder's reported student checkpoint), the run folder it belongs to and where a command's
outputs about it go, the config stored in it, its student (or a cohort member), and the teacher
its run distilled from. Used by ``kdlab-eval`` and ``kdlab-export``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kdlab.data.memory import InMemoryDataModule
from kdlab.engine.teachers import load_into, load_weights
from kdlab.modes.build import (
    build_model,
    build_strategy,
    head_replacing_members,
    strategy_configs,
)
from kdlab.modes.mutual import member_configs
from kdlab.modes.resume import MARKER
from kdlab.modes.teacher import get_teacher
from kdlab.util.errors import KdlabError
from kdlab.util.files import load_safely

log = logging.getLogger(__name__)

#: files or folders that mark a run folder (results.json once finished; the others from the start)
RUN_MARKERS = ("results.json", MARKER, ".hydra")
#: how many folders above a checkpoint its run folder may be (<run>/<stage>/checkpoints/x.ckpt)
_RUN_DEPTH = 3


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint file a ``ckpt_path`` stands for, the run folder it belongs to, its name
    there (``best-epoch11-acc0.9061``, ``baseline-last``) and how it was chosen."""

    path: Path
    run_dir: Path
    name: str
    chosen: str


def resolve_checkpoint(ckpt_path: str) -> Checkpoint:
    """``ckpt_path`` as given on the command line: a checkpoint file is used as it is; a run
    folder stands for the student checkpoint its ``results.json`` reports (see
    :func:`reported_student_checkpoint`)."""
    path = Path(ckpt_path)
    if path.is_dir():
        ckpt, chosen = reported_student_checkpoint(path)
        run_dir = path
    elif path.is_file():
        ckpt, chosen, run_dir = path, "given as ckpt_path", run_folder(path)
    else:
        raise KdlabError(f"ckpt_path={ckpt_path} does not exist: give a kdlab checkpoint "
                         "(.ckpt) or a finished run folder")
    return Checkpoint(path=ckpt, run_dir=run_dir, name=checkpoint_name(ckpt, run_dir),
                      chosen=chosen)


def run_folder(ckpt: Path) -> Path:
    """The run folder of a checkpoint file: the nearest folder above it (at most three levels)
    that holds a ``results.json``, ``kdlab_run.json`` or ``.hydra``; else the folder of its
    ``checkpoints/`` folder, or its own folder."""
    for folder in list(ckpt.resolve().parents)[:_RUN_DEPTH]:
        if any((folder / marker).exists() for marker in RUN_MARKERS):
            return folder
    parent = ckpt.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def checkpoint_name(ckpt: Path, run_dir: Path) -> str:
    """A checkpoint's name within its run folder, for the folder of a command's outputs: its
    path there without ``checkpoints/`` and the suffix (``checkpoints/last.ckpt`` → ``last``,
    ``baseline/checkpoints/best-….ckpt`` → ``baseline-best-…``)."""
    try:
        parts = ckpt.resolve().relative_to(run_dir.resolve()).with_suffix("").parts
    except ValueError:  # a checkpoint outside the folder (results.json named another place)
        parts = (ckpt.stem,)
    return "-".join(p for p in parts if p != "checkpoints") or ckpt.stem


def _read_results(run_dir: Path) -> dict[str, Any]:
    """``<run_dir>/results.json``; a folder without one (an unfinished run, or no run folder
    at all) is refused with the checkpoint to give instead."""
    path = run_dir / "results.json"
    last = run_dir / "checkpoints" / "last.ckpt"
    instead = f"ckpt_path={last}" if last.is_file() else "ckpt_path=<one of its .ckpt files>"
    if not path.is_file():
        raise KdlabError(f"ckpt_path={run_dir}: this folder has no results.json (an unfinished "
                         f"run, or not a run folder), so no reported checkpoint to pick; give "
                         f"a checkpoint file instead: {instead}")
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KdlabError(f"{path} cannot be read ({str(e).splitlines()[0]}); give a checkpoint "
                         f"file instead: {instead}") from None
    if not isinstance(results, dict) or not isinstance(results.get("student"), dict):
        raise KdlabError(f"{path} has no student entry; give a checkpoint file instead: "
                         f"{instead}")
    return results


def _relocated(recorded: str, results: dict[str, Any], run_dir: Path) -> Path | None:
    """A checkpoint path recorded in ``results.json``, found in ``run_dir`` (also after the run
    folder was moved or copied: the part below the recorded run folder is kept), or where it
    was recorded; ``None`` when neither exists."""
    path = Path(recorded)
    old_run = results.get("run_dir") or ((results.get("config") or {}).get("paths") or {}).get(
        "output_dir")
    if old_run:
        try:
            moved = run_dir / path.relative_to(old_run)
        except ValueError:
            moved = None
        if moved is not None and moved.is_file():
            return moved
    return path if path.is_file() else None


def reported_student_checkpoint(run_dir: Path) -> tuple[Path, str]:
    """The student checkpoint of a finished run folder whose accuracy its ``results.json``
    reports, and why: the student entry's ``best_ckpt`` (the best-validation checkpoint, which
    the stage tested), else its ``last_ckpt`` (a stage without a best checkpoint tests its
    final weights, which ``last.ckpt`` holds)."""
    results = _read_results(run_dir)
    entry = results["student"]
    why = {"best_ckpt": "results.json's student best_ckpt: the best-validation checkpoint, "
                        "whose test accuracy results.json reports",
           "last_ckpt": "results.json's student last_ckpt: the stage kept no best checkpoint, "
                        "so its reported test accuracy is of these final weights"}
    for key in ("best_ckpt", "last_ckpt"):
        recorded = entry.get(key)
        if not recorded:
            continue
        found = _relocated(str(recorded), results, run_dir)
        if found is None:
            raise KdlabError(f"{run_dir / 'results.json'}: the student's {key} {recorded} is "
                             "missing (moved or deleted?); give a checkpoint file instead: "
                             "ckpt_path=<one of its .ckpt files>")
        return found, why[key]
    raise KdlabError(f"{run_dir / 'results.json'}: the student entry records no checkpoint (a "
                     "trainer.fast_dev_run run saves none), so there is nothing to read")


def output_folder(checkpoint: Checkpoint, out: str | None, command: str,
                  member: int | None = None) -> Path:
    """Where ``command`` (``eval``, ``export``) writes about ``checkpoint``: ``out`` when
    given, else ``<run folder>/<command>/<checkpoint name>[-member<i>]``, beside the run."""
    if out not in (None, ""):
        return Path(str(out))
    name = checkpoint.name + ("" if member is None else f"-member{int(member)}")
    return checkpoint.run_dir / command / name


def load_run_config(ckpt_path: str | Path) -> DictConfig:
    """The resolved config stored in a kdlab checkpoint (a file that is none, or does not load
    safely, is one :class:`KdlabError` line)."""
    ckpt = load_safely(Path(ckpt_path), "ckpt_path", missing="give a kdlab checkpoint (.ckpt) "
                       "or a finished run folder", folder="give a kdlab checkpoint (.ckpt)")
    config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if not config:
        raise KdlabError(f"ckpt_path={ckpt_path} is not a kdlab checkpoint (no stored config)")
    return OmegaConf.create(config)


def checkpoint_student(run_cfg: DictConfig, ckpt_path: str | Path, data: InMemoryDataModule,
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


def deployed_student(run_cfg: DictConfig, ckpt_path: str | Path, data: InMemoryDataModule,
                     member: int | None = None) -> tuple[nn.Module, DictConfig]:
    """The network a kdlab checkpoint delivers and its student's model config: the student of
    :func:`checkpoint_student`, or, when the run's strategy replaces the student's head
    (SimKD), the network that strategy deployed, rebuilt from the checkpoint's strategy weights
    without the teacher (:meth:`~kdlab.strategies.base.Strategy.deployed_from_state`)."""
    model, model_cfg = checkpoint_student(run_cfg, ckpt_path, data, member)
    mode = str((run_cfg.get("mode") or {}).get("name", "offline"))
    if mode == "mutual" or not head_replacing_members(run_cfg):
        return model, model_cfg
    strategy = build_strategy(run_cfg)
    assert strategy is not None
    ckpt = load_safely(Path(ckpt_path), "ckpt_path", missing="give a kdlab checkpoint (.ckpt)",
                       folder="give a kdlab checkpoint (.ckpt)")
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    prefix = "strategy."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        net = strategy.deployed_from_state(model, own)
    except KdlabError as e:
        raise KdlabError(f"ckpt_path={ckpt_path}: {e}") from None
    return net.eval(), model_cfg


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
    elif not strategy_configs(run_cfg):
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


