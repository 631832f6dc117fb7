"""What every distillation strategy is: an ``nn.Module`` mapping outputs to named loss terms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from kdlab.data.memory import UNLABELLED
from kdlab.data.randaugment import StrongAugment
from kdlab.models.paths import resolve_paths

#: named, weighted loss terms returned by a strategy
Terms = dict[str, torch.Tensor]


@dataclass
class Outputs:
    """What a network produced for a batch: its logits and the outputs of its tapped modules,
    keyed by module path; for a strategy that trains on two views of every sample
    (:attr:`Strategy.views` ``= 2``, e.g. MLKD), ``strong`` holds the network's outputs on the
    batch's second, strongly augmented view (``None`` otherwise)."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    strong: Outputs | None = None

    def log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        """``log_softmax(logits / temperature)`` over classes. Cached teacher outputs answer
        from a per-temperature table computed once (see :mod:`kdlab.engine.cache`)."""
        return torch.log_softmax(self.logits / temperature, dim=1)


@dataclass
class Batch:
    """A training batch: inputs, targets (``-1`` for unlabelled transfer-set samples) and each
    sample's index in the training split (for memory banks)."""

    x: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor

    @property
    def labelled(self) -> torch.Tensor:
        """Boolean mask of the samples that carry a label."""
        return self.targets != UNLABELLED


class Strategy(nn.Module):
    """Base class of distillation strategies.

    A strategy receives the student's and the teacher's :class:`Outputs` and the :class:`Batch`
    and returns a dict of *weighted* loss terms, e.g. ``{"kd": alpha * T² * KL}``. The training
    step adds the cross-entropy on labelled samples, weighted by :attr:`ce_weight`, and logs
    every term by name as ``train/<name>``; the loss is their sum.

    Feature-based strategies set :attr:`student_layers` / :attr:`teacher_layers` to module
    paths (``"stages.1"``) or to an alias the model defines in ``taps()`` (``"stages"``,
    ``"preact"``, ``"embedding"``). The module hooks those layers (no model is edited), runs
    one dry forward pass and calls :meth:`setup` with the probed outputs, where connectors
    (regressors, projection heads) are built from the shapes. Connectors are submodules of the
    strategy: they train with the student and are saved in the student checkpoint.

    Multi-stage methods set :attr:`init_epochs`: for that many epochs the step minimises
    :meth:`init_loss` alone (e.g. training FT's paraphraser), then :meth:`forward`.

    Methods that learn from two augmented views of every sample set :attr:`views` to 2 and
    :attr:`strong_augment` to the augmentation of the second view: the engine then has the
    datamodule add a strong view of each training batch (its own random shift/flip of the
    unaugmented images, then :class:`StrongAugment`), runs the student and the live teacher
    on it too and passes those outputs as ``student.strong`` / ``teacher.strong``. Such a
    strategy cannot read cached teacher outputs (a fresh strong view every step), share a
    packed cohort's one teacher pass, or train on mixed or disk-streamed batches: each is
    refused or logged.

    A strategy that *replaces the student's head* (SimKD: the student's map through a projector
    and a copy of the teacher's classifier) sets :attr:`replaces_head` and returns from
    :meth:`deployed` the network that is validated, tested, measured and exported after
    training in place of the bare student; :meth:`student_outputs` gives the cross-entropy and
    the loss that network's logits, and :meth:`deployed_from_state` rebuilds it from a
    checkpoint without the teacher. The defaults leave the student as it is.
    """

    #: weight of the cross-entropy on the hard labels (Hinton's ``1 - alpha`` for KD)
    ce_weight: float = 1.0
    #: False for teacher-free regularisers (label smoothing): no teacher is loaded or run
    needs_teacher: bool = True
    #: epochs of the method's pre-stage (see :meth:`init_loss`)
    init_epochs: int = 0
    #: True when the trained network is not the bare student (see :meth:`deployed`)
    replaces_head: bool = False
    #: layers read from the student and the teacher (paths or model aliases); empty: logits only
    student_layers: Sequence[str] | str = ()
    teacher_layers: Sequence[str] | str = ()
    #: augmented views of each training sample the strategy reads: 1 (the batch), or 2 (plus a
    #: strong view, see :attr:`strong_augment` and ``Outputs.strong``)
    views: int = 1
    #: the augmentation of the second view (``views = 2``)
    strong_augment: StrongAugment | None = None
    #: True when the loss compares teacher and student outputs of different widths (ULD, for
    #: language models of different vocabularies); otherwise the engine refuses such a pair
    any_vocabulary: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        self.student_paths: list[str] = []
        self.teacher_paths: list[str] = []

    def resolve(self, student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
        """Module paths to tap in the student and the teacher (aliases expanded, checked)."""
        if self.student_layers:
            self.student_paths = resolve_paths(student, self.student_layers,
                                               "distill.student_layers")
        if self.teacher_layers:
            self.teacher_paths = resolve_paths(teacher, self.teacher_layers,
                                               "distill.teacher_layers")
        return self.student_paths, self.teacher_paths

    def student_features(self, outputs: Outputs) -> list[torch.Tensor]:
        """This strategy's student features, in the order of :attr:`student_layers`."""
        return [outputs.features[p] for p in self.student_paths]

    def teacher_features(self, outputs: Outputs) -> list[torch.Tensor]:
        """This strategy's teacher features, in the order of :attr:`teacher_layers`."""
        return [outputs.features[p] for p in self.teacher_paths]

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        """Build connectors from the outputs of a dry forward pass (default: nothing)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called at the start of every training epoch (warm-ups, stage switches)."""
        self.epoch = epoch

    def logged(self) -> dict[str, float | torch.Tensor]:
        """Scalars to log as ``train/<name>`` besides the loss terms, read once per training
        step (a learned temperature, a schedule's current weight); never part of the loss.
        Default: none."""
        return {}

    def deployed(self, student: nn.Module) -> nn.Module:
        """The network this strategy delivers, evaluated, measured and exported after training
        (called after :meth:`setup`); it shares the student's and the connectors' modules.
        Default: the student itself."""
        return student

    def student_outputs(self, student: Outputs) -> Outputs:
        """The student's outputs as the cross-entropy and :meth:`forward` read them during
        training: a strategy that replaces the head puts the deployed network's logits in
        place of the student's own. Default: unchanged."""
        return student

    def deployed_from_state(self, student: nn.Module,
                            state: Mapping[str, torch.Tensor]) -> nn.Module:
        """The deployed network of a checkpoint, rebuilt without the teacher: ``student``
        holds the checkpoint's student weights, ``state`` the strategy's saved tensors (keys
        without the ``strategy.`` prefix). Default: the student."""
        return student

    def init_loss(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        """The loss of the pre-stage, minimised during the first :attr:`init_epochs` epochs."""
        raise NotImplementedError(f"{type(self).__name__} has no pre-stage")

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        raise NotImplementedError
