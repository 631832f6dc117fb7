"""kdlab: knowledge distillation for researchers, on PyTorch Lightning and Hydra.

The small public API (imported lazily, so ``import kdlab`` is cheap):

- :func:`run` (``kdlab.run(["distill=kd", "seed=1"])``), :func:`compose` and
  :func:`run_config`: a run from Python, returning the content of ``results.json``
  (:mod:`kdlab.api`); :func:`run_packed`: several runs as one packed cohort;
- :class:`Strategy`, :class:`Outputs`, :class:`Batch`: the base of distillation strategies
  (:mod:`kdlab.strategies.base`);
- :mod:`kdlab.models` (``kdlab.models.create("resnet8x4", [3, 32, 32], 100)``) and
  :mod:`kdlab.data` (the datamodules);
- :class:`KdlabError`: the error every user mistake raises, with a one-line message.

The layers below the API are drawn in ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "run": ("kdlab.api", "run"),
    "compose": ("kdlab.api", "compose"),
    "run_config": ("kdlab.api", "run_config"),
    "run_packed": ("kdlab.api", "run_packed"),
    "Strategy": ("kdlab.strategies.base", "Strategy"),
    "Outputs": ("kdlab.strategies.base", "Outputs"),
    "Batch": ("kdlab.strategies.base", "Batch"),
    "KdlabError": ("kdlab.util.errors", "KdlabError"),
}

__all__ = ["Batch", "KdlabError", "Outputs", "Strategy", "compose", "data", "models", "run",
           "run_config", "run_packed"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    if name in ("models", "data", "strategies"):
        return importlib.import_module(f"kdlab.{name}")
    raise AttributeError(f"module 'kdlab' has no attribute {name!r}")
