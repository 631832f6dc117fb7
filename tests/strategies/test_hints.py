"""Hint methods (FitNets, OFD, AB, VID): losses against their formulas written out by hand,
gradient flow, hyper-parameter checks, layer pairing and end-to-end short runs that learn."""

import math

import pytest
import torch
from torch import nn

from kdlab.models import CNN
from kdlab.strategies.base import Batch, Outputs
from kdlab.strategies.hints import (
    AB,
    OFD,
    VID,
    FitNets,
    ab_elementwise,
    ab_residual,
    as_map,
    ofd_residual,
    piecewise_square_sum,
    resize_to,
)
from kdlab.util.errors import KdlabError

BATCH = Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.arange(2))


def _outputs(prefix: str, *features: torch.Tensor) -> Outputs:
    return Outputs(torch.zeros(features[0].shape[0], 3),
                   {f"{prefix}{i}": f for i, f in enumerate(features)})


def _build(strategy, student: list[torch.Tensor], teacher: list[torch.Tensor]):
    """Paths set by hand (no model), then ``setup`` on the hand-made outputs."""
    strategy.student_paths = [f"s{i}" for i in range(len(student))]
    strategy.teacher_paths = [f"t{i}" for i in range(len(teacher))]
    s, t = _outputs("s", *student), _outputs("t", *teacher)
    strategy.setup(s, t, 10)
    return s, t


def _flat(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.detach().flatten()]


def _items(x: torch.Tensor):
    """``(channel, value)`` of every element of an (N, C, H, W) tensor."""
    n, c, h, w = x.shape
    for a in range(n):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    yield ch, float(x[a, ch, i, j])


# -- shared helpers ------------------------------------------------------------------------------
def test_resize_pools_larger_maps_interpolates_smaller_ones_and_vectors_become_maps():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    pooled = resize_to(x, (2, 2))
    expected = [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9 + 12 + 13) / 4,
                (10 + 11 + 14 + 15) / 4]
    assert _flat(pooled) == pytest.approx(expected)
    assert resize_to(x, (4, 4)) is x
    up = resize_to(torch.ones(2, 3, 3, 3), (7, 7))
    assert up.shape == (2, 3, 7, 7) and torch.allclose(up, torch.ones_like(up))
    assert as_map(torch.ones(2, 5)).shape == (2, 5, 1, 1)
    with pytest.raises(KdlabError, match="student layer x"):
        as_map(torch.ones(2, 3, 4), "student layer x")


def test_layers_pair_from_the_end_and_unpaired_layers_are_not_tapped():
    torch.manual_seed(0)
    student, teacher = CNN([1, 28, 28], 10, channels=[8, 16, 16], hidden=16), CNN([1, 28, 28], 10)
    # FitNets' default pairs the middle entries, (n - 1) // 2: of 3 student and 2 teacher stages
    assert FitNets().resolve(student, teacher) == (["stages.1"], ["stages.0"])
    assert FitNets(hints=1).resolve(student, teacher) == (["stages.2"], ["stages.1"])
    assert FitNets(hints=None).resolve(student, teacher) == (["stages.1", "stages.2"],
                                                             ["stages.0", "stages.1"])
    assert AB().resolve(student, teacher) == (["stages.1.1", "stages.2.1"],
                                              ["stages.0.1", "stages.1.1"])
    assert VID(student_layers=["stages.0"], teacher_layers="stages").resolve(
        student, teacher) == (["stages.0"], ["stages.1"])
    # hand-made lists of unequal length pair the same way in forward
    vid = VID()
    s_feats = [torch.randn(2, 8, 4, 4), torch.randn(2, 4, 2, 2), torch.randn(2, 6, 1, 1)]
    t_feats = [torch.randn(2, 5, 2, 2), torch.randn(2, 3, 2, 2)]
    _build(vid, s_feats, t_feats)
    assert [tuple(r[0].weight.shape[:2]) for r in vid.regressors] == [(5, 4), (3, 6)]


# -- FitNets ---------------------------------------------------------------------------------------
def test_fitnets_is_beta_times_the_mean_squared_error_after_pooling():
    s = torch.tensor([[[[1.0, 3.0], [5.0, -1.0]]], [[[0.0, 2.0], [2.0, 0.0]]]])  # (2, 1, 2, 2)
    t = torch.tensor([[[[2.5]]], [[[0.5]]]])  # (2, 1, 1, 1): the student is pooled to 1×1
    fit = FitNets(beta=3.0, init_epochs=2)
    student, teacher = _build(fit, [s], [t])
    fit.regressors[0] = nn.Identity()
    # means: (1+3+5-1)/4 = 2 vs 2.5, (0+2+2+0)/4 = 1 vs 0.5 -> ((-0.5)² + 0.5²) / 2 = 0.25
    assert fit(student, teacher, BATCH)["fitnets"].item() == pytest.approx(3.0 * 0.25)
    assert fit.init_loss(student, teacher, BATCH)["fitnets_init"].item() == pytest.approx(0.25)
    assert fit.init_epochs == 2


