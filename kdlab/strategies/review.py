"""Knowledge review: every teacher stage is matched by a fusion of the same and deeper student
stages."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import check_epochs, check_number
from kdlab.util.errors import KdlabError

#: output sizes of the pooled levels of the hierarchical context loss (each kept only when
#: smaller than the map)
HCL_LEVELS = (4, 2, 1)


def _as_map(x: torch.Tensor, key: str) -> torch.Tensor:
    """``[N, C, H, W]`` maps as they are, ``[N, C]`` vectors as ``[N, C, 1, 1]``."""
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() != 4:
        raise KdlabError(f"{key}: ReviewKD reads feature maps [N, C, H, W] or vectors [N, C], "
                         f"got shape {list(x.shape)}")
    return x


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` at spatial ``size``: average-pooled when shrinking, nearest-upsampled otherwise."""
    size = tuple(int(d) for d in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if all(d <= s for d, s in zip(size, x.shape[-2:])):
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")


def hcl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Hierarchical context loss of one level: the MSE at full resolution (weight 1) plus the
    MSE of the maps average-pooled to 4×4, 2×2, 1×1 (those smaller than the map), the weight
    halving at each pooled level kept; divided by the sum of the weights."""
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for level in HCL_LEVELS:
        if level >= min(student.shape[-2:]):
            continue
        weight /= 2.0
        pooled_s = F.adaptive_avg_pool2d(student, level)
        pooled_t = F.adaptive_avg_pool2d(teacher, level)
        loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
        total += weight
    return loss / total


class ABF(nn.Module):
    """Attention-based fusion of ReviewKD: a 1×1 conv + BN takes the student map to
    ``mid_channels``; unless it is the deepest level, it is blended with the (upsampled)
    residual of the deeper level by two sigmoid attention maps predicted from both; the result
    (the residual passed on) is resized to the teacher map and a 3×3 conv + BN gives the
    teacher's channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                    nn.BatchNorm2d(mid_channels))
        self.attention = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
                          if fuse else None)
        self.output = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        for conv in (self.reduce[0], self.output[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output at out_size with the teacher's channels, residual for the next level)``."""
        x = self.reduce(x)
        if self.attention is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the residual of the deeper level")
            residual = resize(residual, x.shape[-2:])
            a = self.attention(torch.cat([x, residual], dim=1))
            x = x * a[:, 0:1] + residual * a[:, 1:2]
        x = resize(x, out_size)
        return self.output(x), x


class ReviewKD(Strategy):
    """Knowledge review — Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review",
    CVPR 2021 (arXiv:2104.09044).

    ``loss = beta · min((epoch + 1) / warmup, 1) · Σ_i HCL(ABF_i(s_i, r_{i+1}), t_i)``,
    ``HCL(a, b) = Σ_l w_l · MSE(pool_l(a), pool_l(b)) / Σ_l w_l`` over full size, 4, 2, 1
    (``w = 1, ½, ¼, ⅛``)

    Reads ``student_layers`` and ``teacher_layers`` (default: the stages of each; ``[N, C]``
    vectors such as ``embedding`` count as 1×1 maps). When the counts differ, the last
    ``min(len)`` of each side are paired. Attention-based fusion (ABF) modules run from the
    deepest student level to the shallowest: each takes its student map to ``mid_channels``
    (1×1 conv), fuses it with the residual of the deeper level (nearest-upsampled) through a
    learned 2-channel sigmoid attention, resizes it to the paired teacher map (average-pooled
    when shrinking, nearest-upsampled when growing) and outputs the teacher's channels (3×3
    conv). Each output is matched to its teacher map by the hierarchical context loss (HCL);
    the levels' losses are summed. The weight warms up linearly over ``warmup`` epochs.

    Defaults: ``beta = 1`` and ``warmup = 20`` are the defaults of the authors' CIFAR-100 code
    (``--kd-loss-weight 1.0 --kd-warm-up 20``) and of mdistiller (``REVIEWKD_WEIGHT 1.0``,
    ``WARMUP_EPOCHS 20``, factor ``min(epoch / 20, 1)`` with epochs counted from 1); the
    published CIFAR-100 runs raise ``beta`` per pair (0.6 to 8, mostly 5). ``mid_channels``
    defaults to ``min(512, C)`` of the deepest student level, as in both codes. The authors read
    the teacher's pre-ReLU maps (``teacher_layers: preact``) and add the pooled embedding as an
    extra 1×1 level; here both sides default to ``stages``.

    Config (``conf/distill/reviewkd.yaml``)::

        _target_: kdlab.strategies.review.ReviewKD
        beta: 1.0
        warmup: 20
        mid_channels: null

    Args:
        beta: weight of the review term, ``>= 0``.
        warmup: epochs of the linear warm-up of ``beta``, ``>= 0`` (0: none).
        mid_channels: width of the fused maps, ``> 0``; ``None``: ``min(512, C_deepest)``.
        student_layers: student layers, shallow to deep (paths or aliases).
        teacher_layers: teacher layers, shallow to deep (paths or aliases).
    """

    def __init__(
        self,
        beta: float = 1.0,
        warmup: int = 20,
        mid_channels: int | None = None,
        student_layers: Sequence[str] | str = "stages",
        teacher_layers: Sequence[str] | str = "stages",
    ) -> None:
        super().__init__()
        self.beta = check_number("beta", beta)
        self.warmup = check_epochs("warmup", warmup)
        if mid_channels is not None and (int(mid_channels) != mid_channels or mid_channels < 1):
            raise KdlabError(f"distill.mid_channels={mid_channels} must be a positive integer "
                             "or null")
        self.mid_channels = None if mid_channels is None else int(mid_channels)
        self.student_layers, self.teacher_layers = student_layers, teacher_layers

    def _pairs(
        self, student: Outputs, teacher: Outputs
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The paired maps, shallow to deep: the last ``min(len)`` of each side."""
        s = [_as_map(x, "distill.student_layers") for x in self.student_features(student)]
        t = [_as_map(x, "distill.teacher_layers") for x in self.teacher_features(teacher)]
        n = min(len(s), len(t))
        return s[len(s) - n:], t[len(t) - n:]

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        s, t = self._pairs(student, teacher)
        mid = self.mid_channels or min(512, s[-1].shape[1])
        self.abfs = nn.ModuleList(
            ABF(fs.shape[1], mid, ft.shape[1], fuse=i < len(s) - 1)
            for i, (fs, ft) in enumerate(zip(s, t))
        )

    def warmup_factor(self) -> float:
        """``min((epoch + 1) / warmup, 1)`` (1 without warm-up)."""
        return 1.0 if self.warmup == 0 else min((self.epoch + 1) / self.warmup, 1.0)

    def review(self, student: Outputs, teacher: Outputs) -> list[torch.Tensor]:
        """The ABF outputs, shallow to deep, each shaped like its paired teacher map."""
        s, t = self._pairs(student, teacher)
        outputs: list[torch.Tensor] = []
        residual = None
        for fs, ft, abf in zip(reversed(s), reversed(t), reversed(self.abfs)):
            out, residual = abf(fs, residual, ft.shape[-2:])
            outputs.insert(0, out)
        return outputs

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        _, t = self._pairs(student, teacher)
        outputs = self.review(student, teacher)
        loss = sum(hcl_loss(o, ft.detach()) for o, ft in zip(outputs, t))
        return {"reviewkd": self.beta * self.warmup_factor() * loss}
