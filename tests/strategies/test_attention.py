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
def _at_expected(student, teacher, p):
    """Zagoruyko & Komodakis: per sample, mean_c |a|^p at each position, the larger map pooled
    to the smaller, flattened, L2-normalised; mean squared difference."""
    total = 0.0
    for s, t in zip(student, teacher):
        s, t = s.tolist(), t.tolist()
        squares, count = 0.0, 0
        for xs, xt in zip(s, t):  # samples
            maps = []
            for x in (xs, xt):
                h, w = len(x[0]), len(x[0][0])
                maps.append([[sum(abs(c[i][j]) ** p for c in x) / len(x) for j in range(w)]
                             for i in range(h)])
            h = min(len(m) for m in maps)
            w = min(len(m[0]) for m in maps)
            q = []
            for m in maps:
                flat = [v for row in _pool(m, h, w) for v in row]
                norm = math.sqrt(sum(v * v for v in flat))
                q.append([v / norm for v in flat])
            squares += sum((a - b) ** 2 for a, b in zip(*q))
            count += h * w
        total += squares / count
    return total


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_matches_the_formula_and_pairs_the_last_layers(p):
    student = _maps(0, (2, 2, 8, 8), (2, 2, 4, 4), (2, 3, 2, 2))  # the first is not paired
    teacher = _maps(1, (2, 3, 2, 2), (2, 5, 4, 4))  # 2×2 vs 4×4: the teacher's map is pooled
    at = AT(beta=10.0, p=p)
    terms = at(*_connect(at, student, teacher))
    assert set(terms) == {"at"}
    expected = 10.0 * _at_expected(student[1:], teacher, p)
    assert terms["at"].item() == pytest.approx(expected, rel=1e-5)


def test_at_is_zero_for_maps_with_the_same_attention():
    f = _maps(2, (2, 4, 4, 4))[0]
    at = AT()
    # a channel-permuted, sign-flipped copy at twice the resolution has the same attention map
    teacher = torch.repeat_interleave(torch.repeat_interleave(-f.flip(1), 2, 2), 2, 3)
    assert at(*_connect(at, [f], [teacher]))["at"].item() == pytest.approx(0.0, abs=1e-9)


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


# -- both ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [AT, NST])
def test_gradients_reach_the_student_only(cls):
    student = [f.requires_grad_() for f in _maps(5, (2, 4, 8, 8), (2, 8, 4, 4))]
    teacher = [f.requires_grad_() for f in _maps(6, (2, 6, 4, 4), (2, 12, 2, 2))]
    strategy = cls()
    loss = sum(strategy(*_connect(strategy, student, teacher)).values())
    loss.backward()
    for f in student:
        assert f.grad is not None and f.grad.isfinite().all() and f.grad.abs().sum() > 0
    assert all(f.grad is None for f in teacher)


@pytest.mark.parametrize(("cls", "kwargs", "key"), [
    (AT, {"beta": -1.0}, "distill.beta=-1.0"),
    (AT, {"p": 0.0}, "distill.p=0.0"),
    (AT, {"p": 0.5}, "distill.p=0.5"),
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


@pytest.mark.parametrize("distill", ["at", "nst"])
def test_a_short_run_learns(distill, tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short(distill, tmp_path)
    assert_learned(results)
