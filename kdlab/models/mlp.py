"""Multi-layer perceptron on flattened images (a logistic regression when ``hidden`` is empty)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """``Flatten → [Linear → ReLU → Dropout] × len(hidden) → Linear``.

    Args:
        input_shape: shape of one input sample, e.g. ``[1, 28, 28]``.
        num_classes: number of output logits.
        hidden: widths of the hidden layers; ``[]`` gives multinomial logistic regression.
        dropout: dropout after each hidden layer.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (128,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_features = 1
        for d in input_shape:
            in_features *= int(d)
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, int(width)), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = int(width)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
