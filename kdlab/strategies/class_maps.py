"""Class-map methods: each network's linear classifier applied position by position to its last
feature map (CAT-KD), or to that map pooled over regions (SDD).

Both read, on each side, the module that outputs the final spatial map and the ``nn.Linear``
classifier that turns its global average (or, for kdlab's ``CNN`` with ``hidden=0``, its
flattening) into the logits; :func:`kdlab.models.head.final_head` finds them for every kdlab
model, the torchvision/timm wrappers included. No option names layers. The student's maps use
the student's own classifier, which therefore receives gradients from the distillation term;
the teacher's side is computed without gradients. At set-up both heads are checked on the
probe batch: the class maps must reproduce the logits (``mean_{h,w} M + b = logits``).

A model whose classifier sits behind a hidden layer (``CNN`` with ``hidden > 0``, ``MLP``)
fails with a message saying what to set (``student.model.hidden=0`` / ``teacher.model.hidden=0``
for the CNN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.data.memory import UNLABELLED
from kdlab.models.head import Head, final_head
from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import check_number
from kdlab.util.errors import KdlabError


class _ClassMapStrategy(Strategy):
    """Plumbing: both networks' heads found in :meth:`resolve`, their final maps tapped, the
    heads checked against the logits of the probe batch in :meth:`setup`.

    The heads are kept in a plain dict, not as submodules: the classifiers belong to the
    networks (no duplicate parameters in the optimizer or the checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: dict[str, Head] = {}

    def resolve(self, student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
        self.heads = {"student": final_head(student, "student"),
                      "teacher": final_head(teacher, "teacher")}
        self.student_paths = [self.heads["student"].feature_path]
        self.teacher_paths = [self.heads["teacher"].feature_path]
        return self.student_paths, self.teacher_paths

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        s, t = self.head("student"), self.head("teacher")
        if s.classifier.out_features != t.classifier.out_features:
            raise KdlabError(f"{type(self).__name__}: the student has "
                             f"{s.classifier.out_features} classes, the teacher "
                             f"{t.classifier.out_features}")
        for role, head, outputs in (("student", s, student), ("teacher", t, teacher)):
            if outputs.logits.dim() == 2 and head.feature_path in outputs.features:
                head.check(outputs.features[head.feature_path], outputs.logits, role)

    def head(self, role: str) -> Head:
        if role not in self.heads:
            raise RuntimeError(f"{type(self).__name__}.resolve(student, teacher) was not called")
        return self.heads[role]

    def final_maps(self, student: Outputs, teacher: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's final map and the teacher's (detached)."""
        return (student.features[self.head("student").feature_path],
                teacher.features[self.head("teacher").feature_path].detach())


# -- CAT-KD ------------------------------------------------------------------------------------
class CATKD(_ClassMapStrategy):
    """Class attention transfer — Guo, Yan, Li & Lin, "Class Attention Transfer Based
    Knowledge Distillation", CVPR 2023 (arXiv:2304.12777).

    Each network's class activation maps ``M = W · F(h, w)`` (its classifier's weights applied
    at every position of its final map ``F``, no bias) are average-pooled to ``r × r``
    (``P_r``), optionally L2-normalised over the ``r × r`` positions of each map (``ν``), and
    matched:

    ``loss = beta · mean_{n,k,i,j} (ν(P_r(M_S)) − ν(P_r(M_T)))² + ce_weight · CE``

    The mean runs over the batch, the ``K`` classes and the ``r²`` cells. The student's maps
    use the student's own classifier, which is trained by this term too. CAT-KD adds no
    logit-KD term: its objective is CE + CAT. Published: 76.91% top-1 for resnet32x4 →
    resnet8x4 on CIFAR-100.

    Defaults are the authors' CIFAR-100 resnet32x4 → resnet8x4 setting
    (GzyAftermath/CAT-KD, ``configs/cifar100/CAT_KD/res32x4_res8x4.yaml``: ``CAT_loss_weight
    15``, ``CAM_RESOLUTION 2``, ``IF_NORMALIZE False``, ``CE_WEIGHT 1``). Their weight is
    tuned per pair (0.7 for resnet56 → resnet20, 4.5 for vgg13 → vgg8; 600 with
    normalisation and ``r = 4`` for resnet32x4 → ShuffleNetV1); the README asks to keep the
    CAT loss at roughly 1–50 after the first epoch.

    Where kdlab departs from the authors' code:

    * the authors replace the classifier by a bias-free 1×1 convolution applied *before* the
      global pooling (``*_test`` models; the teacher's ``fc.weight`` is copied into it and its
      bias dropped). Here the models keep their ``nn.Linear`` (bias included in the logits);
      the maps use its weight without the bias, as the authors' teacher does. The logits are
      the same function of the map up to the student's bias, which the authors' student lacks;
    * for kdlab's ``CNN`` with ``hidden=0`` (a classifier on the flattened map) the map is
      each position's exact contribution to the logits times ``H·W`` (see
      :mod:`kdlab.models.head`), a kdlab extension;
    * the authors' ablation options (binarised maps, transferring only some classes' maps)
      are not implemented.

    Config (``conf/distill/catkd.yaml``)::

        _target_: kdlab.strategies.class_maps.CATKD
        beta: 15.0
        resolution: 2
        normalize: false
        ce_weight: 1.0

    Args:
        beta: weight of the CAT term, ``>= 0``.
        resolution: side ``r`` of the pooled maps, an integer ``>= 1``.
        normalize: L2-normalise each pooled map over its ``r²`` cells before matching.
        ce_weight: weight of the cross-entropy on the labels, ``>= 0``.
    """

    def __init__(self, beta: float = 15.0, resolution: int = 2, normalize: bool = False,
                 ce_weight: float = 1.0) -> None:
        super().__init__()
        self.beta = check_number("beta", beta)
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise KdlabError(f"distill.resolution={resolution} must be an integer >= 1 (the "
                             f"side of the pooled class maps)")
        self.resolution = resolution
        if not isinstance(normalize, bool):
            raise KdlabError(f"distill.normalize={normalize} must be true or false")
        self.normalize = normalize
        self.ce_weight = check_number("ce_weight", ce_weight)

    def pooled_maps(self, head: Head, features: torch.Tensor) -> torch.Tensor:
        """``ν(P_r(M))`` ``(N, K, r, r)`` for one network."""
        maps = F.adaptive_avg_pool2d(head.class_maps(features), self.resolution)
        return F.normalize(maps, dim=(2, 3)) if self.normalize else maps

    def cat_loss(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        """``mean (ν(P_r(M_S)) − ν(P_r(M_T)))²``, unweighted."""
        s_map, t_map = self.final_maps(student, teacher)
        with torch.no_grad():
            t = self.pooled_maps(self.head("teacher"), t_map)
        s = self.pooled_maps(self.head("student"), s_map)
        return F.mse_loss(s, t.to(s.dtype))

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return {"cat": self.beta * self.cat_loss(student, teacher)}


# -- SDD ---------------------------------------------------------------------------------------
def kd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per row, ``(R,)``."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1) * temperature**2


def dkd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             temperature: float, alpha: float, beta: float) -> torch.Tensor:
    """DKD per row, ``T² · (alpha · TCKD + beta · NCKD)``, ``(R,)``: TCKD the KL between the
    binary ``[p_target, 1 − p_target]`` distributions, NCKD the KL between the distributions
    renormalised over the non-target classes (Zhao et al., CVPR 2022)."""
    rows, classes = student_logits.shape
    if classes < 2:
        raise KdlabError(f"distill.base=dkd needs at least 2 classes, got {classes}")
    is_target = F.one_hot(target, classes).bool()

    def binary(logits: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits / temperature, dim=1)
        rest = log_p.masked_fill(is_target, float("-inf")).logsumexp(dim=1)
        return torch.stack([log_p[is_target], rest], dim=1)

    def non_target(logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits[~is_target].view(rows, classes - 1) / temperature, dim=1)

    def kl(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
        return (log_t.exp() * (log_t - log_s)).sum(dim=1)

    s, t = student_logits, teacher_logits
    tckd = kl(binary(t), binary(s))
    nckd = kl(non_target(t), non_target(s))
    return (alpha * tckd + beta * nckd) * temperature**2


class SDD(_ClassMapStrategy):
    """Scale decoupled distillation — Wei, Luo & Luo, "Scale Decoupled Distillation",
    CVPR 2024 (arXiv:2403.13512).

    Each network's classifier is applied to its final map average-pooled over the cells of
    ``s × s`` grids, for every scale ``s`` in ``scales`` (``1``: the whole map, i.e. the
    logits): region logits ``z_{n,r} = W · mean_{cell r}(F_n) + b``, ``R = Σ s²`` regions per
    image. A logit loss ``ℓ`` (KD or DKD) is applied to every (image, region) pair. A pair is
    *complementary* when the teacher's region prediction is right and its global prediction
    wrong, or the reverse (``[argmax z^T_{n,r} = y_n] ≠ [argmax z^T_{n,global} = y_n]``), and
    *consistent* otherwise; complementary pairs weigh ``complementary`` (β):

    ``L_SDD = (1 / (N·R)) · (Σ_consistent ℓ_{n,r} + β · Σ_complementary ℓ_{n,r})``
    ``loss = weight · w(e) · L_SDD + ce_weight · CE``

    with ``ℓ = T² · KL(p^T ‖ p^S)`` (``base: kd``, SD-KD) or DKD's ``T² · (dkd_alpha · TCKD +
    dkd_beta · NCKD)`` (``base: dkd``, SD-DKD), and ``w(e) = min((e + 1) / warmup, 1)`` (``e``
    the 0-based epoch; ``warmup: 0`` disables it). ``y_n`` is the label; for an unlabelled
    transfer-set image it is the teacher's global prediction (then a region is complementary
    exactly when the teacher's region prediction differs from its global one). Returns the
    terms ``sdd_con`` and ``sdd_com`` (the two sums, already weighted; their sum is the loss).

    Defaults are the authors' (shicaiwei123/SDD-CVPR2024): ``mdistiller/distillers/KD.py``
    (``sdd_kd_loss``: per-region ``T² · KL``, weights 1 and 2, mean over the ``N·R`` pairs)
    and ``SDD_DKD.py`` (``multi_dkd``), the SPP pooling of ``mdistiller/models/cifar/utils.py``
    (region logits = the classifier, bias included, on the pooled map), and their CIFAR-100
    scripts (``teacher_resnet32x4.sh``: resnet32x4 → resnet8x4 trained with ``M=[1,2]``, the
    heterogeneous pairs with ``[1,2,4]``; ``train_origin.py``: ``warmup 20``, which only SD-DKD
    uses). The loss weights are mdistiller's, which the SDD code reads: SD-KD ``KD_WEIGHT 0.9``,
    ``CE_WEIGHT 0.1``, ``T = 4``; SD-DKD ``CE_WEIGHT 1``, ``ALPHA 1``, ``BETA 8``, ``T = 4``
    (``weight``, ``ce_weight`` and ``warmup`` left null take the chosen base's values).
    Published: SD-KD with ``M = {1, 2}`` on CIFAR-100 resnet32x4 → resnet8x4, 76.63 % top-1
    (the paper's Tables 6 and 7; KD 73.33); the notes in the authors' ``teacher_resnet32x4.sh``
    give 75.59 and 75.31 for single runs of it. The paper's text states a 30-epoch linear
    warm-up "for all experiments"; the released code applies one (20 epochs) to SD-DKD only,
    which kdlab follows (``warmup: 30`` gives the text's setting).

    Where kdlab departs from the authors' code:

    * regions are ``adaptive_avg_pool2d(F, s)`` for each scale; the authors pool to 4×4 first
      and then to 2×2 and 1×1 from it — the same regions when the map's side is a multiple of 4
      (resnet8x4's 8×8), not otherwise;
    * KL and DKD are computed in log space (the authors' SD-KD zeroes NaN entries, their DKD
      masks with ``−1000``); the results agree where theirs are finite;
    * unlabelled images (no label in the authors' setting) use the teacher's global prediction;
    * for kdlab's ``CNN`` with ``hidden=0`` (a classifier on the flattened map) a region's
      logits are ``b +`` the mean over its cells of the class map of :mod:`kdlab.models.head`
      (``H·W`` times each position's contribution), a kdlab extension; the scale-1 region still
      gives the logits.

    Config (``conf/distill/sdd.yaml``)::

        _target_: kdlab.strategies.class_maps.SDD
        base: kd
        scales: [1, 2]
        temperature: 4.0
        complementary: 2.0
        weight: null          # kd: 0.9, dkd: 1.0
        ce_weight: null       # kd: 0.1, dkd: 1.0
        warmup: null          # kd: 0, dkd: 20
        dkd_alpha: 1.0
        dkd_beta: 8.0

    Args:
        base: the per-region loss, ``"kd"`` (SD-KD) or ``"dkd"`` (SD-DKD).
        scales: grid sides ``s >= 1`` of the regions, distinct (``1``: the global region).
        temperature: softmax temperature ``T > 0``.
        complementary: weight β of the complementary regions, ``>= 0`` (consistent: 1).
        weight: weight of ``L_SDD``, ``>= 0``; ``None``: 0.9 for kd, 1.0 for dkd.
        ce_weight: weight of the cross-entropy, ``>= 0``; ``None``: 0.1 for kd, 1.0 for dkd.
        warmup: epochs of linear warm-up, ``>= 0``; ``None``: 0 for kd, 20 for dkd.
        dkd_alpha: DKD's TCKD weight (``base: dkd``), ``>= 0``.
        dkd_beta: DKD's NCKD weight (``base: dkd``), ``>= 0``.
    """

    #: per base: (weight, ce_weight, warmup) where left null
    BASES = {"kd": (0.9, 0.1, 0), "dkd": (1.0, 1.0, 20)}

    def __init__(self, base: str = "kd", scales: Sequence[int] = (1, 2),
                 temperature: float = 4.0, complementary: float = 2.0,
                 weight: float | None = None, ce_weight: float | None = None,
                 warmup: int | None = None, dkd_alpha: float = 1.0,
                 dkd_beta: float = 8.0) -> None:
        super().__init__()
        if base not in self.BASES:
            raise KdlabError(f"distill.base={base!r} must be one of {', '.join(self.BASES)}")
        self.base = base
        default_weight, default_ce, default_warmup = self.BASES[base]
        if isinstance(scales, int | str) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in scales):
            raise KdlabError(f"distill.scales={scales} must be a list of integers >= 1 (grid "
                             f"sides of the regions, e.g. [1, 2, 4])")
        self.scales = [int(s) for s in scales]
        if not self.scales or len(set(self.scales)) != len(self.scales):
            raise KdlabError(f"distill.scales={scales} must list distinct grid sides, at least one")
        self.temperature = check_number("temperature", temperature, "> 0")
        self.complementary = check_number("complementary", complementary)
        self.weight = check_number("weight", default_weight if weight is None else weight)
        self.ce_weight = check_number("ce_weight", default_ce if ce_weight is None else ce_weight)
        warmup = default_warmup if warmup is None else warmup
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise KdlabError(f"distill.warmup={warmup} must be an integer >= 0 (epochs)")
        self.warmup = warmup
        self.dkd_alpha = check_number("dkd_alpha", dkd_alpha)
        self.dkd_beta = check_number("dkd_beta", dkd_beta)

    def warmup_factor(self) -> float:
        """``min((epoch + 1) / warmup, 1)``, or 1 without warm-up."""
        return 1.0 if self.warmup == 0 else min((self.epoch + 1) / self.warmup, 1.0)

    def region_logits(self, head: Head, features: torch.Tensor) -> torch.Tensor:
        """``(N, R, K)``: the regions of every scale, in the order of :attr:`scales`, each grid
        row-major."""
        return torch.cat([head.region_logits(features, s).flatten(2) for s in self.scales],
                         dim=2).transpose(1, 2)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        s_map, t_map = self.final_maps(student, teacher)
        t_head = self.head("teacher")
        with torch.no_grad():
            t_regions = self.region_logits(t_head, t_map)
            t_global = t_head.region_logits(t_map, 1).flatten(1).argmax(dim=1)
        s_regions = self.region_logits(self.head("student"), s_map)
        n, r, k = s_regions.shape
        target = torch.where(batch.targets != UNLABELLED, batch.targets, t_global)
        right = t_regions.argmax(dim=2) == target[:, None]
        complementary = right != (t_global == target)[:, None]
        s_rows, t_rows = s_regions.reshape(n * r, k), t_regions.reshape(n * r, k).to(s_regions)
        if self.base == "kd":
            losses = kd_rows(s_rows, t_rows, self.temperature)
        else:
            losses = dkd_rows(s_rows, t_rows, target.repeat_interleave(r), self.temperature,
                              self.dkd_alpha, self.dkd_beta)
        losses = losses.view(n, r)
        scale = self.weight * self.warmup_factor() / (n * r)
        return {"sdd_con": scale * losses[~complementary].sum(),
                "sdd_com": scale * self.complementary * losses[complementary].sum()}
