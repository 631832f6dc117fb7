"""A few continuations written by a trained language model, for ``results.json``: what a reader
looks at beside bits per byte.

Prompts are the first ``prompt`` tokens of ``n`` test windows spread evenly over the test split
(the same for every network of a run, and across runs of one corpus); each network continues
them to the end of its context, sampled at ``temperature`` from a generator seeded by the run's
seed (:func:`kdlab.engine.generate.sample`, KV-cached for kdlab's GPT).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdlab.engine.generate import sample
from kdlab.util.inputs import TokenShape

#: test windows sampled, tokens of each kept as the prompt, sampling temperature
SAMPLES, PROMPT, TEMPERATURE = 3, 24, 0.8


def text_samples(model: nn.Module, data: Any, seed: int, n: int = SAMPLES,
                 prompt: int = PROMPT, temperature: float = TEMPERATURE) -> list[dict[str, str]]:
    """``[{"prompt": …, "continuation": …}]`` of ``model`` on ``data``'s test split (decoded
    by its tokenizer); empty for data that is not text."""
    if not isinstance(getattr(data, "input_shape", None), TokenShape) or \
            not hasattr(data, "tokenizer"):
        return []
    data.setup()
    x = data.x_test.cpu()
    context = x.shape[1]
    prompt = min(prompt, context - 1)
    index = torch.linspace(0, len(x) - 1, min(n, len(x))).round().long()
    device = next(model.parameters()).device
    prompts = x[index, :prompt].to(device)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    out = sample(model, prompts, context - prompt, temperature, generator=generator).cpu()
    decode = data.tokenizer.decode
    return [{"prompt": decode(p), "continuation": decode(c)}
            for p, c in zip(out[:, :prompt], out[:, prompt:])]
