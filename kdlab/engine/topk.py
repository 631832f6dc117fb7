"""Top-k teacher logits with the rest of the probability spread evenly: a cache for many classes.

A cache of full float16 logits costs ``2·C`` bytes per stored input: 2 KB for ImageNet's 1,000
classes, 20 GB for 1.28M images × 8 views. Keeping the ``k`` largest logits (values and class
indices) and one number for the other ``C − k`` classes — the log of the mean of their
``exp(logit)``, so that at temperature 1 their total probability is exactly the teacher's —
costs ``k·(2 + 2) + 2`` bytes (class indices in int16 up to 32,767 classes). Expanded, the
top-k probabilities at ``T = 1`` are the teacher's exactly and the remainder is spread evenly
over the other classes; at other temperatures the spread remainder is an approximation.
:func:`kl_error` measures what it changes (the ``KL(p_T ‖ p̂_T)`` per input); docs/BENCHMARKS.md
has the numbers. This is the "top-k soft labels with a renormalised remainder" of offline
distillation toolkits (FKD, Shen & Xing 2022, stores top-k soft labels per crop).
"""

from __future__ import annotations

import math

import torch


def compress(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, index, fill)`` of float32 ``logits`` ``(..., C)`` (one input per row, or a
    language model's ``(n, T, C)``: one distribution per token): the ``k`` largest logits
    ``(..., k)``, their classes ``(..., k)`` and the log-mean-exp of the other logits
    ``(..., 1)``."""
    classes = logits.shape[-1]
    if not 0 < k < classes:
        raise ValueError(f"top-k needs 0 < k < {classes} classes, not {k}")
    values, index = logits.topk(k, dim=-1)
    others = logits.scatter(-1, index, float("-inf"))
    fill = torch.logsumexp(others, dim=-1, keepdim=True) - math.log(classes - k)
    dtype = torch.int16 if classes <= torch.iinfo(torch.int16).max else torch.int32
    return values, index.to(dtype), fill


def expand(values: torch.Tensor, index: torch.Tensor, fill: torch.Tensor,
           classes: int) -> torch.Tensor:
    """Float32 logits ``(..., C)``: ``fill`` everywhere but the top-k classes, which get their
    values."""
    out = fill.float().expand(*values.shape[:-1], classes).clone()
    return out.scatter_(-1, index.long(), values.float())


def kl_error(logits: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """Per input (per token) ``KL(softmax(z/T) ‖ softmax(ẑ/T))`` in nats, ``ẑ`` the expanded
    top-``k``."""
    expanded = expand(*compress(logits, k), logits.shape[-1])
    p = torch.log_softmax(logits / temperature, dim=-1)
    q = torch.log_softmax(expanded / temperature, dim=-1)
    return (p.exp() * (p - q)).sum(-1)
