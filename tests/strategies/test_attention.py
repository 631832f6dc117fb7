"""AT and NST: losses against their formulas computed independently in plain Python, gradient
paths, hyper-parameter checks and a short run of each config that learns."""

import math

import pytest
import torch

from kdlab.strategies.attention import AT, NST
from kdlab.util.errors import KdlabError
from tests.strategies.harness import connect as _connect


def _pool(grid, out_h, out_w):
    """Plain average pooling of a 2-D list by integer factors."""
    fh, fw = len(grid) // out_h, len(grid[0]) // out_w
    return [[sum(grid[i * fh + a][j * fw + b] for a in range(fh) for b in range(fw)) / (fh * fw)
             for j in range(out_w)] for i in range(out_h)]


def _maps(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


# -- AT ------------------------------------------------------------------------------------------
def _at_expected(student, teacher, p, form="code", pool="attention"):
    """Zagoruyko & Komodakis: per sample, mean_c |a|^p at each position, the larger map pooled
    to the smaller (the attention map, or each channel of the feature map first), flattened,
    L2-normalised; code: mean squared difference; paper: mean over samples of the L2 norm of
    the difference divided by the number of positions."""
    total = 0.0
    for s, t in zip(student, teacher):
        s, t = s.tolist(), t.tolist()
        h = min(len(s[0][0]), len(t[0][0]))
        w = min(len(s[0][0][0]), len(t[0][0][0]))
        squares, norms, count = 0.0, 0.0, 0
        for xs, xt in zip(s, t):  # samples
            q = []
            for x in (xs, xt):
                if pool == "features":
                    x = [_pool(c, h, w) for c in x]
                hx, wx = len(x[0]), len(x[0][0])
                m = [[sum(abs(c[i][j]) ** p for c in x) / len(x) for j in range(wx)]
                     for i in range(hx)]
                flat = [v for row in _pool(m, h, w) for v in row]
                norm = math.sqrt(sum(v * v for v in flat))
                q.append([v / norm for v in flat])
            squares += sum((a - b) ** 2 for a, b in zip(*q))
            norms += math.sqrt(sum((a - b) ** 2 for a, b in zip(*q))) / (h * w)
            count += h * w
        total += squares / count if form == "code" else norms / len(s)
    return total


@pytest.mark.parametrize(("p", "form", "pool"), [
    (2.0, "code", "attention"), (3.0, "code", "attention"), (2.0, "paper", "attention"),
    (2.0, "code", "features"), (3.0, "paper", "features"),
])
def test_at_matches_the_formula_and_pairs_the_last_layers(p, form, pool):
    student = _maps(0, (2, 2, 8, 8), (2, 2, 4, 4), (2, 3, 2, 2))  # the first is not paired
    teacher = _maps(1, (2, 3, 2, 2), (2, 5, 4, 4))  # 2×2 vs 4×4: the teacher's map is pooled
    student, teacher = [f.double() for f in student], [f.double() for f in teacher]
    at = AT(beta=10.0, p=p, form=form, pool=pool)
    terms = at(*_connect(at, student, teacher))
    assert set(terms) == {"at"}
    expected = 10.0 * _at_expected(student[1:], teacher, p, form, pool)
    assert terms["at"].item() == pytest.approx(expected, rel=1e-9)
    if pool == "features":  # pooling the features first is a different function
        other = AT(beta=10.0, p=p, form=form)
        assert other(*_connect(other, student, teacher))["at"].item() != pytest.approx(
            terms["at"].item(), rel=1e-3)


def test_at_is_zero_for_maps_with_the_same_attention():
    f = _maps(2, (2, 4, 4, 4))[0].double()  # the paper form's norm is not squared: float64
    # a channel-permuted, sign-flipped copy at twice the resolution has the same attention map
    teacher = torch.repeat_interleave(torch.repeat_interleave(-f.flip(1), 2, 2), 2, 3)
    for form in ("code", "paper"):
        at = AT(form=form)
        assert at(*_connect(at, [f], [teacher]))["at"].item() == pytest.approx(0.0, abs=1e-9)


def _q(x, p=2):
    """The authors' / RepDistiller's attention vector: normalise(mean_c x^p) per sample."""
    return torch.nn.functional.normalize(x.pow(p).mean(1).flatten(1))


def test_at_code_form_equals_the_authors_repdistiller_and_torchdistill():
    # equal sizes: szagoruyko/attention-transfer beta * sum_groups mean((Q_s - Q_t)^2),
    # beta = 1e3; RepDistiller's Attention x beta 1000; torchdistill ATLoss(mode='code') x 1000
    student = [f.double() for f in _maps(7, (3, 4, 8, 8), (3, 6, 4, 4))]
    teacher = [f.double() for f in _maps(8, (3, 5, 8, 8), (3, 9, 4, 4))]
    theirs = 1000 * sum((_q(s) - _q(t)).pow(2).mean() for s, t in zip(student, teacher))
    at = AT()
    assert at(*_connect(at, student, teacher))["at"].item() == pytest.approx(theirs.item(),
                                                                             rel=1e-12)
    # unequal sizes: RepDistiller pools the larger *feature map* (pool: features)
    s, t = student[0], teacher[1]  # 8×8 vs 4×4
    theirs = (_q(torch.nn.functional.adaptive_avg_pool2d(s, (4, 4))) - _q(t)).pow(2).mean()
    at = AT(beta=1.0, pool="features")
    assert at(*_connect(at, [s], [t]))["at"].item() == pytest.approx(theirs.item(), rel=1e-12)


def test_at_paper_form_factors_against_the_paper_and_torchdistill():
    student = [f.double() for f in _maps(9, (4, 3, 4, 4))]
    teacher = [f.double() for f in _maps(10, (4, 6, 4, 4))]
    s, t = student[0], teacher[0]
    n, hw = 4, 16
    norms = (_q(s) - _q(t)).norm(dim=1)  # per-sample ||Q_s - Q_t||_2
    # the paper, eq. 2: beta/2 * sum_n ||.||_2 with beta = 1e3 / (hw * n): kdlab beta = 500
    paper = 1e3 / (hw * n) / 2 * norms.sum()
    at = AT(beta=500.0, form="paper")
    assert at(*_connect(at, student, teacher))["at"].item() == pytest.approx(paper.item(),
                                                                             rel=1e-12)
    # torchdistill ATLoss(mode='paper'), pair weight w: w * sum_n ||.||_2 / n = kdlab x hw / beta
    w = 3.0
    torchdistill = w * norms.sum() / n
    at = AT(beta=w * hw, form="paper")
    assert at(*_connect(at, student, teacher))["at"].item() == pytest.approx(
        torchdistill.item(), rel=1e-12)
    # and code vs paper is no constant factor: per sample ||.||^2 / hw vs ||.|| / hw
    code, paper_form = AT(beta=1.0), AT(beta=1.0, form="paper")
    ratios = []
    for k in range(2):
        s_k, t_k = s[2 * k: 2 * k + 2], t[2 * k: 2 * k + 2]
        ratios.append(code(*_connect(code, [s_k], [t_k]))["at"].item()
                      / paper_form(*_connect(paper_form, [s_k], [t_k]))["at"].item())
    assert ratios[0] != pytest.approx(ratios[1], rel=1e-3)


# -- NST -----------------------------------------------------------------------------------------
def _nst_expected(student, teacher, degree, c):
    """Huang & Wang: MMD² between the sets of L2-normalised channel maps under
    k(x, y) = (x·y + c)^d, averaged over the batch; the larger map pooled to the smaller."""
    total = 0.0
    for s, t in zip(student, teacher):
        s, t = s.tolist(), t.tolist()
        mmd = 0.0
        for xs, xt in zip(s, t):
            h = min(len(xs[0]), len(xt[0]))
            w = min(len(xs[0][0]), len(xt[0][0]))
            sets = []
            for x in (xs, xt):
                rows = []
                for ch in x:
                    flat = [v for row in _pool(ch, h, w) for v in row]
                    norm = math.sqrt(sum(v * v for v in flat))
                    rows.append([v / norm for v in flat])
                sets.append(rows)

            def k_mean(a, b):
                return sum((sum(x * y for x, y in zip(u, v)) + c) ** degree
                           for u in a for v in b) / (len(a) * len(b))

            ss, ts = sets
            mmd += k_mean(ts, ts) + k_mean(ss, ss) - 2 * k_mean(ss, ts)
        total += mmd / len(s)
    return total


@pytest.mark.parametrize(("degree", "c"), [(2, 0.0), (3, 0.5)])
def test_nst_matches_the_mmd_formula(degree, c):
    student = _maps(3, (2, 2, 4, 4), (2, 3, 2, 2))
    teacher = _maps(4, (2, 5, 2, 2), (2, 4, 2, 2))  # channels differ; first pair pools 4→2
    nst = NST(beta=5.0, degree=degree, c=c)
    terms = nst(*_connect(nst, student, teacher))
    assert set(terms) == {"nst"}
    expected = 5.0 * _nst_expected(student, teacher, degree, c)
    assert terms["nst"].item() == pytest.approx(expected, rel=1e-5)


def test_nst_is_zero_for_the_same_set_of_channel_maps():
    f = torch.rand(2, 3, 4, 4)
    nst = NST()
    teacher = torch.cat([f.flip(1), 2 * f], 1)  # the same set, each map twice, rescaled
    assert nst(*_connect(nst, [f], [teacher]))["nst"].item() == pytest.approx(0.0, abs=1e-4)


def test_nst_differs_from_the_authors_code_by_a_teacher_constant_only():
    # TuSimple/neuron-selectivity-transfer (MXNet): lambda * mean_n (mean k(s, s) - 2 mean
    # k(s, t)), no teacher-only term; kdlab = theirs + beta * mean_n mean k(t, t)
    s = _maps(11, (3, 4, 4, 4))[0].double().requires_grad_()
    t = _maps(12, (3, 6, 4, 4))[0].double()

    def unit_maps(x):
        return torch.nn.functional.normalize(x.flatten(2), dim=2)

    def k(a, b):
        return (a @ b.transpose(1, 2)).pow(2).mean()

    us, ut = unit_maps(s), unit_maps(t)
    theirs = 50 * (k(us, us) - 2 * k(us, ut))
    nst = NST()
    ours = nst(*_connect(nst, [s], [t]))["nst"]
    assert ours.item() - theirs.item() == pytest.approx(50 * k(ut, ut).item(), rel=1e-10)
    grad_ours, = torch.autograd.grad(ours, s)
    grad_theirs, = torch.autograd.grad(theirs, s)
    assert torch.allclose(grad_ours, grad_theirs, rtol=1e-10, atol=1e-14)


# -- both ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [AT, NST, lambda: AT(form="paper", pool="features")],
                         ids=["at", "nst", "at_paper_features"])
