"""Relation strategies (RKD, PKT, SP, CC): losses against the papers' formulas written out in
plain Python, gradient flow, hyper-parameter checks, layer selection and end-to-end runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdlab.engine.module import DistillationModule
from kdlab.models import CNN
from kdlab.strategies import Batch, Outputs
from kdlab.strategies.relations import CC, PKT, RKD, SP
from kdlab.util.errors import KdlabError


# -- helpers: plain-python linear algebra ---------------------------------------------------------
def rows(x: torch.Tensor) -> list[list[float]]:
    return x.detach().double().flatten(1).tolist()


def dot(a: list[float], b: list[float]) -> float:
    return sum(u * v for u, v in zip(a, b))


def sub(a: list[float], b: list[float]) -> list[float]:
    return [u - v for u, v in zip(a, b)]


def norm(a: list[float]) -> float:
    return math.sqrt(dot(a, a))


def unit(a: list[float]) -> list[float]:
    n = norm(a)
    return [u / n for u in a]


def huber(x: float, y: float) -> float:
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def wired(strategy, s: torch.Tensor, t: torch.Tensor):
    """``strategy`` reading ``s`` and ``t`` as its (only) student and teacher features."""
    strategy.student_paths, strategy.teacher_paths = ["s"], ["t"]
    student = Outputs(torch.zeros(s.shape[0], 3), {"s": s})
    teacher = Outputs(torch.zeros(t.shape[0], 3), {"t": t})
    batch = Batch(torch.zeros(s.shape[0], 1), torch.zeros(s.shape[0], dtype=torch.long),
                  torch.arange(s.shape[0]))
    return student, teacher, batch


def features(b: int = 5, ds: int = 3, dt: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, ds, generator=g), torch.randn(b, dt, generator=g)


# -- RKD ------------------------------------------------------------------------------------------
def rkd_expected(s: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
    """Park et al., eqs. 2-5: mean Huber over distinct pairs of mean-normalised distances and
    over distinct triplets of the cosines of the angle at the middle point."""
    S, T = rows(s), rows(t)
    n = len(S)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mu_s = sum(norm(sub(S[i], S[j])) for i, j in pairs) / len(pairs)
    mu_t = sum(norm(sub(T[i], T[j])) for i, j in pairs) / len(pairs)
    dist = sum(huber(norm(sub(S[i], S[j])) / mu_s, norm(sub(T[i], T[j])) / mu_t)
               for i, j in pairs) / len(pairs)
    triplets = [(i, j, k) for i, j in pairs for k in range(n) if k not in (i, j)]

    def cos(X, i, j, k):
        return dot(unit(sub(X[i], X[j])), unit(sub(X[k], X[j])))

    angle = sum(huber(cos(S, i, j, k), cos(T, i, j, k)) for i, j, k in triplets) / len(triplets)
    return dist, angle


def test_rkd_matches_distance_and_angle_formulas():
    s, t = features()
    s = s * 3  # some normalised differences beyond the quadratic zone of the Huber loss
    rkd = RKD(beta=2.0, distance_weight=25.0, angle_weight=50.0)
    terms = rkd(*wired(rkd, s, t))
    dist, angle = rkd_expected(s, t)
    assert set(terms) == {"rkd_dist", "rkd_angle"}
    assert terms["rkd_dist"].item() == pytest.approx(2 * 25 * dist, rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(2 * 50 * angle, rel=1e-5)
    assert dist > 0 and angle > 0


def test_rkd_is_zero_for_a_scaled_copy_and_safe_on_tiny_batches_and_duplicates():
    _, t = features()
    rkd = RKD()
    terms = rkd(*wired(rkd, 4 * t, t))  # distances normalised by their mean: scale-free
    assert terms["rkd_dist"].item() == pytest.approx(0, abs=1e-6)
    assert terms["rkd_angle"].item() == pytest.approx(0, abs=1e-6)
    for b in (1, 2):
        s = torch.randn(b, 3, requires_grad=True)
        terms = rkd(*wired(rkd, s, torch.randn(b, 4)))
        assert terms["rkd_angle"].item() == 0 and torch.isfinite(terms["rkd_dist"])
        sum(terms.values()).backward()
    s = torch.randn(4, 3)
    s = torch.cat([s, s[:1]]).requires_grad_()  # two identical samples: zero distance
    sum(rkd(*wired(rkd, s, torch.randn(5, 4))).values()).backward()
    assert torch.isfinite(s.grad).all()


# -- PKT ------------------------------------------------------------------------------------------
def test_pkt_matches_the_kl_of_cosine_conditionals():
    s, t = features()
    eps = 1e-7

    def conditionals(x):
        X = [unit(r) for r in rows(x)]
        kernel = [[(dot(a, b) + 1) / 2 for b in X] for a in X]
        return [[k / sum(row) for k in row] for row in kernel]

    p, q = conditionals(t), conditionals(s)
    n = len(p)
    expected = sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps))
                   for i in range(n) for j in range(n)) / n**2
    pkt = PKT(beta=30000.0)
    loss = pkt(*wired(pkt, s, t))["pkt"]
    assert loss.item() == pytest.approx(30000 * expected, rel=1e-4)
    assert pkt(*wired(pkt, 2 * t, t))["pkt"].item() == pytest.approx(0, abs=1e-3)


# -- SP -------------------------------------------------------------------------------------------
def test_sp_matches_the_normalised_gram_formula():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 5, 2, 2, generator=g)

    def gram(x):
        A = rows(x)
        G = [[dot(a, b) for b in A] for a in A]
        return [[v / norm(row) for v in row] for row in G]

    gs, gt = gram(s), gram(t)
    b = len(gs)
    expected = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2
    sp = SP(beta=3000.0)
    assert sp(*wired(sp, s, t))["sp"].item() == pytest.approx(3000 * expected, rel=1e-5)


def test_sp_reads_the_last_stage_by_default_or_pairs_layers():
    student, teacher = CNN([1, 28, 28], 10, channels=[8, 16, 16], hidden=16), CNN([1, 28, 28], 10)
    assert SP().resolve(student, teacher) == (["stages.2"], ["stages.1"])
    pairs = SP(student_layers=["stages.0", "stages.2"], last_only=False)
    assert pairs.resolve(student, teacher) == (["stages.0", "stages.2"], ["stages.0", "stages.1"])
    with pytest.raises(KdlabError, match="distill.student_layers=stages .*must name as many"):
        SP(last_only=False).resolve(student, teacher)


# -- CC -------------------------------------------------------------------------------------------
def linear(layer: nn.Linear, x: torch.Tensor) -> list[list[float]]:
    W, bias = layer.weight.detach().double().tolist(), layer.bias.detach().double().tolist()
    return [[dot(w, r) + c for w, c in zip(W, bias)] for r in rows(x)]


def taylor_rbf(Z: list[list[float]], gamma: float, order: int) -> list[list[float]]:
    """Peng et al., eq. 9: exp(-γ‖a-b‖²) = e^{-2γ} e^{2γ a·b} on the unit sphere, expanded."""
    Z = [unit(z) for z in Z]
    return [[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot(a, b) ** p
                 for p in range(order + 1)) for b in Z] for a in Z]


def cc_setup(s, t, **kwargs) -> CC:
    cc = CC(**kwargs)
    cc.setup(*wired(cc, s, t)[:2], num_train_samples=0)
    return cc


def test_cc_matches_the_taylor_expanded_rbf_correlations():
    torch.manual_seed(0)
    s, t = features()
    cc = cc_setup(s, t, beta=2.0, gamma=0.4, order=2, feat_dim=4)
    cs = taylor_rbf(linear(cc.student_embed[0], s), 0.4, 2)
    ct = taylor_rbf(linear(cc.teacher_embed[0], t), 0.4, 2)
    n = len(cs)
    expected = sum((cs[i][j] - ct[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2
    assert cc(*wired(cc, s, t))["cc"].item() == pytest.approx(2 * expected, rel=1e-5)


def test_cc_taylor_series_converges_to_the_gaussian_rbf_kernel():
    torch.manual_seed(0)
    s, t = features()
    cc = cc_setup(s, t, beta=1.0, gamma=0.4, order=12)  # student -> teacher size, teacher as is
    assert isinstance(cc.teacher_embed[0], nn.Identity)
    assert cc.student_embed[0].weight.shape == (6, 3)

    def rbf(Z):
        Z = [unit(z) for z in Z]
        return [[math.exp(-0.4 * norm(sub(a, b)) ** 2) for b in Z] for a in Z]

    cs, ct = rbf(linear(cc.student_embed[0], s)), rbf(rows(t))
    n = len(cs)
    expected = sum((cs[i][j] - ct[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2
    assert cc(*wired(cc, s, t))["cc"].item() == pytest.approx(expected, rel=1e-5)


# -- all: gradients and hyper-parameters ----------------------------------------------------------
@pytest.mark.parametrize("make", [RKD, PKT, SP, lambda: CC(), lambda: CC(feat_dim=4)],
                         ids=["rkd", "pkt", "sp", "cc", "cc_feat_dim"])
def test_gradients_reach_student_and_connectors_but_not_the_teacher(make):
    s, t = features(b=6)
    s.requires_grad_()
    t.requires_grad_()  # a leaf that would collect gradient if any flowed into the teacher
    strategy = make()
    if isinstance(strategy, CC):
        strategy.setup(*wired(strategy, s, t)[:2], num_train_samples=0)
    loss = sum(strategy(*wired(strategy, s, t)).values())
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    params = list(strategy.parameters())
    assert bool(params) == isinstance(strategy, CC)
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("make, key", [
    (lambda: RKD(beta=-1), "beta"),
    (lambda: RKD(distance_weight=-25), "distance_weight"),
    (lambda: RKD(angle_weight=float("nan")), "angle_weight"),
    (lambda: RKD(student_layers=[]), "student_layers"),
    (lambda: PKT(beta=-3), "beta"),
    (lambda: PKT(eps=0), "eps"),
    (lambda: PKT(teacher_layers=""), "teacher_layers"),
    (lambda: SP(beta=-1), "beta"),
    (lambda: SP(last_only="yes"), "last_only"),
    (lambda: CC(beta=-0.1), "beta"),
    (lambda: CC(gamma=0), "gamma"),
    (lambda: CC(order=0), "order"),
    (lambda: CC(order=2.5), "order"),
    (lambda: CC(feat_dim=0), "feat_dim"),
])
def test_bad_hyper_parameters_name_their_key(make, key):
    with pytest.raises(KdlabError, match=rf"distill\.{key}="):
        make()


def test_cc_connectors_are_built_from_probed_shapes_and_train():
    torch.manual_seed(0)
    student = CNN([1, 28, 28], 10, channels=[8, 16, 16], hidden=16)
    teacher = CNN([1, 28, 28], 10)
    cc = CC(feat_dim=8)
    module = DistillationModule(student, 10, torch.optim.SGD, teacher=teacher, strategy=cc,
                                example_input=torch.zeros(2, 1, 28, 28))
    assert cc.student_embed[0].weight.shape == (8, 16)
    assert cc.teacher_embed[0].weight.shape == (8, 128)
    trainable = {id(p) for p in module.trainable_parameters()}
    assert {id(p) for p in cc.parameters()} <= trainable
    batch = (torch.randn(6, 1, 28, 28), torch.tensor([1, -1, 2, -1, 0, 3]), torch.arange(6))
    module.batch_loss(batch)[0].backward()
    assert cc.teacher_embed[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("distill", ["rkd", "pkt", "sp", "cc"])
def test_a_short_run_learns(distill, tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short(distill, tmp_path)
    assert results["strategy"] == distill
    assert_learned(results)
