"""DKD, DIST and LSKD: each loss against its paper's formula written out in plain Python, the
gradient flow, hyper-parameter checks and a short run of each config that learns."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from kdlab.strategies.base import Batch, Outputs
from kdlab.strategies.logits import DIST, DKD, LSKD, kd_loss, standardize
from kdlab.util.errors import KdlabError

STUDENT = [[1.0, 2.0, 0.5, -0.3], [0.3, -1.0, 2.0, 0.1], [-0.5, 0.2, 0.4, 1.5]]
TEACHER = [[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.0, 3.0], [1.0, -2.0, 0.5, 0.7]]
TARGETS = [1, -1, 0]  # the second sample is unlabelled: DKD uses the teacher's argmax (3)


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _batch(targets: list[int] = TARGETS) -> Batch:
    n = len(targets)
    return Batch(torch.zeros(n, 1), torch.tensor(targets), torch.arange(n))


def _outputs(student=STUDENT, teacher=TEACHER) -> tuple[Outputs, Outputs]:
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(teacher, dtype=torch.float64, requires_grad=True)
    return Outputs(s), Outputs(t)


def _total(terms: dict[str, torch.Tensor]) -> float:
    return sum(v.item() for v in terms.values())


def _assert_grads(strategy, targets: list[int] = TARGETS) -> None:
    """Gradients reach the student's logits and never the teacher's."""
    student, teacher = _outputs()
    terms = strategy(student, teacher, _batch(targets))
    torch.stack(list(terms.values())).sum().backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
    assert teacher.logits.grad is None
    assert not list(strategy.parameters())  # logit methods have no connectors


# -- DKD ---------------------------------------------------------------------------------------
def _dkd_expected(alpha: float, beta: float, temperature: float) -> tuple[float, float]:
    """TCKD and NCKD (Eq. 1-4 of the paper) averaged over the batch, times T²."""
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(STUDENT, TEACHER, TARGETS):
        if y < 0:
            y = max(range(len(t_row)), key=t_row.__getitem__)
        p_s, p_t = _softmax(s_row, temperature), _softmax(t_row, temperature)
        b_s, b_t = [p_s[y], 1 - p_s[y]], [p_t[y], 1 - p_t[y]]
        hat_s = [p / (1 - p_s[y]) for k, p in enumerate(p_s) if k != y]
        hat_t = [p / (1 - p_t[y]) for k, p in enumerate(p_t) if k != y]
        tckd += _kl(b_t, b_s)
        nckd += _kl(hat_t, hat_s)
    n, t2 = len(STUDENT), temperature**2
    return alpha * t2 * tckd / n, beta * t2 * nckd / n


def test_dkd_matches_its_formula_with_teacher_argmax_for_unlabelled_samples():
    dkd = DKD(alpha=1.5, beta=8.0, temperature=2.0, warmup=0)
    terms = dkd(*_outputs(), _batch())
    tckd, nckd = _dkd_expected(1.5, 8.0, 2.0)
    assert set(terms) == {"tckd", "nckd"}
    assert terms["tckd"].item() == pytest.approx(tckd, rel=1e-9)
    assert terms["nckd"].item() == pytest.approx(nckd, rel=1e-9)


def test_dkd_reformulates_kd():
    """Eq. 4 of the paper: KD = TCKD + (1 − p_t^T) · NCKD, for one sample."""
    dkd = DKD(alpha=1.0, beta=1.0, temperature=3.0, warmup=0)
    student, teacher = _outputs(STUDENT[:1], TEACHER[:1])
    terms = dkd(student, teacher, _batch(TARGETS[:1]))
    p_target = _softmax(TEACHER[0], 3.0)[TARGETS[0]]
    kd = kd_loss(student.logits, teacher.logits, 3.0).item()
    assert terms["tckd"].item() + (1 - p_target) * terms["nckd"].item() == pytest.approx(kd)


def test_dkd_warms_up_linearly_over_0_based_epochs():
    dkd = DKD(warmup=4, temperature=2.0)
    full = _total(DKD(warmup=0, temperature=2.0)(*_outputs(), _batch()))
    for epoch, factor in [(0, 0.25), (1, 0.5), (3, 1.0), (10, 1.0)]:
        dkd.on_epoch_start(epoch)
        assert _total(dkd(*_outputs(), _batch())) == pytest.approx(factor * full)


def test_dkd_gradients():
    _assert_grads(DKD(warmup=0))


# -- DIST --------------------------------------------------------------------------------------
def test_dist_matches_its_formula():
    tau, beta, gamma = 2.0, 1.5, 0.5
    ys = [_softmax(r, tau) for r in STUDENT]
    yt = [_softmax(r, tau) for r in TEACHER]
    inter = 1 - statistics.fmean(statistics.correlation(a, b) for a, b in zip(ys, yt))
    columns = range(len(ys[0]))
    intra = 1 - statistics.fmean(
        statistics.correlation([r[j] for r in ys], [r[j] for r in yt]) for j in columns)
    terms = DIST(beta=beta, gamma=gamma, tau=tau)(*_outputs(), _batch())
    assert terms["inter"].item() == pytest.approx(tau**2 * beta * inter, rel=1e-6)
    assert terms["intra"].item() == pytest.approx(tau**2 * gamma * intra, rel=1e-6)


def test_dist_is_zero_for_a_perfect_student_and_finite_for_one_sample():
    # tau=1: at the default tau=4 the centred probabilities are so small that the Pearson's
    # eps (1e-8, as the authors' cosine_similarity) leaves ~1e-5 (times tau² beta)
    terms = DIST(tau=1.0)(*_outputs(TEACHER, TEACHER), _batch())
    assert _total(terms) == pytest.approx(0.0, abs=1e-6)
    one = DIST()(*_outputs(STUDENT[:1], TEACHER[:1]), _batch(TARGETS[:1]))
    assert all(torch.isfinite(v) for v in one.values())


def test_dist_gradients():
    _assert_grads(DIST(tau=4.0))


# -- LSKD --------------------------------------------------------------------------------------
def test_standardize_divides_by_the_unbiased_std():
    """The authors' code z-scores with ``Tensor.std``'s default (Bessel-corrected) deviation:
    for [1, 2, 3, 4], mean 2.5 and std sqrt(5 / 3), not the population sqrt(5 / 4)."""
    z = standardize(torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 8.0]],
                                 dtype=torch.float64), eps=0.0)
    std = math.sqrt(5 / 3)
    expected = [[-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], [-0.5, -0.5, -0.5, 1.5]]
    for row, want in zip(z.tolist(), expected):
        assert row == pytest.approx(want, rel=1e-12)
    assert z[0, 3].item() != pytest.approx(1.5 / math.sqrt(5 / 4), rel=1e-3)  # not population
    assert z.std(dim=1).tolist() == pytest.approx([1.0, 1.0], rel=1e-12)


def test_lskd_matches_its_formula():
    tau, alpha = 2.0, 9.0
    total = 0.0
    for s_row, t_row in zip(STUDENT, TEACHER):
        zs = [(v - statistics.fmean(s_row)) / statistics.stdev(s_row) for v in s_row]
        zt = [(v - statistics.fmean(t_row)) / statistics.stdev(t_row) for v in t_row]
        total += _kl(_softmax(zt, tau), _softmax(zs, tau))
    expected = alpha * tau**2 * total / len(STUDENT)
    terms = LSKD(temperature=tau, alpha=alpha)(*_outputs(), _batch())
    assert set(terms) == {"lskd"}
    assert terms["lskd"].item() == pytest.approx(expected, rel=1e-5)


def test_lskd_ignores_the_scale_and_shift_of_the_logits():
    teacher = torch.tensor(TEACHER, dtype=torch.float64)
    scaled = (0.3 * teacher + 5.0).tolist()
    assert _total(LSKD()(*_outputs(scaled, TEACHER), _batch())) == pytest.approx(0, abs=1e-10)
    lskd = LSKD()
    student = torch.tensor(STUDENT, dtype=torch.float64)
    a = _total(lskd(*_outputs(STUDENT), _batch()))
    b = _total(lskd(*_outputs((4 * student - 2).tolist()), _batch()))
    assert a == pytest.approx(b, rel=1e-6) and a > 0
    assert lskd.ce_weight == 0.1


def test_lskd_gradients():
    _assert_grads(LSKD())


# -- hyper-parameters and end to end -----------------------------------------------------------
@pytest.mark.parametrize("cls, kwargs, key", [
    (DKD, {"alpha": -1.0}, "alpha"),
    (DKD, {"beta": -0.5}, "beta"),
    (DKD, {"temperature": 0.0}, "temperature"),
    (DKD, {"warmup": -1}, "warmup"),
    (DKD, {"warmup": 2.5}, "warmup"),
    (DKD, {"ce_weight": -1.0}, "ce_weight"),
    (DIST, {"beta": -1.0}, "beta"),
    (DIST, {"gamma": -1.0}, "gamma"),
    (DIST, {"tau": -2.0}, "tau"),
    (DIST, {"ce_weight": float("nan")}, "ce_weight"),
    (LSKD, {"temperature": 0.0}, "temperature"),
    (LSKD, {"alpha": -9.0}, "alpha"),
    (LSKD, {"ce_weight": -0.1}, "ce_weight"),
])
def test_bad_hyper_parameters_name_the_key(cls, kwargs, key):
    with pytest.raises(KdlabError, match=rf"distill\.{key}="):
        cls(**kwargs)


@pytest.mark.parametrize("distill", ["dkd", "dist", "lskd"])
def test_a_short_run_learns(distill, tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short(distill, tmp_path)
    assert results["strategy"] == distill
    assert_learned(results)
