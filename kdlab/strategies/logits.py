"""Strategies that match the teacher's output distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlab.errors import KdlabError
from kdlab.strategies.base import Batch, Outputs, Strategy, Terms


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton's soft-target loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean.

    The ``T²`` factor keeps the gradient magnitude of the soft term roughly independent of the
    temperature (Hinton et al. 2015, §2).
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class KD(Strategy):
    """Knowledge distillation with soft targets — Hinton, Vinyals & Dean, "Distilling the
    Knowledge in a Neural Network", NIPS Deep Learning Workshop 2015 (arXiv:1503.02531).

    ``loss = alpha · T² · KL(p_teacher^T ‖ p_student^T) + (1 - alpha) · CE(student, labels)``

    ``alpha`` weights the soft (teacher) term; ``1 - alpha`` weights the hard-label
    cross-entropy, which is computed on the labelled samples of the batch only. The soft term
    covers every sample, labelled or not, so unlabelled transfer-set images are learned from
    the teacher alone.

    Config (``conf/distill/kd.yaml``)::

        _target_: kdlab.strategies.KD
        temperature: 4.0
        alpha: 0.9

    Args:
        temperature: softmax temperature ``T > 0`` for both teacher and student.
        alpha: weight of the soft term, in ``[0, 1]``.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        if not temperature > 0:
            raise KdlabError(f"distill.temperature={temperature} must be > 0")
        if not 0.0 <= alpha <= 1.0:
            raise KdlabError(f"distill.alpha={alpha} must be in [0, 1]")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.ce_weight = 1.0 - self.alpha

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        soft = kd_loss(student.logits, teacher.logits, self.temperature)
        return {"kd": self.alpha * soft}
