"""DeiT's distillation through a distillation token (a ViT student with a second head)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import check_number
from kdlab.strategies.logits import soft_target_kl
from kdlab.util.errors import KdlabError

#: the alias of the distillation head's module in the student's ``taps()``
DISTILLATION = "distillation"


class DeiT(Strategy):
    """Distillation token — Touvron, Cord, Douze, Massa, Sablayrolles & Jégou, "Training
    data-efficient image transformers & distillation through attention", ICML 2021
    (arXiv:2012.12877).

    The student ViT carries a second learned token next to the cls token; its head
    (``head_dist``) learns from the teacher while the cls head learns from the labels:

    ``loss = (1 − alpha) · CE(z_cls, y) + alpha · L_dist(z_dist, teacher)``, with
    ``hard``: ``L_dist = CE(z_dist, argmax_c z_t)`` (the paper's default),
    ``soft``: ``L_dist = T² · Σ_{n,c} p_t log(p_t / p_s) / (N · K)``,
    ``p = softmax(z / T)``, ``K`` classes.

    At test time the student returns ``(z_cls + z_dist) / 2`` (the model's eval mode does it,
    :class:`kdlab.models.vit.ViT`). No engine change: in training the model returns ``z_cls``,
    which kdlab's cross-entropy reads (weighted ``1 − alpha``, on the labelled samples), and
    this strategy reads ``z_dist`` through the student's ``distillation`` tap. The distillation
    term covers every sample, labelled or not (the teacher labels the transfer set).

    Defaults are those of facebookresearch/deit (``main.py``: ``--distillation-alpha 0.5``,
    ``--distillation-tau 1.0``; README: ``--distillation-type hard``; ``losses.py``:
    ``DistillationLoss``). The soft KL there is summed and divided by ``N · K``
    (``outputs_kd.numel()``: PyTorch's legacy ``mean``; the authors kept it, deit issue #61) —
    ``1 / K`` times the per-sample KL that ``distill=kd`` uses. ``kl_reduction: batchmean``
    gives the per-sample KL instead (``K`` times larger). No CIFAR-100 resnet32x4→resnet8x4
    result is published (the method needs a ViT student); on ImageNet DeiT-Ti goes from 72.2%
    to 74.5% top-1 with hard distillation from a RegNetY-16GF (deit README).

    Where kdlab departs: DeiT's base criterion is label-smoothed / mixup soft-target CE under
    its augmentation recipe; here it is kdlab's CE on the labels. Under a teacher cache
    (``teacher_cache``) the hard targets are the argmax of the cached (float16) logits.

    Config (``conf/distill/deit.yaml``)::

        _target_: kdlab.strategies.deit.DeiT
        kind: hard
        alpha: 0.5
        temperature: 1.0
        kl_reduction: mean

    The student must have a distillation token: ``student=zoo
    student.model.name=vit_nano_distilled`` (or ``+student.model.distill_token=true`` on any
    ``vit_*``).

    Args:
        kind: ``hard`` (CE against the teacher's argmax) or ``soft`` (KL at ``temperature``).
        alpha: weight of the distillation term, in ``[0, 1]``; the label CE gets ``1 − alpha``.
        temperature: softmax temperature ``T > 0`` of ``soft`` (unused by ``hard``).
        kl_reduction: ``mean`` (sum / (N·K), the authors' code) or ``batchmean`` (sum / N).
    """

    def __init__(self, kind: str = "hard", alpha: float = 0.5, temperature: float = 1.0,
                 kl_reduction: str = "mean") -> None:
        super().__init__()
        if kind not in ("hard", "soft"):
            raise KdlabError(f"distill.kind={kind} must be hard or soft")
        alpha = check_number("alpha", alpha)
        if alpha > 1.0:
            raise KdlabError(f"distill.alpha={alpha} must be in [0, 1]")
        if kl_reduction not in ("mean", "batchmean"):
            raise KdlabError(f"distill.kl_reduction={kl_reduction} must be mean (the authors' "
                             "sum / (N·K)) or batchmean (sum / N)")
        self.kind = kind
        self.alpha = alpha
        self.temperature = check_number("temperature", temperature, "> 0")
        self.kl_reduction = kl_reduction
        self.ce_weight = 1.0 - alpha
        self.student_layers = DISTILLATION
        # the transfer-set check of forward() reads the first batch only: no sync per step
        self._checked = kind != "soft" or kl_reduction != "mean"

    def resolve(self, student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
        aliases = student.taps() if hasattr(student, "taps") else {}
        if DISTILLATION not in aliases:
            raise KdlabError(
                f"distill=deit reads the student's distillation-token head, but the student "
                f"({type(student).__name__}) has none: use a ViT built with a distillation token "
                "(student=zoo student.model.name=vit_nano_distilled, or "
                "+student.model.distill_token=true on a vit_* model)")
        return super().resolve(student, teacher)

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        (dist,) = self.student_features(student)
        if dist.dim() != 2 or (teacher.logits.numel() and dist.shape != teacher.logits.shape):
            raise KdlabError(f"distill=deit: the student's distillation head gives shape "
                             f"{list(dist.shape)}, the teacher's logits "
                             f"{list(teacher.logits.shape)}: they must be [N, classes] alike")

    def distillation_loss(self, dist: torch.Tensor, teacher: Outputs) -> torch.Tensor:
        """``L_dist`` of the docstring, unweighted, for the distillation head's logits."""
        if self.kind == "hard":
            return F.cross_entropy(dist, teacher.logits.detach().argmax(dim=1))
        t = self.temperature
        scale = t * t / (dist.shape[1] if self.kl_reduction == "mean" else 1)
        return soft_target_kl(dist, teacher.log_probs(t).detach(), t, scale)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        (dist,) = self.student_features(student)
        if not self._checked:
            self._checked = True
            if bool((~batch.labelled).any()):
                warnings.warn(
                    "distill=deit kind=soft with kl_reduction=mean (the authors' sum / "
                    "(N x classes)) on a transfer set: the soft term is 1/classes of the "
                    "per-sample KL while the "
                    "cross-entropy averages over the few labelled samples of each batch, so it can "
                    "drown the teacher's signal (docs/RESULTS.md, vit section: 28.95 % vs 71.91 % "
                    "with distill.deit.kl_reduction=batchmean)", stacklevel=2)
        return {"deit": self.alpha * self.distillation_loss(dist, teacher)}
