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
def rkd_expected(s: torch.Tensor, t: torch.Tensor, pairs: str = "distinct") -> tuple[float, float]:
    """Park et al., eqs. 2-5: mean Huber of mean-normalised distances (mu over distinct pairs)
    and of the cosines of the angle at the middle point; ``distinct``: over distinct pairs and
    triplets; ``all``: over every index pair and triplet (a zero difference vector has a zero
    unit vector)."""
    S, T = rows(s), rows(t)
    n = len(S)
    distinct = [(i, j) for i in range(n) for j in range(n) if i != j]
    mu_s = sum(norm(sub(S[i], S[j])) for i, j in distinct) / len(distinct)
    mu_t = sum(norm(sub(T[i], T[j])) for i, j in distinct) / len(distinct)
    every = [(i, j) for i in range(n) for j in range(n)]
    pair_set = distinct if pairs == "distinct" else every
    dist = sum(huber(norm(sub(S[i], S[j])) / mu_s, norm(sub(T[i], T[j])) / mu_t)
               for i, j in pair_set) / len(pair_set)
    if pairs == "distinct":
        triplets = [(i, j, k) for i, j in distinct for k in range(n) if k not in (i, j)]
    else:
        triplets = [(i, j, k) for i, j in every for k in range(n)]

    def unit_or_zero(a):
        n_a = norm(a)
        return [0.0] * len(a) if n_a == 0 else [u / n_a for u in a]

    def cos(X, i, j, k):
        return dot(unit_or_zero(sub(X[i], X[j])), unit_or_zero(sub(X[k], X[j])))

    angle = sum(huber(cos(S, i, j, k), cos(T, i, j, k)) for i, j, k in triplets) / len(triplets)
    return dist, angle


@pytest.mark.parametrize("pairs", ["all", "distinct"])
def test_rkd_matches_distance_and_angle_formulas(pairs):
    s, t = features()
    s, t = s.double() * 3, t.double()  # some normalised differences beyond the Huber's quadratic
    rkd = RKD(beta=2.0, distance_weight=25.0, angle_weight=50.0, pairs=pairs)
    terms = rkd(*wired(rkd, s, t))
    dist, angle = rkd_expected(s, t, pairs)
    assert set(terms) == {"rkd_dist", "rkd_angle"}
    assert terms["rkd_dist"].item() == pytest.approx(2 * 25 * dist, rel=1e-10)
    assert terms["rkd_angle"].item() == pytest.approx(2 * 50 * angle, rel=1e-10)
    assert dist > 0 and angle > 0


def test_rkd_all_is_distinct_times_a_batch_size_factor_and_equals_the_authors_code():
    s, t = features(b=6, seed=3)
    s, t = s.double(), t.double()
    b = 6

    def terms(pairs):
        rkd = RKD(pairs=pairs)
        out = rkd(*wired(rkd, s, t))
        return out["rkd_dist"].item(), out["rkd_angle"].item()

    (d_all, a_all), (d_distinct, a_distinct) = terms("all"), terms("distinct")
    assert d_all == pytest.approx(d_distinct * (b - 1) / b, rel=1e-12)
    assert a_all == pytest.approx(a_distinct * (b - 1) * (b - 2) / b**2, rel=1e-12)

    # lenscloth/RKD, RepDistiller, torchdistill: pdist via the Gram matrix, mu over d > 0,
    # smooth-L1 averaged over the flattened b×b and b×b×b tensors; w_d = 25, w_a = 50
    def pdist(e):
        sq = e.pow(2).sum(1)
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt()
        return d * (1 - torch.eye(len(e), dtype=e.dtype))

    def angles(e):
        u = torch.nn.functional.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(u, u.transpose(1, 2)).view(-1)

    d_s, d_t = pdist(s), pdist(t)
    theirs_d = 25 * torch.nn.functional.smooth_l1_loss(d_s / d_s[d_s > 0].mean(),
                                                       d_t / d_t[d_t > 0].mean())
    theirs_a = 50 * torch.nn.functional.smooth_l1_loss(angles(s), angles(t))
    assert d_all == pytest.approx(theirs_d.item(), rel=1e-9)
    assert a_all == pytest.approx(theirs_a.item(), rel=1e-9)


