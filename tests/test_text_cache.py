"""The teacher-output cache for language models: one stored distribution per token of every
training window, full or top-k, looked up as the live teacher's rows; a cached text run ends
where a live one does."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from kdlab.engine.cache import prepare_cache
from kdlab.engine.module import as_rows
from kdlab.engine.topk import compress, expand, kl_error
from kdlab.models.gpt import GPT
from kdlab.modes.build import cache_options
from kdlab.train import run
from tests.conftest import make_cfg
from tests.test_text_runs import TEXT


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT((12,), 40, dim=16, depth=1, heads=2).eval()


def test_top_k_of_token_windows_is_the_top_k_of_each_token_row():
    logits = torch.randn(3, 5, 40)
    values, index, fill = compress(logits, 4)
    assert values.shape == index.shape == (3, 5, 4) and fill.shape == (3, 5, 1)
    rows = compress(logits.flatten(0, 1), 4)
    for got, want in zip((values, index, fill), rows):
        torch.testing.assert_close(got.flatten(0, 1), want)
    torch.testing.assert_close(expand(values, index, fill, 40).flatten(0, 1),
                               expand(*rows, 40))
    torch.testing.assert_close(kl_error(logits, 4).flatten(), kl_error(logits.flatten(0, 1), 4))


@pytest.mark.parametrize("topk", [None, 6])
def test_a_token_cache_returns_the_live_teachers_rows(fast_cfg, topk):
    teacher = _gpt()
    data = SimpleNamespace(x_train=torch.randint(0, 40, (20, 12)), augmented=False)
    options = ["teacher_cache.dtype=float32", *([f"teacher_cache.topk={topk}"] if topk else [])]
    cache = prepare_cache(cache_options(fast_cfg(*options)), teacher, None, data, False)
    again = prepare_cache(cache_options(fast_cfg(*options)), teacher, None, data, False)
    assert again.path == cache.path  # from the file, keyed by top-k
    index = torch.tensor([4, 0, 19])
    with torch.no_grad():
        live = teacher(data.x_train[index])  # [3, 12, 40]
    want = as_rows(live) if topk is None else as_rows(expand(*compress(live, topk), 40))
    for c in (cache, again):
        assert c.tokens and c.logits.shape == (20, 12, topk or 40)
        out = c.lookup(index)
        assert out.logits.shape == (36, 40)
        torch.testing.assert_close(out.logits, want)
        torch.testing.assert_close(out.log_probs(2.0), torch.log_softmax(want / 2.0, 1))


def test_a_token_cache_too_large_for_its_budget_says_how_to_shrink_it(fast_cfg, caplog):
    caplog.set_level(logging.INFO, logger="kdlab.engine.cache")
    data = SimpleNamespace(x_train=torch.randint(0, 40, (2000, 12)), augmented=False)
    # 2,000 windows x 12 tokens x 40 logits x 2 bytes = 1.83 MB; top-4: 2000*12*(4*4+2) = 0.41
    cache = prepare_cache(cache_options(fast_cfg("teacher_cache.max_mb=1")), _gpt(), None,
                          data, False)
    assert cache is None and "teacher_cache.topk=k keeps k of the 40 logits" in caplog.text
    small = prepare_cache(cache_options(fast_cfg("teacher_cache.max_mb=1",
                                                 "teacher_cache.topk=4")), _gpt(), None, data,
                          False)
    assert small is not None and small.nbytes == 2000 * 12 * (4 * 4 + 2)


def test_a_cached_text_run_ends_where_a_live_run_does(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdlab.engine.cache")
    base = [*TEXT, "distill=kd", "trainer.limit_train_batches=4", "data.max_bytes=150000"]
    live = run(make_cfg(tmp_path, [*base, "teacher_cache.enabled=false",
                                   f"paths.output_dir={tmp_path}/live"]))
    cached = run(make_cfg(tmp_path, [*base, "teacher_cache.enabled=true",
                                     "teacher_cache.dtype=float32",
                                     f"paths.output_dir={tmp_path}/cached"]))
    assert live["student"]["last_ckpt"] != cached["student"]["last_ckpt"]
    assert "windows of 32 tokens" in caplog.text
    a = torch.load(live["student"]["last_ckpt"], weights_only=True)["state_dict"]
    b = torch.load(cached["student"]["last_ckpt"], weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_a_resumed_text_stage_with_a_top_k_cache_ends_with_the_uninterrupted_weights(tmp_path):
    """Text KD read from a top-k cache, interrupted after one epoch and resumed from
    last.ckpt: the same student as an uninterrupted run, bit for bit."""
    from kdlab.engine.spec import OnPolicyOptions
    from tests.test_on_policy import StopAfter, _text_stage

    off = OnPolicyOptions(fraction=0.0)
    two = ("distill=kd", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
           "teacher_cache.enabled=true", "teacher_cache.topk=8", "teacher_cache.disk=false")
    _, straight = _text_stage(tmp_path, off, "straight", *two)
    _text_stage(tmp_path, off, "cut", *two, callbacks=[StopAfter(1)])
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    _, again = _text_stage(tmp_path, off, "cut", *two, ckpt_path=str(last))
    for k, v in straight.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
