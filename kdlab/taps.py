"""Read intermediate outputs of a model by module path, with forward hooks (no model edits)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdlab.errors import KdlabError, close_matches


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


class Taps:
    """Forward hooks recording the outputs of ``paths`` of ``model`` at each forward pass."""

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        self.paths = list(paths)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[p].register_forward_hook(self._recorder(p)) for p in self.paths]

    def _recorder(self, path: str):
        def hook(module: nn.Module, inputs, output) -> None:
            self.features[path] = output

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The features recorded since the last call."""
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
