"""SimKD: the student's final map projected to the teacher's and classified by a frozen copy of
the teacher's classifier, which the deployed student keeps."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.models.head import Head, final_head, final_map_body
from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.strategies.checks import check_number
from kdlab.util.errors import KdlabError

#: the key of :attr:`Outputs.features` under which the projected student map travels from
#: :meth:`SimKD.student_outputs` to the loss (not a module path)
PROJECTED = "simkd:projected"
#: what to use instead when the student has no final feature map (a ViT)
_INSTEAD = ("a student without a final feature map and linear classifier (a ViT) cannot reuse "
            "the teacher's classifier: use distill=deit (a ViT with a distillation token) or a "
            "logit method such as distill=kd")


def projector(student_channels: int, teacher_channels: int, factor: int = 2) -> nn.Sequential:
    """The authors' bottleneck from ``C_s`` to ``C_t`` channels: conv1×1 (``C_s → C_t/factor``)
    → BN → ReLU → conv3×3 (padding 1) → BN → ReLU → conv1×1 (``→ C_t``) → BN → ReLU, the
    convolutions without bias. Spatial size unchanged."""
    mid = teacher_channels // factor
    if mid < 1:
        raise KdlabError(f"distill.factor={factor} leaves no channel: the teacher's map has "
                         f"{teacher_channels} channels (factor must be <= {teacher_channels})")
    return bottleneck(student_channels, mid, teacher_channels)


def bottleneck(channels_in: int, mid: int, channels_out: int) -> nn.Sequential:
    """:func:`projector` with its middle width given."""
    return nn.Sequential(
        nn.Conv2d(channels_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, channels_out, 1, bias=False), nn.BatchNorm2d(channels_out), nn.ReLU())


def alignment(student_size: tuple[int, int], teacher_size: tuple[int, int]
              ) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """The authors' spatial alignment: the size the student's map is average-pooled to before
    the projector and the size the teacher's map is pooled to (``None``: left as it is). A
    student map taller than the teacher's is pooled to the teacher's size; otherwise the
    teacher's is pooled to the student's (a no-op when equal)."""
    if student_size[0] > teacher_size[0]:
        return teacher_size, None
    return None, (student_size if student_size != teacher_size else None)


def _pooled(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    return x if size is None else F.adaptive_avg_pool2d(x, size)


class ReusedClassifierNet(nn.Module):
    """The network SimKD deploys: ``classifier(pool(projector(align(body(x)))))``.

    ``body`` is the student up to its final feature map (its own pooling and classifier
    dropped, :func:`kdlab.models.head.final_map_body`), ``align`` the average pooling of that
    map to ``source_size`` (the teacher's map size, when the student's is larger), ``pool`` the
    global average over positions (the flattening instead, when the teacher's classifier reads
    its flattened map: ``flat``) and ``classifier`` the frozen copy of the teacher's
    ``nn.Linear``. The modules are shared with the student and the strategy, not copied.
    """

    def __init__(self, body: nn.Module, projector: nn.Module, classifier: nn.Linear,
                 source_size: tuple[int, int] | None = None, flat: bool = False) -> None:
        super().__init__()
        self.body = body
        self.projector = projector
        self.classifier = classifier
        self.source_size = source_size
        self.flat = flat

    def projected(self, x: torch.Tensor) -> torch.Tensor:
        """The projected student map ``(N, C_t, H, W)`` of the images ``x``."""
        return self.projector(_pooled(self.body(x), self.source_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reused_logits(self.classifier, self.projected(x), self.flat)


def reused_logits(classifier: nn.Linear, projected: torch.Tensor, flat: bool) -> torch.Tensor:
    """The teacher classifier's logits for a projected map: on its global average over
    positions, or on its flattening (``flat``: the teacher's classifier reads its flattened
    map)."""
    return classifier(projected.flatten(1) if flat else projected.mean(dim=(2, 3)))


class SimKD(Strategy):
    """Reused teacher classifier — Chen, Mei, Wang, Feng & Chen, "Knowledge Distillation with
    the Reused Teacher Classifier", CVPR 2022 (arXiv:2203.14001).

    The student's final feature map ``F_s`` is spatially aligned with the teacher's ``F_t``
    (the larger of the two average-pooled to the smaller's size, ``A``), projected to the
    teacher's channels by a small trainable network ``P`` (conv1×1 → conv3×3 → conv1×1, each
    followed by BN and ReLU, the middle width ``C_t / factor``) and matched to the teacher's map:

    ``loss = beta · mean_{n,c,h,w} (P(A(F_s)) − A(F_t))² + ce_weight · CE``

    The teacher's own linear classifier ``W_t`` is then *reused*: the deployed student is
    ``z = W_t · mean_{h,w} P(A(F_s)) + b_t`` (:class:`ReusedClassifierNet`), so kdlab
    validates, tests, measures, exports and ``kdlab-eval`` s that network, not the student's own
    classifier, which is dropped (:meth:`deployed`). The copy of ``W_t`` is frozen. Published:
    78.08% top-1 for resnet32x4 → resnet8x4 on CIFAR-100.

    Defaults are the authors' (DefangChen/SimKD: ``models/util.py`` ``SimKD`` with
    ``factor=2``; ``train_student.py`` run as ``--distill simkd -c 0 -d 0 -b 1``: the MSE
    weighted 1, no cross-entropy and no KD term). The classifier copy is the teacher's, bias
    included; the teacher's map is read without gradients. When ``ce_weight > 0`` the
    cross-entropy (and any other member of ``distill=[simkd,…]`` reading the student's logits)
    sees the reused classifier's logits, as the authors' ``logit_s`` is.

    Where kdlab departs from the authors' code:

    * the maps are found generically (:mod:`kdlab.models.head`: the module whose output the
      classifier pools), not by ``is_feat=True`` outputs of hand-edited models;
    * alignment pools both spatial dimensions to the other map's ``(H, W)``; the authors pool
      to ``(H, H)`` (their maps are square) and compare heights only, as here;
    * a teacher whose classifier reads the *flattened* map (kdlab's ``CNN`` with ``hidden=0``)
      is supported when the aligned map has the teacher's size: the projected map is flattened
      instead of pooled, a kdlab extension;
    * the projector's ReLUs are not in place (a tapped output stays readable).

    Config (``conf/distill/simkd.yaml``)::

        _target_: kdlab.strategies.reused_classifier.SimKD
        beta: 1.0
        factor: 2
        ce_weight: 0.0

    Args:
        beta: weight of the feature MSE, ``>= 0``.
        factor: the projector's bottleneck divides the teacher's channels by this, an integer
            ``>= 1``.
        ce_weight: weight of the cross-entropy on the reused classifier's logits, ``>= 0``.
    """

    replaces_head = True

    def __init__(self, beta: float = 1.0, factor: int = 2, ce_weight: float = 0.0) -> None:
        super().__init__()
        self.beta = check_number("beta", beta)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise KdlabError(f"distill.factor={factor} must be an integer >= 1 (the projector's "
                             "bottleneck divides the teacher's channels by it)")
        self.factor = factor
        self.ce_weight = check_number("ce_weight", ce_weight)
        self.heads: dict[str, Head] = {}
        self.projector: nn.Sequential | None = None
        self.classifier: nn.Linear | None = None
        self.source_size: tuple[int, int] | None = None
        self.target_size: tuple[int, int] | None = None
        self.flat = False
        self._net: tuple[nn.Module, ReusedClassifierNet] | None = None  # (student, its net)

    # -- set-up ----------------------------------------------------------------------------------
    @staticmethod
    def _head(model: nn.Module, role: str) -> Head:
        try:
            return final_head(model, role)
        except KdlabError as e:
            hint = f" ({_INSTEAD})" if role == "student" else ""
            raise KdlabError(f"distill=simkd reads the {role}'s final feature map and reuses the "
                             f"teacher's linear classifier: {e}{hint}") from None

    def resolve(self, student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
        self.heads = {"student": self._head(student, "student"),
                      "teacher": self._head(teacher, "teacher")}
        self.student_paths = [self.heads["student"].feature_path]
        self.teacher_paths = [self.heads["teacher"].feature_path]
        return self.student_paths, self.teacher_paths

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        if not self.heads:
            raise RuntimeError("SimKD.resolve(student, teacher) was not called")
        s_head, t_head = self.heads["student"], self.heads["teacher"]
        (s_map,), (t_map,) = self.student_features(student), self.teacher_features(teacher)
        for role, head, outputs, fmap in (("student", s_head, student, s_map),
                                          ("teacher", t_head, teacher, t_map)):
            if fmap.dim() != 4:
                raise KdlabError(f"distill=simkd: the {role}'s {head.feature_path} gives shape "
                                 f"{list(fmap.shape)}, not a (N, C, H, W) feature map")
            if outputs.logits.dim() == 2:
                head.check(fmap, outputs.logits, role)
        s_size, t_size = tuple(s_map.shape[2:]), tuple(t_map.shape[2:])
        self.source_size, self.target_size = alignment(s_size, t_size)
        self.flat = t_head.flat
        if self.flat and (self.source_size or s_size) != t_size:
            raise KdlabError(
                f"distill=simkd: the teacher's classifier {t_head.classifier_path} reads its "
                f"flattened {t_size[0]}×{t_size[1]} map, but the student's final map is "
                f"{s_size[0]}×{s_size[1]}, smaller, so the reused classifier cannot read it; "
                "use a student whose final map is at least as large, or a teacher whose "
                "classifier reads the globally pooled map")
        self.projector = projector(s_map.shape[1], t_map.shape[1], self.factor)
        self.classifier = frozen_copy(t_head.classifier)
        self.projector.to(device=s_map.device)
        self.classifier.to(device=s_map.device)
        self._keep_alignment()
        self._net = None

    def _keep_alignment(self) -> None:
        """The alignment as a buffer, ``aligned_size`` (``[0, 0]``: the student's map is not
        pooled), so that a checkpoint rebuilds the deployed network without the teacher."""
        size = torch.tensor(self.source_size or (0, 0), dtype=torch.long)
        device = next(self.projector.parameters()).device if self.projector else None
        self.register_buffer("aligned_size", size.to(device))

    # -- the deployed network --------------------------------------------------------------------
    def deployed(self, student: nn.Module) -> ReusedClassifierNet:
        if self.projector is None or self.classifier is None:
            raise RuntimeError("SimKD.setup(...) was not called: no projector yet")
        if self._net is None or self._net[0] is not student:
            net = ReusedClassifierNet(final_map_body(student, "student"), self.projector,
                                      self.classifier, self.source_size, self.flat)
            self._net = (student, net)
        return self._net[1]

    def deployed_from_state(self, student: nn.Module,
                            state: Mapping[str, torch.Tensor]) -> ReusedClassifierNet:
        """The deployed network of a checkpoint: the projector and classifier rebuilt from the
        shapes of their saved weights and loaded, the alignment from ``source_size``."""
        needed = ("projector.0.weight", "projector.6.weight", "classifier.weight", "aligned_size")
        missing = [k for k in needed if k not in state]
        if missing:
            raise KdlabError(f"the checkpoint holds no SimKD projector and classifier ("
                             f"missing strategy keys {', '.join(missing)})")
        first, last = state["projector.0.weight"], state["projector.6.weight"]
        self.projector = bottleneck(first.shape[1], first.shape[0], last.shape[0])
        weight = state["classifier.weight"]
        self.classifier = frozen_copy(nn.Linear(weight.shape[1], weight.shape[0],
                                                bias="classifier.bias" in state))
        size = [int(v) for v in state["aligned_size"]]
        self.source_size = (size[0], size[1]) if size[0] > 0 else None
        self.flat = weight.shape[1] != last.shape[0]
        self._keep_alignment()
        own = {k: v for k, v in state.items()
               if k.startswith(("projector.", "classifier.")) or k == "aligned_size"}
        self.load_state_dict(own)
        self._net = None
        return self.deployed(student)

    # -- training --------------------------------------------------------------------------------
    def student_outputs(self, student: Outputs) -> Outputs:
        """The student's outputs with the reused classifier's logits in place of its own, and
        the projected map (under :data:`PROJECTED`) for the loss."""
        if self.projector is None or self.classifier is None:
            raise RuntimeError("SimKD.setup(...) was not called: no projector yet")
        (s_map,) = self.student_features(student)
        projected = self.projector(_pooled(s_map, self.source_size))
        return Outputs(reused_logits(self.classifier, projected, self.flat),
                       {**student.features, PROJECTED: projected})

    @staticmethod
    def feature_loss(projected: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        """``mean (P(A(F_s)) − A(F_t))²``, unweighted: the teacher's map (no gradient)
        average-pooled to the projected map's size where they differ."""
        target = teacher_map.detach()
        if target.shape[2:] != projected.shape[2:]:
            target = F.adaptive_avg_pool2d(target, tuple(projected.shape[2:]))
        return F.mse_loss(projected, target.to(projected.dtype))

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        if PROJECTED not in student.features:
            student = self.student_outputs(student)
        (t_map,) = self.teacher_features(teacher)
        return {"simkd": self.beta * self.feature_loss(student.features[PROJECTED], t_map)}


def frozen_copy(classifier: nn.Linear) -> nn.Linear:
    """A copy of ``classifier`` that takes no gradients (the teacher's stays untouched)."""
    return copy.deepcopy(classifier).requires_grad_(False)
