"""Strategies that transfer the *flow* between layers: how one tapped layer's features relate
to the next one's, as Gram matrices (FSP) or as correlations of their principal singular
vectors (KDSVD).

Both read 4-D feature maps ``[N, C, H, W]`` and compare relations between *consecutive*
tapped layers, so they need at least two paired layers (pairing as in
:func:`kdlab.strategies.attention.pair_last`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.strategies.attention import (
    check_maps,
    common_size,
    pair_last,
    pool_to,
)
from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import Layers, check_choice, check_number, layers_arg
from kdlab.util.errors import KdlabError

# -- FSP -----------------------------------------------------------------------------------------
#: how the larger of two consecutive maps is brought to the smaller's spatial size
FSP_POOLS = ("avg", "max")
#: how the squared (or plain) differences of two FSP matrices are reduced (see :class:`FSP`)
FSP_REDUCTIONS = ("mean", "sum", "column_norm")


def fsp_matrix(first: torch.Tensor, second: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """The "flow of solution procedure" matrix ``G = F₁ᵀ F₂ / (h·w)`` of two ``[N, C, H, W]``
    maps: ``[N, C₁, C₂]``. The larger map is adaptive-average-pooled (``pool="avg"``) or
    adaptive-max-pooled (``"max"``) to the smaller's spatial size."""
    size = common_size(first, second)
    if pool == "max":
        first, second = (x if tuple(x.shape[-2:]) == size else F.adaptive_max_pool2d(x, size)
                         for x in (first, second))
    else:
        first, second = pool_to(first, size), pool_to(second, size)
    a, b = first.flatten(2), second.flatten(2)  # [N, C1, hw], [N, C2, hw]
    return a @ b.transpose(1, 2) / (size[0] * size[1])


def fsp_distance(g_s: torch.Tensor, g_t: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The distance of two batches of FSP matrices ``[N, C₁, C₂]``:

    - ``mean``: ``mean_{n,a,b} (G_s − G_t)²`` (RepDistiller);
    - ``sum``: ``mean_n Σ_{a,b} (G_s − G_t)²``, the paper's squared Frobenius norm per sample
      (``= C₁·C₂ ×`` ``mean``);
    - ``column_norm``: ``mean_n Σ_b ‖G_s[:, b] − G_t[:, b]‖₂`` (torchdistill: the L2 norms of
      the columns, not squared, summed).
    """
    diff = g_s - g_t
    if reduction == "sum":
        return diff.pow(2).sum() / diff.shape[0]
    if reduction == "column_norm":
        return diff.norm(dim=1).sum() / diff.shape[0]
    return diff.pow(2).mean()


def fsp_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], pool: str = "avg",
             reduction: str = "mean") -> torch.Tensor:
    """``Σ_i d(G_s^i, G_t^i)`` over the FSP matrices of consecutive layers ``(i, i+1)`` of two
    equally long lists of maps whose channel counts match layer by layer (``d``:
    :func:`fsp_distance`)."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student maps but {len(teacher)} teacher maps")
    return sum(
        fsp_distance(fsp_matrix(student[i], student[i + 1], pool),
                     fsp_matrix(teacher[i], teacher[i + 1], pool), reduction)
        for i in range(len(student) - 1)
    )


