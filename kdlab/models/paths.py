"""Module paths of a model: the layers a strategy reads, by path or by the model's aliases."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kdlab.util.errors import KdlabError, close_matches


def resolve_paths(model: nn.Module, paths: Sequence[str] | str, key: str) -> list[str]:
    """Module paths for ``paths``: a list of paths, or an alias the model defines in
    ``model.taps()`` (e.g. ``"stages"``, ``"embedding"``). Unknown paths fail with the close
    matches listed, naming ``key``."""
    aliases = model.taps() if hasattr(model, "taps") else {}
    if isinstance(paths, str):
        if paths in aliases:
            return list(aliases[paths])
        paths = [paths]
    modules = dict(model.named_modules())
    resolved = []
    for path in paths:
        if path in aliases:
            resolved += list(aliases[path])
        elif path in modules and path:
            resolved.append(path)
        else:
            options = [p for p in modules if p] + list(aliases)
            raise KdlabError(f"{key}: '{path}' is not a module of {type(model).__name__}"
                             f"{close_matches(path, options)}; aliases: "
                             f"{', '.join(aliases) or 'none'}")
    return resolved
