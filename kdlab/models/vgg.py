"""CIFAR VGGs with BatchNorm of the knowledge-distillation literature (RepDistiller / CRD).

Parameter-carrying submodules keep RepDistiller's names and indices (``block<i>.<j>``,
``classifier``), so its published ``vgg*_bn`` checkpoints load as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

#: output channels of the convolutions of each of the five groups, by depth
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _group(in_ch: int, channels: Sequence[int]) -> nn.Sequential:
    """``[conv3×3 → BN → ReLU] × len(channels)``; the last ReLU is not in place."""
    layers: list[nn.Module] = []
    for out_ch in channels:
        layers += [
            nn.Conv2d(in_ch, int(out_ch), 3, padding=1),  # with bias, as in RepDistiller
            nn.BatchNorm2d(int(out_ch)),
            nn.ReLU(),
        ]
        in_ch = int(out_ch)
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """VGG of Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
    Recognition" (ICLR 2015) with BatchNorm, in the configuration of the CIFAR variants used by
    RepDistiller/CRD (Tian et al., ICLR 2020): five groups ``block0 … block4`` of
    ``conv3×3 → BN → ReLU`` (channels :data:`CONFIGS`; VGG-8 has one convolution per group),
    2×2 max-pools ``pool0 … pool3`` between them, global average pooling and a single
    ``Linear(512, num_classes)`` classifier (no fully connected hidden layers).

    As in RepDistiller, the pool between groups 4 and 5 (``pool3``) is skipped for small inputs
    (32×32 CIFAR: groups 4 and 5 both run at 4×4); it is applied from 64-pixel inputs on.

    Module paths for feature strategies: ``block<i>`` (each group's output), ``block<i>.<-2>``
    (its last BatchNorm, pre-ReLU), ``pool`` (penultimate features); see :meth:`taps`.

    Args:
        input_shape: shape of one input sample ``[C, H, W]``.
        num_classes: number of output logits.
        depth: 8, 11, 13, 16 or 19 (key of :data:`CONFIGS`).
        pool3: whether to max-pool between groups 4 and 5; ``None``: when ``min(H, W) >= 64``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 13,
        pool3: bool | None = None,
    ) -> None:
        super().__init__()
        if depth not in CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
        in_ch, height, width = (int(d) for d in input_shape)
        if pool3 is None:
            pool3 = min(height, width) >= 64
        for i, channels in enumerate(CONFIGS[depth]):
            self.add_module(f"block{i}", _group(in_ch, channels))
            in_ch = channels[-1]
        for i in range(3):
            self.add_module(f"pool{i}", nn.MaxPool2d(2))
        self.pool3 = nn.MaxPool2d(2) if pool3 else nn.Identity()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def taps(self) -> dict[str, list[str]]:
        """Aliases of the module paths feature strategies read: each conv group's output
        (``stages``), its last BatchNorm's output before the ReLU (``preact``), the globally
        pooled penultimate features (``embedding``)."""
        blocks = [f"block{i}" for i in range(5)]
        return {
            "stages": blocks,
            "preact": [f"{b}.{len(getattr(self, b)) - 2}" for b in blocks],
            "embedding": ["pool"],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = getattr(self, f"pool{i}")(getattr(self, f"block{i}")(x))
        return self.classifier(self.pool(self.block4(x)))


#: CIFAR VGG (with BatchNorm) constructors ``(input_shape, num_classes, **kwargs)`` by name
MODELS: dict[str, Callable[..., nn.Module]] = {
    f"vgg{d}": partial(CifarVGG, depth=d) for d in sorted(CONFIGS)
}
