"""Reverse KL, GKD's generalised JSD, DistiLLM's skew KLs and ULD: each against its formula
written out in plain Python on hand-made logits, their limits and special cases, different
vocabularies for ULD, gradients, hyper-parameter checks and a short run of each config."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.strategies.base import Batch, Outputs
from kdlab.strategies.divergences import (
    GKD,
    ULD,
    ReverseKL,
    SkewKL,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    uld_distance,
)
from kdlab.util.errors import KdlabError

STUDENT = [[1.0, 2.0, 0.5, -0.3], [0.3, -1.0, 2.0, 0.1], [-0.5, 0.2, 0.4, 1.5]]
TEACHER = [[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.0, 3.0], [1.0, -2.0, 0.5, 0.7]]


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True))


def _mean_over_rows(per_row, temperature: float = 1.0) -> float:
    rows = [per_row(_softmax(t, temperature), _softmax(s, temperature))
            for s, t in zip(STUDENT, TEACHER, strict=True)]
    return sum(rows) / len(rows)


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _jsd(p: list[float], q: list[float], beta: float) -> float:
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reverse_kl_is_kl_of_the_student_to_the_teacher(temperature):
    expected = _mean_over_rows(lambda p, q: _kl(q, p), temperature)
    got = reverse_kl(_t(STUDENT), _t(TEACHER), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_its_formula(beta):
    expected = _mean_over_rows(lambda p, q: _jsd(p, q, beta))
    assert generalized_jsd(_t(STUDENT), _t(TEACHER), beta).item() == pytest.approx(expected,
                                                                                   rel=1e-10)


def test_generalized_jsd_end_points_are_forward_and_reverse_kl():
    s, t = _t(STUDENT), _t(TEACHER)
    assert generalized_jsd(s, t, 0.0).item() == pytest.approx(
        _mean_over_rows(lambda p, q: _kl(p, q)), rel=1e-12)
    assert generalized_jsd(s, t, 1.0).item() == pytest.approx(
        _mean_over_rows(lambda p, q: _kl(q, p)), rel=1e-12)
    # the symmetric JSD at beta = 1/2 is bounded by log 2 and symmetric in its arguments
    half = generalized_jsd(s, t, 0.5)
    assert 0 < half.item() < math.log(2)
    assert half.item() == pytest.approx(generalized_jsd(t, s, 0.5).item(), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_skew_kls_match_distillms_definitions(alpha):
    def skl(p, q):
        return _kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q, strict=True)])

    def srkl(p, q):
        return _kl(q, [(1 - alpha) * x + alpha * y for x, y in zip(p, q, strict=True)])

    s, t = _t(STUDENT), _t(TEACHER)
    assert skew_kl(s, t, alpha).item() == pytest.approx(_mean_over_rows(skl), rel=1e-10)
    assert skew_reverse_kl(s, t, alpha).item() == pytest.approx(_mean_over_rows(srkl), rel=1e-10)


def test_skew_kls_at_alpha_zero_are_the_plain_kls_and_shrink_with_alpha():
    s, t = _t(STUDENT), _t(TEACHER)
    assert skew_kl(s, t, 0.0).item() == pytest.approx(_mean_over_rows(lambda p, q: _kl(p, q)))
    assert skew_reverse_kl(s, t, 0.0).item() == pytest.approx(reverse_kl(s, t).item())
    values = [skew_kl(s, t, a).item() for a in (0.0, 0.1, 0.5, 0.9)]
    assert values == sorted(values, reverse=True)


def test_uld_is_the_l1_distance_of_the_sorted_probabilities():
    def sorted_l1(p, q):
        return sum(abs(x - y) for x, y in zip(sorted(q, reverse=True), sorted(p, reverse=True),
                                              strict=True))

    got = uld_distance(_t(STUDENT), _t(TEACHER))
    assert got.item() == pytest.approx(_mean_over_rows(sorted_l1), rel=1e-12)
    # a permutation of the teacher's classes changes nothing: no mapping between vocabularies
    permuted = _t(TEACHER)[:, [2, 0, 3, 1]]
    assert uld_distance(_t(STUDENT), permuted).item() == pytest.approx(got.item(), rel=1e-12)


def test_uld_pads_the_smaller_vocabulary_with_zeros():
    student = [[0.0, math.log(3.0)]]           # q = (1/4, 3/4)
    teacher = [[0.0, 0.0, math.log(2.0)]]      # p = (1/4, 1/4, 1/2)
    # sorted: q = (3/4, 1/4, 0), p = (1/2, 1/4, 1/4) -> |1/4| + 0 + |1/4|
    assert uld_distance(_t(student), _t(teacher)).item() == pytest.approx(0.5, rel=1e-12)


def test_strategies_weight_their_divergence_and_label_ce():
    s, t = Outputs(_t(STUDENT)), Outputs(_t(TEACHER))
    batch = Batch(torch.zeros(3, 1), torch.tensor([1, -1, 0]), torch.arange(3))
    rkl = ReverseKL(weight=2.0, temperature=2.0, ce_weight=0.5)
    assert rkl.ce_weight == 0.5
    assert rkl(s, t, batch)["reverse_kl"].item() == pytest.approx(
        2.0 * 4.0 * _mean_over_rows(lambda p, q: _kl(q, p), 2.0), rel=1e-12)
    assert GKD(beta=0.3)(s, t, batch)["gkd"].item() == pytest.approx(
        _mean_over_rows(lambda p, q: _jsd(p, q, 0.3)), rel=1e-10)
    assert SkewKL(kind="forward", alpha=0.0)(s, t, batch)["skew_kl"].item() == pytest.approx(
        _mean_over_rows(lambda p, q: _kl(p, q)), rel=1e-12)
    uld = ULD(weight=0.5, temperature=2.0)
    assert uld(s, t, batch)["uld"].item() == pytest.approx(
        0.5 * uld_distance(_t(STUDENT), _t(TEACHER), 2.0).item(), rel=1e-12)


@pytest.mark.parametrize("strategy", [ReverseKL(), GKD(), SkewKL(), SkewKL(kind="forward"),
                                      ULD()])
def test_gradients_reach_the_student_only(strategy):
    s = _t(STUDENT).requires_grad_()
    t = _t(TEACHER).requires_grad_()
    batch = Batch(torch.zeros(3, 1), torch.tensor([1, -1, 0]), torch.arange(3))
    sum(strategy(Outputs(s), Outputs(t), batch).values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_a_divergence_is_zero_and_stationary_when_the_student_matches():
    s = _t(TEACHER).requires_grad_()
    for loss in (reverse_kl(s, _t(TEACHER)), generalized_jsd(s, _t(TEACHER), 0.5),
                 skew_reverse_kl(s, _t(TEACHER), 0.1), uld_distance(s, _t(TEACHER))):
        assert abs(loss.item()) < 1e-12


def test_same_vocabulary_divergences_refuse_different_ones():
    student, teacher = Outputs(torch.zeros(2, 5)), Outputs(torch.zeros(2, 7))
    with pytest.raises(KdlabError, match="use distill=uld"):
        GKD().setup(student, teacher, 10)
    ULD().setup(student, teacher, 10)  # ULD takes any two


def test_the_engine_allows_different_vocabularies_only_to_strategies_built_for_them():
    from kdlab.engine.module import check_vocabularies
    from kdlab.strategies import KD
    from kdlab.strategies.composite import Composite

    check_vocabularies(Composite(uld=ULD()), 256, 300)
    check_vocabularies(Composite(kd=KD()), 256, 256)
    with pytest.raises(KdlabError, match="the teacher predicts 300 classes .* and the student "
                                         r"256: distill=uld\+kd .* use distill=uld"):
        check_vocabularies(Composite(uld=ULD(), kd=KD()), 256, 300)


@pytest.mark.parametrize(("cls", "kwargs", "key"), [
    (GKD, {"beta": 1.5}, "distill.beta"),
    (GKD, {"beta": -0.1}, "distill.beta"),
    (SkewKL, {"alpha": 1.0}, "distill.alpha"),
    (SkewKL, {"kind": "sideways"}, "distill.kind"),
    (ReverseKL, {"temperature": 0.0}, "distill.temperature"),
    (ULD, {"weight": -1.0}, "distill.weight"),
    (ULD, {"ce_weight": float("nan")}, "distill.ce_weight"),
])
def test_bad_hyper_parameters_name_the_key(cls, kwargs, key):
    with pytest.raises(KdlabError, match=key):
        cls(**kwargs)


@pytest.mark.parametrize("distill", ["gkd", *(pytest.param(name, marks=pytest.mark.slow)
                                              for name in ("reverse_kl", "skew_kl", "uld"))])
def test_a_short_run_learns(distill, tmp_path):
    """GKD by default (the others share its code path and run in fast_dev_run in
    ``tests/test_every_strategy.py``); all four with ``-m slow``."""
    from tests.strategies.harness import assert_learned, run_short

    results = run_short(distill, tmp_path)
    assert_learned(results)


@pytest.mark.parametrize("name", ["reverse_kl", "gkd", "skew_kl", "uld"])
def test_large_token_batches_are_chunked_with_the_same_loss_and_gradient(name, monkeypatch):
    """Above CHUNKED_ABOVE logits the divergence runs over checkpointed chunks of rows: the
    same mean and the same gradient as in one piece."""
    from kdlab.strategies import GKD, ULD, ReverseKL, SkewKL, divergences
    from kdlab.strategies import logits as logit_module

    strategy = {"reverse_kl": ReverseKL(temperature=2.0), "gkd": GKD(beta=0.3),
                "skew_kl": SkewKL(), "uld": ULD()}[name]
    torch.manual_seed(0)
    s = torch.randn(30, 50, requires_grad=True)
    t = Outputs(torch.randn(30, 50))
    batch = Batch(torch.zeros(30), torch.zeros(30, dtype=torch.long), torch.arange(30))
    whole = sum(strategy(Outputs(s), t, batch).values())
    (g_whole,) = torch.autograd.grad(whole, s)
    calls = []
    original = divergences.checkpoint
    monkeypatch.setattr(divergences, "checkpoint",
                        lambda *a, **k: calls.append(len(a[1])) or original(*a, **k))
    monkeypatch.setattr(logit_module, "CHUNKED_ABOVE", 1000)
    monkeypatch.setattr(logit_module, "CHUNK_ELEMENTS", 400)
    chunked = sum(strategy(Outputs(s), t, batch).values())
    (g_chunked,) = torch.autograd.grad(chunked, s)
    assert calls == [8, 8, 8, 6]  # 400 elements / 50 classes per chunk
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(g_chunked, g_whole)