def test_fitnets_middle_is_the_lower_middle_of_each_list_as_repdistillers_hint_layer():
    five, four = nn.Sequential(*[nn.Identity() for _ in range(5)]), nn.Sequential(
        *[nn.Identity() for _ in range(4)])
    fit = FitNets(student_layers=[str(i) for i in range(5)],
                  teacher_layers=[str(i) for i in range(4)])
    # 5 VGG blocks -> the third; 4 stages (MobileNetV2, ResNet-50) -> the second
    assert fit.resolve(five, four) == (["2"], ["1"])
    three = nn.Sequential(*[nn.Identity() for _ in range(3)])
    assert FitNets(student_layers=["0", "1", "2"], teacher_layers=["0"]).resolve(
        three, three) == (["1"], ["0"])


def _bn_train(x):
    """BatchNorm in training mode with weight 1, bias 0: per channel (x − mean) / √(var + 1e-5),
    biased variance over (N, H, W)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


@pytest.mark.parametrize("relu", [True, False])
def test_fitnets_regressor_is_conv_bn_then_relu_as_the_paper_and_repdistiller(relu):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    t = torch.randn(3, 3, 2, 2, generator=g, dtype=torch.float64).relu()
    fit = FitNets(beta=2.0, relu=relu)
    student, teacher = _build(fit, [s], [t])
    fit.double()
    assert isinstance(fit.regressors[0][-1], nn.ReLU) == relu
    weight = fit.regressors[0][0].weight[:, :, 0, 0].detach()  # (3, 2)
    # independently: 1×1 conv as a sum over input channels, BN, ReLU, squared error
    conv = torch.stack([sum(weight[o, c] * s[:, c] for c in range(2)) for o in range(3)], 1)
    out = _bn_train(conv)
    out = out.clamp_min(0) if relu else out
    expected = ((out - t) ** 2).sum().item() / t.numel()
    assert fit(student, teacher, BATCH)["fitnets"].item() == pytest.approx(2.0 * expected,
                                                                           rel=1e-10)


def test_fitnets_authors_half_sum_is_chw_over_two_times_ours():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    fit = FitNets(beta=1.0)
    student, teacher = _build(fit, [s], [t])
    fit.regressors[0] = nn.Identity()
    ours = fit(student, teacher, BATCH)["fitnets"].item()
    # adri-romsor/FitNets HintCost: mean over the batch of Σ_features ½ (hint − r)²
    authors = sum(0.5 * float(((t[n] - s[n]) ** 2).sum()) for n in range(4)) / 4
    assert authors == pytest.approx(3 * 5 * 5 / 2 * ours, rel=1e-12)


def test_fitnets_gradients_reach_student_and_regressor_not_teacher():
    torch.manual_seed(0)
    s = torch.randn(4, 3, 6, 6, requires_grad=True)
    t = torch.randn(4, 5, 3, 3, requires_grad=True)
    fit = FitNets()
    student, teacher = _build(fit, [s], [t])
    fit(student, teacher, BATCH)["fitnets"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fit.regressors.parameters())
    assert t.grad is None


# -- OFD -------------------------------------------------------------------------------------------
def test_ofd_margin_is_the_mean_negative_teacher_response_and_moves_with_momentum():
    t = torch.tensor([[[[-1.0, 2.0], [-3.0, 0.5]], [[1.0, 2.0], [3.0, 4.0]]]])  # (1, 2, 2, 2)
    ofd = OFD(momentum=0.25)
    student, teacher = _build(ofd, [torch.randn(1, 2, 2, 2)], [t])
    assert _flat(ofd.margin0) == pytest.approx([(-1.0 - 3.0) / 2, 0.0])  # channel 1: none seen
    assert "margin0" in ofd.state_dict()
    t2 = torch.tensor([[[[-2.0, -4.0], [1.0, 1.0]], [[-5.0, 2.0], [3.0, 4.0]]]])
    ofd.update_margins([t2])
    # channel 0: 0.75 * -2 + 0.25 * -3; channel 1: first negatives seen, taken as is
    assert _flat(ofd.margin0) == pytest.approx([0.75 * -2.0 + 0.25 * -3.0, -5.0])
    ofd.update_margins([torch.ones(1, 2, 2, 2)])  # no negatives: unchanged
    assert _flat(ofd.margin0) == pytest.approx([-2.25, -5.0])


def test_ofd_is_the_layer_weighted_partial_l2_to_the_margin_relu_target():
    torch.manual_seed(1)
    s_feats = [torch.randn(2, 2, 2, 2), torch.randn(2, 3, 1, 1)]
    t_feats = [torch.randn(2, 2, 2, 2), torch.randn(2, 3, 1, 1)]
    ofd = OFD(beta=0.5, momentum=0.0)
    ofd.eval()  # no margin update: the margins below stay as set
    student, teacher = _build(ofd, s_feats, t_feats)
    ofd.connectors = nn.ModuleList([nn.Identity(), nn.Identity()])
    margins = [[-0.3, -1.2], [-0.5, -0.1, -2.0]]
    for i, m in enumerate(margins):
        getattr(ofd, f"margin{i}").copy_(torch.tensor(m))
    expected = 0.0
    for level, (s, t) in enumerate(zip(s_feats, t_feats)):
        distance = 0.0
        for (ch, sv), (_, tv) in zip(_items(s), _items(t)):
            target = max(tv, margins[level][ch])
            if not (sv <= target and target <= 0):
                distance += (sv - target) ** 2
        expected += distance / 2 / 2 ** (1 - level)  # / batch size, shallower pair halved
    assert ofd(student, teacher, BATCH)["ofd"].item() == pytest.approx(0.5 * expected, rel=1e-5)


def test_ofd_gradients_reach_student_and_connectors_not_teacher():
    torch.manual_seed(0)
    s = torch.randn(4, 3, 6, 6, requires_grad=True)
    t = torch.randn(4, 5, 6, 6, requires_grad=True)
    ofd = OFD()
    student, teacher = _build(ofd, [s], [t])
    ofd.train()
    ofd(student, teacher, BATCH)["ofd"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ofd.connectors.parameters())
    assert t.grad is None and not ofd.margin0.requires_grad


# -- AB --------------------------------------------------------------------------------------------
def test_ab_is_the_mean_piecewise_margin_loss():
    s = torch.tensor([[[[0.5, -2.0, 0.2, 3.0, -0.5, 1.0]]]])  # (1, 1, 1, 6)
    t = torch.tensor([[[[-1.0, -1.0, 1.0, 1.0, 0.0, 2.0]]]])
    ab = AB(beta=2.0, margin=1.0, init_epochs=30)
    student, teacher = _build(ab, [s], [t])
    ab.connectors[0] = nn.Identity()
    m, terms = 1.0, []
    for sv, tv in zip(_flat(s), _flat(t)):
        off = (sv + m) ** 2 if (sv > -m and tv <= 0) else 0.0  # should be inactive (≤ −m)
        on = (sv - m) ** 2 if (sv <= m and tv > 0) else 0.0  # should be active (≥ m)
        terms.append(off + on)
    # by hand: 2.25, 0, 0.64, 0, 0.25, 0 -> mean 3.14 / 6
    assert sum(terms) == pytest.approx(2.25 + 0.64 + 0.25)
    expected = sum(terms) / len(terms)
    assert ab(student, teacher, BATCH)["ab"].item() == pytest.approx(2.0 * expected)
    assert ab.init_loss(student, teacher, BATCH)["ab_init"].item() == pytest.approx(expected)


def test_ab_authors_reduction_weights_pairs_by_depth_and_scales_by_3_over_1000():
    g = torch.Generator().manual_seed(5)
    shapes = [(2, 2, 4, 4), (2, 3, 2, 2), (2, 4, 1, 1)]
    s_feats = [torch.randn(*sh, generator=g, dtype=torch.float64) for sh in shapes]
    t_feats = [torch.randn(*sh, generator=g, dtype=torch.float64) for sh in shapes]
    ab = AB(beta=0.5, margin=0.7, reduction="authors")
    student, teacher = _build(ab, s_feats, t_feats)
    ab.connectors = nn.ModuleList([nn.Identity()] * 3)
    expected = 0.0
    for level, (s, t) in enumerate(zip(s_feats, t_feats)):  # shallowest first
        total = 0.0
        for (_, sv), (_, tv) in zip(_items(s), _items(t)):
            if sv > -0.7 and tv <= 0:
                total += (sv + 0.7) ** 2
            if sv <= 0.7 and tv > 0:
                total += (sv - 0.7) ** 2
        expected += total / 2 * 3 / 1000 * {0: 0.25, 1: 0.5, 2: 1.0}[level]  # / N
    assert ab(student, teacher, BATCH)["ab"].item() == pytest.approx(0.5 * expected, rel=1e-10)
    assert ab.init_loss(student, teacher, BATCH)["ab_init"].item() == pytest.approx(expected,
                                                                                    rel=1e-10)


def test_ab_authors_reduction_is_49_152_times_the_mean_on_resnet8x4_preacts():
    g = torch.Generator().manual_seed(6)
    shapes = [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8)]  # resnet8x4 / resnet32x4
    s_feats = [torch.randn(*sh, generator=g) for sh in shapes]
    t_feats = [torch.randn(*sh, generator=g) for sh in shapes]
    ab = AB()
    student, teacher = _build(ab, s_feats, t_feats)
    mean = ab.ab_loss(student, teacher)
    ab.reduction = "authors"
    authors = ab.ab_loss(student, teacher)
    assert (authors / mean).item() == pytest.approx(3 * 16384 / 1000, rel=1e-5)  # 49.152


def test_ab_gradients_reach_student_and_connectors_not_teacher():
    torch.manual_seed(0)
    s = [torch.randn(4, 3, 4, 4, requires_grad=True), torch.randn(4, 3, 2, 2, requires_grad=True)]
    t = [torch.randn(4, 6, 8, 8, requires_grad=True)]
    ab = AB()
    student, teacher = _build(ab, s, t)  # pairs s[1] (upsampled) with t[0]
    ab(student, teacher, BATCH)["ab"].backward()
    assert s[0].grad is None and s[1].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ab.connectors.parameters())
    assert t[0].grad is None


# -- the fused square sum of AB and OFD ------------------------------------------------------------
def _with_boundaries(shape, values, seed):
    """Random float64 entries, every fourth set to one of ``values`` (the kinks)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    flat = x.view(-1)
    flat[::4] = torch.tensor(values, dtype=torch.float64).repeat(len(flat[::4]))[: len(flat[::4])]
    return x