@pytest.mark.parametrize("pairs", ["all", "distinct"])
def test_rkd_is_zero_for_a_scaled_copy_and_safe_on_tiny_batches_and_duplicates(pairs):
    _, t = features()
    rkd = RKD(pairs=pairs)
    terms = rkd(*wired(rkd, 4 * t, t))  # distances normalised by their mean: scale-free
    assert terms["rkd_dist"].item() == pytest.approx(0, abs=1e-6)
    assert terms["rkd_angle"].item() == pytest.approx(0, abs=1e-6)
    for b in (1, 2):
        s = torch.randn(b, 3, requires_grad=True)
        terms = rkd(*wired(rkd, s, torch.randn(b, 4)))
        assert terms["rkd_angle"].item() == pytest.approx(0, abs=1e-6)
        assert torch.isfinite(terms["rkd_dist"])
        sum(terms.values()).backward()
    s = torch.randn(4, 3)
    s = torch.cat([s, s[:1]]).requires_grad_()  # two identical samples: zero distance
    sum(rkd(*wired(rkd, s, torch.randn(5, 4))).values()).backward()
    assert torch.isfinite(s.grad).all()


# -- PKT ------------------------------------------------------------------------------------------
def pkt_expected(s: torch.Tensor, t: torch.Tensor, form: str, eps: float = 1e-7) -> float:
    """Passalis & Tefas: KL of the cosine-kernel conditionals; code: self-similarity kept, mean
    over b²; paper (eqs. 3, 9 with the cosine kernel): k = i left out of each row's sum and
    j = i out of the KL, mean over the b(b-1) others."""
    n = s.shape[0]

    def conditionals(x):
        X = [unit(r) for r in rows(x)]
        kernel = [[0.0 if form == "paper" and i == j else (dot(a, b) + 1) / 2
                   for j, b in enumerate(X)] for i, a in enumerate(X)]
        return [[k / sum(row) for k in row] for row in kernel]

    p, q = conditionals(t), conditionals(s)
    cells = [(i, j) for i in range(n) for j in range(n) if form == "code" or i != j]
    return sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps))
               for i, j in cells) / len(cells)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_pkt_matches_the_kl_of_cosine_conditionals(form):
    s, t = features()
    s, t = s.double(), t.double()
    pkt = PKT(beta=30000.0, form=form)
    loss = pkt(*wired(pkt, s, t))["pkt"]
    assert loss.item() == pytest.approx(30000 * pkt_expected(s, t, form), rel=1e-10)
    assert pkt(*wired(pkt, 2 * t, t))["pkt"].item() == pytest.approx(0, abs=1e-3)


def test_pkt_code_form_equals_the_authors_code_and_the_forms_differ():
    s, t = features(b=7, seed=4)
    s, t = s.double(), t.double()

    # passalis/probabilistic_kt nn/pkt.py = RepDistiller PKT = torchdistill PKTLoss
    def theirs(out, target, eps=1e-7):
        out = out / (out.norm(dim=1, keepdim=True) + eps)
        target = target / (target.norm(dim=1, keepdim=True) + eps)
        q, p = (out @ out.t() + 1) / 2, (target @ target.t() + 1) / 2
        q, p = q / q.sum(1, keepdim=True), p / p.sum(1, keepdim=True)
        return (p * torch.log((p + eps) / (q + eps))).mean()

    pkt = PKT(beta=30000.0)
    assert pkt(*wired(pkt, s, t))["pkt"].item() == pytest.approx(30000 * theirs(s, t).item(),
                                                                 rel=1e-6)
    ratios = []
    for seed in (5, 6):
        s2, t2 = features(b=7, seed=seed)
        code, paper = PKT(), PKT(form="paper")
        ratios.append(code(*wired(code, s2, t2))["pkt"].item()
                      / paper(*wired(paper, s2, t2))["pkt"].item())
    assert ratios[0] != pytest.approx(ratios[1], rel=1e-3)  # not a constant factor


