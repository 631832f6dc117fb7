"""KV-cached decoding of the GPT and sampling (kdlab/engine/generate.py): the cache gives a full
forward pass's logits, greedy decoding is the argmax of full passes, seeded draws repeat."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab.engine.generate import next_token, sample
from kdlab.models.gpt import GPT
from kdlab.util.errors import KdlabError


def _gpt(context: int = 16, vocab: int = 40) -> GPT:
    torch.manual_seed(0)
    return GPT((context,), vocab, dim=32, depth=2, heads=4).eval()


class Plain(nn.Module):
    """The same network without ``decode``: sampling falls back to full passes."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt
        self.context = gpt.context

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt(tokens)


@pytest.mark.parametrize("steps", [[16], [1] * 16, [5, 1, 1, 4, 3, 2]])
def test_cached_decoding_gives_the_full_forward_logits_at_every_position(steps):
    model = _gpt()
    tokens = torch.randint(0, 40, (3, 16))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(3)
        parts, start = [], 0
        for t in steps:  # the prompt at once, one token at a time, or chunks after a prefix
            parts.append(model.decode(tokens[:, start : start + t], cache))
            start += t
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_decoding_past_the_context_names_it():
    model = _gpt(context=8)
    cache = model.new_cache(1)
    model.decode(torch.zeros(1, 6, dtype=torch.long), cache)
    with pytest.raises(KdlabError, match="model.context"):
        model.decode(torch.zeros(1, 3, dtype=torch.long), cache)


def _greedy_by_full_passes(model: nn.Module, prompt: torch.Tensor, length: int) -> torch.Tensor:
    out = prompt
    with torch.no_grad():
        for _ in range(length):
            window = out[:, -model.context:]
            out = torch.cat([out, model(window)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("length", [12, 13, 20])  # to the context, one beyond (the last token
def test_greedy_sampling_is_the_argmax_of_full_passes(length):  # needs no pass), and past it
    model = _gpt()
    prompt = torch.randint(0, 40, (4, 4))
    expected = _greedy_by_full_passes(model, prompt, length)
    cached = sample(model, prompt, length, temperature=0.0)
    assert cached.shape == (4, 4 + length)
    assert torch.equal(cached, expected)
    assert torch.equal(sample(Plain(model), prompt, length, temperature=0.0), expected)


def test_seeded_sampling_repeats_and_matches_without_the_cache():
    model = _gpt()
    prompt = torch.randint(0, 40, (5, 3))

    def draw(m: nn.Module, seed: int, **kw) -> torch.Tensor:
        return sample(m, prompt, 13, temperature=1.0, generator=torch.Generator().manual_seed(
            seed), **kw)

    a, b = draw(model, 7), draw(model, 7)
    assert torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    assert not torch.equal(a, draw(model, 8))
    assert torch.equal(a, draw(Plain(model), 7))  # same logits, same draws
    top1 = draw(model, 7, top_k=1)
    assert torch.equal(top1, sample(model, prompt, 13, temperature=0.0))


def test_sampling_restores_the_training_mode_and_tracks_no_gradients():
    model = _gpt().train()
    out = sample(model, torch.zeros(2, 2, dtype=torch.long), 5, temperature=0.5,
                 generator=torch.Generator().manual_seed(0))
    assert model.training and not out.requires_grad and out.dtype == torch.long


def test_top_k_draws_only_among_the_k_largest():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    drawn = next_token(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(drawn.flatten().tolist()) == {1, 2}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"top_k": 0}, "top_k=0"),
])
def test_bad_options_fail_naming_them(kwargs, message):
    with pytest.raises(KdlabError, match=message):
        sample(_gpt(), torch.zeros(1, 2, dtype=torch.long), 3, **kwargs)


def test_text_samples_continue_test_prompts_to_the_context_and_skip_images():
    from types import SimpleNamespace

    from kdlab.data.text import ByteTokenizer
    from kdlab.modes.samples import text_samples
    from kdlab.util.inputs import TokenShape

    torch.manual_seed(0)
    model = GPT((16,), 256, dim=16, depth=1, heads=2)
    x_test = torch.tensor(list(b"def f(x):\n    return x + 1\n" * 4)[:80]).view(5, 16)
    data = SimpleNamespace(input_shape=TokenShape((16,), 256), tokenizer=ByteTokenizer(),
                           x_test=x_test, setup=lambda: None)
    samples = text_samples(model, data, seed=0, n=3, prompt=6)
    assert [s["prompt"] for s in samples] == [bytes(x_test[i, :6].tolist()).decode()
                                              for i in (0, 2, 4)]
    assert all(len(s["continuation"].encode("utf-8", "surrogatepass")) >= 1 for s in samples)
    assert samples == text_samples(model, data, seed=0, n=3, prompt=6)  # seeded
    images = SimpleNamespace(input_shape=(1, 28, 28))
    assert text_samples(model, images, seed=0) == []
