"""The accuracy of each head of a student whose eval output averages several heads.

A ViT with DeiT's distillation token (Touvron et al., ICML 2021) answers at test time with the
average of its cls head and its distillation head. The paper reports each head on its own as
well (Table 5: class embedding, distillation embedding, both), and a user judging whether the
distillation head learned from the teacher needs the same split. :class:`HeadAccuracy` records
the heads' logits with forward hooks during the evaluation forward pass (no second pass) and
logs ``{split}/acc_<head>`` beside ``{split}/acc``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kdlab.engine.taps import Taps

SPLITS = ("val", "test")


def averaged_heads(model: nn.Module) -> dict[str, str]:
    """The heads (name → module path) whose average ``model`` returns in eval mode, from its
    ``averaged_heads()`` method; empty for a model with one head."""
    heads = model.averaged_heads() if hasattr(model, "averaged_heads") else {}
    return dict(heads)


class HeadAccuracy(nn.Module):
    """Top-1 accuracy of each of ``heads`` (name → module path of ``model``) per split.

    Args:
        heads: the heads to measure, as :func:`averaged_heads` gives them.
        num_classes: classes of the task.
    """

    def __init__(self, heads: dict[str, str], num_classes: int) -> None:
        super().__init__()
        self.heads = dict(heads)
        self.metrics = nn.ModuleDict({
            f"{split}_{name}": MulticlassAccuracy(num_classes=num_classes, average="micro")
            for split in SPLITS for name in self.heads})

    @contextmanager
    def recording(self, model: nn.Module) -> Iterator[Taps]:
        """Hooks on the heads of ``model`` for the forward passes inside the block, removed on
        leaving it."""
        taps = Taps(model, list(self.heads.values()))
        try:
            yield taps
        finally:
            taps.remove()

    def update(self, features: dict[str, torch.Tensor], y: torch.Tensor,
               split: str) -> dict[str, MulticlassAccuracy]:
        """Update each head's metric of ``split`` with its recorded logits against ``y``; the
        metrics to log, by name (``{split}/acc_<head>``). A head the forward pass did not reach
        (a deployed copy of the network, not the hooked one) is left out."""
        logged = {}
        for name, path in self.heads.items():
            if path in features:
                metric = self.metrics[f"{split}_{name}"]
                metric.update(features[path], y)
                logged[f"{split}/acc_{name}"] = metric
        return logged
