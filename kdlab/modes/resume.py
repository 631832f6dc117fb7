"""Resume a killed run where it stopped: the same command in the same folder, or ``ckpt_path=last``.

A run writes ``kdlab_run.json`` (a hash of its config, paths aside) in its folder when it
starts. Launching the same config into a folder that holds that marker resumes it: every stage
(teacher, student, baseline, generations, assistants …) whose ``checkpoints/last.ckpt`` exists
continues from it — weights, optimizer, LR schedule, epoch and step counters, connectors, the
checkpoint callbacks and the RNG state (:meth:`DistillationModule.on_save_checkpoint`) — and
the loader's data order is a function of (seed, epoch), so on CPU with
``trainer.deterministic=true`` the resumed run ends where an uninterrupted one does. A stage
that had finished resumes at its last epoch and trains no further; a stored teacher is reused.

With Hydra's timestamped run folders, the plain re-run of the same command (no
``hydra.run.dir``) continues the newest unfinished run of the same config under
``paths.log_dir`` in its folder (:func:`continue_unfinished`; ``resume=false`` starts anew),
and ``ckpt_path=last`` does so or fails if there is none. The config's identity leaves out
where the run writes, so the run's own folder never makes two launches differ. A run holds its
folder's lock (:func:`hold_run_folder`) while it works: a second run into the same folder is
refused, and a folder in use is never continued.
"""

from __future__ import annotations

import contextvars
import copy
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from kdlab.engine.history import BACKUP_SUFFIX, ReplayHistory, csv_metrics_files, rows_to_keep
from kdlab.util.errors import KdlabError
from kdlab.util.files import LockHeld, lock_holder, locked, write_json

log = logging.getLogger(__name__)

MARKER = "kdlab_run.json"
#: in a folder Hydra made for a launch that continued an unfinished run: where it went
POINTER = "kdlab_continued.json"
#: held (``flock``) by the run working in a folder
LOCK = ".kdlab.lock"
#: config keys that say where a run writes, or how it shows progress, not what it computes
VOLATILE = ("paths", "ckpt_path", "resume", "hydra")
_resuming: contextvars.ContextVar[bool] = contextvars.ContextVar("kdlab_resuming", default=False)


