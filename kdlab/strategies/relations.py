"""Strategies that transfer relations between the samples of a batch: distances and angles
(RKD), similarity distributions (PKT), similarity matrices (SP) and kernel correlations (CC).

Each compares a ``b × b`` (or ``b × b × b``) structure computed within the student with the same
structure computed within the teacher, so the two networks' feature sizes need not agree.
Features are flattened to ``[b, D]`` and computed in float32; teacher features are detached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import check_number, layers_arg
from kdlab.util.errors import KdlabError

#: guards divisions and logarithms
EPS = 1e-12
#: (student, teacher) features of the paired layers, each ``[b, D]``
Pairs = list[tuple[torch.Tensor, torch.Tensor]]




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
        """(student, teacher) features flattened to ``[b, D]`` in float32, teacher detached."""
        return [(s.flatten(1).float(), t.detach().flatten(1).float())
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


def _normalised_distances(dist: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The distances of distinct pairs divided by their mean (RKD's ``1/mu``)."""
    d = dist[pairs]
    return d / d.mean().clamp_min(EPS)


class RKD(_Relational):
    """Relational knowledge distillation — Park, Kim, Lu & Cho, "Relational Knowledge
    Distillation", CVPR 2019 (arXiv:1904.05068).

    ``loss = beta · (w_d · mean_{i≠j} huber(‖s_i−s_j‖/mu_s, ‖t_i−t_j‖/mu_t)
    + w_a · mean_{i,j,k distinct} huber(cos∠s_i s_j s_k, cos∠t_i t_j t_k))``

    ``mu`` is the mean distance over the distinct pairs of the batch, ``huber`` is the smooth-L1
    loss (δ = 1) and ``∠ x_i x_j x_k`` is the angle at ``x_j``. Reads the penultimate embedding
    of both networks by default; features are flattened, their sizes may differ (no connector).
    Returns two terms, ``rkd_dist`` and ``rkd_angle`` (already weighted).

    The paper sums over the sets of distinct pairs and triplets; like the authors' code this
    averages instead, but over distinct pairs/triplets only (the authors' ``b²``/``b³`` means
    include the zero terms of repeated indices, smaller by a factor ``(b-1)/b`` and
    ``(b-1)(b-2)/b²``). Batches smaller than 2 (3 for angles) give a zero term.

    Config (``conf/distill/rkd.yaml``)::

        _target_: kdlab.strategies.relations.RKD
        beta: 1.0
        distance_weight: 25.0
        angle_weight: 50.0
        student_layers: embedding
        teacher_layers: embedding

    Args:
        beta: overall weight (RepDistiller's setting is 1).
        distance_weight: weight ``w_d`` of the distance-wise term (RepDistiller: 25).
        angle_weight: weight ``w_a`` of the angle-wise term (RepDistiller: 50).
        student_layers: student layer(s), module paths or an alias; paired with the teacher's.
        teacher_layers: teacher layer(s), as many as the student's.
    """

    def __init__(
        self,
        beta: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        student_layers: str | Sequence[str] = "embedding",
        teacher_layers: str | Sequence[str] = "embedding",
    ) -> None:
        super().__init__(student_layers, teacher_layers)
        self.beta = check_number("beta", beta)
        self.distance_weight = check_number("distance_weight", distance_weight)
        self.angle_weight = check_number("angle_weight", angle_weight)

    def _terms(self, pairs: Pairs, device: torch.device) -> Terms:
        dist_loss = angle_loss = torch.zeros((), device=device)
        for s, t in pairs:
            b = s.shape[0]
            zero = s.sum() * 0.0  # keeps the graph for tiny batches
            if b < 2:
                dist_loss, angle_loss = dist_loss + zero, angle_loss + zero
                continue
            eye = torch.eye(b, dtype=torch.bool, device=s.device)
            pairs = ~eye
            triplets = pairs.unsqueeze(2) & pairs.unsqueeze(1) & pairs.unsqueeze(0)
            dist_s, cos_s = _distances_and_angles(s)
            with torch.no_grad():
                dist_t, cos_t = _distances_and_angles(t)
            dist_loss = dist_loss + F.smooth_l1_loss(_normalised_distances(dist_s, pairs),
                                                     _normalised_distances(dist_t, pairs))
            if b < 3:
                angle_loss = angle_loss + zero
            else:
                angle_loss = angle_loss + F.smooth_l1_loss(cos_s[triplets], cos_t[triplets])
        return {"rkd_dist": self.beta * self.distance_weight * dist_loss,
                "rkd_angle": self.beta * self.angle_weight * angle_loss}


