"""Ways to move knowledge, one per ``conf/mode/<name>.yaml`` (``kdlab-train mode=<name>``).

A mode is a function ``run(cfg, run_dir) -> results`` that trains one or more stages and returns
the content of ``results.json`` without ``config`` and ``wall_time_s`` (``kdlab.train`` adds
them). Every mode writes a ``stages`` list — one entry per trained (or evaluated) network, in
order, each with ``stage``, ``model``, ``params``, ``metrics`` and its checkpoints — and a
``student`` entry for the network the mode delivers, so sweeps and comparisons read any mode
the same way.

Add a mode: a module with ``run``, a line in :data:`MODES`, a ``conf/mode/<name>.yaml`` with
``name: <name>`` and the mode's options.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdlab.util.errors import KdlabError

#: mode name → ``module:function`` (imported when used)
MODES: dict[str, str] = {
    "offline": "kdlab.modes.offline:run",
    "mutual": "kdlab.modes.mutual:run",
    "born_again": "kdlab.modes.chain:run_born_again",
    "takd": "kdlab.modes.chain:run_takd",
    "multi_teacher": "kdlab.modes.multi_teacher:run",
    "transfer": "kdlab.modes.transfer:run",
}


def mode_runner(name: str) -> Callable[[DictConfig, Path], dict[str, Any]]:
    """The ``run`` function of mode ``name``; an unknown name lists the known ones."""
    if name not in MODES:
        raise KdlabError(f"mode.name={name} is not a kdlab mode: choose one of "
                         f"{', '.join(sorted(MODES))} (kdlab-train mode=<name>)")
    module, function = MODES[name].split(":")
    return getattr(importlib.import_module(module), function)
