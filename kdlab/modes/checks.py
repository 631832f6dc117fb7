"""The config's values checked before anything trains: one line naming the key, its value and
what it must be, instead of a traceback after a 15-epoch teacher.

Every key kdlab reads as a number is listed in :data:`RULES` with its type and range; the
checks run first in ``kdlab-train`` (:func:`check_values`). Strategy and mode options are
checked by their own classes when they are built, which also happens before any training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdlab.util.errors import KdlabError

#: (key, kind, condition, what the value must be); kind: "int", "number"; the value may be
#: null where ``nullable``
Rule = tuple[str, str, Callable[[float], bool], str, bool]
RULES: tuple[Rule, ...] = (
    ("seed", "int", lambda v: True, "an integer", False),
    ("trainer.max_epochs", "int", lambda v: v >= -1, "an integer >= -1 (-1: no limit)", True),
    ("trainer.max_steps", "int", lambda v: v >= -1, "an integer >= -1 (-1: no limit)", True),
    ("trainer.log_every_n_steps", "int", lambda v: v >= 1, "an integer >= 1", True),
    ("trainer.check_val_every_n_epoch", "int", lambda v: v >= 1, "an integer >= 1", True),
    ("data.batch_size", "int", lambda v: v >= 1, "a positive integer", False),
    ("data.eval_batch_size", "int", lambda v: v >= 1, "a positive integer", False),
    ("data.num_labels", "int", lambda v: v >= 1, "a positive integer, or null for every label",
     True),
    ("data.val_size", "int", lambda v: v >= 0, "an integer >= 0", False),
    ("data.split_seed", "int", lambda v: True, "an integer", False),
    ("data.label_seed", "int", lambda v: True, "an integer", False),
    ("data.shuffle_seed", "int", lambda v: True, "an integer", False),
    ("optimizer.lr", "number", lambda v: v > 0, "a number > 0", False),
    ("optimizer.weight_decay", "number", lambda v: v >= 0, "a number >= 0", False),
    ("teacher.seed", "int", lambda v: True, "an integer", False),
    ("teacher.train.max_epochs", "int", lambda v: v >= 0, "an integer >= 0", False),
    ("teacher.train.batch_size", "int", lambda v: v >= 1, "a positive integer", False),
    ("teacher.train.optimizer.lr", "number", lambda v: v > 0, "a number > 0", False),
)

#: keys that take one of a few values: (key, the values)
CHOICES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("compile.student", (True, False, "auto")),
    ("compile.teacher", (True, False, "auto")),
    ("compile.mode", ("auto", "default", "reduce-overhead", "max-autotune",
                      "max-autotune-no-cudagraphs", None)),
)


def _value(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """``(present, value)`` of a dotted key (interpolations resolved)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_values(cfg: DictConfig) -> None:
    """Fail in one line on the first value of :data:`RULES` of the wrong type or range."""
    for key, kind, condition, what, nullable in RULES:
        present, value = _value(cfg, key)
        if not present or (value is None and nullable):
            continue
        if OmegaConf.is_config(value) or isinstance(value, bool):
            ok = False
        elif kind == "int":
            ok = isinstance(value, int)
        else:
            ok = isinstance(value, (int, float)) and math.isfinite(float(value))
        if not ok or not condition(value):
            raise KdlabError(f"{key}={value!r} must be {what}")
    for key, values in CHOICES:
        present, value = _value(cfg, key)
        if present and not any(value is v if isinstance(v, bool) or v is None else value == v
                               for v in values):
            shown = ", ".join("null" if v is None else str(v).lower() if isinstance(v, bool)
                              else v for v in values)
            raise KdlabError(f"{key}={value!r} must be one of {shown}")