# -- SP -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_", ["l2", "l1"])
def test_sp_matches_the_normalised_gram_formula(norm_):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 5, 2, 2, generator=g)
    s, t = s.double(), t.double()

    def gram(x):
        A = rows(x)
        G = [[dot(a, b) for b in A] for a in A]
        row_norm = norm if norm_ == "l2" else (lambda r: sum(abs(v) for v in r))
        return [[v / row_norm(row) for v in row] for row in G]

    gs, gt = gram(s), gram(t)
    b = len(gs)
    expected = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2
    sp = SP(beta=3000.0, norm=norm_)
    assert sp(*wired(sp, s, t))["sp"].item() == pytest.approx(3000 * expected, rel=1e-10)


def test_sp_equals_repdistiller_with_l2_and_torchdistill_with_l1():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 3, 2, 2, generator=g).double(), torch.randn(5, 7, generator=g).double()
    b = 5

    def repdistiller(f_s, f_t):  # Similarity: normalize(G) (p=2, dim=1), sum of squares / b²
        g_s = torch.nn.functional.normalize(f_s.view(b, -1) @ f_s.view(b, -1).t())
        g_t = torch.nn.functional.normalize(f_t.view(b, -1) @ f_t.view(b, -1).t())
        return ((g_t - g_s) ** 2).sum() / b**2

    def torchdistill(f_s, f_t):  # SPKDLoss: normalize(G, 1) is p=1; ||.||_F² / b² (batchmean)
        g_s = torch.nn.functional.normalize(f_s.flatten(1) @ f_s.flatten(1).t(), 1)
        g_t = torch.nn.functional.normalize(f_t.flatten(1) @ f_t.flatten(1).t(), 1)
        return torch.norm(g_t - g_s) ** 2 / b**2

    for norm_, reference in (("l2", repdistiller), ("l1", torchdistill)):
        sp = SP(beta=1.0, norm=norm_)
        assert sp(*wired(sp, s, t))["sp"].item() == pytest.approx(reference(s, t).item(),
                                                                  rel=1e-12)
    l2, l1 = SP(beta=1.0), SP(beta=1.0, norm="l1")
    ratios = [l2(*wired(l2, x, y))["sp"].item() / l1(*wired(l1, x, y))["sp"].item()
              for x, y in ((s, t), (s[:, :1], t[:, 3:]))]
    assert ratios[0] != pytest.approx(ratios[1], rel=1e-3)  # not a constant factor


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


def cc_expected(cc: CC, s: torch.Tensor, t: torch.Tensor) -> float:
    """Plain-Python CC for every option: projections (normalised or not), then the paper's
    correlation congruence (Taylor-Gaussian or bilinear kernel; mean of squares or Frobenius
    norm / b²) or RepDistiller's Correlation (mean_i Σ_d |Δ_i,d| |Δ_{i+1},d|)."""
    def project(embed, x):
        z = linear(embed, x) if isinstance(embed, nn.Linear) else rows(x)
        return [unit(r) for r in z] if cc.normalize else z

    zs, zt = project(cc.student_embed[0], s), project(cc.teacher_embed[0], t)
    n = len(zs)
    if cc.form == "repdistiller":
        delta = [[abs(a - b) for a, b in zip(u, v)] for u, v in zip(zs, zt)]
        return sum(dot(delta[i], delta[i + 1]) for i in range(n - 1)) / (n - 1)

    def corr(Z):
        if cc.kernel == "bilinear":
            return [[dot(a, b) for b in Z] for a in Z]
        g = cc.gamma
        return [[sum(math.exp(-2 * g) * (2 * g) ** p / math.factorial(p) * dot(a, b) ** p
                     for p in range(cc.order + 1)) for b in Z] for a in Z]

    cs, ct = corr(zs), corr(zt)
    squares = sum((cs[i][j] - ct[i][j]) ** 2 for i in range(n) for j in range(n))
    return squares / n**2 if cc.distance == "squared" else math.sqrt(squares) / n**2


@pytest.mark.parametrize("options", [
    {"kernel": "bilinear"},
    {"normalize": False},
    {"distance": "norm"},
    {"kernel": "bilinear", "normalize": False, "distance": "norm"},
    {"form": "repdistiller"},
    {"form": "repdistiller", "normalize": False},
], ids=["bilinear", "unnormalised", "norm", "torchdistill_bilinear", "repdistiller",
        "repdistiller_linear"])
