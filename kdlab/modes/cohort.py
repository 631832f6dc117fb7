"""CohortModule: Deep Mutual Learning — Zhang, Xiang, Hospedales and Lu, "Deep Mutual Learning",
CVPR 2018 (arXiv:1706.00384).

A cohort of ``N >= 2`` networks is trained together from scratch, with no frozen teacher: each
member learns from the labels and from the predictions of the other members. Member ``i``
minimises

    CE(y, p_i) + kl_weight · T² · 1/(N-1) · Σ_{j≠i} KL(p_j^T ‖ p_i^T)

where ``p^T = softmax(z / T)`` and every ``p_j`` in member ``i``'s terms is detached: the other
members are targets there, not trained through it (the paper's alternating updates, done in
one step on the same batch). ``T = 1`` is the paper's setting; the ``T²`` factor keeps the
gradient scale of the soft term independent of ``T`` (Hinton et al. 2015).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kdlab.engine.module import DistillationModule
from kdlab.util.errors import KdlabError


def check_cohort(members: int, temperature: float, kl_weight: float) -> None:
    """Fail with one line naming the ``mode.*`` key of a bad cohort hyper-parameter."""
    if int(members) < 2:
        raise KdlabError(f"mode.members={members} must be >= 2: a member learns from the "
                         "others' predictions (mode.members=2 is the paper's cohort)")
    if not float(temperature) > 0:
        raise KdlabError(f"mode.temperature={temperature} must be > 0 (1 is the paper's)")
    if not float(kl_weight) >= 0:
        raise KdlabError(f"mode.kl_weight={kl_weight} must be >= 0 (0 trains the members "
                         "independently)")


def mutual_terms(logits: Sequence[torch.Tensor], temperature: float = 1.0,
                 kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """``kl_m{i}`` for each member ``i``: ``kl_weight · T² ·`` the mean over the other members
    ``j`` of ``KL(p_j ‖ p_i)`` at temperature ``T`` (batch mean; ``p_j`` detached).

    Every sample counts, labelled or not: the soft targets come from the cohort itself."""
    n = len(logits)
    log_p = [F.log_softmax(z.float() / temperature, dim=-1) for z in logits]
    targets = [lp.detach() for lp in log_p]
    scale = kl_weight * temperature ** 2 / (n - 1)
    terms = {}
    for i in range(n):
        kl = sum(F.kl_div(log_p[i], targets[j], reduction="batchmean", log_target=True)
                 for j in range(n) if j != i)
        terms[f"kl_m{i}"] = scale * kl
    return terms


class CohortModule(DistillationModule):
    """Trains a cohort of networks with Deep Mutual Learning (see the module docstring).

    ``student`` is an :class:`~torch.nn.ModuleList` of the members; checkpoints hold every
    member (``student.<i>.*``). One optimizer covers all members: member ``i``'s parameters get
    gradients only from its own terms ``ce_m{i}`` and ``kl_m{i}``, and AdamW's update is per
    parameter, so this equals one optimizer per member (same learning rate schedule). Gradient
    clipping by norm (``trainer.gradient_clip_val``) is applied per member, as separate
    training would.

    Terms logged by name: ``train/ce_m{i}``, ``train/kl_m{i}`` (``train/loss`` is their sum).
    Cross-entropy is averaged over the labelled samples of a batch (targets ``-1`` are skipped,
    as in :meth:`DistillationModule._cross_entropy`); the KL terms use every sample.

    Validation and test log ``{split}/acc_m{i}`` and ``{split}/loss_m{i}`` for each member, and
    ``{split}/acc`` / ``{split}/loss`` for member 0 — the network the mode delivers — so the
    default checkpoint (best ``val/acc``) is member 0's best.

    Args:
        members: the networks of the cohort (two or more, same number of classes).
        temperature: ``T`` of the soft predictions in the KL terms.
        kl_weight: weight of each member's KL term (its CE has weight 1).
        **kwargs: the arguments of :class:`DistillationModule` but ``student``, ``teacher`` and
            ``strategy``.
    """

    def __init__(self, members: Sequence[nn.Module], num_classes: int,
                 temperature: float = 1.0, kl_weight: float = 1.0, **kwargs: Any) -> None:
        check_cohort(len(members), temperature, kl_weight)
        super().__init__(student=nn.ModuleList(members), num_classes=num_classes, **kwargs)
        self.temperature = float(temperature)
        self.kl_weight = float(kl_weight)
        self.member_val_acc = nn.ModuleList(
            MulticlassAccuracy(num_classes=num_classes, average="micro") for _ in members)
        self.member_test_acc = nn.ModuleList(
            MulticlassAccuracy(num_classes=num_classes, average="micro") for _ in members)

    @property
    def members(self) -> nn.ModuleList:
        """The cohort (``self.student``)."""
        return self.student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every member, stacked: ``(members, batch, classes)``."""
        x = self._input(x)
        return torch.stack([member(x) for member in self.members])

    def _terms(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
               view: torch.Tensor | None = None) -> dict[str, Any]:
        # the peers teach each other: no frozen teacher, no cache, fresh random views
        logits = [member(x) for member in self.members]
        kl = mutual_terms(logits, self.temperature, self.kl_weight) if self.kl_weight > 0 else {}
        terms = {}
        for i, z in enumerate(logits):
            terms[f"ce_m{i}"] = self._cross_entropy(z, y)
            if kl:
                terms[f"kl_m{i}"] = kl[f"kl_m{i}"]
        return terms

    def clip_gradients(self, optimizer: Any, gradient_clip_val: float | None = None,
                       gradient_clip_algorithm: str | None = None) -> None:
        """Norm clipping per member (each member's gradient norm is its own); value clipping,
        element-wise anyway, as in Lightning."""
        if gradient_clip_val is None or (gradient_clip_algorithm or "norm") != "norm":
            return super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for member in self.members:
            torch.nn.utils.clip_grad_norm_(member.parameters(), float(gradient_clip_val))

    def _evaluate(self, batch: tuple[torch.Tensor, ...], split: str, metric) -> None:
        x, y, _ = batch
        metrics = self.member_val_acc if split == "val" else self.member_test_acc
        for i, logits in enumerate(self(x)):
            metrics[i].update(logits, y)
            loss = F.cross_entropy(logits, y)
            self.log(f"{split}/loss_m{i}", loss, on_epoch=True, sync_dist=True)
            self.log(f"{split}/acc_m{i}", metrics[i], on_epoch=True)
            if i == 0:  # the delivered network: what checkpointing and the table read
                metric.update(logits, y)
                self.log(f"{split}/loss", loss, on_epoch=True, sync_dist=True)
                self.log(f"{split}/acc", metric, on_epoch=True, prog_bar=True)
