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
from kdlab.strategies.checks import Layers, check_choice, check_number, layers_arg
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
#: how one layer pair's normalised attention maps are compared (see :class:`AT`)
AT_FORMS = ("code", "paper")
#: what is average-pooled when the two maps' spatial sizes differ (see :class:`AT`)
AT_POOLS = ("attention", "features")


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """Spatial attention ``mean_c |A_c|^p`` of a ``[N, C, H, W]`` map: ``[N, H, W]``."""
    return feature.abs().pow(p).mean(dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0, form: str = "code",
            pool: str = "attention") -> torch.Tensor:
    """AT distance of one layer pair. ``Q`` is the flattened attention map, L2-normalised per
    sample; ``form="code"``: ``mean_{n, hw} (Q_s − Q_t)²``; ``form="paper"``:
    ``mean_n ‖Q_s − Q_t‖₂ / (h·w)``. When the spatial sizes differ, the larger attention map
    (``pool="attention"``) or the larger feature map (``pool="features"``) is adaptive-average-
    pooled to the smaller's size first."""
    if pool == "features":
        size = common_size(student, teacher)
        student, teacher = pool_to(student, size), pool_to(teacher, size)
    a_s, a_t = attention_map(student, p), attention_map(teacher, p)
    size = common_size(a_s, a_t)
    q_s = F.normalize(pool_to(a_s, size).flatten(1), dim=1)
    q_t = F.normalize(pool_to(a_t, size).flatten(1), dim=1)
    diff = q_s - q_t
    if form == "paper":
        return torch.linalg.vector_norm(diff, dim=1).mean() / diff.shape[1]
    return diff.pow(2).mean()


class AT(Strategy):
    """Attention transfer — Zagoruyko & Komodakis, "Paying More Attention to Attention:
    Improving the Performance of Convolutional Neural Networks via Attention Transfer",
    ICLR 2017 (arXiv:1612.03928).

    ``Q = vec(mean_c |A_c|^p) / ‖vec(mean_c |A_c|^p)‖₂`` per sample and layer pair, with
    ``hw`` entries; with ``form: code`` (default)
    ``loss = beta · Σ_pairs mean_{n, hw} (Q_s − Q_t)²``, with ``form: paper``
    ``loss = beta · Σ_pairs mean_n ‖Q_s − Q_t‖₂ / hw``.

    ``form: code`` is the authors' released code (szagoruyko/attention-transfer ``cifar.py``:
    ``β · Σ_groups at_loss`` with ``β = 10³``), RepDistiller's ``Attention`` (Tian et al., ICLR
    2020, ``β = 1000``) and torchdistill's ``ATLoss(mode='code')``: with equal spatial sizes
    kdlab's value equals each of them at ``beta = 1000`` exactly. ``form: paper`` is eq. 2 of
    the paper, ``β/2 · Σ_j ‖Q_s − Q_t‖₂`` (unsquared, ``p = 2`` norm) with ``β = 10³``
    divided by the batch size and the attention map's size: ``beta = 500`` reproduces it.
    The two differ by more than a factor: per sample, code = ``‖ΔQ‖₂² / hw``, paper =
    ``‖ΔQ‖₂ / hw``. torchdistill's ``mode='paper'`` omits the ``1/hw``: with one layer pair
    of ``hw`` positions it equals ``form: paper`` with ``beta = weight · hw``.

    Reads the student and teacher feature maps of ``student_layers`` / ``teacher_layers``
    (default: every stage output, as RepDistiller's ``feat[1:-1]``). If the layer counts
    differ, the last ``min(len)`` of each are paired. Channel counts may differ (the map
    averages over channels; the mean and the paper's sum over channels give the same
    normalised map). When the spatial sizes differ, ``pool: attention`` (default) adaptive-
    average-pools the larger *attention map* (``mean_c |A|^p``, before normalisation) to the
    smaller size, which keeps the signs of pre-activation features from cancelling out;
    ``pool: features`` pools the larger *feature map* first, as RepDistiller does (it pools
    to a square ``H × H``; the authors' code and torchdistill require equal sizes). The map
    is ``|A|^p`` as in the paper; RepDistiller and torchdistill raise ``A`` to ``p`` without
    the absolute value (the same for even ``p``). No connector, no parameters.

    Config (``conf/distill/at.yaml``)::

        _target_: kdlab.strategies.attention.AT
        beta: 1000.0
        p: 2.0
        form: code
        pool: attention
        student_layers: stages
        teacher_layers: stages

    Args:
        beta: weight of the attention term, ``>= 0``.
        p: exponent of the attention map, ``>= 1`` (the paper's default: 2).
        student_layers: student layers (paths or aliases: ``stages``, ``preact``).
        teacher_layers: teacher layers, paired with the student's as above.
        form: ``code`` (mean of squared differences: authors' code, RepDistiller,
            torchdistill) or ``paper`` (per-sample L2 norm of the difference over ``hw``).
        pool: ``attention`` (pool the larger attention map) or ``features`` (pool the larger
            feature map first, RepDistiller), when the spatial sizes of a pair differ.
    """

    def __init__(self, beta: float = 1000.0, p: float = 2.0, student_layers: Layers = "stages",
                 teacher_layers: Layers = "stages", form: str = "code",
                 pool: str = "attention") -> None:
        super().__init__()
        self.beta = check_number("beta", beta)
        if not p >= 1:  # |a|^p with p < 1 has an infinite slope at the zeros of ReLU maps
            raise KdlabError(f"distill.p={p} must be >= 1")
        self.p = float(p)
        self.form = check_choice("form", form, AT_FORMS)
        self.pool = check_choice("pool", pool, AT_POOLS)
        self.student_layers = layers_arg(student_layers, "student_layers")
        self.teacher_layers = layers_arg(teacher_layers, "teacher_layers")

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        check_maps("at", self.student_features(student), self.teacher_features(teacher),
                   self.student_layers, self.teacher_layers)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        pairs = pair_last(self.student_features(student), self.teacher_features(teacher))
        loss = sum(at_loss(s, t.detach(), self.p, self.form, self.pool) for s, t in pairs)
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

    The paper writes ``λ/2 · MMD²``: kdlab's ``beta = λ/2``. RepDistiller's ``NSTLoss``
    (Tian et al., ICLR 2020; ``β = 50``, every stage, the larger feature map pooled) is the
    same function: equal to kdlab's at ``beta = 50`` exactly. The authors' MXNet code
    (TuSimple/neuron-selectivity-transfer ``symbol/transfer.py``, ImageNet, last stage only,
    ``λ = 50``) drops the teacher-only term ``mean k(t, t)``: kdlab's value is theirs plus
    ``beta · mean k(t, t)``, a constant of the teacher, so the gradients are identical.
    torchdistill has no NST. The paper's polynomial kernel (``d = 2, c = 0``) is the default.

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