def run_key(cfg: DictConfig) -> str:
    """A hash of the resolved config without the keys of :data:`VOLATILE` and progress bars.
    The run's own folder is replaced by a placeholder before resolving, so values derived
    from it (the default CSV logger's ``save_dir: ${paths.output_dir}``) do not make two
    launches of the same config differ."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = "<run folder>"
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for key in VOLATILE:
        config.pop(key, None)
    config.get("trainer", {}).pop("enable_progress_bar", None)
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def find_unfinished(log_dir: Path, key: str, exclude: Path | None = None) -> Path | None:
    """The newest run folder under ``log_dir`` with this config, no ``results.json`` and no
    run working in it now (``exclude``: a folder not to return, the launch's own)."""
    candidates = [p.parent for p in [*log_dir.glob(f"runs/*/{MARKER}"),
                                     *log_dir.glob(f"multiruns/*/*/{MARKER}")]]
    unfinished = [f for f in candidates if (_marker(f) or {}).get("key") == key
                  and not (f / "results.json").exists() and f != exclude
                  and in_use_by(f) is None]
    return max(unfinished, key=lambda f: (f / MARKER).stat().st_mtime, default=None)


def select_last_run(cfg: DictConfig) -> None:
    """``ckpt_path=last``: point ``paths.output_dir`` at the newest unfinished run of this
    config under ``paths.log_dir`` (and clear ``ckpt_path``)."""
    if cfg.get("ckpt_path") != "last":
        return
    folder = find_unfinished(Path(cfg.paths.log_dir), run_key(cfg))
    if folder is None:
        raise KdlabError(f"ckpt_path=last: no unfinished run of this config under "
                         f"paths.log_dir={cfg.paths.log_dir} (a run is unfinished while it "
                         "has no results.json); drop ckpt_path to start a new one")
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
        cfg.ckpt_path = None


def continue_unfinished(cfg: DictConfig, new_folder: Path) -> Path | None:
    """The plain re-run of a command: when this launch's folder is a fresh one Hydra made (the
    caller knows), the newest unfinished run of the same config under ``paths.log_dir`` is
    continued in its folder instead (``resume=false`` starts a new run). ``new_folder`` gets
    a pointer to it (:data:`POINTER`, followed by the other ranks of a DDP run), and this
    process's log files are written to that folder too. Returns the folder, or ``None``."""
    if not cfg.get("resume", True) or cfg.get("ckpt_path"):
        return None
    folder = find_unfinished(Path(cfg.paths.log_dir), run_key(cfg), exclude=new_folder)
    if folder is None:
        return None
    log.info("Continuing the unfinished run of this config in %s (resume=false starts a new "
             "one instead)", folder)
    write_json(new_folder / POINTER, {"continued_in": str(folder)})
    follow_logs(new_folder, folder)
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
    return folder


def followed_folder(folder: Path) -> Path | None:
    """The folder a launch in ``folder`` continued in (its :data:`POINTER`), or ``None``."""
    try:
        return Path(json.loads((folder / POINTER).read_text())["continued_in"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def follow_logs(old: Path, new: Path) -> None:
    """Every log file of the root logger that is in ``old`` is also appended to in ``new``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == old:
            twin = logging.FileHandler(new / Path(handler.baseFilename).name, mode="a")
            twin.setLevel(handler.level)
            twin.setFormatter(handler.formatter)
            root.addHandler(twin)


def in_use_by(folder: Path) -> str | None:
    """Who holds ``folder``'s run lock (``pid … since …``), or ``None`` when no run does."""
    return lock_holder(folder / LOCK)


@contextmanager
def hold_run_folder(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s run lock while the run works in it: a second run started into the
    same folder is refused in one line naming the first (its pid and start time), instead
    of both writing the same checkpoints and logs."""
    try:
        with locked(folder / LOCK, wait=False):  # LockHeld: only a no-wait lock raises it
            yield
    except LockHeld as e:
        raise KdlabError(f"paths.output_dir={folder} is in use by another kdlab run "
                         f"({e.holder}): wait for it to finish, or start this one in another "
                         "folder (drop hydra.run.dir)") from None


def prepare_run(cfg: DictConfig, run_dir: Path) -> bool:
    """Decide whether this run resumes the one in ``run_dir`` (same config: yes, unless
    ``resume=false``) and mark the folder with this config's key; returns it. A folder whose
    marker names another config is refused while that run is unfinished and has checkpoints;
    after it finished (or if it failed before its first checkpoint) the folder is reused."""
    key = run_key(cfg)
    marker = _marker(run_dir)
    resuming = False
    if marker is not None and marker.get("key") == key:
        resuming = bool(cfg.get("resume", True))
        if resuming:
            log.info("Resuming the run in %s (same config, key %s): each stage continues from "
                     "its last.ckpt", run_dir, key)
    elif marker is not None and not (run_dir / "results.json").exists() \
            and next(run_dir.rglob("last.ckpt"), None) is not None:
        raise KdlabError(f"paths.output_dir={run_dir} holds an unfinished run of another config "
                         f"(key {marker.get('key')}, this one {key}): choose another folder, or "
                         "delete that one")
    write_json(run_dir / MARKER, {"key": key, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "resumed": resuming})
    _resuming.set(resuming)
    return resuming


def resume_marker_matches(cfg: DictConfig, run_dir: Path) -> bool:
    """For DDP ranks other than 0: whether rank 0 decided to resume (read from its marker)."""
    marker = _marker(run_dir) or {}
    return marker.get("key") == run_key(cfg) and bool(marker.get("resumed"))


def set_resuming(value: bool) -> None:
    """Set whether the stages of this run continue from their ``last.ckpt``."""
    _resuming.set(value)


def resume_checkpoint(stage_dir: Path) -> str | None:
    """``stage_dir/checkpoints/last.ckpt`` when this run resumes and that file exists."""
    last = stage_dir / "checkpoints" / "last.ckpt"
    if not (_resuming.get() and last.is_file()):
        return None
    try:  # never resume from a damaged file silently (checkpoints are written atomically,
        # so this takes a disk error or a hand-made copy)
        torch.load(last, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch says, the fix is the same
        raise KdlabError(f"{last} is truncated or corrupted ({type(e).__name__}): delete it to "
                         f"train that stage from its start, or resume=false to start the run "
                         "over") from None
    log.info("Resuming %s from %s", stage_dir, last)
    return str(last)


def history_callback(loggers: list[Logger], ckpt_path: str | None,
                     own: bool = False) -> ReplayHistory | None:
    """When a stage resumes from ``ckpt_path``: the callback that keeps the metrics its CSV
    logger wrote before the stop (:mod:`kdlab.engine.history`), or ``None``. ``own``: replay
    them to ``loggers`` themselves (a packed member's, not the Trainer's)."""
    if not ckpt_path:
        return None
    files = csv_metrics_files(loggers)
    if not files:
        return None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    rows = rows_to_keep(files[0], int(ckpt.get("epoch", 0)),
                        bool(ckpt.get("kdlab_epoch_done", True)))
    backup = files[0].with_name(files[0].name + BACKUP_SUFFIX)
    return ReplayHistory(rows, backup, list(loggers) if own else None) if rows else None
