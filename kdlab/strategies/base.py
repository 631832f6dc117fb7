"""What every distillation strategy is: an ``nn.Module`` mapping outputs to named loss terms."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Outputs:
    """What a network produced for a batch: its logits and any tapped intermediate features."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class Strategy(nn.Module):
    """Base class of distillation strategies.

    A strategy receives the student's and the teacher's :class:`Outputs` and the batch targets
    (``-1`` marks unlabelled transfer-set samples) and returns a dict of *weighted* loss terms,
    e.g. ``{"kd": alpha * T² * KL}``. The training step adds the cross-entropy on labelled
    samples, weighted by :attr:`ce_weight`, and logs every term by name; the loss is their sum.

    Parameters of a strategy (connectors, projection heads) train with the student and are
    saved in the student checkpoint.
    """

    #: weight of the cross-entropy on the hard labels (Hinton's ``1 - alpha`` for KD)
    ce_weight: float = 1.0

    def forward(
        self, student: Outputs, teacher: Outputs, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError
