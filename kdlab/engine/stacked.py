"""The students of a pack that share one architecture, run as one vectorised forward pass.

:class:`StackedStudents` stacks the members' parameters and buffers (``torch.stack`` of each
member's own tensors, so gradients flow back to them and every member keeps its own optimizer)
and runs the architecture once with ``torch.func.vmap`` over the members
(``functional_call`` of the first member's network with each member's tensors): one kernel
per layer for all members instead of one per member, which is what a launch-bound GPU needs.
Batch-norm running statistics are updated in the stacked buffers and copied back into each
member after the pass.

:func:`stackable` says whether a pack's members qualify — the same architecture (module types,
parameter and buffer names and shapes), no student layer read by a strategy (features are
tapped by hooks, which a vectorised pass cannot hand out), and no randomness in the students
(dropout with ``p > 0``: a vectorised pass would draw other masks than each member alone) —
and if not, why.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

#: modules whose forward pass draws random numbers in training mode
RANDOM = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
          nn.FeatureAlphaDropout)


def signature(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """What makes two networks the same architecture: module types by path, and the names,
    shapes and dtypes of parameters and buffers."""
    modules = [(name, type(m).__qualname__, ()) for name, m in model.named_modules()]
    tensors = [(name, str(t.dtype), tuple(t.shape))
               for name, t in [*model.named_parameters(), *model.named_buffers()]]
    return [*modules, *tensors]


def stackable(students: Sequence[nn.Module], reads_features: Sequence[bool]) -> str | None:
    """Why ``students`` cannot run as one vectorised pass, or ``None`` when they can."""
    if len(students) < 2:
        return "a single member"
    first = signature(students[0])
    if any(signature(s) != first for s in students[1:]):
        return "the members' students differ in architecture"
    if any(reads_features):
        return "a member's strategy reads student features (tapped by hooks)"
    for student in students:
        for name, module in student.named_modules():
            if isinstance(module, RANDOM) and module.p > 0:
                return f"the student has dropout ({name or 'the model'}, p={module.p})"
    return None


class StackedStudents:
    """One vectorised forward pass of ``students`` (same architecture, see :func:`stackable`)
    over one input batch; ``forward(x, members)`` returns each listed member's logits."""

    def __init__(self, students: Sequence[nn.Module]) -> None:
        self.students = list(students)
        self.template = self.students[0]
        self.param_names = [n for n, _ in self.template.named_parameters()]
        self.buffer_names = [n for n, _ in self.template.named_buffers()]
        self._params = [dict(s.named_parameters()) for s in self.students]
        self._buffers = [dict(s.named_buffers()) for s in self.students]

        def call(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                 x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.template, (params, buffers), (x,))

        self._call = vmap(call, in_dims=(0, 0, None), randomness="error")

    def forward(self, x: torch.Tensor, members: Sequence[int]) -> list[torch.Tensor]:
        """The logits of ``members`` (indices into the students) on ``x``, one vectorised
        pass; the training-mode buffers they update (batch-norm statistics) are written back
        into each member."""
        params = {n: torch.stack([self._params[i][n] for i in members])
                  for n in self.param_names}
        with torch.no_grad():
            buffers = {n: torch.stack([self._buffers[i][n] for i in members])
                       for n in self.buffer_names}
        logits = self._call(params, buffers, x)
        if self.template.training and buffers:
            with torch.no_grad():
                for k, i in enumerate(members):
                    for n in self.buffer_names:
                        self._buffers[i][n].copy_(buffers[n][k])
        return list(logits.unbind(0))
