"""On-policy distillation of language models — Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist
& Bachem, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
(GKD), ICLR 2024 (arXiv:2306.13649).

A student trained only on the corpus is judged at generation time on its own prefixes, which
drift from any it saw in training. GKD trains a fraction λ of the batches on sequences the
student generates itself, scored token by token by the teacher. Here, for such a batch
(:meth:`~kdlab.engine.module.DistillationModule.on_policy_terms`): every training window keeps
its first ``prompt`` tokens; the student samples the rest of the window without gradients
(:func:`generated_windows`, KV-cached); the live teacher and the student run on the generated
window; and the strategy (``distill=gkd``, ``reverse_kl``, ``kd`` …) compares their next-token
distributions on the positions that predict generated tokens, ``prompt - 1 … context - 1``,
the prompt's positions left out. There is no cross-entropy on such a batch: the student's own
samples are not labels. The other batches are trained as usual (cross-entropy plus the
strategy on the corpus, with the teacher cache if any).

Which batches are generated, and what is sampled, is a pure function of ``on_policy.seed``, the
optimizer step and the batch's place in a gradient accumulation (:func:`on_policy_draw`), so a
resumed run trains on what the uninterrupted run would have.

A strategy that reads hidden states is refused (:func:`check_on_policy`): the prompt's positions
are left out of the token rows the logit strategies compare, and a feature strategy's
``[N, T, D]`` maps have no such rows to leave out.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from kdlab.engine.generate import sample
from kdlab.engine.spec import OnPolicyOptions
from kdlab.util.errors import KdlabError
from kdlab.util.inputs import TokenShape


def on_policy_draw(options: OnPolicyOptions, step: int, micro: int) -> int | None:
    """Whether the batch at optimizer step ``step`` (the ``micro``-th of a gradient
    accumulation) is generated: the seed of its sample when it is (a uniform draw below
    ``options.fraction``), ``None`` when it comes from the data."""
    digest = hashlib.blake2b(f"{options.seed}:{step}:{micro}".encode(), digest_size=16).digest()
    if int.from_bytes(digest[:8], "big") / 2.0**64 >= options.fraction:
        return None
    return int.from_bytes(digest[8:], "big") >> 1  # a seed below 2**63


def generated_windows(student: nn.Module, x: torch.Tensor, options: OnPolicyOptions,
                      generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows the student writes from the prompts of ``x`` ``[N, T]``: its first
    ``options.prompt`` tokens, then ``T - prompt + 1`` tokens sampled at
    ``options.temperature`` (the last one is only a target, as a corpus window has one more
    token than its inputs). Returns inputs ``[N, T]`` and next-token targets ``[N, T]``."""
    t = x.shape[1]
    sequence = sample(student, x[:, : options.prompt], t - options.prompt + 1,
                      options.temperature, options.top_k, generator)
    return sequence[:, :t], sequence[:, 1:]


def check_on_policy(options: OnPolicyOptions, data: Any, strategy: Any,
                    tapped: bool) -> None:
    """Refuse, naming the ``on_policy.*`` key, what on-policy distillation cannot train:
    non-token data, a prompt that leaves nothing to generate, a stage without a teacher, or
    a strategy that reads hidden states (``tapped``)."""
    if options.fraction <= 0:
        return
    fraction = f"on_policy.fraction={options.fraction:g}"
    if not isinstance(getattr(data, "input_shape", None), TokenShape):
        raise KdlabError(f"{fraction}: the student generates token sequences, but "
                         f"data={getattr(data, 'name', type(data).__name__)} is not text; "
                         "set on_policy.fraction=0 (or use data=text)")
    context = int(data.input_shape[0])
    if not 1 <= options.prompt < context:
        raise KdlabError(f"on_policy.prompt={options.prompt} must be at least 1 and below "
                         f"data.context={context}: the student writes the rest of each window")
    if strategy is None or not strategy.needs_teacher:
        raise KdlabError(f"{fraction} needs a teacher to score the student's samples: choose "
                         "a distillation strategy (distill=gkd, reverse_kl, kd …)")
    if tapped:
        raise KdlabError(f"{fraction} with a strategy that reads hidden states: on-policy "
                         "batches compare the next-token distributions of the generated "
                         "positions only (the prompt's are left out), which a feature map has "
                         "no rows for; use a logit strategy (distill=gkd, reverse_kl, kd …)")
