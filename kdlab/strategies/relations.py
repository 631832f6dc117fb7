"""Strategies that transfer relations between the samples of a batch: distances and angles
(RKD), similarity distributions (PKT), similarity matrices (SP) and kernel correlations (CC).

Each compares a ``b × b`` (or ``b × b × b``) structure computed within the student with the same
structure computed within the teacher, so the two networks' feature sizes need not agree.
Features are flattened to ``[b, D]`` and computed in float32 (float64 inputs stay float64);
teacher features are detached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import check_choice, check_number, layers_arg
from kdlab.util.errors import KdlabError

#: guards divisions and logarithms
EPS = 1e-12
#: (student, teacher) features of the paired layers, each ``[b, D]``
Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def _flag(key: str, value: bool) -> bool:
    """``value`` if it is a bool, else a :class:`KdlabError` naming ``distill.<key>``."""
    if not isinstance(value, bool):
        raise KdlabError(f"distill.{key}={value} must be true or false")
    return value


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or as is if it is float64."""
    return x if x.dtype == torch.float64 else x.float()


def _full_precision(x: torch.Tensor) -> torch.autocast:
    """No autocast: relation matrices of nearby samples need float32."""
    return torch.autocast(x.device.type, enabled=False)




class _Relational(Strategy):
    """Shared plumbing: configurable layers on both sides, paired one to one."""

    def __init__(self, student_layers: str | Sequence[str],
                 teacher_layers: str | Sequence[str]) -> None:
        super().__init__()
        self.student_layers = layers_arg(student_layers, "student_layers")
        self.teacher_layers = layers_arg(teacher_layers, "teacher_layers")

    def _select(self, paths: list[str]) -> list[str]:
        """The resolved paths this strategy reads (all of them by default)."""
        return paths

    def resolve(self, student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
        super().resolve(student, teacher)
        self.student_paths = self._select(self.student_paths)
        self.teacher_paths = self._select(self.teacher_paths)
        if len(self.student_paths) != len(self.teacher_paths):
            raise KdlabError(
                f"distill.student_layers={self.student_layers} ({len(self.student_paths)} "
                f"layers: {', '.join(self.student_paths)}) and distill.teacher_layers="
                f"{self.teacher_layers} ({len(self.teacher_paths)}: "
                f"{', '.join(self.teacher_paths)}) must name as many layers, paired in order")
        return self.student_paths, self.teacher_paths

    def _pairs(self, student: Outputs, teacher: Outputs) -> Pairs:
        """(student, teacher) features flattened to ``[b, D]`` in float32 (float64 kept),
        teacher detached."""
        return [(_at_least_float32(s.flatten(1)), _at_least_float32(t.detach().flatten(1)))
                for s, t in zip(self.student_features(student), self.teacher_features(teacher))]

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        with _full_precision(student.logits):
            return self._terms(self._pairs(student, teacher), student.logits.device)

    def _terms(self, pairs: Pairs, device: torch.device) -> Terms:
        """The weighted loss terms of the (student, teacher) feature pairs."""
        raise NotImplementedError


# -- RKD -------------------------------------------------------------------------------------------
def _distances_and_angles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise Euclidean distances ``[b, b]`` and the cosines ``[b, b, b]`` of the angles of all
    triplets: ``cos[j, i, k] = <(x_i - x_j)/‖x_i - x_j‖, (x_k - x_j)/‖x_k - x_j‖>`` (vertex j)."""
    diff = x.unsqueeze(0) - x.unsqueeze(1)  # diff[j, i] = x_i - x_j
    dist = torch.linalg.vector_norm(diff, dim=-1)
    unit = diff / dist.unsqueeze(-1).clamp_min(EPS)
    return dist, torch.bmm(unit, unit.transpose(1, 2))


def _over_mean_distance(dist: torch.Tensor, distinct: torch.Tensor) -> torch.Tensor:
    """The ``[b, b]`` distances divided by their mean over the distinct pairs (RKD's ``1/mu``)."""
    return dist / dist[distinct].mean().clamp_min(EPS)


#: which entries RKD's Huber losses average over (see :class:`RKD`)
RKD_PAIRS = ("all", "distinct")


class RKD(_Relational):
    """Relational knowledge distillation — Park, Kim, Lu & Cho, "Relational Knowledge
    Distillation", CVPR 2019 (arXiv:1904.05068).

    ``loss = beta · (w_d · mean_{i,j} huber(‖s_i−s_j‖/mu_s, ‖t_i−t_j‖/mu_t)
    + w_a · mean_{i,j,k} huber(cos∠s_i s_j s_k, cos∠t_i t_j t_k))``

    ``mu`` is the mean distance over the distinct pairs of the batch, ``huber`` is the smooth-L1
    loss (δ = 1) and ``∠ x_i x_j x_k`` is the angle at ``x_j`` (its cosine is 0 when ``x_i`` or
    ``x_k`` coincides with ``x_j``). Reads the penultimate embedding of both networks by
    default; features are flattened, their sizes may differ (no connector). Returns two terms,
    ``rkd_dist`` and ``rkd_angle`` (already weighted).

    ``pairs: all`` (default) averages over all ``b²`` pairs and ``b³`` triplets, repeated
    indices included, as the authors' code (lenscloth/RKD ``metric/loss.py``), RepDistiller
    (Tian et al., ICLR 2020) and torchdistill do, for which RepDistiller's ``w_d = 25``,
    ``w_a = 50`` are tuned: kdlab's terms equal theirs exactly. ``pairs: distinct`` averages
    over the ``b(b−1)`` distinct pairs and ``b(b−1)(b−2)`` distinct triplets only, the sets of
    the paper's equations. Repeated indices give zero terms unless two samples coincide, so
    for a batch of distinct samples ``all = distinct × (b−1)/b`` (distance) and
    ``× (b−1)(b−2)/b²`` (angle); the paper *sums* over those sets: paper ``= distinct ×
    b(b−1)`` (distance) and ``× b(b−1)(b−2)`` (angle). Batches of one sample give zero terms
    (``distinct``: also the angle term of two samples).

    Config (``conf/distill/rkd.yaml``)::

        _target_: kdlab.strategies.relations.RKD
        beta: 1.0
        distance_weight: 25.0
        angle_weight: 50.0
        pairs: all
        student_layers: embedding
        teacher_layers: embedding

    Args:
        beta: overall weight (RepDistiller's setting is 1).
        distance_weight: weight ``w_d`` of the distance-wise term (RepDistiller: 25; paper: 1).
        angle_weight: weight ``w_a`` of the angle-wise term (RepDistiller: 50; paper: 2).
        student_layers: student layer(s), module paths or an alias; paired with the teacher's.
        teacher_layers: teacher layer(s), as many as the student's.
        pairs: ``all`` (mean over every index pair/triplet: authors' code, RepDistiller,
            torchdistill) or ``distinct`` (mean over distinct ones only).
    """

    def __init__(
        self,
        beta: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        student_layers: str | Sequence[str] = "embedding",
        teacher_layers: str | Sequence[str] = "embedding",
        pairs: str = "all",
    ) -> None:
        super().__init__(student_layers, teacher_layers)
        self.beta = check_number("beta", beta)
        self.distance_weight = check_number("distance_weight", distance_weight)
        self.angle_weight = check_number("angle_weight", angle_weight)
        self.pairs = check_choice("pairs", pairs, RKD_PAIRS)

    def _terms(self, pairs: Pairs, device: torch.device) -> Terms:
        dist_loss = angle_loss = torch.zeros((), device=device)
        for s, t in pairs:
            b = s.shape[0]
            zero = s.sum() * 0.0  # keeps the graph for tiny batches
            if b < 2:
                dist_loss, angle_loss = dist_loss + zero, angle_loss + zero
                continue
            distinct = ~torch.eye(b, dtype=torch.bool, device=s.device)
            dist_s, cos_s = _distances_and_angles(s)
            with torch.no_grad():
                dist_t, cos_t = _distances_and_angles(t)
            d_s, d_t = _over_mean_distance(dist_s, distinct), _over_mean_distance(dist_t, distinct)
            if self.pairs == "all":
                dist_loss = dist_loss + F.smooth_l1_loss(d_s, d_t)
                angle_loss = angle_loss + F.smooth_l1_loss(cos_s, cos_t)
                continue
            dist_loss = dist_loss + F.smooth_l1_loss(d_s[distinct], d_t[distinct])
            if b < 3:
                angle_loss = angle_loss + zero
            else:
                triplets = distinct.unsqueeze(2) & distinct.unsqueeze(1) & distinct.unsqueeze(0)
                angle_loss = angle_loss + F.smooth_l1_loss(cos_s[triplets], cos_t[triplets])
        return {"rkd_dist": self.beta * self.distance_weight * dist_loss,
                "rkd_angle": self.beta * self.angle_weight * angle_loss}


# -- PKT -------------------------------------------------------------------------------------------
#: how PKT's conditional distributions treat a sample's similarity to itself (see :class:`PKT`)
PKT_FORMS = ("code", "paper")


def _cosine_conditionals(x: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Rows of ``(cos(x_i, x_j) + 1) / 2`` normalised to sum to 1: ``p_{j|i}``; with
    ``exclude_self`` the diagonal is zeroed before the rows are normalised."""
    x = F.normalize(x, dim=1, eps=EPS)
    kernel = (x @ x.t() + 1.0) / 2.0
    if exclude_self:
        eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        kernel = kernel.masked_fill(eye, 0.0)
    return kernel / kernel.sum(dim=1, keepdim=True).clamp_min(EPS)


class PKT(_Relational):
    """Probabilistic knowledge transfer — Passalis & Tefas, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", ECCV 2018 (arXiv:1803.10837).

    ``p_{j|i} = K(t_i, t_j) / Σ_k K(t_i, t_k)`` with ``K(a, b) = (cos(a, b) + 1) / 2`` (likewise
    ``q_{j|i}`` for the student); ``form: code`` (default):
    ``loss = beta · (1/b²) Σ_{i,j} p_{j|i} log((p_{j|i} + ε) / (q_{j|i} + ε))``, the
    teacher-to-student KL of the conditional similarity distributions.

    ``form: code`` is the authors' reference code (passalis/probabilistic_kt ``nn/pkt.py``),
    RepDistiller's ``PKT`` (β = 30000 is tuned for it) and torchdistill's ``PKTLoss``: each
    sample's similarity to itself stays in the kernel and the KL is averaged over the ``b²``
    entries; kdlab equals them exactly but for the normalisation guard (they divide by
    ``‖x‖ + 10⁻⁷``, kdlab by ``max(‖x‖, 10⁻¹²)``: a relative difference below ``10⁻⁷/‖x‖``).
    ``form: paper`` follows the paper's equations, which leave ``k = i`` out of the
    normalisation and ``j = i`` out of the KL: the diagonal is removed before the rows are
    normalised and the KL is averaged over the ``b(b−1)`` off-diagonal entries (the paper sums
    them: paper ``= kdlab × b(b−1)``). The two forms differ by more than a factor (the
    self-similarity 1 is part of every code-form row).

    Reads the penultimate embedding of both networks by default (sizes may differ).

    Config (``conf/distill/pkt.yaml``)::

        _target_: kdlab.strategies.relations.PKT
        beta: 30000.0
        eps: 1.0e-7
        form: code
        student_layers: embedding
        teacher_layers: embedding

    Args:
        beta: weight of the term (RepDistiller: 30000).
        eps: ``ε`` inside the logarithm (authors' code: 1e-7).
        student_layers: student layer(s), module paths or an alias; paired with the teacher's.
        teacher_layers: teacher layer(s), as many as the student's.
        form: ``code`` (diagonal kept, mean over ``b²``: authors' code, RepDistiller,
            torchdistill) or ``paper`` (diagonal left out, mean over ``b(b−1)``).
    """

    def __init__(
        self,
        beta: float = 30000.0,
        eps: float = 1e-7,
        student_layers: str | Sequence[str] = "embedding",
        teacher_layers: str | Sequence[str] = "embedding",
        form: str = "code",
    ) -> None:
        super().__init__(student_layers, teacher_layers)
        self.beta = check_number("beta", beta)
        if not (isinstance(eps, int | float) and 0 < eps < 1):
            raise KdlabError(f"distill.eps={eps} must be in (0, 1)")
        self.eps = float(eps)
        self.form = check_choice("form", form, PKT_FORMS)

    def _terms(self, pairs: Pairs, device: torch.device) -> Terms:
        loss = torch.zeros((), device=device)
        paper = self.form == "paper"
        for s, t in pairs:
            b = s.shape[0]
            q = _cosine_conditionals(s, exclude_self=paper)
            p = _cosine_conditionals(t, exclude_self=paper)
            kl = p * torch.log((p + self.eps) / (q + self.eps))  # zero where p = 0 (diagonal)
            loss = loss + (kl.sum() / max(b * (b - 1), 1) if paper else kl.mean())
        return {"pkt": self.beta * loss}


# -- SP --------------------------------------------------------------------------------------------
#: how SP normalises the rows of a batch's Gram matrix (see :class:`SP`)
SP_NORMS = ("l2", "l1")


def _similarity(x: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """SP's ``G = A·Aᵀ`` with each row L2-normalised (``norm="l1"``: L1-normalised)."""
    return F.normalize(x @ x.t(), p=2.0 if norm == "l2" else 1.0, dim=1, eps=EPS)


class SP(_Relational):
    """Similarity-preserving distillation — Tung & Mori, "Similarity-Preserving Knowledge
    Distillation", ICCV 2019 (arXiv:1907.09682).

    ``G = normalise_rows(A · Aᵀ)`` for the ``[b, C·H·W]`` features ``A`` of a batch;
    ``loss = beta · ‖G_s − G_t‖_F² / b²`` (summed over layer pairs).

    ``norm: l2`` (default) divides each row by its L2 norm, as the paper (eq. 2), the
    authors' code as RepDistiller received it (its docstring says the author verified it)
    and RepDistiller's ``Similarity`` (``γ = β = 3000``) do: kdlab equals RepDistiller exactly.
    ``norm: l1`` divides each row by its L1 norm, as torchdistill's ``SPKDLoss`` does
    (``normalize(G, 1)``: the positional ``1`` is ``p``); with it kdlab equals torchdistill's
    ``reduction: batchmean`` exactly. The two differ by more than a factor (per row,
    ``‖g‖₁ / ‖g‖₂`` varies between 1 and ``√b``).

    Reads the output of the last stage of both networks by default, as the paper does for its
    CIFAR experiments (RepDistiller: ``feat[-2]``); with ``last_only: false`` the listed layers
    are paired one to one (as many on both sides) and their losses summed, the paper's
    multi-layer form.

    Config (``conf/distill/sp.yaml``)::

        _target_: kdlab.strategies.relations.SP
        beta: 3000.0
        norm: l2
        student_layers: stages
        teacher_layers: stages
        last_only: true

    Args:
        beta: weight of the term (paper's ``γ`` and RepDistiller: 3000).
        student_layers: student layer(s), module paths or an alias.
        teacher_layers: teacher layer(s).
        last_only: read only the last of the listed layers on each side.
        norm: ``l2`` (paper, RepDistiller) or ``l1`` (torchdistill) row normalisation.
    """

    def __init__(
        self,
        beta: float = 3000.0,
        student_layers: str | Sequence[str] = "stages",
        teacher_layers: str | Sequence[str] = "stages",
        last_only: bool = True,
        norm: str = "l2",
    ) -> None:
        super().__init__(student_layers, teacher_layers)
        self.beta = check_number("beta", beta)
        self.norm = check_choice("norm", norm, SP_NORMS)
        self.last_only = _flag("last_only", last_only)

    def _select(self, paths: list[str]) -> list[str]:
        return paths[-1:] if self.last_only else paths

    def _terms(self, pairs: Pairs, device: torch.device) -> Terms:
        loss = torch.zeros((), device=device)
        for s, t in pairs:
            b = s.shape[0]
            diff = _similarity(s, self.norm) - _similarity(t, self.norm)
            loss = loss + diff.pow(2).sum() / b**2
        return {"sp": self.beta * loss}


def _project(embed: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``embed(x)`` in float32 (float64 if both are), whatever the precision the connector was
    moved to."""
    weight = next(embed.parameters(), None)
    return _at_least_float32(embed(x if weight is None else x.to(weight.dtype)))


# -- CC --------------------------------------------------------------------------------------------
#: what CC compares (see :class:`CC`)
CC_FORMS = ("paper", "repdistiller")
#: the kernel of the paper's correlation matrix
CC_KERNELS = ("gaussian", "bilinear")
#: how the paper form reduces the difference of the two correlation matrices
CC_DISTANCES = ("squared", "norm")


class CC(_Relational):
    """Correlation congruence — Peng, Jin, Liu, Zhou, Wu, Liu, Li & Zhang, "Correlation
    Congruence for Knowledge Distillation", ICCV 2019 (arXiv:1904.01802).

    ``z = normalise(W·f)``; ``C_ij = Σ_{p=0..P} e^{−2γ} (2γ)^p / p! · (z_i·z_j)^p``, the P-order
    Taylor expansion of the Gaussian RBF kernel ``exp(−γ‖z_i − z_j‖²)`` (exact on unit
    vectors); ``loss = beta · mean_{i,j} (C^s_ij − C^t_ij)²`` (the paper's
    ``‖ψ(F_t) − ψ(F_s)‖² / b²``).

    Reads the penultimate embedding of both networks by default. Linear connectors are built
    in :meth:`setup`: with ``feat_dim: null`` the student is projected to the teacher's size
    and the teacher's embedding is used as is; with ``feat_dim: <n>`` both are projected to
    ``n`` (RepDistiller's and torchdistill's layout; the teacher-side projection trains on the
    detached teacher features, and since it also moves the target, a collapse of both
    projections is a trivial minimiser of this term).

    Variants, each changing more than a constant factor:

    - ``kernel``: ``gaussian`` (default, the paper's Taylor-expanded RBF above) or
      ``bilinear`` (the paper's bilinear-pool kernel ``C_ij = z_i·z_j``).
    - ``normalize``: ``true`` (default) L2-normalises ``W·f`` first, which the Taylor identity
      ``exp(−γ‖a−b‖²) = e^{−2γ} e^{2γ a·b}`` needs (as Hu's Knowledge-Distillation-Zoo does);
      ``false`` uses ``W·f`` as is (torchdistill's ``Linear4CCKD``, RepDistiller's
      ``LinearEmbed``).
    - ``distance``: ``squared`` (default) ``mean_{i,j} (ΔC)² = ‖ΔC‖_F² / b²``, the paper's;
      ``norm`` ``‖ΔC‖_F / b²``, torchdistill's ``torch.dist(C_s, C_t) / b²``
      (``reduction: batchmean``).
    - ``form``: ``paper`` (default) is the correlation-congruence term above; ``repdistiller``
      is RepDistiller's ``Correlation`` loss, a different function (no kernel):
      ``mean_{i<b} Σ_d |Δ_i,d| · |Δ_{i+1},d|`` of the projected differences
      ``Δ = z_s − z_t`` of consecutive samples in batch order (``kernel`` and ``distance`` do
      not apply).

    RepDistiller's CIFAR-100 setting is ``form: repdistiller, normalize: false, feat_dim: 128,
    beta: 0.02``; torchdistill's (ImageNet sample) is ``kernel: gaussian, normalize: false,
    distance: norm, feat_dim: 128, beta: 0.003``. This is the paper's correlation term only
    (the instance congruence is KD; add it with ``distill=[kd,cc]``). On the bounded kernel
    values of the paper's formula RepDistiller's weight 0.02 makes the term vanish, so
    ``beta`` defaults to 100, the weight Knowledge-Distillation-Zoo uses for this P=2,
    γ=0.4 formulation.

    Config (``conf/distill/cc.yaml``)::

        _target_: kdlab.strategies.relations.CC
        beta: 100.0
        gamma: 0.4
        order: 2
        kernel: gaussian
        normalize: true
        distance: squared
        form: paper
        feat_dim: null
        student_layers: embedding
        teacher_layers: embedding

    Args:
        beta: weight of the term.
        gamma: RBF kernel parameter ``γ > 0`` (paper: 0.4).
        order: Taylor order ``P >= 1`` (paper: 2).
        feat_dim: size both sides are projected to, or ``None`` to project the student to the
            teacher's size.
        student_layers: student layer(s), module paths or an alias; paired with the teacher's.
        teacher_layers: teacher layer(s), as many as the student's.
        kernel: ``gaussian`` (Taylor-expanded RBF) or ``bilinear`` (``z_i·z_j``).
        normalize: L2-normalise the projections before the kernel (or the differences).
        distance: ``squared`` (mean of squared differences) or ``norm`` (Frobenius norm / b²).
        form: ``paper`` (correlation congruence) or ``repdistiller`` (RepDistiller's loss).
    """

    def __init__(
        self,
        beta: float = 100.0,
        gamma: float = 0.4,
        order: int = 2,
        feat_dim: int | None = None,
        student_layers: str | Sequence[str] = "embedding",
        teacher_layers: str | Sequence[str] = "embedding",
        kernel: str = "gaussian",
        normalize: bool = True,
        distance: str = "squared",
        form: str = "paper",
    ) -> None:
        super().__init__(student_layers, teacher_layers)
        self.beta = check_number("beta", beta)
        if not (isinstance(gamma, int | float) and math.isfinite(gamma) and gamma > 0):
            raise KdlabError(f"distill.gamma={gamma} must be > 0")
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise KdlabError(f"distill.order={order} must be an integer >= 1")
        if feat_dim is not None and (isinstance(feat_dim, bool) or not isinstance(feat_dim, int)
                                     or feat_dim < 1):
            raise KdlabError(f"distill.feat_dim={feat_dim} must be a positive integer or null")
        self.gamma, self.order, self.feat_dim = float(gamma), order, feat_dim
        self.kernel = check_choice("kernel", kernel, CC_KERNELS)
        self.normalize = _flag("normalize", normalize)
        self.distance = check_choice("distance", distance, CC_DISTANCES)
        self.form = check_choice("form", form, CC_FORMS)
        # Taylor coefficients e^{-2γ} (2γ)^p / p!, p = 0..P
        self.coefficients = [math.exp(-2 * self.gamma) * (2 * self.gamma) ** p / math.factorial(p)
                             for p in range(order + 1)]
        self.student_embed = nn.ModuleList()
        self.teacher_embed = nn.ModuleList()

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        self.student_embed, self.teacher_embed = nn.ModuleList(), nn.ModuleList()
        for s, t in self._pairs(student, teacher):
            ds, dt = s.shape[1], t.shape[1]
            if self.feat_dim is None:
                self.student_embed.append(nn.Linear(ds, dt))
                self.teacher_embed.append(nn.Identity())
            else:
                self.student_embed.append(nn.Linear(ds, self.feat_dim))
                self.teacher_embed.append(nn.Linear(dt, self.feat_dim))

    def _embed(self, embed: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``embed(x)``, L2-normalised per sample if ``normalize``."""
        z = _project(embed, x)
        return F.normalize(z, dim=1, eps=EPS) if self.normalize else z

    def _correlation(self, z: torch.Tensor) -> torch.Tensor:
        dot = z @ z.t()
        if self.kernel == "bilinear":
            return dot
        corr = torch.full_like(dot, self.coefficients[0])
        power = torch.ones_like(dot)
        for coefficient in self.coefficients[1:]:
            power = power * dot
            corr = corr + coefficient * power
        return corr

    def _congruence(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """The distance of one pair's projected embeddings ``[b, d]`` under ``form``."""
        b = z_s.shape[0]
        if self.form == "repdistiller":
            if b < 2:
                return z_s.sum() * 0.0
            delta = (z_s - z_t).abs()
            return (delta[:-1] * delta[1:]).sum(dim=1).mean()
        diff = self._correlation(z_s) - self._correlation(z_t)
        if self.distance == "norm":
            return torch.linalg.vector_norm(diff) / b**2
        return diff.pow(2).mean()

    def _terms(self, pairs: Pairs, device: torch.device) -> Terms:
        if len(self.student_embed) != len(pairs):
            raise RuntimeError("CC.setup() has not built the connectors")
        loss = torch.zeros((), device=device)
        for (s, t), embed_s, embed_t in zip(pairs, self.student_embed, self.teacher_embed):
            loss = loss + self._congruence(self._embed(embed_s, s), self._embed(embed_t, t))
        return {"cc": self.beta * loss}