def test_gradients_reach_the_student_only(make):
    student = [f.requires_grad_() for f in _maps(5, (2, 4, 8, 8), (2, 8, 4, 4))]
    teacher = [f.requires_grad_() for f in _maps(6, (2, 6, 4, 4), (2, 12, 2, 2))]
    strategy = make()
    loss = sum(strategy(*_connect(strategy, student, teacher)).values())
    loss.backward()
    for f in student:
        assert f.grad is not None and f.grad.isfinite().all() and f.grad.abs().sum() > 0
    assert all(f.grad is None for f in teacher)


@pytest.mark.parametrize(("cls", "kwargs", "key"), [
    (AT, {"beta": -1.0}, "distill.beta=-1.0"),
    (AT, {"p": 0.0}, "distill.p=0.0"),
    (AT, {"p": 0.5}, "distill.p=0.5"),
    (AT, {"form": "squared"}, "distill.form=squared"),
    (AT, {"pool": "max"}, "distill.pool=max"),
    (NST, {"beta": -0.5}, "distill.beta=-0.5"),
    (NST, {"degree": 0}, "distill.degree=0"),
    (NST, {"degree": 1.5}, "distill.degree=1.5"),
    (NST, {"c": -1.0}, "distill.c=-1.0"),
])
def test_bad_hyper_parameters_name_the_key(cls, kwargs, key):
    with pytest.raises(KdlabError, match=key):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [AT, NST])
def test_non_spatial_layers_are_refused_naming_the_key(cls):
    strategy = cls(student_layers="embedding")
    with pytest.raises(KdlabError, match=r"distill.student_layers=embedding.*\[2, 16\]"):
        _connect(strategy, [torch.zeros(2, 16)], [torch.zeros(2, 4, 2, 2)])


def test_the_config_keys_reach_the_strategy(tmp_path):
    from kdlab.modes.build import build_strategy
    from tests.conftest import make_cfg

    at = build_strategy(make_cfg(tmp_path, ["distill=at"])).members["at"]
    assert (at.beta, at.form, at.pool) == (1000.0, "code", "attention")
    at = build_strategy(make_cfg(tmp_path, ["distill=at", "distill.at.form=paper",
                                            "distill.at.pool=features"])).members["at"]
    assert (at.form, at.pool) == ("paper", "features")
    with pytest.raises(KdlabError, match=r"distill\.at\.form=norm"):
        build_strategy(make_cfg(tmp_path, ["distill=at", "distill.at.form=norm"]))


@pytest.mark.parametrize("distill", ["at", "nst"])
def test_a_short_run_learns(distill, tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short(distill, tmp_path)
    assert_learned(results)
