"""CIFAR ResNets of the knowledge-distillation literature (RepDistiller / CRD, mdistiller).

Parameter-carrying submodules keep RepDistiller's attribute names (``conv1``, ``bn1``,
``layer<i>``, ``downsample`` / ``shortcut``), so its published checkpoints load once the head's
keys (``fc.*`` / ``linear.*``) are renamed to ``classifier.*``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convolutions, BatchNorm weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Shortcut: identity when the shape is kept, else a strided 1×1 conv → BatchNorm."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    """Post-activation residual block of He et al., "Deep Residual Learning for Image
    Recognition" (CVPR 2016): ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3×3
    convolutions, as in the CIFAR ResNets used by RepDistiller/CRD (projection shortcut
    ``downsample``: 1×1 conv → BatchNorm, whenever the stride or the width changes).

    ``preact`` (an identity) outputs the sum before the last ReLU. No ReLU works in place, so a
    forward hook on any submodule reads its true output.
    """

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _projection(in_ch, planes, stride)
        self.preact = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.preact(out + self.downsample(x)))


class Bottleneck(nn.Module):
    """Bottleneck residual block of He et al., "Deep Residual Learning for Image Recognition"
    (CVPR 2016): 1×1 reduce → 3×3 (strided) → 1×1 expand (×4), each followed by BatchNorm,
    added to the shortcut then ReLU, as in the CIFAR ResNet-50 used by RepDistiller/CRD
    (projection ``shortcut``: 1×1 conv → BatchNorm, whenever the stride or the width changes).

    ``preact`` (an identity) outputs the sum before the last ReLU. No ReLU works in place, so a
    forward hook on any submodule reads its true output.
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _projection(in_ch, out_ch, stride)
        self.preact = nn.Identity()
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(self.preact(out + self.shortcut(x)))


def _make_stage(
    block: type[BasicBlock] | type[Bottleneck], in_ch: int, planes: int, blocks: int, stride: int
) -> nn.Sequential:
    layers = []
    for i in range(blocks):
        layers.append(block(in_ch, planes, stride if i == 0 else 1))
        in_ch = planes * block.expansion
    return nn.Sequential(*layers)


class _ResNetBase(nn.Module):
    """Shared by the CIFAR ResNets: the stages ``layer1 … layerS`` after a stem (``conv1``,
    ``bn1``, ``relu``, built by the subclass), ``pool`` (global average → flatten),
    ``classifier``, and the feature taps."""

    def _build(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        stem_ch: int,
        widths: Sequence[int],
        blocks: Sequence[int],
        num_classes: int,
    ) -> None:
        in_ch = stem_ch
        self.num_stages = len(widths)
        for i, (planes, n) in enumerate(zip(widths, blocks)):
            stage = _make_stage(block, in_ch, int(planes), int(n), 1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
            in_ch = int(planes) * block.expansion
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def _stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def taps(self) -> dict[str, list[str]]:
        """Aliases of the module paths feature strategies read: each stage's output after its
        last block's ReLU (``stages``), that block's sum before the ReLU (``preact``), the
        globally pooled penultimate features (``embedding``)."""
        names = [f"layer{i + 1}" for i in range(self.num_stages)]
        return {
            "stages": names,
            "preact": [f"{n}.{len(s) - 1}.preact" for n, s in zip(names, self._stages())],
            "embedding": ["pool"],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in self._stages():
            x = stage(x)
        return self.classifier(self.pool(x))


class CifarResNet(_ResNetBase):
    """CIFAR ResNet of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016,
    §4.2), in the configuration of the CIFAR variants used by RepDistiller/CRD (Tian et al.,
    ICLR 2020): a 3×3 stem conv → BN → ReLU with ``widths[0]`` channels, three stages of
    ``(depth - 2) / 6`` :class:`BasicBlock` each with ``widths[1:]`` channels (stride 2 at stages
    2 and 3), global average pooling and a linear classifier. Shortcuts are 1×1 conv → BN
    projections wherever the shape changes (also at stage 1 when ``widths[0] != widths[1]``,
    as in ``resnet8x4`` / ``resnet32x4``).

    Module paths for feature strategies: ``layer<i>`` (stage outputs), ``layer<i>.<last>.preact``
    (pre-ReLU sums), ``pool`` (penultimate features); see :meth:`taps`.

    Args:
        input_shape: shape of one input sample ``[C, H, W]`` (any C; H, W of any size ≥ 1).
        num_classes: number of output logits.
        depth: ``6n + 2`` (8, 14, 20, 32, 44, 56, 110, …).
        widths: stem width, then the widths of the three stages.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 20,
        widths: Sequence[int] = (16, 16, 32, 64),
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must be (stem, stage1, stage2, stage3), got {widths}")
        n = (depth - 2) // 6
        in_ch = int(input_shape[0])
        self.conv1 = nn.Conv2d(in_ch, int(widths[0]), 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(int(widths[0]))
        self.relu = nn.ReLU()
        self._build(BasicBlock, int(widths[0]), widths[1:], [n] * 3, num_classes)


class CifarBottleneckResNet(_ResNetBase):
    """Bottleneck ResNet of He et al., "Deep Residual Learning for Image Recognition"
    (CVPR 2016) adapted to 32×32 inputs as in RepDistiller/CRD's ``ResNet50`` (``resnetv2``):
    a 3×3 stride-1 stem conv → BN → ReLU with 64 channels and no max-pool, four stages of
    :class:`Bottleneck` blocks (``blocks``, widths ``widths`` ×4 expansion, stride 2 from stage
    2 on), global average pooling and a linear classifier.

    Module paths for feature strategies: ``layer<i>`` (stage outputs), ``layer<i>.<last>.preact``
    (pre-ReLU sums), ``pool`` (penultimate features); see :meth:`taps`.

    Args:
        input_shape: shape of one input sample ``[C, H, W]``.
        num_classes: number of output logits.
        blocks: bottleneck blocks per stage (``(3, 4, 6, 3)``: ResNet-50).
        widths: bottleneck (inner) width of each stage; outputs are 4× wider.
        stem: channels of the stem convolution.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        blocks: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: int = 64,
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"blocks {blocks} and widths {widths} differ in length")
        in_ch = int(input_shape[0])
        self.conv1 = nn.Conv2d(in_ch, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self._build(Bottleneck, stem, widths, blocks, num_classes)


_X4 = (32, 64, 128, 256)

#: CIFAR ResNet constructors ``(input_shape, num_classes, **kwargs)`` by name
MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": partial(CifarResNet, depth=d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(CifarResNet, depth=8, widths=_X4),
    "resnet32x4": partial(CifarResNet, depth=32, widths=_X4),
    "resnet50_cifar": partial(CifarBottleneckResNet, blocks=(3, 4, 6, 3)),
}
