"""kdlab's batched RandAugment + Cutout (MLKD's strong view): every operation keeps shape,
dtype and the [0, 1] range, a few operations against hand-computed results, per-sample
randomness, seeded determinism, and the normalised wrapper's options."""

from __future__ import annotations

import pytest
import torch

from kdlab.data import randaugment as ra
from kdlab.util.errors import KdlabError


def _batch(n: int = 6, c: int = 3, size: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(ra.OPS))
def test_each_op_keeps_shape_dtype_and_range(name, channels):
    op, lo, hi = ra.OPS[name]
    x = _batch(c=channels)
    for strengths in (torch.full((6,), lo), torch.full((6,), hi), lo + (hi - lo) * torch.rand(6)):
        out = op(x, strengths)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_ops_against_hand_computed_results():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 7] = 1.0  # right of the centre
    # counter-clockwise by 90°: the pixel moves above the centre
    assert ra.rotate(x, torch.tensor([90.0]))[0, 0].nonzero().tolist() == [[1, 4]]
    # translate by 2 px of 9: the content moves left by 2
    assert ra.translate_x(x, torch.tensor([2 / 9]))[0, 0].nonzero().tolist() == [[4, 5]]
    levels = torch.tensor([0.0, 100.0, 128.0, 255.0]).view(1, 1, 1, 4) / 255
    solar = ra.solarize(levels, torch.tensor([128.0])) * 255
    assert solar.round().flatten().tolist() == [0.0, 100.0, 127.0, 0.0]
    poster = ra.posterize(levels, torch.tensor([4.7])) * 255  # int(4.7) = 4 bits
    assert poster.round().flatten().tolist() == [0.0, 96.0, 128.0, 240.0]
    grey = torch.full((1, 3, 2, 2), 0.5)
    assert torch.allclose(ra.brightness(grey, torch.tensor([0.5])), grey * 0.5)
    assert torch.equal(ra.color(grey, torch.tensor([0.1])), grey)  # no saturation to lose


def test_cutout_draws_the_authors_square():
    x = torch.zeros(2, 3, 8, 8)
    out = ra.cutout(x, torch.tensor([0.25, 0.0]), torch.tensor([4.0, 4.0]),
                    torch.tensor([4.0, 4.0]), ra.cutout_fill(3))
    # side 2 px, corner int(4 - 1) = 3, far corner 3 + 2 = 5, both ends inclusive
    box = (out[0, 0] > 0).nonzero()
    assert box[:, 0].unique().tolist() == [3, 4, 5] and box[:, 1].unique().tolist() == [3, 4, 5]
    assert torch.allclose(out[0, :, 4, 4], torch.tensor(ra.CUTOUT_FILL))
    assert torch.equal(out[1], x[1])  # a side of 0: untouched


def test_each_sample_draws_its_own_ops_and_the_seed_fixes_them():
    x = _batch(n=1).expand(32, -1, -1, -1).contiguous()  # one image, 32 times
    torch.manual_seed(3)
    first = ra.rand_augment(x)
    distinct = {tuple(img.flatten()[:50].tolist()) for img in first}
    assert len(distinct) > 16  # per-sample draws
    torch.manual_seed(3)
    assert torch.equal(ra.rand_augment(x), first)
    again = ra.rand_augment(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, ra.rand_augment(x, generator=torch.Generator().manual_seed(5)))
    assert first.min() >= 0 and first.max() <= 1


def test_the_normalised_wrapper():
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    pixels = _batch()
    x = (pixels - mean) / std
    plain = ra.StrongAugment(num_ops=0, cutout=0.0)
    assert torch.allclose(plain(x, mean, std), x, atol=1e-6)
    strong = ra.StrongAugment()(x, mean, std)
    assert strong.shape == x.shape and not torch.equal(strong, x)
    back = strong * std + mean
    assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6
    with pytest.raises(KdlabError, match=r"distill\.strong_ops="):
        ra.StrongAugment(num_ops=-1)
    with pytest.raises(KdlabError, match=r"distill\.cutout="):
        ra.StrongAugment(cutout=1.5)
