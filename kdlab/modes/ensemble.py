"""Several frozen teachers seen as one: their soft targets combined per sample.

Multi-teacher distillation goes back to Hinton et al. 2015 (§2: the soft targets of an ensemble,
averaged) and to You et al., KDD 2017, "Learning from Multiple Teacher Networks" (averaged
outputs); choosing per sample the most confident teacher follows the confidence-based teacher
selection of e.g. Zhang et al. 2022, "Confidence-Aware Multi-Teacher Knowledge Distillation"
(here as a hard choice). The ensemble is an ``nn.Module`` that returns logits, so every logit
strategy, the teacher-output cache and the evaluation treat it like one teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdlab.util.errors import KdlabError

COMBINE = ("mean", "weighted", "confident")


class TeacherEnsemble(nn.Module):
    """Teachers whose outputs are combined into one set of logits ``z``.

    - ``mean`` / ``weighted``: soft targets averaged (uniformly or with ``weights``) at the
      distillation ``temperature`` T: ``z = T · log Σ_i w_i softmax(z_i / T)``, so that
      ``softmax(z / T)`` is exactly the averaged soft target a logit strategy at T compares
      with.
    - ``confident``: per sample, the logits of the teacher whose top class has the highest
      probability.

    Feature strategies read the first teacher (aliases of ``model.taps()`` are those of
    ``members.0``; other members are reachable as ``members.<i>.<path>``).
    """

    def __init__(self, teachers: Sequence[nn.Module], combine: str = "mean",
                 weights: Sequence[float] | None = None, temperature: float = 1.0) -> None:
        super().__init__()
        if len(teachers) < 2:
            raise KdlabError(f"mode.teachers lists {len(teachers)} teacher(s): give at least 2")
        if combine not in COMBINE:
            raise KdlabError(f"mode.combine={combine} must be one of {', '.join(COMBINE)}")
        if combine == "weighted":
            if weights is None or len(weights) != len(teachers):
                raise KdlabError(f"mode.weights must give one weight per teacher "
                                 f"({len(teachers)}) with mode.combine=weighted")
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise KdlabError(f"mode.weights={list(weights)} must be >= 0 with a positive sum")
            w = torch.tensor([float(v) for v in weights])
        else:
            if weights is not None:
                raise KdlabError(f"mode.weights is only used with mode.combine=weighted "
                                 f"(not {combine}): set it to null")
            w = torch.ones(len(teachers))
        if temperature <= 0:
            raise KdlabError(f"the ensemble's temperature {temperature} must be > 0")
        self.members = nn.ModuleList(teachers)
        self.combine = combine
        # buffers, so that the teacher-output cache key (a hash of the state dict) changes
        # with the combination rule
        self.register_buffer("weights", w / w.sum())
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("rule", torch.tensor(COMBINE.index(combine)))

    def taps(self) -> dict[str, list[str]]:
        first = self.members[0]
        aliases = first.taps() if hasattr(first, "taps") else {}
        return {name: [f"members.0.{p}" for p in paths] for name, paths in aliases.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([m(x) for m in self.members])  # (M, N, K)
        if self.combine == "confident":
            confidence = logits.softmax(-1).amax(-1)  # (M, N)
            best = confidence.argmax(0)  # (N,)
            return logits[best, torch.arange(logits.shape[1], device=logits.device)]
        t = self.temperature
        log_p = (logits / t).log_softmax(-1) + self.weights.log()[:, None, None]
        return t * torch.logsumexp(log_p, dim=0)