def test_cc_variants_match_their_formulas(options):
    torch.manual_seed(0)
    s, t = features()
    s, t = s.double(), t.double()
    cc = cc_setup(s, t, beta=3.0, feat_dim=4, **options)
    cc.double()
    assert cc(*wired(cc, s, t))["cc"].item() == pytest.approx(3 * cc_expected(cc, s, t),
                                                              rel=1e-10)


def test_cc_torchdistill_and_repdistiller_settings_equal_their_code():
    torch.manual_seed(1)
    s, t = features(b=6)
    s, t = s.double(), t.double()
    # torchdistill CCKDLoss (gaussian, max_p 2, gamma 0.4, batchmean) on Linear4CCKD outputs
    cc = cc_setup(s, t, beta=0.003, feat_dim=4, normalize=False, distance="norm").double()
    z_s, z_t = cc.student_embed[0](s), cc.teacher_embed[0](t)

    def gaussian(z):
        prod = z @ z.t()
        return math.exp(-0.8) * (1 + 0.8 * prod + 0.8**2 / 2 * prod**2)

    theirs = 0.003 * torch.dist(gaussian(z_s), gaussian(z_t), 2) / 6**2
    assert cc(*wired(cc, s, t))["cc"].item() == pytest.approx(theirs.item(), rel=1e-10)
    # RepDistiller Correlation on LinearEmbed outputs, beta 0.02
    cc = cc_setup(s, t, beta=0.02, feat_dim=4, normalize=False, form="repdistiller").double()
    delta = (cc.student_embed[0](s) - cc.teacher_embed[0](t)).abs()
    theirs = 0.02 * (delta[:-1] * delta[1:]).sum(1).mean()
    assert cc(*wired(cc, s, t))["cc"].item() == pytest.approx(theirs.item(), rel=1e-10)


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
@pytest.mark.parametrize("make", [
    RKD, lambda: RKD(pairs="distinct"), PKT, lambda: PKT(form="paper"), SP,
    lambda: SP(norm="l1"), lambda: CC(), lambda: CC(feat_dim=4),
    lambda: CC(kernel="bilinear", normalize=False, distance="norm", feat_dim=4),
    lambda: CC(form="repdistiller", normalize=False, feat_dim=4),
], ids=["rkd", "rkd_distinct", "pkt", "pkt_paper", "sp", "sp_l1", "cc", "cc_feat_dim",
        "cc_torchdistill", "cc_repdistiller"])
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
    (lambda: RKD(pairs="unique"), "pairs"),
    (lambda: PKT(form="authors"), "form"),
    (lambda: SP(norm="l3"), "norm"),
    (lambda: CC(kernel="rbf"), "kernel"),
    (lambda: CC(normalize="yes"), "normalize"),
    (lambda: CC(distance="l1"), "distance"),
    (lambda: CC(form="torchdistill"), "form"),
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


def test_the_config_keys_reach_the_strategies(tmp_path):
    from kdlab.modes.build import build_strategy
    from tests.conftest import make_cfg

    cfg = make_cfg(tmp_path, ["distill=[rkd,pkt,sp,cc]"])
    members = build_strategy(cfg).members
    assert members["rkd"].pairs == "all" and members["pkt"].form == "code"
    assert members["sp"].norm == "l2"
    cc = members["cc"]
    assert (cc.kernel, cc.normalize, cc.distance, cc.form) == ("gaussian", True, "squared",
                                                               "paper")
    cfg = make_cfg(tmp_path, ["distill=[rkd,pkt,sp,cc]", "distill.rkd.pairs=distinct",
                              "distill.pkt.form=paper", "distill.sp.norm=l1",
                              "distill.cc.kernel=bilinear", "distill.cc.normalize=false",
                              "distill.cc.distance=norm", "distill.cc.form=repdistiller"])
    members = build_strategy(cfg).members
    assert members["rkd"].pairs == "distinct" and members["pkt"].form == "paper"
    assert members["sp"].norm == "l1"
    cc = members["cc"]
    assert (cc.kernel, cc.normalize, cc.distance, cc.form) == ("bilinear", False, "norm",
                                                               "repdistiller")


@pytest.mark.parametrize("distill", ["rkd", "pkt", "sp", "cc"])
def test_a_short_run_learns(distill, tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short(distill, tmp_path)
    assert results["strategy"] == distill
    assert_learned(results)
