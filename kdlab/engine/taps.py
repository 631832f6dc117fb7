"""Read intermediate outputs of a model by module path, with forward hooks (no model edits).

Which paths a strategy reads is resolved by :func:`kdlab.models.paths.resolve_paths`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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
