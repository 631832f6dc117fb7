"""CIFAR wide ResNets (WRN-d-k) of the knowledge-distillation literature (RepDistiller / CRD).

Parameter-carrying submodules keep RepDistiller's attribute names (``conv1``,
``block<i>.layer.<j>.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``), so its published
checkpoints load once the head's keys ``fc.*`` are renamed to ``classifier.*``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block of Zagoruyko & Komodakis, "Wide Residual Networks"
    (BMVC 2016), as in the CIFAR WRNs used by RepDistiller/CRD: ``bn1 → relu1 → conv3×3
    (strided) → bn2 → relu2 → dropout → conv3×3``, added to the input, or — when the width or
    stride changes — to a strided 1×1 convolution (``convShortcut``) of the *activated* input
    ``relu1(bn1(x))``. No ReLU works in place, so ``bn1`` and ``relu1`` stay readable by hooks.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.equal_in_out = in_ch == out_ch and stride == 1
        self.convShortcut = (  # RepDistiller's name, kept for its checkpoints
            None if self.equal_in_out else nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return out + shortcut


class WideGroup(nn.Module):
    """One group of :class:`WideBasicBlock` s (Zagoruyko & Komodakis 2016), the first one
    carrying the group's stride and width change; RepDistiller/CRD's ``NetworkBlock``."""

    def __init__(
        self, blocks: int, in_ch: int, out_ch: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(
                    in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, drop_rate
                )
                for i in range(blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Wide ResNet WRN-``depth``-``widen`` of Zagoruyko & Komodakis, "Wide Residual Networks"
    (BMVC 2016), in the configuration of the CIFAR variants used by RepDistiller/CRD (Tian et
    al., ICLR 2020): a 3×3 stem conv with 16 channels, three groups ``block1 … block3`` of
    ``(depth - 4) / 6`` pre-activation :class:`WideBasicBlock` s with 16k, 32k, 64k channels
    (stride 2 at groups 2 and 3), a final ``bn1 → relu``, global average pooling and a linear
    classifier.

    Being pre-activation, a group's raw output is an un-normalised sum; its activated form
    ``relu(bn(·))`` is computed at the start of the next group (``block<i+1>.layer.0.bn1`` /
    ``.relu1``) and, for the last group, by the final ``bn1`` / ``relu``. Those are the module
    paths of the ``preact`` and ``stages`` taps (the same BN outputs RepDistiller/CRD use as
    pre-ReLU features); ``pool`` gives the penultimate features. See :meth:`taps`.

    Args:
        input_shape: shape of one input sample ``[C, H, W]``.
        num_classes: number of output logits.
        depth: ``6n + 4`` (16, 22, 28, 40, …).
        widen: widening factor k.
        drop_rate: dropout between the two convolutions of each block (0 in RepDistiller/CRD).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 16,
        widen: int = 1,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(int(input_shape[0]), widths[0], 3, padding=1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideGroup(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideGroup(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.classifier.bias)

    def taps(self) -> dict[str, list[str]]:
        """Aliases of the module paths feature strategies read: each group's output after
        BN → ReLU (``stages``), the same BN's output (``preact``), the globally pooled
        penultimate features (``embedding``)."""
        return {
            "stages": ["block2.layer.0.relu1", "block3.layer.0.relu1", "relu"],
            "preact": ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"],
            "embedding": ["pool"],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.classifier(self.pool(self.relu(self.bn1(x))))


#: wide ResNet constructors ``(input_shape, num_classes, **kwargs)`` by name
MODELS: dict[str, Callable[..., nn.Module]] = {
    f"wrn_{d}_{k}": partial(WideResNet, depth=d, widen=k) for d in (16, 40) for k in (1, 2)
}
