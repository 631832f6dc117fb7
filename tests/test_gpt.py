"""The zoo's GPT decoders: shapes, causality, weight tying, taps, init, option errors, and a
tiny one that learns a sequence."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.models import create
from kdlab.models.gpt import GPT, SIZES
from kdlab.util.errors import KdlabError


def _tiny(**kwargs) -> GPT:
    torch.manual_seed(0)
    return GPT((16,), 50, dim=32, depth=2, heads=4, **kwargs)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_zoo_names_build_with_their_sizes(name):
    model = create(name, input_shape=[32], num_classes=256)
    dim, depth, heads = SIZES[name]
    assert len(model.blocks) == depth and model.token.embedding_dim == dim
    assert model(torch.randint(0, 256, (2, 32))).shape == (2, 32, 256)


def test_a_future_token_never_changes_an_earlier_logit():
    model = _tiny().eval()
    tokens = torch.randint(0, 50, (3, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 50
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_shorter_sequences_and_weight_tying():
    model = _tiny()
    assert model(torch.randint(0, 50, (2, 5))).shape == (2, 5, 50)
    assert model.head.weight is model.token.weight
    untied = _tiny(tie_weights=False)
    assert untied.head.weight is not untied.token.weight
    assert sum(p.numel() for p in untied.parameters()) - sum(
        p.numel() for p in model.parameters()) == 50 * 32


def test_init_is_gpt2s():
    model = GPT((64,), 256, dim=128, depth=8, heads=4)
    assert model.token.weight.std().item() == pytest.approx(0.02, rel=0.05)
    proj = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert all(b.attn.qkv.bias.abs().sum() == 0 for b in model.blocks)


def test_taps_name_every_block_and_the_final_state():
    model = _tiny()
    taps = model.taps()
    assert taps["blocks"] == ["blocks.0", "blocks.1"]
    assert taps["stages"] == ["stage_maps.0", "stage_maps.1"]  # the same as maps
    assert taps["embedding"] == ["ln_f"]
    modules = dict(model.named_modules())
    assert all(path in modules for paths in taps.values() for path in paths)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"input_shape": (1, 28, 28)}, "input shape must be \\(context,\\)"),
    ({"dim": 30, "heads": 4}, "model.dim=30"),
    ({"dropout": 1.0}, "model.dropout=1.0"),
])
def test_bad_options_name_the_key(kwargs, message):
    args = {"input_shape": (16,), "num_classes": 50, **kwargs}
    with pytest.raises(KdlabError, match=message):
        GPT(**args)


def test_too_long_a_sequence_names_the_context():
    with pytest.raises(KdlabError, match="model.context"):
        _tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_a_tiny_gpt_learns_a_repeating_sequence():
    torch.manual_seed(0)
    model = _tiny()
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6] * 3)
    x, y = pattern[:16].repeat(8, 1), pattern[1:17].repeat(8, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * math.log(50)  # from log(50) = 3.9 nats at chance


def test_stage_maps_are_each_blocks_hidden_states_as_one_column_maps():
    """Hint strategies read ``stages``: block k's ``[N, T, D]`` as ``[N, D, T, 1]``."""
    from kdlab.engine.taps import Taps

    torch.manual_seed(0)
    model = GPT((8,), 20, dim=16, depth=2, heads=2)
    aliases = model.taps()
    assert aliases["stages"] == aliases["preact"] == ["stage_maps.0", "stage_maps.1"]
    taps = Taps(model, [*aliases["stages"], *aliases["blocks"]])
    model(torch.randint(0, 20, (3, 8)))
    out = taps.pop()
    for k in range(2):
        hidden, fmap = out[f"blocks.{k}"], out[f"stage_maps.{k}"]
        assert hidden.shape == (3, 8, 16) and fmap.shape == (3, 16, 8, 1)
        torch.testing.assert_close(fmap[..., 0].transpose(1, 2), hidden)


@pytest.mark.parametrize("distill", ["fitnets", "at"])
def test_hint_strategies_match_gpt_hidden_states_end_to_end(distill, tmp_path):
    from kdlab.train import run
    from tests.conftest import make_cfg

    results = run(make_cfg(tmp_path, [
        "experiment=text_kd", f"distill={distill}", "~distill.kd", "trainer.fast_dev_run=true",
        "data.max_bytes=300000", "logger=none", "trainer.enable_progress_bar=false",
        "latency.repeats=1", "latency.batch_size=2", "baseline=false",
        "teacher.model.name=gpt_nano"]))
    assert results["strategy"] == distill
    assert 0 < results["student"]["metrics"]["test/bits_per_token"] < 9