def test_ab_fused_sum_and_gradient_equal_autograd_of_the_papers_formula():
    m = 0.7
    s = _with_boundaries((3, 4, 5, 5), [m, -m, 0.0], seed=1).requires_grad_()
    t = _with_boundaries((3, 4, 5, 5), [0.0], seed=2)
    reference = ab_elementwise(s, t, m).sum()
    (expected,) = torch.autograd.grad(reference, s)
    fused = piecewise_square_sum(s, ab_residual, t, m)
    (got,) = torch.autograd.grad(3.0 * fused, s)
    assert fused.dtype == torch.float64
    assert fused.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(got, 3.0 * expected, rtol=1e-12, atol=0)


def test_ofd_fused_sum_and_gradient_equal_autograd_of_the_partial_l2():
    s = _with_boundaries((3, 4, 5, 5), [0.0, -0.5], seed=3).requires_grad_()
    target = torch.maximum(_with_boundaries((3, 4, 5, 5), [0.0, -0.5], seed=4),
                           torch.tensor(-0.5, dtype=torch.float64))
    keep = (s > target) | (target > 0)
    reference = ((s - target).pow(2) * keep).sum()
    (expected,) = torch.autograd.grad(reference, s)
    fused = piecewise_square_sum(s, ofd_residual, target)
    (got,) = torch.autograd.grad(fused, s)
    assert fused.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_fused_square_sum_of_bfloat16_sums_in_float32_and_returns_a_bfloat16_gradient():
    s = torch.randn(2, 3, 4, 4).bfloat16().requires_grad_()
    t = torch.randn(2, 3, 4, 4).bfloat16()
    loss = piecewise_square_sum(s, ab_residual, t, 1.0)
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    expected = ab_elementwise(s.detach().float(), t.float(), 1.0).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-2)


