"""kdlab from Python (a notebook, a script): compose a config with overrides and run it.

    import kdlab

    results = kdlab.run(["distill=kd", "trainer.max_epochs=3"])
    results["student"]["metrics"]["test/acc"]

    cfg = kdlab.compose(["distill=[kd,at]"])     # the DictConfig, to inspect or edit first
    results = kdlab.run_config(cfg)

    # several runs as one packed cohort: one teacher pass per batch (docs/SCALING.md)
    each = kdlab.run_packed([["distill.kd.temperature=2"], ["distill.kd.temperature=4"]])

The overrides are the command line's (``kdlab-train …``), composed with Hydra's compose API
from kdlab's configs plus ``config_dirs`` (folders of a user's own configs, searched like
``--config-dir``). Results are the content of the run's ``results.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, open_dict

from kdlab.util.config import CONF_DIR


def compose(overrides: Sequence[str] = (), config_name: str = "train",
            config_dirs: Sequence[str | Path] = (),
            output_dir: str | Path | None = None) -> DictConfig:
    """kdlab's config ``config_name`` with ``overrides`` applied (command-line syntax).

    ``paths.output_dir`` (Hydra's run folder on the command line) becomes ``output_dir`` or,
    unless an override sets it, ``<paths.log_dir>/runs/<date>_<time>``."""
    searchpath = [f"file://{Path(d).resolve()}" for d in config_dirs]
    extra = [f"hydra.searchpath=[{','.join(searchpath)}]"] if searchpath else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=[*extra, *overrides])
    sets_output = any(o.split("=", 1)[0].lstrip("+~") == "paths.output_dir" for o in overrides)
    if output_dir is not None or not sets_output:
        folder = output_dir or Path(str(cfg.paths.log_dir)) / "runs" / time.strftime(
            "%Y-%m-%d_%H-%M-%S")
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)
    return cfg


def run(overrides: Sequence[str] = (), config_dirs: Sequence[str | Path] = (),
        output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``kdlab-train <overrides>`` in this process; returns ``results.json``'s content.
    A mistake in the config raises :class:`~kdlab.util.errors.KdlabError` with the one-line
    message the command line prints."""
    return run_config(compose(overrides, config_dirs=config_dirs, output_dir=output_dir))


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """Run a composed config (:func:`compose`); returns ``results.json``'s content."""
    from kdlab.train import execute

    return execute(cfg)


def run_packed(jobs: Sequence[Sequence[str]], common: Sequence[str] = (),
               config_dirs: Sequence[str | Path] = (), output_dir: str | Path | None = None,
               stack: bool | str = "auto") -> list[dict[str, Any] | Exception]:
    """Run ``jobs`` (each a list of overrides, after ``common``) as one packed cohort in this
    process, as ``kdlab-train -m hydra/launcher=packed`` runs the jobs of a sweep that share a
    teacher (:mod:`kdlab.modes.pack`). Job ``k`` writes into ``<output_dir>/<k>`` (default
    ``output_dir``: ``<paths.log_dir>/packs/<date>_<time>``), the pack's own checkpoint into
    ``<output_dir>/pack-0-…``. Returns each job's ``results.json`` content, or the error that
    stopped it; raises :class:`~kdlab.util.errors.KdlabError` when the jobs cannot share one
    pack (naming why), as a sweep would run them apart."""
    from kdlab.modes.pack import plan_packs
    from kdlab.packed import execute_pack
    from kdlab.util.errors import KdlabError

    if len(jobs) < 2:
        raise KdlabError(f"run_packed needs at least 2 jobs, got {len(jobs)}: use kdlab.run")
    first = compose([*common, *jobs[0]], config_dirs=config_dirs)
    folder = Path(output_dir) if output_dir is not None else \
        Path(str(first.paths.log_dir)) / "packs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    cfgs = [compose([*common, *job], config_dirs=config_dirs, output_dir=folder / str(k))
            for k, job in enumerate(jobs)]
    packs, alone = plan_packs(cfgs, [list(job) for job in jobs], max_members=len(cfgs))
    if alone or len(packs) != 1:
        why = "; ".join(f"job {k} ({' '.join(jobs[k])}): {reason}"
                        for k, reason in sorted(alone.items())) or \
            "the jobs differ in more than seed, strategy, student, optimizer and schedule"
        raise KdlabError(f"these jobs cannot share one pack: {why} (docs/SCALING.md)")
    name = "pack-" + "-".join(str(k) for k in range(len(cfgs)))
    return execute_pack(cfgs, folder / name, stack)

