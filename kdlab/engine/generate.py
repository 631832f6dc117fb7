"""Sampling continuations from a language model: the student's own sequences for on-policy
distillation and the teacher's for sequence-level KD.

:func:`sample` extends prompts token by token, greedily (temperature 0) or from the model's
softmax at a temperature, optionally among the ``top_k`` most likely tokens. A model with a
key/value cache (:meth:`kdlab.models.gpt.GPT.decode`) feeds each new token through one position
of every layer; any other model mapping ``[N, T]`` token ids to ``[N, T, V]`` logits is run over
the whole sequence (its last ``context`` tokens, when it has a ``context``) at every step.
Measured once on one shared CPU thread (context 64, 8 prompts of 8 tokens, 56 new tokens,
greedy): gpt_micro 0.13 s with the cache against 0.67 s re-running the prefix, gpt_nano 0.05 s
against 0.17 s.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.util.errors import KdlabError


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` ``[N, V]``: the argmax at ``temperature`` 0, otherwise a
    draw from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits
    (``None``: every token). Returns ``[N, 1]`` token ids."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def sample(model: nn.Module, prompt: torch.Tensor, length: int, temperature: float = 1.0,
           top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``prompt`` ``[N, P]`` followed by ``length`` tokens drawn from ``model`` one at a time:
    ``[N, P + length]``.

    Args:
        model: maps token ids ``[N, T]`` to next-token logits ``[N, T, V]``; with a ``decode``
            method and ``new_cache`` (:class:`~kdlab.models.gpt.GPT`) its key/value cache is used.
        prompt: the first tokens of every sequence (at least one).
        length: tokens to add.
        temperature: 0: greedy (the most likely token); > 0: sampled from the softmax of the
            logits divided by it.
        top_k: sample among the ``k`` most likely tokens only; ``None``: all.
        generator: the random source of the draws (on the model's device), for reproducible
            samples; ``None``: torch's global one.

    The model runs in eval mode without gradients (its training mode is restored afterwards).
    Its ``context`` is respected: a sequence longer than the context is continued from its last
    ``context`` tokens (the cache is then left for full passes over that window, as nanoGPT
    crops).
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise KdlabError(f"sample: the prompt must be [N, P] token ids with P >= 1, got shape "
                         f"{list(prompt.shape)}")
    if temperature < 0:
        raise KdlabError(f"sample: temperature={temperature} must be >= 0 (0: greedy)")
    if top_k is not None and top_k < 1:
        raise KdlabError(f"sample: top_k={top_k} must be >= 1 or None")
    if length <= 0:
        return prompt.clone()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _extend(model, prompt, length, temperature, top_k, generator)
    finally:
        model.train(was_training)


def _extend(model: nn.Module, prompt: torch.Tensor, length: int, temperature: float,
            top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    context = getattr(model, "context", None)
    out = torch.empty(prompt.shape[0], prompt.shape[1] + length, dtype=prompt.dtype,
                      device=prompt.device)
    out[:, : prompt.shape[1]] = prompt
    filled = prompt.shape[1]
    cache = None
    if hasattr(model, "decode") and hasattr(model, "new_cache") and context is not None \
            and filled <= context:
        cache = model.new_cache(prompt.shape[0])
        logits = model.decode(prompt, cache)[:, -1]
    else:
        logits = _full(model, out[:, :filled], context)
    while True:
        out[:, filled : filled + 1] = next_token(logits, temperature, top_k, generator)
        filled += 1
        if filled == out.shape[1]:
            return out
        if cache is not None and filled <= context:
            logits = model.decode(out[:, filled - 1 : filled], cache)[:, -1]
        else:  # no cache, or past the context: the last `context` tokens again
            cache = None
            logits = _full(model, out[:, :filled], context)


def _full(model: nn.Module, tokens: torch.Tensor, context: int | None) -> torch.Tensor:
    """The next-token logits ``[N, V]`` after ``tokens`` from a full forward pass over its
    last ``context`` tokens."""
    if context is not None and tokens.shape[1] > context:
        tokens = tokens[:, -context:]
    return model(tokens)[:, -1]
