"""A plain VGG-style CNN: stages of 3×3 conv → BN → ReLU → 2×2 max-pool, then an MLP head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CNN(nn.Module):
    """Stages ``conv3×3 → BatchNorm → ReLU → MaxPool2d(2)``, one per entry of ``channels``,
    then ``embed = Flatten → Dropout → Linear(hidden) → ReLU`` and
    ``classifier = Dropout → Linear(num_classes)``.

    Module paths for feature strategies: ``stages.<i>`` (each stage's output), ``stages.<i>.1``
    (its pre-ReLU BatchNorm output), ``embed`` (the penultimate features); see :meth:`taps`.

    With the defaults of ``conf/teacher/cnn.yaml`` (channels 32, 64; hidden 128) this is a
    422k-parameter network reaching ≈ 92–93% on Fashion-MNIST; ``conf/student/cnn.yaml``
    (channels 8, 16; hidden 32) has 27k parameters.

    Args:
        input_shape: shape of one input sample ``[C, H, W]``.
        num_classes: number of output logits.
        channels: output channels of each stage.
        hidden: width of the hidden fully connected layer (0: linear head on the features).
        dropout: dropout before each fully connected layer.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        in_ch, height, width = (int(d) for d in input_shape)
        stages = []
        for out_ch in channels:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, int(out_ch), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(out_ch)),
                    nn.ReLU(),  # not in place: the pre-ReLU output stays readable
                    nn.MaxPool2d(2),
                )
            )
            in_ch, height, width = int(out_ch), height // 2, width // 2
        self.stages = nn.Sequential(*stages)
        features = in_ch * height * width
        embed: list[nn.Module] = [nn.Flatten()]
        if hidden:
            embed += [nn.Dropout(dropout), nn.Linear(features, hidden), nn.ReLU()]
            features = hidden
        self.embed = nn.Sequential(*embed)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))

    def taps(self) -> dict[str, list[str]]:
        """Aliases of the module paths feature strategies read: each stage's output
        (``stages``), each stage's pre-ReLU BatchNorm output (``preact``), the penultimate
        feature vector (``embedding``)."""
        n = len(self.stages)
        return {
            "stages": [f"stages.{i}" for i in range(n)],
            "preact": [f"stages.{i}.1" for i in range(n)],
            "embedding": ["embed"],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(self.stages(x)))
