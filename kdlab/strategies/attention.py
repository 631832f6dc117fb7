"""Strategies that transfer *where* the teacher's feature maps respond: spatial attention maps
(AT) and the distribution of neuron selectivity patterns (NST).

Both read 4-D feature maps ``[N, C, H, W]`` of paired student and teacher layers. The helpers
below (:func:`pair_last`, :func:`common_size`, :func:`pool_to`, :func:`check_maps`) are shared
with :mod:`kdlab.strategies.flow`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import Layers, check_number, layers_arg
from kdlab.util.errors import KdlabError


def pair_last(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pair the student's and the teacher's layers, in order. When their counts differ, the
    *last* ``min(len)`` of each are paired (the deepest stages, whose semantics match best)
    and the extra leading layers of the longer list are ignored."""
    n = min(len(student), len(teacher))
    return list(zip(student[len(student) - n:], teacher[len(teacher) - n:], strict=True))


def common_size(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """The smaller of the two maps' spatial sizes, per dimension."""
    return min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])


def pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` (``[..., H, W]``) adaptively average-pooled to ``size`` (unchanged if equal)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.adaptive_avg_pool2d(x, size)


def check_maps(
    method: str,
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    student_layers: Layers,
    teacher_layers: Layers,
    min_pairs: int = 1,
) -> None:
    """Fail with a :class:`KdlabError` naming the config key unless both networks give at least
    ``min_pairs`` paired 4-D feature maps."""
    for side, feats, layers in (("student", student, student_layers),
                                ("teacher", teacher, teacher_layers)):
        for f in feats:
            if f.dim() != 4:
                raise KdlabError(
                    f"distill.{side}_layers={layers}: distill={method} reads feature maps "
                    f"[N, C, H, W], but a tapped layer gives shape {list(f.shape)}; "
                    "tap convolutional layers (e.g. 'stages')")
    pairs = min(len(student), len(teacher))
    if pairs < min_pairs:
        raise KdlabError(
            f"distill.student_layers={student_layers} / distill.teacher_layers="
            f"{teacher_layers}: distill={method} needs at least {min_pairs} paired layers, "
            f"got {len(student)} student and {len(teacher)} teacher layers")




# -- AT ------------------------------------------------------------------------------------------
def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """Spatial attention ``mean_c |A_c|^p`` of a ``[N, C, H, W]`` map: ``[N, H, W]``."""
    return feature.abs().pow(p).mean(dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the L2-normalised, flattened attention maps of one layer
    pair. The larger attention map is average-pooled to the smaller's spatial size first."""
    a_s, a_t = attention_map(student, p), attention_map(teacher, p)
    size = common_size(a_s, a_t)
    q_s = F.normalize(pool_to(a_s, size).flatten(1), dim=1)
    q_t = F.normalize(pool_to(a_t, size).flatten(1), dim=1)
    return (q_s - q_t).pow(2).mean()


class AT(Strategy):
    """Attention transfer — Zagoruyko & Komodakis, "Paying More Attention to Attention:
    Improving the Performance of Convolutional Neural Networks via Attention Transfer",
    ICLR 2017 (arXiv:1612.03928).

    ``Q = vec(mean_c |A_c|^p) / ‖vec(mean_c |A_c|^p)‖₂`` per sample and layer;
    ``loss = beta · Σ_pairs mean_{n, hw} (Q_s − Q_t)²``

    The paper adds ``β/2 · ‖Q_s − Q_t‖_p`` per layer with ``β = 10³`` scaled down by the
    number of attention-map elements and the batch size; like RepDistiller (Tian et al.,
    ICLR 2020) we take the mean of the squared differences, weighted by their ``β = 1000``.

    Reads the student and teacher feature maps of ``student_layers`` / ``teacher_layers``
    (default: every stage output). If the layer counts differ, the last ``min(len)`` of each
    are paired. Channel counts may differ (the map averages over channels); when the spatial
    sizes differ, the larger *attention map* (``mean_c |A|^p``, before normalisation) is
    adaptive-average-pooled to the smaller size (RepDistiller pools the feature maps instead;
    pooling the energy map keeps the sign of pre-activation features from cancelling out).
    No connector, no parameters.

    Config (``conf/distill/at.yaml``)::

        _target_: kdlab.strategies.attention.AT
        beta: 1000.0
        p: 2.0
        student_layers: stages
        teacher_layers: stages

    Args:
        beta: weight of the attention term, ``>= 0``.
        p: exponent of the attention map, ``>= 1`` (the paper's default: 2).
        student_layers: student layers (paths or aliases: ``stages``, ``preact``).
        teacher_layers: teacher layers, paired with the student's as above.
    """

    def __init__(self, beta: float = 1000.0, p: float = 2.0, student_layers: Layers = "stages",
                 teacher_layers: Layers = "stages") -> None:
        super().__init__()
        self.beta = check_number("beta", beta)
        if not p >= 1:  # |a|^p with p < 1 has an infinite slope at the zeros of ReLU maps
            raise KdlabError(f"distill.p={p} must be >= 1")
        self.p = float(p)
        self.student_layers = layers_arg(student_layers, "student_layers")
        self.teacher_layers = layers_arg(teacher_layers, "teacher_layers")

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        check_maps("at", self.student_features(student), self.teacher_features(teacher),
                   self.student_layers, self.teacher_layers)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        pairs = pair_last(self.student_features(student), self.teacher_features(teacher))
        loss = sum(at_loss(s, t.detach(), self.p) for s, t in pairs)
        return {"at": self.beta * loss}


# -- NST -----------------------------------------------------------------------------------------
def poly_kernel(a: torch.Tensor, b: torch.Tensor, degree: int, c: float) -> torch.Tensor:
    """``(aᵢ·bⱼ + c)^degree`` for all rows of ``a`` (``[N, A, D]``) and ``b`` (``[N, B, D]``):
    ``[N, A, B]``."""
    return (a @ b.transpose(1, 2) + c).pow(degree)


def nst_loss(
    student: torch.Tensor, teacher: torch.Tensor, degree: int = 2, c: float = 0.0
) -> torch.Tensor:
    """Squared MMD between the sets of the student's and the teacher's channel maps (each
    flattened and L2-normalised) under the polynomial kernel, averaged over the batch. The
    larger feature map is average-pooled to the smaller's spatial size first."""
    size = common_size(student, teacher)
    s = F.normalize(pool_to(student, size).flatten(2), dim=2)  # [N, C_s, HW]
    t = F.normalize(pool_to(teacher, size).flatten(2), dim=2)  # [N, C_t, HW]
    return (poly_kernel(t, t, degree, c).mean() + poly_kernel(s, s, degree, c).mean()
            - 2 * poly_kernel(s, t, degree, c).mean())


class NST(Strategy):
    """Neuron selectivity transfer — Huang & Wang, "Like What You Like: Knowledge Distill via
    Neuron Selectivity Transfer", arXiv:1707.01219, 2017.

    Each channel's flattened map ``f^i ∈ R^{HW}`` (L2-normalised) is a sample of the layer's
    distribution of neuron selectivity patterns; with ``k(x, y) = (xᵀy + c)^d``:
    ``MMD² = mean_{i,i'} k(t^i, t^i') + mean_{j,j'} k(s^j, s^j') − 2 mean_{i,j} k(s^j, t^i)``,
    ``loss = beta · Σ_pairs mean_batch MMD²``

    The paper writes ``λ/2 · MMD²``; like RepDistiller (Tian et al., ICLR 2020) we weight the
    MMD² by ``beta`` directly, with their ``β = 50``. The paper's polynomial kernel (``d = 2,
    c = 0``) is the default.

    Reads the feature maps of ``student_layers`` / ``teacher_layers`` (default: every stage
    output); if the counts differ, the last ``min(len)`` of each are paired. Channel counts may
    differ (MMD compares two sets of any sizes); when spatial sizes differ, the larger feature
    map is adaptive-average-pooled to the smaller before normalisation. No parameters.

    Config (``conf/distill/nst.yaml``)::

        _target_: kdlab.strategies.attention.NST
        beta: 50.0
        degree: 2
        c: 0.0
        student_layers: stages
        teacher_layers: stages

    Args:
        beta: weight of the MMD term, ``>= 0``.
        degree: degree ``d`` of the polynomial kernel, an integer ``>= 1``.
        c: offset ``c >= 0`` of the polynomial kernel.
        student_layers: student layers (paths or aliases: ``stages``, ``preact``).
        teacher_layers: teacher layers, paired with the student's as above.
    """

    def __init__(self, beta: float = 50.0, degree: int = 2, c: float = 0.0,
                 student_layers: Layers = "stages", teacher_layers: Layers = "stages") -> None:
        super().__init__()
        self.beta = check_number("beta", beta)
        if isinstance(degree, bool) or int(degree) != degree or degree < 1:
            raise KdlabError(f"distill.degree={degree} must be an integer >= 1")
        if not c >= 0:
            raise KdlabError(f"distill.c={c} must be >= 0")
        self.degree, self.c = int(degree), float(c)
        self.student_layers = layers_arg(student_layers, "student_layers")
        self.teacher_layers = layers_arg(teacher_layers, "teacher_layers")

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        check_maps("nst", self.student_features(student), self.teacher_features(teacher),
                   self.student_layers, self.teacher_layers)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        pairs = pair_last(self.student_features(student), self.teacher_features(teacher))
        loss = sum(nst_loss(s, t.detach(), self.degree, self.c) for s, t in pairs)
        return {"nst": self.beta * loss}
