"""Several strategies at once: ``distill=[kd,at]`` or a combo config."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.util.errors import KdlabError


class Composite(Strategy):
    """The sum of its members' loss terms, each logged under its own name.

    ``kdlab-train distill=[kd,at]`` builds ``Composite(kd=KD(...), at=AT(...))``; a member's
    options are ``distill.<member>.<key>`` (``distill.at.beta=500``). A term name used by two
    members is prefixed with the member's name. The cross-entropy weight is the product of the
    members' (KD's ``1 - alpha`` with AT's 1 gives ``1 - alpha``); the pre-stage lasts as long as
    the longest member's, and each member runs its own pre-stage for its own ``init_epochs``.

    Config (``conf/distill/combo.yaml`` plus members)::

        _target_: kdlab.strategies.Composite
        kd: {_target_: kdlab.strategies.KD, temperature: 4.0, alpha: 0.9}
        at: {_target_: kdlab.strategies.AT, beta: 1000.0}
    """

    def __init__(self, **members: Strategy) -> None:
        super().__init__()
        if not members:
            raise KdlabError("distill=combo has no member strategies: list them, e.g. "
                             "distill=[kd,at]")
        self.members = nn.ModuleDict(members)
        self.ce_weight = math.prod(m.ce_weight for m in members.values())
        self.init_epochs = max(m.init_epochs for m in members.values())

    def resolve(self, student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
        for member in self.members.values():
            s, t = member.resolve(student, teacher)
            self.student_paths += [p for p in s if p not in self.student_paths]
            self.teacher_paths += [p for p in t if p not in self.teacher_paths]
        return self.student_paths, self.teacher_paths

    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        for member in self.members.values():
            member.setup(student, teacher, num_train_samples)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        for member in self.members.values():
            member.on_epoch_start(epoch)

    def _collect(self, results: dict[str, dict[str, torch.Tensor]]) -> Terms:
        counts: dict[str, int] = {}
        for terms in results.values():
            for key in terms:
                counts[key] = counts.get(key, 0) + 1
        out = {}
        for name, terms in results.items():
            for key, value in terms.items():
                out[f"{name}_{key}" if counts[key] > 1 else key] = value
        return out

    def init_loss(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return self._collect({name: m.init_loss(student, teacher, batch)
                              for name, m in self.members.items() if self.epoch < m.init_epochs})

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> Terms:
        return self._collect({name: m(student, teacher, batch) for name, m in self.members.items()})