# -- PKT -------------------------------------------------------------------------------------------
def _cosine_conditionals(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``(cos(x_i, x_j) + 1) / 2`` normalised to sum to 1: ``p_{j|i}``."""
    x = F.normalize(x, dim=1, eps=EPS)
    kernel = (x @ x.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True).clamp_min(EPS)


class PKT(_Relational):
    """Probabilistic knowledge transfer — Passalis & Tefas, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", ECCV 2018 (arXiv:1803.10837).

    ``p_{j|i} = K(t_i, t_j) / Σ_k K(t_i, t_k)`` with ``K(a, b) = (cos(a, b) + 1) / 2`` (likewise
    ``q_{j|i}`` for the student); ``loss = beta · (1/b²) Σ_{i,j} p_{j|i} log((p_{j|i} + ε) /
    (q_{j|i} + ε))``, the teacher-to-student KL of the conditional similarity distributions.

    Reads the penultimate embedding of both networks by default (sizes may differ). As in the
    authors' reference code (which RepDistiller's ``beta`` is tuned for), the kernel includes
    each sample's similarity to itself and the KL is averaged over the ``b²`` entries; the
    paper's equations leave ``k = i`` out and sum.

    Config (``conf/distill/pkt.yaml``)::

        _target_: kdlab.strategies.relations.PKT
        beta: 30000.0
        eps: 1.0e-7
        student_layers: embedding
        teacher_layers: embedding

    Args:
        beta: weight of the term (RepDistiller: 30000).
        eps: ``ε`` inside the logarithm (authors' code: 1e-7).
        student_layers: student layer(s), module paths or an alias; paired with the teacher's.
        teacher_layers: teacher layer(s), as many as the student's.
    """

    def __init__(
        self,
        beta: float = 30000.0,
        eps: float = 1e-7,
        student_layers: str | Sequence[str] = "embedding",
        teacher_layers: str | Sequence[str] = "embedding",
    ) -> None:
        super().__init__(student_layers, teacher_layers)
        self.beta = check_number("beta", beta)
        if not (isinstance(eps, int | float) and 0 < eps < 1):
            raise KdlabError(f"distill.eps={eps} must be in (0, 1)")
        self.eps = float(eps)

    def _terms(self, pairs: Pairs, device: torch.device) -> Terms:
        loss = torch.zeros((), device=device)
        for s, t in pairs:
            q = _cosine_conditionals(s)
            p = _cosine_conditionals(t)
            loss = loss + (p * torch.log((p + self.eps) / (q + self.eps))).mean()
        return {"pkt": self.beta * loss}


# -- SP --------------------------------------------------------------------------------------------
def _similarity(x: torch.Tensor) -> torch.Tensor:
    """SP's ``G = A·Aᵀ`` with each row L2-normalised."""
    return F.normalize(x @ x.t(), dim=1, eps=EPS)


class SP(_Relational):
    """Similarity-preserving distillation — Tung & Mori, "Similarity-Preserving Knowledge
    Distillation", ICCV 2019 (arXiv:1907.09682).

    ``G = normalise_rows(A · Aᵀ)`` for the ``[b, C·H·W]`` features ``A`` of a batch;
    ``loss = beta · ‖G_s − G_t‖_F² / b²`` (summed over layer pairs).

    Reads the output of the last stage of both networks by default, as the paper does for its
    CIFAR experiments; with ``last_only: false`` the listed layers are paired one to one (as
    many on both sides) and their losses summed, the paper's multi-layer form.

    Config (``conf/distill/sp.yaml``)::

        _target_: kdlab.strategies.relations.SP
        beta: 3000.0
        student_layers: stages
        teacher_layers: stages
        last_only: true

    Args:
        beta: weight of the term (paper's ``γ`` and RepDistiller: 3000).
        student_layers: student layer(s), module paths or an alias.
        teacher_layers: teacher layer(s).
        last_only: read only the last of the listed layers on each side.
    """

    def __init__(
        self,
        beta: float = 3000.0,
        student_layers: str | Sequence[str] = "stages",
        teacher_layers: str | Sequence[str] = "stages",
        last_only: bool = True,
    ) -> None:
        super().__init__(student_layers, teacher_layers)
        self.beta = check_number("beta", beta)
        if not isinstance(last_only, bool):
            raise KdlabError(f"distill.last_only={last_only} must be true or false")
        self.last_only = last_only

    def _select(self, paths: list[str]) -> list[str]:
        return paths[-1:] if self.last_only else paths

    def _terms(self, pairs: Pairs, device: torch.device) -> Terms:
        loss = torch.zeros((), device=device)
        for s, t in pairs:
            b = s.shape[0]
            loss = loss + (_similarity(s) - _similarity(t)).pow(2).sum() / b**2
        return {"sp": self.beta * loss}


def _project(embed: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``embed(x)`` in float32, whatever the precision the connector was moved to."""
    weight = next(embed.parameters(), None)
    return embed(x if weight is None else x.to(weight.dtype)).float()


# -- CC --------------------------------------------------------------------------------------------
class CC(_Relational):
    """Correlation congruence — Peng, Jin, Liu, Zhou, Wu, Liu, Li & Zhang, "Correlation
    Congruence for Knowledge Distillation", ICCV 2019 (arXiv:1904.01802).

    ``z = normalise(W·f)``; ``C_ij = Σ_{p=0..P} e^{−2γ} (2γ)^p / p! · (z_i·z_j)^p``, the P-order
    Taylor expansion of the Gaussian RBF kernel ``exp(−γ‖z_i − z_j‖²)``;
    ``loss = beta · mean_{i,j} (C^s_ij − C^t_ij)²`` (the paper's ``‖ψ(F_t) − ψ(F_s)‖² / b²``).

    Reads the penultimate embedding of both networks by default. Linear connectors are built
    in :meth:`setup`: with ``feat_dim: null`` the student is projected to the teacher's size
    and the teacher's embedding is used as is; with ``feat_dim: <n>`` both are projected to
    ``n`` (RepDistiller's layout; the teacher-side projection trains on the detached teacher
    features, and since it also moves the target, a collapse of both projections is a trivial
    minimiser of this term).

    This is the paper's correlation-congruence term only (the instance congruence is KD; add
    it with ``distill=[kd,cc]``). RepDistiller's ``Correlation`` loss, for which its weight 0.02
    is tuned, is a different function (``mean_i Σ_d |Δ_i|·|Δ_{i+1}|`` of raw embedding
    differences ``Δ = f_s − f_t``); on the bounded kernel values of the paper's formula that
    weight makes the term vanish, so ``beta`` defaults to 100, the weight that Hu's
    Knowledge-Distillation-Zoo uses for this P=2, γ=0.4 formulation.

    Config (``conf/distill/cc.yaml``)::

        _target_: kdlab.strategies.relations.CC
        beta: 100.0
        gamma: 0.4
        order: 2
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
    """

    def __init__(
        self,
        beta: float = 100.0,
        gamma: float = 0.4,
        order: int = 2,
        feat_dim: int | None = None,
        student_layers: str | Sequence[str] = "embedding",
        teacher_layers: str | Sequence[str] = "embedding",
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

    def _correlation(self, z: torch.Tensor) -> torch.Tensor:
        z = F.normalize(z, dim=1, eps=EPS)
        dot = z @ z.t()
        corr = torch.full_like(dot, self.coefficients[0])
        power = torch.ones_like(dot)
        for coefficient in self.coefficients[1:]:
            power = power * dot
            corr = corr + coefficient * power
        return corr

    def _terms(self, pairs: Pairs, device: torch.device) -> Terms:
        if len(self.student_embed) != len(pairs):
            raise RuntimeError("CC.setup() has not built the connectors")
        loss = torch.zeros((), device=device)
        for (s, t), embed_s, embed_t in zip(pairs, self.student_embed, self.teacher_embed):
            corr_s = self._correlation(_project(embed_s, s))
            corr_t = self._correlation(_project(embed_t, t))
            loss = loss + (corr_s - corr_t).pow(2).mean()
        return {"cc": self.beta * loss}
