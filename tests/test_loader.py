"""The fast data path: seeded per-epoch order, chunks of batches, sharding."""

from __future__ import annotations

import torch

from kdlab.data.loader import BatchLoader
from kdlab.engine.loop import ChunkedLoader


def _loader(**kwargs) -> BatchLoader:
    x = torch.arange(50).float()[:, None]
    return BatchLoader(x, torch.arange(50) % 3, torch.arange(50), batch_size=8, **kwargs)


def _indices(loader: BatchLoader) -> list[int]:
    out = []
    for item in loader:
        for x, y, j in item if isinstance(item, list) else [item]:
            assert torch.equal(x[:, 0], j.float()) and torch.equal(y, j % 3)
            out += j.tolist()
    return out


def test_each_epoch_is_a_seeded_permutation_that_changes_with_the_epoch():
    loader = _loader(shuffle=True, seed=3)
    first = _indices(loader)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert _indices(loader) == first  # same epoch, same order (resumable)
    loader.set_epoch(1)
    assert _indices(loader) != first
    other = _loader(shuffle=True, seed=4)
    assert _indices(other) != first
    assert len(loader) == 7 and loader.num_batches == 7  # ceil(50 / 8)


def test_chunks_hold_the_same_batches_in_the_same_order():
    plain, chunked = _loader(shuffle=True), ChunkedLoader(_loader(shuffle=True), 3)
    items = list(chunked)
    assert len(chunked) == len(items) == 3 and [len(c) for c in items] == [3, 3, 1]
    assert _indices(chunked) == _indices(plain)


def test_chunks_stop_at_the_batch_limit_and_end_at_validation_points():
    limited = ChunkedLoader(_loader(), 3, limit=5)
    assert [len(c) for c in limited] == [3, 2] and limited.num_batches == 5
    assert _indices(limited) == list(range(40))
    bounded = ChunkedLoader(_loader(), 4, boundary=3)  # validation every 3 batches
    assert [len(c) for c in bounded] == [3, 3, 1] == bounded.sizes()
    assert ChunkedLoader(_loader(), 2, boundary=5).sizes() == [2, 2, 1, 2]
    assert ChunkedLoader(_loader(), 64).sizes() == [7] and len(ChunkedLoader(_loader(), 64)) == 1


def test_ranks_take_disjoint_equal_shares():
    shards = [_indices(_loader(shuffle=True, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 24  # 3 batches of 8 each; the short 7th dropped
    assert not set(shards[0]) & set(shards[1])
    assert _loader(rank=1, world_size=2).num_batches == 3


def test_lightning_sets_the_epoch_through_the_sampler_attribute():
    from lightning.fabric.utilities.data import _set_sampler_epoch

    loader = _loader(shuffle=True)
    _set_sampler_epoch(loader, 5)
    assert loader.epoch == 5
