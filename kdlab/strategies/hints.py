"""Hint methods: the student's intermediate features, passed through a trained connector, are
regressed onto the teacher's (FitNets, OFD, AB, VID).

All four read a list of layers from each network and pair them from the end: with ``n_s``
student and ``n_t`` teacher layers, the last ``min(n_s, n_t)`` of each are paired in order
(the deepest with the deepest). Where the paired maps differ in spatial size, the student map
is resized to the teacher's *before* its connector: adaptive average pooling when it is at
least as large in both dimensions, bilinear interpolation otherwise. Vector features
``(N, C)`` (MLP layers, ``"embedding"``) are treated as ``(N, C, 1, 1)`` maps. Teacher features
are always detached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import Layers, check_choice, check_epochs, check_number, layers_arg
from kdlab.util.errors import KdlabError


# -- shared helpers --------------------------------------------------------------------------------
def as_map(x: torch.Tensor, what: str = "feature") -> torch.Tensor:
    """``(N, C, H, W)`` maps pass; ``(N, C)`` vectors become ``(N, C, 1, 1)``."""
    if x.dim() == 4:
        return x
    if x.dim() == 2:
        return x[:, :, None, None]
    raise KdlabError(f"{what} has shape {list(x.shape)}: hint methods read (N, C, H, W) maps "
                     f"or (N, C) vectors; choose other layers")


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` (N, C, H, W) at spatial ``size``: adaptive average pooling when ``x`` is at least
    as large in both dimensions, bilinear interpolation otherwise; unchanged if equal."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """The usual hint connector: 1×1 convolution (no bias) followed by BatchNorm."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels))


