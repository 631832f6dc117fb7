"""MobileNetV2 for 32×32 inputs, as the compact student of the CIFAR-100 KD benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

#: ``(expansion, channels, blocks, stride)`` per group of inverted residual blocks; the CIFAR
#: layout of RepDistiller/CRD (stride 2 in the stem, then 1, 1, 2, 2, 1, 2, 1). An expansion of
#: ``None`` means "the network's expansion"; the first group always uses 1.
CIFAR_SETTING: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """``1×1 expand → ReLU → 3×3 depthwise (stride) → ReLU → 1×1 linear projection``, plus the
    input when stride is 1 and the widths agree. The output has no activation (a linear
    bottleneck). The expansion convolution is kept even at expansion 1, as in RepDistiller."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.expand = _conv_bn_relu(in_ch, hidden, 1)
        self.depthwise = _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Sequential(
            nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., CVPR 2018, "MobileNetV2: Inverted Residuals and Linear
    Bottlenecks") in the CIFAR configuration of RepDistiller/CRD (Tian et al., ICLR 2020):
    a stride-2 3×3 stem, seven groups of inverted residual blocks (channels 16, 24, 32, 64, 96,
    160, 320 times ``width_mult``; strides 1, 1, 2, 2, 1, 2, 1), a 1×1 convolution to 1280
    channels (``1280 × width_mult`` above width 1), global average pooling and a linear
    classifier. ``width_mult=0.5, expansion=6`` is RepDistiller's ``mobile_half``, the
    "MobileNetV2" of the CRD tables (0.81M parameters with 100 classes).

    Module paths: ``stem``, ``blocks.<g>`` (group ``g``; ``blocks.<g>.<b>`` its blocks),
    ``head`` (the 1×1 convolution), ``pool`` (the pooled features), ``classifier``.
    Weights are initialised as in RepDistiller (He-normal fan-out convolutions, N(0, 0.01)
    linear layer).

    Args:
        input_shape: shape of one input sample ``[C, H, W]``; any size (adaptive pooling).
        num_classes: number of output logits.
        width_mult: width multiplier of every convolution but the 1280-channel head.
        expansion: expansion ratio of the inverted residual blocks (but the first group's).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width_mult: float = 0.5,
        expansion: int = 6,
    ) -> None:
        super().__init__()
        in_ch = int(32 * width_mult)
        self.stem = _conv_bn_relu(int(input_shape[0]), in_ch, 3, stride=2)
        groups, strides = [], []
        for t, c, n, s in CIFAR_SETTING:
            out_ch = int(c * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t or expansion))
                in_ch = out_ch
            groups.append(nn.Sequential(*blocks))
            strides.append(s)
        self.blocks = nn.Sequential(*groups)
        # the last group of each resolution: the next group downsamples, or it is the last one
        self._stage_ids = [
            g for g in range(len(groups)) if g + 1 == len(groups) or strides[g + 1] > 1
        ]
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.head = _conv_bn_relu(in_ch, last, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(last, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def taps(self) -> dict[str, list[str]]:
        """Aliases of module paths: ``stages`` is the output of the last block group of each
        resolution (``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6``: 16×16, 8×8, 4×4,
        2×2 at a 32×32 input, RepDistiller's feature points); ``preact`` is the same paths,
        since a linear bottleneck has no activation after it; ``embedding`` the pooled
        1280-d features the classifier reads."""
        stages = [f"blocks.{g}" for g in self._stage_ids]
        return {"stages": stages, "preact": list(stages), "embedding": ["pool"]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.head(self.blocks(self.stem(x)))))


def mobilenetv2(input_shape: Sequence[int], num_classes: int, **kwargs) -> MobileNetV2:
    """RepDistiller's ``mobile_half``: width 0.5, expansion 6 (0.81M parameters at 100 classes)."""
    kwargs.setdefault("width_mult", 0.5)
    return MobileNetV2(input_shape, num_classes, **kwargs)


def mobilenetv2_1_0(input_shape: Sequence[int], num_classes: int, **kwargs) -> MobileNetV2:
    """The same CIFAR network at width 1.0 (RepDistiller's ``mobilenetv2_T_w(6, 1.0)``)."""
    kwargs.setdefault("width_mult", 1.0)
    return MobileNetV2(input_shape, num_classes, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mobilenetv2": mobilenetv2,
    "mobilenetv2_1_0": mobilenetv2_1_0,
}
