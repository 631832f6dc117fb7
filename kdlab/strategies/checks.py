"""Validation of strategy hyper-parameters: every failure names ``distill.<key>``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from kdlab.util.errors import KdlabError

#: a layer argument: a module path or model alias, or a list of them
Layers = Sequence[str] | str


def check_number(key: str, value: float, condition: str = ">= 0") -> float:
    """``value`` as a float if it is finite and satisfies ``condition`` (``">= 0"`` or
    ``"> 0"``), else a :class:`KdlabError` naming ``distill.<key>``."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and (value > 0 if condition == "> 0" else value >= 0)
    if not ok:
        raise KdlabError(f"distill.{key}={value} must be a finite number {condition}")
    return float(value)


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a :class:`KdlabError` naming
    ``distill.<key>``."""
    if value not in choices:
        raise KdlabError(f"distill.{key}={value} must be one of {', '.join(choices)}")
    return str(value)


def check_epochs(key: str, value: int) -> int:
    """A whole number of epochs ``>= 0``, else a :class:`KdlabError` naming the key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KdlabError(f"distill.{key}={value} must be an integer >= 0 (epochs)")
    return value


def layers_arg(value: Layers, key: str) -> str | list[str]:
    """A layer argument as a plain ``str`` or ``list[str]`` (Hydra passes ``ListConfig``); an
    empty one fails naming ``distill.<key>``."""
    if isinstance(value, str):
        if not value:
            raise KdlabError(f"distill.{key}='' must name a layer path or an alias")
        return value
    layers = [str(v) for v in value]
    if not layers:
        raise KdlabError(f"distill.{key}=[] must name at least one layer path or alias")
    return layers