class FSP(Strategy):
    """Flow of solution procedure — Yim, Joo, Bae & Kim, "A Gift from Knowledge
    Distillation: Fast Optimization, Network Minimization and Transfer Learning", CVPR 2017.

    ``G^i = F_iᵀ F_{i+1} / (h·w)`` (``[C_i, C_{i+1}]``) for consecutive tapped layers;
    ``loss = beta · Σ_i d(G_s^i, G_t^i)`` with, by ``reduction``:

    - ``mean`` (default, RepDistiller — Tian et al., ICLR 2020 — whose β = 50 is the default):
      ``d = mean_{n,a,b} (G_s − G_t)²``;
    - ``sum`` (the paper: ``‖G_t − G_s‖²₂`` summed over the entries, averaged over the batch,
      equal weights λ_i): ``d = mean_n Σ_{a,b} (G_s − G_t)²`` — per pair exactly
      ``C_i · C_{i+1} ×`` ``mean`` (a different weight per pair, so not one constant factor);
    - ``column_norm`` (torchdistill's ``FSPLoss``): ``d = mean_n Σ_b ‖G_s[:, b] − G_t[:, b]‖₂``,
      the column L2 norms, not squared.

    Within one network the larger of two consecutive maps is brought to the smaller's spatial
    size by ``pool``: ``avg`` (adaptive average pooling, RepDistiller) or ``max`` (adaptive max
    pooling, torchdistill); the paper pairs maps of equal size. The FSP matrix itself does not
    depend on the spatial size, so student and teacher sizes need not match. No authors' code
    was released.

    Reads the maps of ``student_layers`` / ``teacher_layers`` (default: every stage output;
    if the counts differ, the last ``min(len)`` of each are paired, and at least two pairs are
    needed). RepDistiller also pairs the stem's output with the first stage (its
    ``feat[:-1]``: three matrices for a CIFAR ResNet where ``stages`` gives two); tap it
    explicitly for that (e.g. ``[relu, layer1, layer2, layer3]`` on kdlab's CIFAR ResNets).
    **Deviation:** the paper requires equal channel counts; where a student layer's channels
    differ from its teacher partner's, a bias-free 1×1 convolution (a connector, trained with
    the student) maps the student layer to the teacher's width first, so the student's FSP
    matrix becomes ``W_i G_s^i W_{i+1}ᵀ``.

    Stages: the paper — and RepDistiller, with ``init_epochs = 30`` — trains the student on the
    FSP loss alone first, then on the task with no FSP term. Here :meth:`init_loss` (the
    unweighted FSP loss, logged as ``fsp_init``) runs for ``init_epochs`` (default 0), then
    :meth:`forward` adds ``beta ×`` the FSP loss (``fsp``) to the cross-entropy. ``beta = 50``
    is RepDistiller's β for FSP (their main stage actually adds no FSP term, so β is unused
    there); ``init_epochs=30 beta=0`` reproduces their two-stage schedule (their 30 init
    epochs come before the 240-epoch schedule, ours count inside ``trainer.max_epochs``).

    CIFAR-100 resnet32x4 → resnet8x4 top-1 (RepDistiller, two stages): 72.62.

    Config (``conf/distill/fsp.yaml``)::

        _target_: kdlab.strategies.flow.FSP
        beta: 50.0
        init_epochs: 0
        reduction: mean
        pool: avg
        student_layers: stages
        teacher_layers: stages

    Args:
        beta: weight of the FSP term in the main stage, ``>= 0``.
        init_epochs: epochs of the FSP-only pre-stage, an integer ``>= 0``.
        reduction: ``mean``, ``sum`` or ``column_norm`` (above).
        pool: ``avg`` or ``max``: how the larger of two consecutive maps is downsized.
        student_layers: student layers (paths or aliases: ``stages``, ``preact``).
        teacher_layers: teacher layers, paired with the student's as above.
    """

    def __init__(self, beta: float = 50.0, init_epochs: int = 0, reduction: str = "mean",
                 pool: str = "avg", student_layers: Layers = "stages",
                 teacher_layers: Layers = "stages") -> None:
        super().__init__()
        self.beta = check_number("beta", beta)
        if isinstance(init_epochs, bool) or int(init_epochs) != init_epochs or init_epochs < 0:
            raise KdlabError(f"distill.init_epochs={init_epochs} must be an integer >= 0")
        self.init_epochs = int(init_epochs)
        self.reduction = check_choice("reduction", reduction, FSP_REDUCTIONS)
        self.pool = check_choice("pool", pool, FSP_POOLS)
        self.student_layers = layers_arg(student_layers, "student_layers")
        self.teacher_layers = layers_arg(teacher_layers, "teacher_layers")
        self.connectors = nn.ModuleList()

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        s_feats, t_feats = self.student_features(student), self.teacher_features(teacher)
        check_maps("fsp", s_feats, t_feats, self.student_layers, self.teacher_layers, 2)
        self.connectors = nn.ModuleList(
            nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False) if s.shape[1] != t.shape[1]
            else nn.Identity()
            for s, t in pair_last(s_feats, t_feats)
        )

    def fsp(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        """The unweighted FSP loss of the paired layers (connectors applied)."""
        pairs = pair_last(self.student_features(student), self.teacher_features(teacher))
        s_feats = [connect(s) for connect, (s, _) in zip(self.connectors, pairs, strict=True)]
        return fsp_loss(s_feats, [t.detach() for _, t in pairs], self.pool, self.reduction)

    def init_loss(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return {"fsp_init": self.fsp(student, teacher)}

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return {"fsp": self.beta * self.fsp(student, teacher)}


# -- KDSVD ---------------------------------------------------------------------------------------
def left_singular(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The thin left singular vectors ``[N, m, r]`` and singular values ``[N, r]`` (descending,
    ``r = min(m, n)``) of a batch of matrices ``x`` (``[N, m, n]``), without gradient, from the
    eigen-decomposition of the smaller Gram matrix in float64, returned in ``x``'s dtype.

    For the small matrices KD-SVD decomposes (a batch of ``c × hw`` maps) this is 1.7 to 7
    times faster on the CPU than ``torch.linalg.svd``, which took 86 % of a KD-SVD training step
    (docs/BENCHMARKS.md); float64 keeps the top vectors more accurate than a float32 SVD
    despite the squared condition number (about 3e-8 against 1e-5 to 6e-5 for random maps).
    With ``m > n`` the left vectors are ``x v / σ``; those of (numerically) zero singular
    values, which the SVD leaves arbitrary, are returned as zero columns. Signs, like the
    SVD's, are arbitrary.
    """
    # float64 unless the device has none (MPS)
    x64 = x.detach().to(torch.float32 if x.device.type == "mps" else torch.float64)
    m, n = x.shape[-2:]
    tall = m > n
    gram = x64.transpose(-2, -1) @ x64 if tall else x64 @ x64.transpose(-2, -1)
    lam, vectors = torch.linalg.eigh(gram)
    lam, vectors = lam.flip(-1), vectors.flip(-1)  # descending
    sigma = lam.clamp_min(0).sqrt()
    if tall:  # right vectors v: the left ones are x v / σ
        valid = lam > torch.finfo(lam.dtype).eps * m * lam[..., :1]
        vectors = (x64 @ vectors) / torch.where(valid, sigma, 1.0).unsqueeze(-2)
        vectors = vectors * valid.unsqueeze(-2)
    return vectors.to(x.dtype), sigma.to(x.dtype)


class _TopSingular(torch.autograd.Function):
    """The top-``k`` left singular vectors and singular values of a batch of matrices
    ``[N, m, n]``, via :func:`left_singular`, with a backward through the vectors that involves
    only the top ``k`` (the singular values get no gradient).

    ``torch.linalg.svd``'s own backward divides by ``σ_i² − σ_j²`` for *every* pair, so two
    equal discarded singular values (e.g. exact zeros from dead ReLU channels) make the whole
    gradient NaN although the top vectors are well defined. With ``A = X Xᵀ``, ``λ = σ²``:
    ``du_i = Σ_{j≠i} u_j (u_jᵀ dA u_i) / (λ_i − λ_j) + (I − U Uᵀ) dA u_i / λ_i`` for ``i < k``
    (``U`` thin), hence ``∂L/∂A = M = W U_kᵀ`` with
    ``w_i = Σ_{j≠i} u_j (u_jᵀ g_i) / (λ_i − λ_j) + (I − U Uᵀ) g_i / λ_i``, and
    ``∂L/∂X = (M + Mᵀ) X``. Pairs with (numerically) equal ``λ`` — a truly ambiguous top
    vector — contribute nothing (the paper's authors crop such terms too). A zero column of
    ``U`` (a zero singular value with ``m > n``, see :func:`left_singular`) adds nothing to the
    sum and leaves its direction to ``(I − U Uᵀ)``, so the gradient is the one any orthonormal
    completion would give.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        u, s = left_singular(x)
        ctx.save_for_backward(x, u, s)
        ctx.k = k
        s_k = s[..., :k].clone()
        ctx.mark_non_differentiable(s_k)
        return u[..., :k].clone(), s_k

    @staticmethod
    def backward(ctx: Any, grad_u: torch.Tensor, grad_s: torch.Tensor) -> tuple[Any, None]:
        x, u, s = ctx.saved_tensors
        k = ctx.k
        lam = s.pow(2)  # [N, r]
        tol = (torch.finfo(lam.dtype).eps * max(x.shape[-2:]) * lam[..., :1]).unsqueeze(-1)
        diff = lam[..., None, :k] - lam[..., :, None]  # [N, r, k]: λ_i − λ_j at (j, i)
        keep = diff.abs() > tol
        inv_diff = torch.where(keep, 1.0 / torch.where(keep, diff, torch.ones_like(diff)), 0.0)
        coeff = u.transpose(-2, -1) @ grad_u  # [N, r, k]: u_jᵀ g_i
        lam_k = lam[..., None, :k]  # [N, 1, k]
        keep_k = lam_k > tol
        inv_lam = torch.where(keep_k, 1.0 / torch.where(keep_k, lam_k, torch.ones_like(lam_k)),
                              0.0)
        w = u @ (inv_diff * coeff) + (grad_u - u @ coeff) * inv_lam  # [N, m, k]
        u_k = u[..., :k]
        # (W U_kᵀ + U_k Wᵀ) X without forming the m × m matrix
        grad_x = w @ (u_k.transpose(-2, -1) @ x) + u_k @ (w.transpose(-2, -1) @ x)
        return grad_x, None


def top_singular(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` left singular vectors ``[N, m, k]`` and singular values ``[N, k]`` of
    ``x`` (``[N, m, n]``); see :class:`_TopSingular` for the gradient."""
    return _TopSingular.apply(x, k)


def _sign(x: torch.Tensor) -> torch.Tensor:
    """``±1`` (``+1`` at zero), without gradient."""
    return torch.where(x.detach() >= 0, 1.0, -1.0).to(x.dtype)


def rbf_correlation(front: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """``exp(−(front[n, i, q] − back[n, j, q])² / 8)``: ``[N, m_front, m_back, k]``."""
    return torch.exp(-(front.unsqueeze(2) - back.unsqueeze(1)).pow(2) / 8)


class KDSVD(Strategy):
    """Self-supervised KD with singular value decomposition — Lee, Kim & Song,
    "Self-supervised Knowledge Distillation Using Singular Value Decomposition", ECCV 2018
    (arXiv:1807.06819).

    Per layer and sample, the map is reshaped to ``X ∈ R^{hw × c}`` and compressed by truncated
    SVD to its top-``k`` singular vectors; after sign alignment and weighting by the teacher's
    normalised singular values they form the distilled feature vectors ``D`` (``[d, k]``).
    Consecutive layers ``l, l+1`` are related by a Gaussian RBF,
    ``G^l_{ijq} = exp(−(D^l_{iq} − D^{l+1}_{jq})² / 8)``, and
    ``loss = beta · Σ_l mean_batch Σ_{ijq} (G^l_s − G^l_t)²``

    As in the paper, its authors' code (sseung0703/SSKD_SVD) and RepDistiller: the teacher's
    top-``k`` singular values are L2-normalised and multiply both networks' vectors (with
    ``k = 1`` the factor is 1); each teacher vector is matched with the student vector of
    largest ``|cos|`` among the student's top ``k + extra`` (``extra = 1`` in the authors' code,
    3 in RepDistiller, 0: the top ``k`` in order), whose sign is flipped where the cosine is
    negative. We fix the teacher's own signs (entries summing to ``>= 0``; the authors leave
    them to the SVD routine) so the teacher's ``G`` does not depend on it. The RBF compares
    entries of the front and the back layers' vectors pairwise, per index ``q``, so the two
    layers' vector lengths may differ.

    Normalisation: like RepDistiller (``β = 1``, ``k = 1``) we sum over the entries and average
    over the batch; the authors' ``tf.nn.l2_loss(·)·√k`` sums over the batch and halves:
    theirs ``= (N · √k / 2) ×`` ours for a batch of ``N``.

    Which singular vectors (``space``): ``channel`` (default) is the paper's: the right
    singular vectors of ``X`` — one entry per *channel* — so a student/teacher pair must have
    equal widths; where they differ (not in the paper's or RepDistiller's pairs), a bias-free
    1×1 convolution (a connector, trained with the student — a kdlab deviation, as in
    :class:`FSP`) maps the student layer to the teacher's width. ``space: spatial`` (kdlab's
    variant) uses the left singular vectors — one entry per *position*, the principal spatial
    patterns — so widths may differ without a connector; then the larger map of a pair is
    adaptive-average-pooled to the smaller. The ``G`` of two spatial layers has
    ``h_l w_l × h_{l+1} w_{l+1}`` entries per sample: mind memory on large maps.

    Gradients reach the student through the SVD with a backward that involves the top
    ``k + extra`` only (see :class:`_TopSingular`). Layers: as in :class:`FSP` (last
    ``min(len)`` paired, at least two pairs).

    CIFAR-100 resnet32x4 → resnet8x4 top-1 (RepDistiller's benchmark does not list KDSVD).

    Config (``conf/distill/kdsvd.yaml``)::

        _target_: kdlab.strategies.flow.KDSVD
        beta: 1.0
        k: 1
        extra: 1
        space: channel
        student_layers: stages
        teacher_layers: stages

    Args:
        beta: weight of the KDSVD term, ``>= 0``.
        k: number of singular vectors kept per layer, an integer ``>= 1`` (at most the rank
            bound ``min(h·w, c)`` of every tapped layer).
        extra: how many more of the student's singular vectors each teacher vector may be
            matched with, an integer ``>= 0`` (capped by the rank bound); 0 pairs the top
            ``k`` in order.
        space: ``channel`` (right singular vectors, the paper's) or ``spatial`` (left).
        student_layers: student layers (paths or aliases: ``stages``, ``preact``).
        teacher_layers: teacher layers, paired with the student's as above.
    """

    SPACES = ("channel", "spatial")

    def __init__(self, beta: float = 1.0, k: int = 1, extra: int = 1, space: str = "channel",
                 student_layers: Layers = "stages", teacher_layers: Layers = "stages") -> None:
        super().__init__()
        self.beta = check_number("beta", beta)
        if isinstance(k, bool) or not isinstance(k, int | float) or int(k) != k or k < 1:
            raise KdlabError(f"distill.k={k} must be an integer >= 1")
        if (isinstance(extra, bool) or not isinstance(extra, int | float) or int(extra) != extra
                or extra < 0):
            raise KdlabError(f"distill.extra={extra} must be an integer >= 0")
        self.k, self.extra = int(k), int(extra)
        self.space = check_choice("space", space, self.SPACES)
        self.student_layers = layers_arg(student_layers, "student_layers")
        self.teacher_layers = layers_arg(teacher_layers, "teacher_layers")
        self.connectors = nn.ModuleList()

    def _matrices(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per pair, the student's and the teacher's matrices whose *left* singular vectors are
        compared: ``[N, c, hw]`` (channel) or ``[N, hw, c]`` (spatial, at the pair's common
        size)."""
        out = []
        for s, t in pairs:
            if self.space == "spatial":
                size = common_size(s, t)
                s, t = pool_to(s, size), pool_to(t, size)
                out.append((s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)))
            else:
                out.append((s.flatten(2), t.flatten(2)))
        return out

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        s_feats, t_feats = self.student_features(student), self.teacher_features(teacher)
        check_maps("kdsvd", s_feats, t_feats, self.student_layers, self.teacher_layers, 2)
        if self.space == "channel":
            self.connectors = nn.ModuleList(
                nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False) if s.shape[1] != t.shape[1]
                else nn.Identity() for s, t in pair_last(s_feats, t_feats))
        for s, t in pair_last(s_feats, t_feats):
            if self.space == "channel":  # [c_t, h·w] each (the student after its connector)
                rank = min(t.shape[1], s.shape[2] * s.shape[3], t.shape[2] * t.shape[3])
            else:  # [h·w at the common size, c] each
                h, w = common_size(s, t)
                rank = min(h * w, s.shape[1], t.shape[1])
            if self.k > rank:
                raise KdlabError(f"distill.k={self.k} must be <= {rank}, the rank bound "
                                 "min(h·w, c) of a tapped layer pair")

    def _pairs(self, student: Outputs, teacher: Outputs) -> list[tuple[torch.Tensor, ...]]:
        pairs = pair_last(self.student_features(student), self.teacher_features(teacher))
        if self.space == "channel":
            pairs = [(connect(s), t) for connect, (s, t) in zip(self.connectors, pairs,
                                                                  strict=True)]
        return pairs

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        terms = []
        previous: tuple[torch.Tensor, torch.Tensor] | None = None
        for s, t in self._matrices(self._pairs(student, teacher)):
            candidates = max(self.k, min(self.k + self.extra, *s.shape[1:]))
            u_s, _ = top_singular(s.float(), candidates)
            with torch.no_grad():
                u_t, sigma_t = top_singular(t.detach().float(), self.k)
                u_t = u_t * _sign(u_t.sum(dim=1, keepdim=True))
                weight = F.normalize(sigma_t, dim=-1).unsqueeze(1)  # [N, 1, k]
                cosine = u_s.detach().transpose(1, 2) @ u_t  # [N, candidates, k]
                if self.extra:  # the most similar of the candidates
                    best = cosine.abs().argmax(dim=1, keepdim=True)  # [N, 1, k]
                else:  # in order
                    best = torch.arange(self.k, device=u_s.device).expand(u_s.shape[0], 1, -1)
                sign = _sign(cosine.gather(1, best))  # [N, 1, k]
            u_s = u_s.gather(2, best.expand(-1, u_s.shape[1], -1)) * sign
            d_s, d_t = u_s * weight, u_t * weight
            if previous is not None:
                g_s = rbf_correlation(previous[0], d_s)
                g_t = rbf_correlation(previous[1], d_t)
                terms.append((g_s - g_t).pow(2).sum() / s.shape[0])
            previous = d_s, d_t
        return {"kdsvd": self.beta * torch.stack(terms).sum()}
