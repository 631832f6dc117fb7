"""ReviewKD: HCL and ABF against their formulas, pairing, warm-up, gradients, validation."""

import pytest
import torch
import torch.nn.functional as F

from kdlab.strategies import Batch, Outputs
from kdlab.strategies.review import ABF, ReviewKD, hcl_loss
from kdlab.util.errors import KdlabError


def _mse(a, b):
    a, b = a.flatten().tolist(), b.flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def _block_mean(x, size):
    """Average pooling to ``size × size``: bin ``i`` of a side ``h`` spans rows
    ``floor(i·h/size)`` to ``ceil((i+1)·h/size)`` (bins overlap when ``size`` does not divide)."""
    h, w = x.shape[-2:]
    rows = [(i * h // size, -(-(i + 1) * h // size)) for i in range(size)]
    cols = [(j * w // size, -(-(j + 1) * w // size)) for j in range(size)]
    return torch.stack([torch.stack([x[..., r0:r1, c0:c1].mean(dim=(-2, -1)) for c0, c1 in cols],
                                    dim=-1) for r0, r1 in rows], dim=-2)


def _hcl(s, t):
    """HCL written out from the paper: weights 1, ½, ¼, ⅛ over full, 4, 2, 1 (sizes smaller
    than the map only), normalised by their sum."""
    h = s.shape[-1]
    levels = [(1.0, s, t)]
    weight = 1.0
    for size in (4, 2, 1):
        if size < h:
            weight /= 2
            levels.append((weight, _block_mean(s, size), _block_mean(t, size)))
    return sum(w * _mse(a, b) for w, a, b in levels) / sum(w for w, _, _ in levels)


def test_hcl_on_a_hand_made_4x4_map():
    s = torch.arange(16.0).reshape(1, 1, 4, 4)
    t = torch.zeros(1, 1, 4, 4)
    full = sum(v * v for v in range(16)) / 16
    # 2×2 pooled: block means 2.5, 4.5, 10.5, 12.5; 1×1: 7.5 (4×4 itself is not pooled)
    two = (2.5**2 + 4.5**2 + 10.5**2 + 12.5**2) / 4
    one = 7.5**2
    expected = (full + 0.5 * two + 0.25 * one) / 1.75
    assert hcl_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("size", [1, 2, 7, 8])
def test_hcl_matches_the_written_out_formula(size):
    torch.manual_seed(size)
    s, t = torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)
    assert hcl_loss(s, t).item() == pytest.approx(_hcl(s, t), rel=1e-5)


def test_abf_fuses_with_the_attention_and_resizes_to_the_teacher():
    torch.manual_seed(0)
    abf = ABF(in_channels=3, mid_channels=2, out_channels=4, fuse=True).eval()
    x, residual = torch.randn(1, 3, 2, 2), torch.randn(1, 2, 1, 1)
    out, fused = abf(x, residual, (4, 4))
    assert out.shape == (1, 4, 4, 4) and fused.shape == (1, 2, 4, 4)
    # written out: 1×1 conv as a matrix product, BN in eval mode (running mean 0, var 1)
    bn = 1 / (1 + abf.reduce[1].eps) ** 0.5
    w1 = abf.reduce[0].weight[:, :, 0, 0]
    reduced = torch.einsum("oc,nchw->nohw", w1, x) * bn
    up = residual.expand(1, 2, 2, 2)  # nearest upsampling of a 1×1 map
    wa, ba = abf.attention[0].weight[:, :, 0, 0], abf.attention[0].bias
    logits = torch.einsum("oc,nchw->nohw", wa, torch.cat([reduced, up], 1)) + ba[:, None, None]
    a = torch.sigmoid(logits)
    mixed = reduced * a[:, :1] + up * a[:, 1:]
    grown = mixed.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    expected = F.conv2d(grown, abf.output[0].weight, padding=1) * bn
    assert torch.allclose(fused, grown, atol=1e-6)
    assert torch.allclose(out, expected, atol=1e-5)
    # the deepest level has no attention and shrinks by average pooling
    deepest = ABF(3, 2, 4, fuse=False).eval()
    _, pooled = deepest(torch.randn(1, 3, 4, 4), None, (2, 2))
    assert deepest.attention is None and pooled.shape == (1, 2, 2, 2)


def _review(student_shapes, teacher_shapes, **kwargs) -> ReviewKD:
    torch.manual_seed(0)
    review = ReviewKD(**kwargs)
    review.student_paths = [f"s{i}" for i in range(len(student_shapes))]
    review.teacher_paths = [f"t{i}" for i in range(len(teacher_shapes))]
    review.setup(*_outputs([torch.zeros(s) for s in student_shapes],
                           [torch.zeros(t) for t in teacher_shapes]), 10)
    return review


def _outputs(student, teacher):
    return (Outputs(torch.zeros(2, 3), {f"s{i}": x for i, x in enumerate(student)}),
            Outputs(torch.zeros(2, 3), {f"t{i}": x for i, x in enumerate(teacher)}))


def _batch(n=2):
    return Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n))


STUDENT = [(2, 8, 14, 14), (2, 16, 7, 7), (2, 16, 3, 3)]
TEACHER = [(2, 32, 14, 14), (2, 64, 7, 7)]


def test_pairs_the_last_stages_and_builds_one_abf_per_pair():
    review = _review(STUDENT, TEACHER)
    assert len(review.abfs) == 2
    assert [abf.reduce[0].in_channels for abf in review.abfs] == [16, 16]
    assert [abf.output[0].out_channels for abf in review.abfs] == [32, 64]
    assert [abf.reduce[0].out_channels for abf in review.abfs] == [16, 16]  # min(512, 16)
    assert review.abfs[0].attention is not None and review.abfs[1].attention is None
    s = [torch.randn(s) for s in STUDENT]
    t = [torch.randn(t) for t in TEACHER]
    outputs = review.review(*_outputs(s, t))
    assert [tuple(o.shape) for o in outputs] == TEACHER
    assert _review(STUDENT, TEACHER, mid_channels=5).abfs[0].reduce[0].out_channels == 5
    # vectors (e.g. the embedding) count as 1×1 maps; more teacher layers: its last ones
    vectors = _review([(2, 16, 3, 3), (2, 12)], [(2, 8, 7, 7), (2, 32, 4, 4), (2, 20)])
    assert [abf.output[0].out_channels for abf in vectors.abfs] == [32, 20]


def test_loss_is_beta_times_warmup_times_the_summed_hcl():
    review = _review(STUDENT, TEACHER, beta=3.0, warmup=20).eval()
    torch.manual_seed(3)
    s = [torch.randn(s) for s in STUDENT]
    t = [torch.randn(t) for t in TEACHER]
    with torch.no_grad():
        outputs = review.review(*_outputs(s, t))
    summed = sum(_hcl(o, ft) for o, ft in zip(outputs, t))
    for epoch, factor in [(0, 1 / 20), (9, 10 / 20), (19, 1.0), (50, 1.0)]:
        review.on_epoch_start(epoch)
        terms = review(*_outputs(s, t), _batch())
        assert set(terms) == {"reviewkd"}
        assert terms["reviewkd"].item() == pytest.approx(3.0 * factor * summed, rel=1e-5)
    no_warmup = _review(STUDENT, TEACHER, warmup=0).eval()
    no_warmup.load_state_dict(review.state_dict())
    value = no_warmup(*_outputs(s, t), _batch())["reviewkd"].item()
    assert value == pytest.approx(summed, rel=1e-5)


def test_gradients_reach_student_and_abfs_but_not_the_teacher():
    review = _review(STUDENT, TEACHER)
    s = [torch.randn(x, requires_grad=True) for x in STUDENT]
    t = [torch.randn(x, requires_grad=True) for x in TEACHER]
    review(*_outputs(s, t), _batch())["reviewkd"].backward()
    assert s[0].grad is None  # the unpaired shallowest student stage
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s[1:])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in review.parameters())
    assert all(x.grad is None for x in t)


@pytest.mark.parametrize("kwargs, key", [
    ({"beta": -0.5}, "distill.beta=-0.5"),
    ({"warmup": -1}, "distill.warmup=-1"),
    ({"warmup": 2.5}, "distill.warmup=2.5"),
    ({"mid_channels": 0}, "distill.mid_channels=0"),
])
def test_bad_hyper_parameters_name_the_key(kwargs, key):
    with pytest.raises(KdlabError, match=key):
        ReviewKD(**kwargs)


def test_bad_feature_rank_names_the_layers_key():
    with pytest.raises(KdlabError, match="distill.student_layers: ReviewKD reads feature maps"):
        _review([(2, 3, 4)], [(2, 3, 4, 4)])


def test_a_short_run_learns(tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short("reviewkd", tmp_path)
    assert_learned(results)
