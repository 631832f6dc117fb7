"""kdlab from Python (a notebook, a script): compose a config with overrides and run it.

    import kdlab

    results = kdlab.run(["distill=kd", "trainer.max_epochs=3"])
    results["student"]["metrics"]["test/acc"]

    cfg = kdlab.compose(["distill=[kd,at]"])     # the DictConfig, to inspect or edit first
    results = kdlab.run_config(cfg)

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
