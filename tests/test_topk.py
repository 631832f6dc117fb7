"""Top-k teacher logits with the remainder spread evenly: exact where they promise to be, and a
cache that stores them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdlab.engine.cache import prepare_cache
from kdlab.engine.topk import compress, expand, kl_error
from kdlab.modes.build import cache_options
from kdlab.util.errors import KdlabError


def test_expanded_top_k_keeps_the_top_probabilities_and_the_remainders_mass():
    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0, -1.0]])
    values, index, fill = compress(logits, 2)
    assert index.tolist() == [[0, 2]] and values.tolist() == [[4.0, 3.0]]
    # the others' log-mean-exp, by hand
    assert fill.item() == pytest.approx(math.log((math.e ** 1 + 1 + math.e ** -1) / 3))
    p = torch.softmax(logits, 1)
    q = torch.softmax(expand(values, index, fill, 5), 1)
    torch.testing.assert_close(q[0, [0, 2]], p[0, [0, 2]])  # the top-2 exactly at T = 1
    torch.testing.assert_close(q[0, [1, 3, 4]], p[0, [1, 3, 4]].sum().expand(3) / 3)
    assert kl_error(logits, 2, 1.0).item() > 0
    assert kl_error(logits, 4, 4.0).item() < kl_error(logits, 2, 4.0).item()
    with pytest.raises(ValueError):
        compress(logits, 5)


def test_a_top_k_cache_looks_up_the_expanded_logits(fast_cfg):
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 40))
    data = SimpleNamespace(x_train=torch.randn(30, 1, 4, 4), augmented=False)
    cache = prepare_cache(cache_options(fast_cfg("teacher_cache.topk=5",
                                                 "teacher_cache.dtype=float32")),
                          teacher, None, data, False)
    again = prepare_cache(cache_options(fast_cfg("teacher_cache.topk=5",
                                                 "teacher_cache.dtype=float32")),
                          teacher, None, data, False)  # from the file
    index = torch.tensor([3, 0, 29])
    with torch.no_grad():
        live = teacher(data.x_train[index])
    for c in (cache, again):
        assert c.logits.shape == (30, 5) and c.classes == 40
        out = c.lookup(index)
        torch.testing.assert_close(out.logits, expand(*compress(live, 5), 40))
        torch.testing.assert_close(out.log_probs(4.0), torch.log_softmax(out.logits / 4.0, 1))
    full = prepare_cache(cache_options(fast_cfg("teacher_cache.dtype=float32")), teacher, None,
                         data, False)
    assert full.path != cache.path  # keyed by top-k
    assert cache.nbytes < full.nbytes / 3
    with pytest.raises(KdlabError, match="teacher_cache.topk"):
        cache_options(fast_cfg("teacher_cache.topk=0"))