# -- VID -------------------------------------------------------------------------------------------
def test_vid_starts_at_the_initial_variance_and_is_the_gaussian_nll():
    torch.manual_seed(2)
    s = torch.randn(2, 2, 2, 2)
    t = torch.randn(2, 2, 2, 2)
    vid = VID(beta=1.5)
    student, teacher = _build(vid, [s], [t])
    assert _flat(vid.variances()[0]) == pytest.approx([5.0, 5.0])
    convs = [m for m in vid.regressors[0] if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(c.bias is None for c in convs)  # the authors' bias-free μ
    vid.regressors[0] = nn.Identity()
    with torch.no_grad():
        vid.alphas[0].copy_(torch.tensor([0.3, -1.0]))
    var = [math.log1p(math.exp(0.3)) + 1e-5, math.log1p(math.exp(-1.0)) + 1e-5]
    nll = [0.5 * (math.log(var[ch]) + (tv - sv) ** 2 / var[ch])
           for (ch, sv), (_, tv) in zip(_items(s), _items(t))]
    expected = 1.5 * sum(nll) / len(nll)
    assert vid(student, teacher, BATCH)["vid"].item() == pytest.approx(expected, rel=1e-5)


def test_vid_per_channel_reduction_equals_the_elementwise_nll_and_its_gradients():
    """VID reduces each channel's squared residual before dividing by its variance; loss and
    gradients (student map, μ's weights, α) equal autograd of the element-wise formula."""
    torch.manual_seed(3)
    s_maps = [torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 5, 2, 2, dtype=torch.float64, requires_grad=True)]
    t_maps = [torch.randn(3, 3, 4, 4, dtype=torch.float64),
              torch.randn(3, 4, 2, 2, dtype=torch.float64)]
    vid = VID(beta=0.7)
    student, teacher = _build(vid, s_maps, t_maps)
    vid.double()
    with torch.no_grad():
        for a in vid.alphas:
            a.copy_(torch.randn_like(a))
    params = [*vid.regressors.parameters(), *vid.alphas, *s_maps]
    loss = vid(student, teacher, BATCH)["vid"]
    grads = torch.autograd.grad(loss, params)
    reference = 0.0
    for mu, a, s, t in zip(vid.regressors, vid.alphas, s_maps, t_maps):
        var = (nn.functional.softplus(a) + vid.eps).view(1, -1, 1, 1)
        reference = reference + (0.5 * (torch.log(var) + (t - mu(s)).pow(2) / var)).mean()
    reference = 0.7 * reference
    expected = torch.autograd.grad(reference, params)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_vid_gradients_reach_student_regressor_and_variance_not_teacher():
    torch.manual_seed(0)
    s = torch.randn(4, 3, 3, 3, requires_grad=True)
    t = torch.randn(4, 5, 6, 6, requires_grad=True)
    vid = VID()
    student, teacher = _build(vid, [s], [t])
    vid(student, teacher, BATCH)["vid"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None for p in vid.regressors.parameters())
    assert vid.alphas[0].grad.abs().sum() > 0
    assert t.grad is None


