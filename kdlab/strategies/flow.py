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
from kdlab.strategies.checks import Layers, check_number, layers_arg
from kdlab.util.errors import KdlabError


# -- FSP -----------------------------------------------------------------------------------------
def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The "flow of solution procedure" matrix ``G = F₁ᵀ F₂ / (h·w)`` of two ``[N, C, H, W]``
    maps: ``[N, C₁, C₂]``. The larger map is average-pooled to the smaller's spatial size."""
    size = common_size(first, second)
    a = pool_to(first, size).flatten(2)  # [N, C1, hw]
    b = pool_to(second, size).flatten(2)  # [N, C2, hw]
    return a @ b.transpose(1, 2) / (size[0] * size[1])


def fsp_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_i mean (G_s^i − G_t^i)²`` over the FSP matrices of consecutive layers ``(i, i+1)``
    of two equally long lists of maps whose channel counts match layer by layer."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student maps but {len(teacher)} teacher maps")
    return sum(
        (fsp_matrix(student[i], student[i + 1]) - fsp_matrix(teacher[i], teacher[i + 1]))
        .pow(2).mean()
        for i in range(len(student) - 1)
    )


class FSP(Strategy):
    """Flow of solution procedure — Yim, Joo, Bae & Kim, "A Gift from Knowledge
    Distillation: Fast Optimization, Network Minimization and Transfer Learning", CVPR 2017.

    ``G^i = F_iᵀ F_{i+1} / (h·w)`` (``[C_i, C_{i+1}]``) for consecutive tapped layers;
    ``loss = beta · Σ_i mean (G_s^i − G_t^i)²``

    The paper sums the squared entries (``‖G_t − G_s‖²₂``); like RepDistiller (Tian et al.,
    ICLR 2020) we average them. Within one network, the larger of two consecutive maps is
    adaptive-average-pooled to the smaller's spatial size (the FSP matrix itself does not
    depend on it, so student and teacher sizes need not match).

    Reads the maps of ``student_layers`` / ``teacher_layers`` (default: every stage output;
    if the counts differ, the last ``min(len)`` of each are paired, and at least two pairs are
    needed). **Deviation:** the paper requires equal channel counts; where a student layer's
    channels differ from its teacher partner's, a bias-free 1×1 convolution (a connector,
    trained with the student) maps the student layer to the teacher's width first, so the
    student's FSP matrix becomes ``W_i G_s^i W_{i+1}ᵀ``.

    Stages: the paper — and RepDistiller, with ``init_epochs = 30`` — trains the student on the
    FSP loss alone first, then on the task with no FSP term. Here :meth:`init_loss` (the
    unweighted FSP loss, logged as ``fsp_init``) runs for ``init_epochs`` (default 0), then
    :meth:`forward` adds ``beta ×`` the FSP loss (``fsp``) to the cross-entropy. ``beta = 50``
    is RepDistiller's β for FSP (their main stage actually adds no FSP term, so β is unused
    there); ``init_epochs=30 beta=0`` reproduces their two-stage schedule.

    Config (``conf/distill/fsp.yaml``)::

        _target_: kdlab.strategies.flow.FSP
        beta: 50.0
        init_epochs: 0
        student_layers: stages
        teacher_layers: stages

    Args:
        beta: weight of the FSP term in the main stage, ``>= 0``.
        init_epochs: epochs of the FSP-only pre-stage, an integer ``>= 0``.
        student_layers: student layers (paths or aliases: ``stages``, ``preact``).
        teacher_layers: teacher layers, paired with the student's as above.
    """

    def __init__(self, beta: float = 50.0, init_epochs: int = 0,
                 student_layers: Layers = "stages", teacher_layers: Layers = "stages") -> None:
        super().__init__()
        self.beta = check_number("beta", beta)
        if isinstance(init_epochs, bool) or int(init_epochs) != init_epochs or init_epochs < 0:
            raise KdlabError(f"distill.init_epochs={init_epochs} must be an integer >= 0")
        self.init_epochs = int(init_epochs)
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
        return fsp_loss(s_feats, [t.detach() for _, t in pairs])

    def init_loss(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return {"fsp_init": self.fsp(student, teacher)}

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return {"fsp": self.beta * self.fsp(student, teacher)}


# -- KDSVD ---------------------------------------------------------------------------------------
class _TopSingular(torch.autograd.Function):
    """The top-``k`` left singular vectors and singular values of a batch of matrices
    ``[N, m, n]``, via ``torch.linalg.svd``, with a backward through the vectors that involves
    only the top ``k`` (the singular values get no gradient).

    ``torch.linalg.svd``'s own backward divides by ``σ_i² − σ_j²`` for *every* pair, so two
    equal discarded singular values (e.g. exact zeros from dead ReLU channels) make the whole
    gradient NaN although the top vectors are well defined. With ``A = X Xᵀ``, ``λ = σ²``:
    ``du_i = Σ_{j≠i} u_j (u_jᵀ dA u_i) / (λ_i − λ_j) + (I − U Uᵀ) dA u_i / λ_i`` for ``i < k``
    (``U`` thin), hence ``∂L/∂A = M = W U_kᵀ`` with
    ``w_i = Σ_{j≠i} u_j (u_jᵀ g_i) / (λ_i − λ_j) + (I − U Uᵀ) g_i / λ_i``, and
    ``∂L/∂X = (M + Mᵀ) X``. Pairs with (numerically) equal ``λ`` — a truly ambiguous top
    vector — contribute nothing (the paper's authors crop such terms too).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
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

    Our reading of the paper (and its authors' code): the teacher's singular values ``σ_t``
    of the top ``k`` are L2-normalised and multiply both networks' vectors (so the dominant
    directions weigh most; with ``k = 1`` the factor is 1); the student's vectors are
    sign-aligned to the teacher's (flipped where their dot product is negative) — we also fix
    the teacher's own signs (entries summing to ``>= 0``) so the teacher's ``G`` does not depend
    on the SVD routine; the RBF compares entries of the front and the back layers' vectors
    pairwise, per singular index ``q``, so the two layers' vector lengths may differ. The
    authors additionally re-match each teacher vector with the most similar of the student's
    top ``k + 1``; we compare the top ``k`` in order. Their loss is ``½ √k Σ`` over the batch;
    like RepDistiller (Tian et al., ICLR 2020, ``β = 1``, ``k = 1``) we sum over the entries
    and average over the batch.

    Which singular vectors (``space``): the paper uses the right singular vectors of
    ``X`` — one entry per *channel* — which needs equal channel counts per student/teacher
    pair. kdlab's default ``space: spatial`` uses the left singular vectors — one entry per
    *position*, the principal spatial patterns — so student and teacher may differ in width;
    then only the spatial sizes of a pair must match, and the larger map is adaptive-average-
    pooled to the smaller. ``space: channel`` is the paper's variant (any spatial sizes; equal
    channels per pair, checked in :meth:`setup`). The ``G`` of two spatial layers has
    ``h_l w_l × h_{l+1} w_{l+1}`` entries per sample: mind memory on large maps.

    Gradients reach the student through the SVD with a backward that involves the top ``k``
    only (see :class:`_TopSingular`). Layers: as in :class:`FSP` (last ``min(len)`` paired, at
    least two pairs). No parameters.

    Config (``conf/distill/kdsvd.yaml``)::

        _target_: kdlab.strategies.flow.KDSVD
        beta: 1.0
        k: 1
        space: spatial
        student_layers: stages
        teacher_layers: stages

    Args:
        beta: weight of the KDSVD term, ``>= 0``.
        k: number of singular vectors kept per layer, an integer ``>= 1`` (at most the rank
            bound ``min(h·w, c)`` of every tapped layer).
        space: ``spatial`` (left singular vectors) or ``channel`` (right, as in the paper).
        student_layers: student layers (paths or aliases: ``stages``, ``preact``).
        teacher_layers: teacher layers, paired with the student's as above.
    """

    SPACES = ("spatial", "channel")

    def __init__(self, beta: float = 1.0, k: int = 1, space: str = "spatial",
                 student_layers: Layers = "stages", teacher_layers: Layers = "stages") -> None:
        super().__init__()
        self.beta = check_number("beta", beta)
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise KdlabError(f"distill.k={k} must be an integer >= 1")
        if space not in self.SPACES:
            raise KdlabError(f"distill.space={space} must be one of {', '.join(self.SPACES)}")
        self.k, self.space = int(k), str(space)
        self.student_layers = layers_arg(student_layers, "student_layers")
        self.teacher_layers = layers_arg(teacher_layers, "teacher_layers")

    def _matrices(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per pair, the student's and the teacher's matrices whose *left* singular vectors are
        compared: ``[N, hw, c]`` (spatial, at the pair's common size) or ``[N, c, hw]``."""
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
        for s, t in self._matrices(pair_last(s_feats, t_feats)):
            if s.shape[1] != t.shape[1]:
                raise KdlabError(
                    f"distill.space={self.space}: paired student/teacher layers have "
                    f"{s.shape[1]} and {t.shape[1]} channels; the channel variant needs equal "
                    "widths (use space=spatial, or tap layers of equal width)")
            rank = min(*s.shape[1:], *t.shape[1:])
            if self.k > rank:
                raise KdlabError(f"distill.k={self.k} must be <= {rank}, the rank bound "
                                 "min(h·w, c) of a tapped layer pair")

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        pairs = pair_last(self.student_features(student), self.teacher_features(teacher))
        terms = []
        previous: tuple[torch.Tensor, torch.Tensor] | None = None
        for s, t in self._matrices(pairs):
            u_s, _ = top_singular(s.float(), self.k)
            with torch.no_grad():
                u_t, sigma_t = top_singular(t.detach().float(), self.k)
                u_t = u_t * _sign(u_t.sum(dim=1, keepdim=True))
                weight = F.normalize(sigma_t, dim=-1).unsqueeze(1)  # [N, 1, k]
            u_s = u_s * _sign((u_s * u_t).sum(dim=1, keepdim=True))
            d_s, d_t = u_s * weight, u_t * weight
            if previous is not None:
                g_s = rbf_correlation(previous[0], d_s)
                g_t = rbf_correlation(previous[1], d_t)
                terms.append((g_s - g_t).pow(2).sum() / s.shape[0])
            previous = d_s, d_t
        return {"kdsvd": self.beta * torch.stack(terms).sum()}
