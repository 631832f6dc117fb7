"""ShuffleNetV1 and ShuffleNetV2 for 32×32 inputs, the compact students of the CIFAR-100 KD
benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from kdlab.util.errors import KdlabError

#: stem width of both CIFAR ShuffleNets (a 1×1 convolution, no downsampling)
STEM = 24

#: ShuffleNetV2 stage widths (three stages, then the 1×1 head) for each net size, from Ma et
#: al. 2018, Table 5; RepDistiller's ``ShuffleV2`` is size 1.
V2_WIDTHS: dict[float, tuple[int, int, int, int]] = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}


class ChannelShuffle(nn.Module):
    """Interleave ``groups`` channel groups: ``(N, g·k, H, W) → (N, k·g, H, W)``."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return x
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _conv_bn(in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1):
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]


def _stem(in_ch: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn(in_ch, STEM), nn.ReLU())


class ShuffleUnit(nn.Module):
    """ShuffleNetV1 unit: grouped 1×1 (bottleneck width ``out/4``) → ReLU → channel shuffle →
    3×3 depthwise (stride) → grouped 1×1, merged with the input by a sum (stride 1) or by
    concatenation with its 3×3 average pool (stride 2), then ``preact`` (an identity, the tap of
    the merged tensor) and a ReLU. ``out_ch`` counts the branch only."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, groups: int, first_groups: int
    ) -> None:
        super().__init__()
        mid = out_ch // 4
        self.branch = nn.Sequential(
            *_conv_bn(in_ch, mid, groups=first_groups),
            nn.ReLU(),
            ChannelShuffle(first_groups),
            *_conv_bn(mid, mid, 3, stride, groups=mid),
            nn.ReLU(),
            *_conv_bn(mid, out_ch, groups=groups),
        )
        self.concat = stride == 2
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if self.concat else nn.Identity()
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, res = self.branch(x), self.shortcut(x)
        merged = torch.cat([out, res], 1) if self.concat else out + res
        return self.relu(self.preact(merged))


class ShuffleNetV1(nn.Module):
    """ShuffleNet (Zhang et al., CVPR 2018, "ShuffleNet: An Extremely Efficient Convolutional
    Neural Network for Mobile Devices") in the CIFAR configuration of RepDistiller/CRD (Tian et
    al., ICLR 2020, ``ShuffleV1``): a 1×1 stem to 24 channels (no downsampling), three stages of
    4, 8, 4 units with 240, 480, 960 output channels at 3 groups (the first unit of each stage
    has stride 2 and concatenates; the very first 1×1 convolution is ungrouped), global average
    pooling, a linear classifier. 0.95M parameters with 100 classes.

    Module paths: ``stem``, ``stages.<s>`` (stage ``s``; ``stages.<s>.<u>`` its units; a unit's
    ``preact`` is its merged output before the ReLU), ``pool``, ``classifier``.

    Args:
        input_shape: shape of one input sample ``[C, H, W]``; any size (adaptive pooling).
        num_classes: number of output logits.
        groups: groups of the 1×1 convolutions.
        out_channels: output channels of each stage (must divide by ``4 × groups`` after the
            concatenated input is taken off).
        num_blocks: units per stage.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        groups: int = 3,
        out_channels: Sequence[int] = (240, 480, 960),
        num_blocks: Sequence[int] = (4, 8, 4),
    ) -> None:
        super().__init__()
        self.stem = _stem(int(input_shape[0]))
        in_ch, stages = STEM, []
        for width, n in zip(out_channels, num_blocks):
            units = []
            for i in range(n):
                stride = 2 if i == 0 else 1
                branch = int(width) - (in_ch if stride == 2 else 0)
                first = 1 if in_ch == STEM else groups
                units.append(ShuffleUnit(in_ch, branch, stride, groups, first))
                in_ch = int(width)
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_ch, num_classes)

    def taps(self) -> dict[str, list[str]]:
        """Aliases of module paths: ``stages`` is each stage's output (after its last unit's
        ReLU), ``preact`` the same tensor before that ReLU (the last unit's sum), ``embedding``
        the pooled features the classifier reads."""
        n = range(len(self.stages))
        return {
            "stages": [f"stages.{s}" for s in n],
            "preact": [f"stages.{s}.{len(self.stages[s]) - 1}.preact" for s in n],
            "embedding": ["pool"],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.stages(self.stem(x))))


