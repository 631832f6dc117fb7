"""A plain VGG-style CNN: stages of 3×3 conv → BN → ReLU → 2×2 max-pool, then an MLP head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CNN(nn.Module):
    """Stages ``conv3×3 → BatchNorm → ReLU → MaxPool2d(2)``, one per entry of ``channels``,
    then ``Flatten → Dropout → Linear(hidden) → ReLU → Dropout → Linear(num_classes)``.

    The stages are ``self.stages[i]`` (named module paths ``stages.0``, ``stages.1`` …), the
    head is ``self.head``, so feature-based strategies can tap each stage's output.

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
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            in_ch, height, width = int(out_ch), height // 2, width // 2
        self.stages = nn.Sequential(*stages)
        features = in_ch * height * width
        head: list[nn.Module] = [nn.Flatten(), nn.Dropout(dropout)]
        if hidden:
            head += [nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            features = hidden
        head.append(nn.Linear(features, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x))