# -- hyper-parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("make, key", [
    (lambda: FitNets(beta=-1.0), "distill.beta=-1.0"),
    (lambda: FitNets(hints=0), "distill.hints=0"),
    (lambda: FitNets(init_epochs=-1), "distill.init_epochs=-1"),
    (lambda: FitNets(hints="first"), "distill.hints=first"),
    (lambda: FitNets(relu="yes"), "distill.relu=yes"),
    (lambda: AB(reduction="sum"), "distill.reduction=sum"),
    (lambda: FitNets(student_layers=[]), r"distill.student_layers=\[\]"),
    (lambda: OFD(beta=float("nan")), "distill.beta=nan"),
    (lambda: OFD(momentum=1.5), "distill.momentum=1.5"),
    (lambda: OFD(teacher_layers=""), "distill.teacher_layers=''"),
    (lambda: AB(margin=0.0), "distill.margin=0.0"),
    (lambda: AB(beta=-0.1), "distill.beta=-0.1"),
    (lambda: AB(init_epochs=1.5), "distill.init_epochs=1.5"),
    (lambda: VID(init_pred_var=0.0), "distill.init_pred_var=0.0"),
    (lambda: VID(eps=-1e-5), "distill.eps=-1e-05"),
    (lambda: VID(beta=-2), "distill.beta=-2"),
])
def test_bad_hyper_parameters_raise_naming_the_key(make, key):
    with pytest.raises(KdlabError, match=key):
        make()


# -- end to end ------------------------------------------------------------------------------------
@pytest.mark.parametrize("distill, overrides", [
    # one epoch of the hint stage, then one of the hint with the labels
    ("fitnets", ["distill.fitnets.init_epochs=1", "trainer.max_epochs=2"]),
    ("fitnets", []),
    ("ofd", []),
    ("ab", []),
    ("vid", []),
])
def test_a_short_run_learns(distill, overrides, tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short(distill, tmp_path, *overrides)
    assert_learned(results)
