"""The strategies of a run, summed: ``distill=kd`` (one member) or ``distill=[kd,at]``."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from kdlab.strategies.base import Batch, Outputs, Strategy, Terms
from kdlab.util.errors import KdlabError


def qualify(message: str, name: str) -> str:
    """A member's error message with its config keys named in full: ``distill.beta=…`` of
    member ``at`` becomes ``distill.at.beta=…``."""
    return re.sub(rf"\bdistill\.(?!{re.escape(name)}\b)(?=[A-Za-z_])", f"distill.{name}.", message)


F = TypeVar("F", bound=Callable[..., Any])


def _qualified(method: F) -> F:
    """Re-raise a member's :class:`KdlabError` with its keys named in full (:func:`qualify`)."""

    @functools.wraps(method)
    def wrapper(self: Composite, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except KdlabError as e:
            raise KdlabError(qualify(str(e), self._current)) from None

    return wrapper  # type: ignore[return-value]


class Composite(Strategy):
    """The strategies of a run, by name; their loss terms summed, each logged under its name.

    ``kdlab-train distill=[kd,at]`` composes ``distill.kd`` and ``distill.at`` (each strategy's
    config file puts it under its own name, ``# @package distill.<name>``) and kdlab builds
    ``Composite(kd=KD(...), at=AT(...))``; ``distill=kd`` is a composite of one. A member's
    options are ``distill.<member>.<key>`` (``distill.at.beta=500``), and its errors name them so.
    A term name used by two members is prefixed with the member's name. The cross-entropy weight
    is the product of the members' (KD's ``1 - alpha`` with AT's 1 gives ``1 - alpha``); the
    teacher is needed when any member needs it; the pre-stage lasts as long as the longest
    member's, and each member runs its own pre-stage for its own ``init_epochs``. The run's
    :attr:`views` are the most any member reads (MLKD's 2 with KD's 1 gives 2, with the first
    such member's :attr:`strong_augment`): every member receives the outputs with their
    ``strong`` view, which one-view members ignore. At most one member may replace the
    student's head (:attr:`Strategy.replaces_head`): its deployed network and its logits are
    the composite's, so the other members read those logits. A teacher and a student of
    different vocabularies are allowed when every member allows them (:attr:`any_vocabulary`).
    """

    def __init__(self, **members: Strategy) -> None:
        super().__init__()
        if not members:
            raise KdlabError("a composite strategy needs members, e.g. distill=[kd,at]")
        self.members = nn.ModuleDict(members)
        self.ce_weight = math.prod(m.ce_weight for m in members.values())
        self.needs_teacher = any(m.needs_teacher for m in members.values())
        self.init_epochs = max(m.init_epochs for m in members.values())
        self.views = max(m.views for m in members.values())
        self.any_vocabulary = all(m.any_vocabulary for m in members.values())
        self.strong_augment = next((m.strong_augment for m in members.values()
                                    if m.views > 1), None)
        heads = [name for name, m in members.items() if m.replaces_head]
        if len(heads) > 1:
            raise KdlabError(f"distill=[{','.join(members)}]: {' and '.join(heads)} each replace "
                             "the student's head with their own; keep at most one of them")
        #: the member that replaces the student's head, or None
        self.head_member = heads[0] if heads else None
        self.replaces_head = bool(heads)
        self._current = next(iter(members))  # the member running now, for error messages
        #: the one member of a one-strategy run (a tuple: not registered twice as a submodule)
        self._only = tuple(members.values()) if len(members) == 1 else ()

    @property
    def names(self) -> list[str]:
        """The members' names, in order."""
        return list(self.members)

    @_qualified
    def resolve(self, student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
        for name, member in self.members.items():
            self._current = name
            s, t = member.resolve(student, teacher)
            self.student_paths += [p for p in s if p not in self.student_paths]
            self.teacher_paths += [p for p in t if p not in self.teacher_paths]
        return self.student_paths, self.teacher_paths

    @_qualified
    def setup(self, student: Outputs, teacher: Outputs, num_train_samples: int) -> None:
        for name, member in self.members.items():
            self._current = name
            member.setup(student, teacher, num_train_samples)

    def deployed(self, student: nn.Module) -> nn.Module:
        if self.head_member is None:
            return student
        return self.members[self.head_member].deployed(student)

    def student_outputs(self, student: Outputs) -> Outputs:
        if self.head_member is None:
            return student
        return self.members[self.head_member].student_outputs(student)

    @_qualified
    def deployed_from_state(self, student: nn.Module,
                            state: Mapping[str, torch.Tensor]) -> nn.Module:
        if self.head_member is None:
            return student
        self._current = name = self.head_member
        prefix = f"members.{name}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return self.members[name].deployed_from_state(student, own)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        for member in self.members.values():
            member.on_epoch_start(epoch)

    def logged(self) -> dict[str, float | torch.Tensor]:
        if self._only:
            return self._only[0].logged()
        return self._collect({name: m.logged() for name, m in self.members.items()})

    def _collect(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
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
        if self._only:  # one member: its terms as they are
            return self._only[0](student, teacher, batch)
        return self._collect({name: m(student, teacher, batch) for name, m in self.members.items()})
