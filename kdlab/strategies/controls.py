"""Control conditions: what distillation gains without soft targets, or without a teacher."""

from __future__ import annotations

import torch.nn.functional as F

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.util.errors import KdlabError


class PseudoLabels(Strategy):
    """Control: the teacher's hard labels as cross-entropy targets, no soft targets.

    After Lee, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method for Deep
    Neural Networks", ICML 2013 Workshop on Challenges in Representation Learning — here the
    pseudo-labels come from the frozen teacher instead of the network itself. It is a control,
    not a distillation method: compared with KD, it separates what the *soft* targets bring
    from what "the teacher labelled the unlabelled transfer set" brings.

    ``loss = weight · CE(student, argmax teacher) + ce_weight · CE(student, labels)``

    The pseudo-label term covers every sample of the batch, labelled or not (batch mean).
    Reads logits only. With ``replace_labels: true`` the teacher's labels replace the true
    labels too (``ce_weight = 0``): the student never sees a true label. Returns the term
    ``pseudo``.

    Config (``conf/distill/pseudo.yaml``)::

        _target_: kdlab.strategies.controls.PseudoLabels
        weight: 1.0
        replace_labels: false

    Args:
        weight: weight of the pseudo-label cross-entropy, ``>= 0``.
        replace_labels: drop the true-label cross-entropy (``ce_weight = 0``) if true.
    """

    def __init__(self, weight: float = 1.0, replace_labels: bool = False) -> None:
        super().__init__()
        if not weight >= 0:
            raise KdlabError(f"distill.weight={weight} must be >= 0")
        if not isinstance(replace_labels, bool):
            raise KdlabError(f"distill.replace_labels={replace_labels} must be true or false")
        self.weight = float(weight)
        self.replace_labels = replace_labels
        self.ce_weight = 0.0 if replace_labels else 1.0

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        pseudo = teacher.logits.detach().argmax(dim=1)
        return {"pseudo": self.weight * F.cross_entropy(student.logits, pseudo)}


class LabelSmoothing(Strategy):
    """Control without a teacher: cross-entropy with smoothed labels — Szegedy, Vanhoucke,
    Ioffe, Shlens & Wojna, "Rethinking the Inception Architecture for Computer Vision", CVPR
    2016 (arXiv:1512.00567), §7; studied as a stand-in for KD by Müller, Kornblith & Hinton,
    "When Does Label Smoothing Help?", NeurIPS 2019 (arXiv:1906.02629).

    ``loss = weight · CE(student, (1 − ε) · onehot(y) + ε / K)`` on the labelled samples

    It replaces the plain cross-entropy (``ce_weight = 0``); no teacher is loaded or run
    (``needs_teacher = False``). Reads the student's logits only. A batch without labelled
    samples gives a zero that still depends on the student's logits. Returns the term ``ls``.

    Config (``conf/distill/label_smoothing.yaml``)::

        _target_: kdlab.strategies.controls.LabelSmoothing
        epsilon: 0.1
        weight: 1.0

    Args:
        epsilon: smoothing ``ε`` in ``[0, 1]``: the mass spread uniformly over the K classes.
        weight: weight of the smoothed cross-entropy, ``>= 0``.
    """

    needs_teacher = False

    def __init__(self, epsilon: float = 0.1, weight: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= epsilon <= 1.0:
            raise KdlabError(f"distill.epsilon={epsilon} must be in [0, 1]")
        if not weight >= 0:
            raise KdlabError(f"distill.weight={weight} must be >= 0")
        self.epsilon = float(epsilon)
        self.weight = float(weight)
        self.ce_weight = 0.0

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        labelled = batch.labelled
        if not labelled.any():
            return {"ls": student.logits.sum() * 0.0}
        ce = F.cross_entropy(student.logits[labelled], batch.targets[labelled],
                             label_smoothing=self.epsilon)
        return {"ls": self.weight * ce}

