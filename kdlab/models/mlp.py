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
            layers += [nn.Linear(in_features, int(width)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = int(width)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_features, num_classes)

    def taps(self) -> dict[str, list[str]]:
        """Aliases of module paths: each hidden layer's output after ReLU (``stages``), before
        it (``preact``), and the penultimate features (``embedding``: the input itself for
        logistic regression)."""
        linear = [i for i, m in enumerate(self.features) if isinstance(m, nn.Linear)]
        return {
            "stages": [f"features.{i + 1}" for i in linear],
            "preact": [f"features.{i}" for i in linear],
            "embedding": ["features"],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