class _PiecewiseSquareSum(torch.autograd.Function):
    """``Σ d²`` for a residual ``d`` of ``x`` that is ``x − c`` on some elements and 0 on the
    others, with ``c`` and the choice of elements held constant: its gradient is ``2 d``.
    AB's and OFD's element losses have this form (see :func:`piecewise_square_sum`)."""

    @staticmethod
    def forward(ctx, x, d):  # noqa: ANN001
        ctx.save_for_backward(d)
        return d.square().sum(dtype=torch.promote_types(d.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        (d,) = ctx.saved_tensors
        return d * (2 * grad).to(d.dtype), None


def piecewise_square_sum(x: torch.Tensor, residual: Callable[..., torch.Tensor],
                         *args: object) -> torch.Tensor:
    """``Σ residual(x, *args)²`` (in float32 at least), differentiable in ``x``, where the
    residual is ``x`` minus a constant on some elements and 0 on the others (masks and
    constants may depend on ``x``'s values but carry no gradient).

    Fused by hand: the residual is computed once without autograd, the forward pass keeps
    only it and the backward pass is one multiplication (``2 d``), instead of autograd's graph
    through masks, shifts, powers and products. On the main job's pre-ReLU maps (2 CPU
    threads) AB's loss runs 1.7–2.1× and a plain training step 1.4–1.5× faster, OFD's
    1.1–1.2× and 1.05–1.1× (four runs of ``scripts/bench_feature_losses.py``); an epoch of
    ``kdlab-train distill=ab`` 2.4× faster (docs/BENCHMARKS.md, "AB, OFD, VID,
    KD-SVD and CRD")."""
    with torch.no_grad():
        d = residual(x.detach(), *args)
    return _PiecewiseSquareSum.apply(x, d)


class _PairedFeatures(Strategy):
    """Plumbing shared by the hint methods: layer arguments, pairing from the end (at most
    ``max_pairs`` pairs), 2-D → 4-D features, resizing the student to the teacher."""

    def __init__(self, student_layers: Layers, teacher_layers: Layers,
                 max_pairs: int | None = None) -> None:
        super().__init__()
        self.student_layers = layers_arg(student_layers, "student_layers")
        self.teacher_layers = layers_arg(teacher_layers, "teacher_layers")
        self.max_pairs = max_pairs

    def _count(self, n_student: int, n_teacher: int) -> int:
        k = min(n_student, n_teacher)
        return k if self.max_pairs is None else min(k, self.max_pairs)

    def resolve(self, student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
        """The resolved paths, cut to the paired ones (the last ``k`` of each), so that layers
        left unpaired are not tapped."""
        s, t = super().resolve(student, teacher)
        k = self._count(len(s), len(t))
        if k == 0:
            raise KdlabError(f"distill.student_layers={self.student_layers} and "
                             f"distill.teacher_layers={self.teacher_layers} select no layer "
                             f"pair for {type(self).__name__}: name at least one layer each")
        self.student_paths, self.teacher_paths = s[len(s) - k:], t[len(t) - k:]
        return self.student_paths, self.teacher_paths

    def paired_maps(self, student: Outputs,
                    teacher: Outputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(student map resized to the teacher's H×W, detached teacher map)`` per pair,
        shallowest pair first."""
        s_list, t_list = self.student_features(student), self.teacher_features(teacher)
        k = self._count(len(s_list), len(t_list))
        pairs = []
        s_paths = self.student_paths[len(s_list) - k:]
        t_paths = self.teacher_paths[len(t_list) - k:]
        for s, t, sp, tp in zip(s_list[len(s_list) - k:], t_list[len(t_list) - k:],
                                s_paths, t_paths):
            t = as_map(t.detach(), f"teacher layer {tp}")
            s = as_map(s, f"student layer {sp}")
            pairs.append((resize_to(s, t.shape[-2:]), t))
        return pairs

    def _probe(self, student: Outputs, teacher: Outputs) -> list[tuple[torch.Tensor, ...]]:
        pairs = self.paired_maps(student, teacher)
        if not pairs:
            raise KdlabError(f"{type(self).__name__}: distill.student_layers and "
                             f"distill.teacher_layers select no layer pair")
        return pairs


# -- FitNets ---------------------------------------------------------------------------------------
class FitNets(_PairedFeatures):
    """FitNets hints — Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin
    Deep Nets", ICLR 2015 (arXiv:1412.6550).

    ``loss = beta · Σ_pairs mean((r(S) − T)²)``: a regressor ``r`` (1×1 conv + BatchNorm, then a
    ReLU with ``relu: true``) maps the student's *guided* layer ``S`` to the shape of the
    teacher's *hint* layer ``T``; the squared error is averaged over all elements (like
    RepDistiller's ``nn.MSELoss``). The authors' code (adri-romsor/FitNets, ``HintCost``) takes
    ``½ Σ`` over a sample's elements and averages over the batch: theirs ``= (C·H·W / 2) ×``
    ours for a hint of ``C × H × W`` (16384 for resnet32x4's middle stage, 128 × 16 × 16).

    Which pair (``hints``): ``middle`` (default) pairs the middle entry of each list —
    index ``(n − 1) // 2`` of ``student_layers`` / ``teacher_layers`` — as in the paper (the
    middle layers of both networks) and RepDistiller (``hint_layer = 2`` of its feature list,
    i.e. the second of three stages of a CIFAR ResNet/WRN or ShuffleNet, the second of four
    of MobileNetV2/ResNet-50, the third of five VGG blocks: all ``(n − 1) // 2`` of kdlab's
    ``stages``); an integer ``h`` pairs the last ``h`` entries from the end (``1``: the deepest
    pair, kdlab's earlier default); ``null`` the last ``min(n_s, n_t)``.

    The regressor: the paper's ends in the hint layer's nonlinearity, and RepDistiller's
    ``ConvReg`` in BN + ReLU, so ``relu: true`` (default) applies a ReLU after the BatchNorm —
    right for post-ReLU hints (``stages``); set ``relu: false`` for pre-activation hints. The
    student map is resized to the teacher's spatial size first (average pooling, or bilinear
    interpolation when it is smaller) and then projected by a 1×1 convolution; RepDistiller's
    regressor instead picks a strided 3×3 convolution, a 4×4 transposed convolution or a
    ``(1 + h_s − h_t)`` valid convolution by the sizes (a 1×1 convolution, as here, for equal
    sizes, e.g. resnet32x4 → resnet8x4), and the authors' a valid convolution.

    The paper trains in two stages, hints first, then KD. With ``init_epochs > 0`` the first
    epochs minimise the unweighted hint loss alone (:meth:`init_loss`, logged as
    ``fitnets_init``; only the student layers below the guided layer and the regressor get
    gradients, as in the paper's stage 1), then ``beta ×`` it plus the cross-entropy (the
    paper's stage 2 is ``distill=[kd,fitnets]`` with ``beta: 0``). RepDistiller trains one
    stage (CE + 100 × hint), the default here.

    CIFAR-100 resnet32x4 → resnet8x4 top-1 (RepDistiller): 73.50.

    Config (``conf/distill/fitnets.yaml``)::

        _target_: kdlab.strategies.hints.FitNets
        beta: 100.0           # RepDistiller's hint weight
        student_layers: stages
        teacher_layers: stages
        hints: middle
        relu: true
        init_epochs: 0

    Args:
        beta: weight of the hint loss in the main stage, ``>= 0``.
        student_layers: student layer paths or alias (guided layers).
        teacher_layers: teacher layer paths or alias (hint layers).
        hints: ``middle`` (one pair: the middle entry of each list), an integer ``>= 1``
            (pairs taken from the end of both lists) or ``None`` (all ``min(n_s, n_t)``).
        relu: apply a ReLU after the regressor's BatchNorm.
        init_epochs: epochs of hint-only pre-training, ``>= 0``.
    """

    def __init__(self, beta: float = 100.0, student_layers: Layers = "stages",
                 teacher_layers: Layers = "stages", hints: int | str | None = "middle",
                 relu: bool = True, init_epochs: int = 0) -> None:
        if hints != "middle" and hints is not None and (
                isinstance(hints, bool) or not isinstance(hints, int) or hints < 1):
            raise KdlabError(f"distill.hints={hints} must be 'middle', an integer >= 1 or null "
                             "(all pairs)")
        super().__init__(student_layers, teacher_layers,
                         max_pairs=1 if hints == "middle" else hints)
        if not isinstance(relu, bool):
            raise KdlabError(f"distill.relu={relu} must be true or false")
        self.hints = hints
        self.relu = relu
        self.beta = check_number("beta", beta)
        self.init_epochs = check_epochs("init_epochs", init_epochs)
        self.regressors = nn.ModuleList()

    def resolve(self, student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
        """The paired paths: the middle entry of each list (``hints: middle``) or the last
        ones (see :class:`_PairedFeatures`)."""
        if self.hints != "middle":
            return super().resolve(student, teacher)
        s, t = Strategy.resolve(self, student, teacher)
        self.student_paths, self.teacher_paths = [s[(len(s) - 1) // 2]], [t[(len(t) - 1) // 2]]
        return self.student_paths, self.teacher_paths

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        self.regressors = nn.ModuleList(
            nn.Sequential(*conv_bn(s.shape[1], t.shape[1]), *([nn.ReLU()] if self.relu else []))
            for s, t in self._probe(student, teacher))

    def hint_loss(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        """``Σ_pairs mean((r(S) − T)²)``, unweighted."""
        pairs = self.paired_maps(student, teacher)
        return sum(F.mse_loss(r(s), t) for r, (s, t) in zip(self.regressors, pairs))

    def init_loss(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return {"fitnets_init": self.hint_loss(student, teacher)}

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return {"fitnets": self.beta * self.hint_loss(student, teacher)}


# -- OFD -------------------------------------------------------------------------------------------
class OFD(_PairedFeatures):
    """Overhaul of feature distillation — Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive
    Overhaul of Feature Distillation", ICCV 2019 (arXiv:1904.01866).

    ``loss = beta · Σ_i 2^{-(k-1-i)} · Σ_{n,c,h,w} d_p(σ_m(T_i), r_i(S_i)) / N`` with the margin
    ReLU ``σ_m(t) = max(t, m_c)`` and the partial L2 ``d_p(t, s) = (s − t)²`` except where
    ``s ≤ t ≤ 0`` (0 there: the student need not match a negative response it already
    undercuts). ``i = 0..k-1`` runs from the shallowest pair to the deepest; the halving per
    level follows the authors' released code, ``N`` is the batch size.

    Reads pre-ReLU features (alias ``"preact"`` on both sides by default; last ``min(n_s,
    n_t)`` paired). The connector ``r`` is 1×1 conv + BatchNorm; the student map is resized to
    the teacher's spatial size first.

    The margin ``m_c = E[t_c | t_c < 0]`` is per teacher channel. The paper computes it in
    closed form from the teacher BatchNorm's affine parameters, assuming Gaussian responses;
    a strategy only sees tensors, so here it is estimated from the data: a persistent buffer
    per pair (``margin<i>``, saved with the student) initialised in :meth:`setup` from the
    probe batch and, in training, moved towards each batch's per-channel mean of the negative
    teacher responses with ``momentum`` (no gradients). A channel with no negative response
    seen so far keeps ``m = 0`` (then ``σ_m`` is a plain ReLU for it) and takes the first
    batch estimate as is.

    Against the authors' code (clovaai/overhaul-distillation: ``Σ / N / 1000`` added to the
    cross-entropy on CIFAR-100, hence ``beta = 1e-3``) and mdistiller (``FEAT_WEIGHT``, the
    same sum averaged over the batch): the same loss; the authors' connector is the same
    1×1 conv + BN; mdistiller average-pools the *teacher* map to the student's size where
    they differ, kdlab resizes the student map to the teacher's (equal sizes in the
    resnet32x4 → resnet8x4 pair). Not a constant factor only where sizes differ.

    CIFAR-100 resnet32x4 → resnet8x4 top-1: not in the paper (later benchmarks, e.g. the DKD
    paper's, report 74.95).

    Config (``conf/distill/ofd.yaml``)::

        _target_: kdlab.strategies.hints.OFD
        beta: 1.0e-3           # the paper's alpha for CIFAR (1e-4 for ImageNet)
        student_layers: preact
        teacher_layers: preact
        momentum: 0.1

    Args:
        beta: weight of the distillation term, ``>= 0``.
        student_layers: student layer paths or alias (pre-ReLU).
        teacher_layers: teacher layer paths or alias (pre-ReLU).
        momentum: update rate of the running margins, in ``[0, 1]`` (0 keeps the probe's).
    """

    def __init__(self, beta: float = 1e-3, student_layers: Layers = "preact",
                 teacher_layers: Layers = "preact", momentum: float = 0.1) -> None:
        super().__init__(student_layers, teacher_layers)
        self.beta = check_number("beta", beta)
        if not (isinstance(momentum, int | float) and 0.0 <= momentum <= 1.0):
            raise KdlabError(f"distill.momentum={momentum} must be in [0, 1]")
        self.momentum = float(momentum)
        self.connectors = nn.ModuleList()
        self.num_pairs = 0

    @staticmethod
    def negative_mean(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel of ``t`` (N, C, H, W): the mean of its negative entries (0 where there
        is none) and whether there is one."""
        negative = t.clamp(max=0)  # the negative entries, 0 elsewhere
        total = negative.sum(dim=(0, 2, 3))
        count = torch.count_nonzero(negative, dim=(0, 2, 3))  # faster than (t < 0).sum(...)
        return total / count.clamp_min(1), count > 0

    def margins(self) -> list[torch.Tensor]:
        """The current per-channel margins, one tensor per pair."""
        return [getattr(self, f"margin{i}") for i in range(self.num_pairs)]

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        pairs = self._probe(student, teacher)
        self.connectors = nn.ModuleList(conv_bn(s.shape[1], t.shape[1]) for s, t in pairs)
        self.num_pairs = len(pairs)
        for i, (_, t) in enumerate(pairs):
            mean, _ = self.negative_mean(t.float())
            self.register_buffer(f"margin{i}", mean, persistent=True)

    @torch.no_grad()
    def update_margins(self, teacher_maps: list[torch.Tensor]) -> None:
        """Move each margin towards the batch's ``E[t | t < 0]`` (channels with a negative)."""
        for margin, t in zip(self.margins(), teacher_maps):
            mean, seen = self.negative_mean(t.float())
            moved = torch.where(margin < 0, (1 - self.momentum) * margin + self.momentum * mean,
                                mean)
            margin.copy_(torch.where(seen, moved, margin))

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        pairs = self.paired_maps(student, teacher)
        if self.training:
            self.update_margins([t for _, t in pairs])
        k = len(pairs)
        total = 0.0
        for i, (connector, margin, (s, t)) in enumerate(zip(self.connectors, self.margins(),
                                                             pairs)):
            target = torch.maximum(t, margin.to(t.dtype).view(1, -1, 1, 1))
            distance = piecewise_square_sum(connector(s), ofd_residual, target)
            total = total + distance / s.shape[0] / 2 ** (k - 1 - i)
        return {"ofd": self.beta * total}


def ofd_residual(s: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """OFD's partial-L2 residual: ``s − target`` except where ``s ≤ target ≤ 0`` (0 there);
    its square is ``d_p(target, s)``."""
    keep = (s > target) | (target > 0)
    return torch.where(keep, s - target, s.new_zeros(()))


# -- AB --------------------------------------------------------------------------------------------
#: how the AB loss of the pairs is normalised (see :class:`AB`)
AB_REDUCTIONS = ("mean", "authors")


def ab_elementwise(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """``(s + m)² · 1{s > −m} · 1{t ≤ 0} + (s − m)² · 1{s ≤ m} · 1{t > 0}`` per element (the
    paper's formula; :class:`AB` sums the squares of :func:`ab_residual`, the same values,
    with a hand-written gradient)."""
    off = (s + margin).pow(2) * ((s > -margin) & (t <= 0))
    on = (s - margin).pow(2) * ((s <= margin) & (t > 0))
    return off + on


def ab_residual(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """``d`` with ``d² =`` :func:`ab_elementwise`: ``min(s − m, 0)`` where the teacher neuron
    is active (``t > 0``), ``max(s + m, 0)`` where it is not."""
    return torch.where(t > 0, (s - margin).clamp(max=0), (s + margin).clamp(min=0))


class AB(_PairedFeatures):
    """Activation-boundary transfer — Heo, Lee, Yun & Choi, "Knowledge Transfer via
    Distillation of Activation Boundaries Formed by Hidden Neurons", AAAI 2019
    (arXiv:1811.03233).

    ``ℓ(s, t) = (s + m)² · 1{s > −m} · 1{t ≤ 0} + (s − m)² · 1{s ≤ m} · 1{t > 0}`` per element,
    with ``s = r(S)`` the connected student pre-activation, ``t`` the teacher's and margin
    ``m``: the student is pushed to be active (``≥ m``) exactly where the teacher neuron is
    active and inactive (``≤ −m``) where it is not. How the elements are reduced
    (``reduction``):

    - ``mean`` (default): ``loss = beta · Σ_i mean_{n,c,h,w} ℓ_i`` — every pair's per-element
      mean, summed;
    - ``authors`` (the authors' code, bhheo/AB_distillation, and RepDistiller):
      ``loss = beta · (3/1000) · Σ_i 2^{−(k−1−i)} · Σ_{n,c,h,w} ℓ_i / N`` for pairs
      ``i = 0..k−1`` from the shallowest (the deepest weighs 1, each shallower one half the
      next). Per pair that is ``3 · C_i H_i W_i · 2^{−(k−1−i)} / 1000 ×`` the ``mean`` term —
      not one constant in general, but 49.152 for every pre-ReLU stage of resnet8x4 /
      resnet32x4 (64·32·32/4 = 128·16·16/2 = 256·8·8 = 16384 elements).

    ``mean`` stays the default because kdlab's default is single-stage (the AB term kept in
    the main stage with ``beta = 1``, a kdlab choice: the authors' main stage has no AB
    term), where the ``authors`` scale would swamp the cross-entropy; the authors' two-stage
    protocol uses ``reduction: authors`` (see below).

    Reads pre-ReLU features (alias ``"preact"`` both sides; last ``min(n_s, n_t)`` paired),
    connector 1×1 conv + BatchNorm (as in the authors' code; RepDistiller connects a pair of
    equal shapes by the identity), student map resized to the teacher's spatial size.

    In the paper (and RepDistiller, 30 epochs at LR 0.05 before the 240-epoch schedule) AB is
    an initialisation: the first ``init_epochs`` minimise the unweighted AB loss alone
    (``ab_init``), after which the original trains with cross-entropy/KD only — ``beta: 0``,
    ``init_epochs: 30``, ``reduction: authors`` reproduce that (kdlab's pre-stage counts
    inside ``trainer.max_epochs``). With the default ``beta: 1`` the AB term stays in the
    main stage.

    CIFAR-100 resnet32x4 → resnet8x4 top-1 (RepDistiller, two stages): 73.17.

    Config (``conf/distill/ab.yaml``)::

        _target_: kdlab.strategies.hints.AB
        beta: 1.0
        margin: 1.0
        reduction: mean
        student_layers: preact
        teacher_layers: preact
        init_epochs: 0

    Args:
        beta: weight of the AB term in the main stage, ``>= 0``.
        margin: the margin ``m > 0``.
        reduction: ``mean`` or ``authors`` (above).
        student_layers: student layer paths or alias (pre-ReLU).
        teacher_layers: teacher layer paths or alias (pre-ReLU).
        init_epochs: epochs of AB-only initialisation, ``>= 0``.
    """

    def __init__(self, beta: float = 1.0, margin: float = 1.0, reduction: str = "mean",
                 student_layers: Layers = "preact", teacher_layers: Layers = "preact",
                 init_epochs: int = 0) -> None:
        super().__init__(student_layers, teacher_layers)
        self.beta = check_number("beta", beta)
        if not (isinstance(margin, int | float) and margin > 0 and math.isfinite(margin)):
            raise KdlabError(f"distill.margin={margin} must be a finite number > 0")
        self.margin = float(margin)
        self.reduction = check_choice("reduction", reduction, AB_REDUCTIONS)
        self.init_epochs = check_epochs("init_epochs", init_epochs)
        self.connectors = nn.ModuleList()

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        self.connectors = nn.ModuleList(conv_bn(s.shape[1], t.shape[1])
                                        for s, t in self._probe(student, teacher))

    def ab_loss(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        """The unweighted AB loss, reduced as :attr:`reduction` says."""
        pairs = self.paired_maps(student, teacher)
        total = 0.0
        for i, (connector, (s, t)) in enumerate(zip(self.connectors, pairs)):
            x = connector(s)
            loss = piecewise_square_sum(x, ab_residual, t, self.margin)
            if self.reduction == "authors":
                total = total + loss / s.shape[0] * 3 / 1000 / 2 ** (len(pairs) - 1 - i)
            else:
                total = total + loss / x.numel()
        return total

    def init_loss(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return {"ab_init": self.ab_loss(student, teacher)}

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return {"ab": self.beta * self.ab_loss(student, teacher)}


# -- VID -------------------------------------------------------------------------------------------
class VID(_PairedFeatures):
    """Variational information distillation — Ahn, Hu, Damianou, Lawrence & Dai, "Variational
    Information Distillation for Knowledge Transfer", CVPR 2019 (arXiv:1904.05835).

    ``loss = beta · Σ_pairs mean_{n,c,h,w} ½ (log σ_c² + (t − μ(s))² / σ_c²)``: the negative
    log-likelihood (constant dropped) of the teacher feature ``t`` under a Gaussian with mean
    ``μ(s)`` regressed from the student feature and a learned per-channel variance
    ``σ_c² = softplus(α_c) + eps`` — a variational lower bound on their mutual information.

    ``μ`` is 1×1 conv → ReLU → 1×1 conv → ReLU → 1×1 conv, bias-free (hidden width = teacher
    channels), as in the authors' code that RepDistiller reproduces; ``α`` starts where
    ``σ² = init_pred_var``. Reads ``"stages"`` on both sides by default (last
    ``min(n_s, n_t)`` paired); the student map is resized to the teacher's spatial size before
    ``μ`` (RepDistiller pools whichever map is larger, so a smaller student map meets a pooled
    teacher map there; equal sizes in the resnet32x4 → resnet8x4 pair). The pairs' terms are
    summed, as in RepDistiller (``beta = 1``; torchdistill likewise).

    CIFAR-100 resnet32x4 → resnet8x4 top-1 (RepDistiller): 73.09.

    Config (``conf/distill/vid.yaml``)::

        _target_: kdlab.strategies.hints.VID
        beta: 1.0              # RepDistiller
        init_pred_var: 5.0     # the authors' initial variance
        eps: 1.0e-5
        student_layers: stages
        teacher_layers: stages

    Args:
        beta: weight of the VID term, ``>= 0``.
        init_pred_var: initial variance ``σ² > eps``.
        eps: variance floor, ``> 0``.
        student_layers: student layer paths or alias.
        teacher_layers: teacher layer paths or alias.
    """

    def __init__(self, beta: float = 1.0, init_pred_var: float = 5.0, eps: float = 1e-5,
                 student_layers: Layers = "stages", teacher_layers: Layers = "stages") -> None:
        super().__init__(student_layers, teacher_layers)
        self.beta = check_number("beta", beta)
        if not (isinstance(eps, int | float) and eps > 0 and math.isfinite(eps)):
            raise KdlabError(f"distill.eps={eps} must be a finite number > 0")
        if not (isinstance(init_pred_var, int | float) and init_pred_var > eps
                and math.isfinite(init_pred_var)):
            raise KdlabError(f"distill.init_pred_var={init_pred_var} must be a finite number "
                             f"> eps={eps}")
        self.eps = float(eps)
        self.init_pred_var = float(init_pred_var)
        self.regressors = nn.ModuleList()
        self.alphas = nn.ParameterList()

    @staticmethod
    def regressor(in_channels: int, out_channels: int) -> nn.Sequential:
        """``μ``: three bias-free 1×1 convolutions with ReLUs between, hidden width
        ``out_channels`` (as the authors' code, through RepDistiller)."""
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.ReLU(),
                             nn.Conv2d(out_channels, out_channels, 1, bias=False), nn.ReLU(),
                             nn.Conv2d(out_channels, out_channels, 1, bias=False))

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        pairs = self._probe(student, teacher)
        self.regressors = nn.ModuleList(self.regressor(s.shape[1], t.shape[1]) for s, t in pairs)
        # softplus(alpha) = init_pred_var - eps  <=>  alpha = log(exp(init_pred_var - eps) - 1)
        alpha = math.log(math.expm1(self.init_pred_var - self.eps))
        self.alphas = nn.ParameterList(nn.Parameter(torch.full((t.shape[1],), alpha))
                                       for _, t in pairs)

    def variances(self) -> list[torch.Tensor]:
        """``σ_c² = softplus(α_c) + eps`` per pair."""
        return [F.softplus(a) + self.eps for a in self.alphas]

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        total = 0.0
        pairs = self.paired_maps(student, teacher)
        for mu, var, (s, t) in zip(self.regressors, self.variances(), pairs):
            # every channel holds N·H·W entries, so the mean over (n, c, h, w) is the mean over
            # c of the per-channel terms: square and reduce the map once, divide C numbers
            residual = t - mu(s)
            square = residual.square().mean(dim=(0, 2, 3),
                                            dtype=torch.promote_types(residual.dtype,
                                                                      torch.float32))
            total = total + (0.5 * (torch.log(var) + square / var)).mean()
        return {"vid": self.beta * total}