class DownUnit(nn.Module):
    """ShuffleNetV2 downsampling unit: two stride-2 branches on the whole input, each ending in
    ``out/2`` channels after a ReLU (``3×3 dw → 1×1`` and ``1×1 → 3×3 dw → 1×1``), concatenated
    and shuffled."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        self.left = nn.Sequential(
            *_conv_bn(in_ch, in_ch, 3, 2, groups=in_ch), *_conv_bn(in_ch, mid), nn.ReLU()
        )
        self.right = nn.Sequential(
            *_conv_bn(in_ch, mid),
            nn.ReLU(),
            *_conv_bn(mid, mid, 3, 2, groups=mid),
            *_conv_bn(mid, mid),
            nn.ReLU(),
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


class BasicUnit(nn.Module):
    """ShuffleNetV2 basic unit: split the channels in halves; the second goes through ``1×1 →
    ReLU → 3×3 dw → 1×1``; concatenate with the first and shuffle; then ``preact`` (an identity,
    the tap) and a ReLU. The ReLU after the shuffle equals the paper's ReLU on the branch alone
    because the first half is already non-negative (every unit's input follows a ReLU); placing
    it last makes ``relu(preact)`` equal to the unit's output, channel for channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split = channels // 2
        half = channels - self.split
        self.branch = nn.Sequential(
            *_conv_bn(half, half),
            nn.ReLU(),
            *_conv_bn(half, half, 3, groups=half),
            *_conv_bn(half, half),
        )
        self.shuffle = ChannelShuffle(2)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, work = x[:, : self.split], x[:, self.split :]
        merged = self.shuffle(torch.cat([keep, self.branch(work)], 1))
        return self.relu(self.preact(merged))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 (Ma et al., ECCV 2018, "ShuffleNet V2: Practical Guidelines for Efficient
    CNN Architecture Design") in the CIFAR configuration of RepDistiller/CRD (Tian et al., ICLR
    2020, ``ShuffleV2``, net size 1): a 1×1 stem to 24 channels (no max-pool, no
    downsampling), three stages of one downsampling unit plus 3, 7, 3 basic units with 116,
    232, 464 channels, a 1×1 convolution to 1024 channels, global average pooling, a linear
    classifier. 1.36M parameters with 100 classes.

    Module paths: ``stem``, ``stages.<s>`` (stage ``s``: ``stages.<s>.0`` the downsampling unit,
    then the basic units, each with a ``preact`` identity), ``head`` (the 1×1 convolution),
    ``pool``, ``classifier``.

    Args:
        input_shape: shape of one input sample ``[C, H, W]``; any size (adaptive pooling).
        num_classes: number of output logits.
        net_size: width multiplier of the paper, one of 0.5, 1, 1.5, 2.
        num_blocks: basic units per stage (after each downsampling unit).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        net_size: float = 1.0,
        num_blocks: Sequence[int] = (3, 7, 3),
    ) -> None:
        super().__init__()
        if float(net_size) not in V2_WIDTHS:
            sizes = ", ".join(f"{s:g}" for s in V2_WIDTHS)
            raise KdlabError(f"model.net_size: {net_size} is not a ShuffleNetV2 size; use {sizes}")
        *widths, last = V2_WIDTHS[float(net_size)]
        self.stem = _stem(int(input_shape[0]))
        in_ch, stages = STEM, []
        for width, n in zip(widths, num_blocks):
            stages.append(
                nn.Sequential(DownUnit(in_ch, width), *(BasicUnit(width) for _ in range(n)))
            )
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(*_conv_bn(in_ch, last), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(last, num_classes)

    def taps(self) -> dict[str, list[str]]:
        """Aliases of module paths: ``stages`` is each stage's output (after its last unit's
        ReLU), ``preact`` the last unit's shuffled concatenation before that ReLU (RepDistiller
        returns it unshuffled; here it is in the stage output's channel order), ``embedding``
        the pooled 1024-d features after the 1×1 head the classifier reads."""
        n = range(len(self.stages))
        return {
            "stages": [f"stages.{s}" for s in n],
            "preact": [f"stages.{s}.{len(self.stages[s]) - 1}.preact" for s in n],
            "embedding": ["pool"],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.head(self.stages(self.stem(x)))))


def shufflenetv1(input_shape: Sequence[int], num_classes: int, **kwargs) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1``: 3 groups, 240/480/960 channels (0.95M at 100 classes)."""
    return ShuffleNetV1(input_shape, num_classes, **kwargs)


def shufflenetv2(input_shape: Sequence[int], num_classes: int, **kwargs) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleV2``: net size 1 (1.36M parameters at 100 classes)."""
    return ShuffleNetV2(input_shape, num_classes, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "shufflenetv1": shufflenetv1,
    "shufflenetv2": shufflenetv2,
}
