"""NKD and WTTM: each loss against its paper's formula written out in plain Python, the
gradient flow, hyper-parameter checks and a short run of each config that learns."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.strategies.base import Batch, Outputs
from kdlab.strategies.transformed import NKD, WTTM
from kdlab.util.errors import KdlabError

STUDENT = [[1.0, 2.0, 0.5, -0.3], [0.3, -1.0, 2.0, 0.1], [-0.5, 0.2, 0.4, 1.5]]
TEACHER = [[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.0, 3.0], [1.0, -2.0, 0.5, 0.7]]
TARGETS = [1, -1, 0]  # the second sample is unlabelled: NKD uses the teacher's argmax (3)


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _batch(targets: list[int] = TARGETS) -> Batch:
    n = len(targets)
    return Batch(torch.zeros(n, 1), torch.tensor(targets), torch.arange(n))


def _outputs(student=STUDENT, teacher=TEACHER) -> tuple[Outputs, Outputs]:
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(teacher, dtype=torch.float64, requires_grad=True)
    return Outputs(s), Outputs(t)


def _assert_grads(strategy) -> None:
    """Gradients reach the student's logits and never the teacher's."""
    student, teacher = _outputs()
    terms = strategy(student, teacher, _batch())
    torch.stack(list(terms.values())).sum().backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
    assert teacher.logits.grad is None
    assert not list(strategy.parameters())  # logit methods have no connectors


# -- NKD ---------------------------------------------------------------------------------------
def _nkd_expected(temperature: float, gamma: float, student=STUDENT, teacher=TEACHER,
                  targets=TARGETS) -> tuple[float, float]:
    """The target and non-target terms of the paper's NKD loss, batch means."""
    target_sum = nontarget_sum = 0.0
    for s_row, t_row, y in zip(student, teacher, targets):
        if y < 0:
            y = max(range(len(t_row)), key=t_row.__getitem__)
        target_sum -= _softmax(t_row)[y] * math.log(_softmax(s_row)[y])
        hat_t = _softmax([v for k, v in enumerate(t_row) if k != y], temperature)
        hat_s = _softmax([v for k, v in enumerate(s_row) if k != y], temperature)
        nontarget_sum -= sum(a * math.log(b) for a, b in zip(hat_t, hat_s))
    n = len(student)
    return target_sum / n, gamma * temperature**2 * nontarget_sum / n


def test_nkd_matches_its_formula_with_teacher_argmax_for_unlabelled_samples():
    terms = NKD(temperature=2.0, gamma=1.5)(*_outputs(), _batch())
    target, nontarget = _nkd_expected(2.0, 1.5)
    assert set(terms) == {"nkd_target", "nkd_nontarget"}
    assert terms["nkd_target"].item() == pytest.approx(target, rel=1e-12)
    assert terms["nkd_nontarget"].item() == pytest.approx(nontarget, rel=1e-12)


def test_nkd_uses_the_label_not_the_teacher_argmax_when_there_is_one():
    """Sample 2's label (3) is also the teacher's argmax; relabelling it as 0 changes the loss
    exactly as the formula does."""
    targets = [1, 0, 0]
    terms = NKD()(*_outputs(), _batch(targets))
    target, nontarget = _nkd_expected(3.0, 3.5, targets=targets)
    assert terms["nkd_target"].item() == pytest.approx(target, rel=1e-12)
    assert terms["nkd_nontarget"].item() == pytest.approx(nontarget, rel=1e-12)
    assert nontarget != pytest.approx(_nkd_expected(3.0, 3.5)[1])


def test_nkd_non_target_term_ignores_the_scale_of_the_non_target_mass():
    """Normalisation: raising the student's target logit shrinks every non-target probability
    by the same factor and leaves the non-target term unchanged; at the teacher's own
    non-target logits that term is the teacher's entropy (its minimum)."""
    nkd = NKD(temperature=2.0, gamma=1.0)
    shifted = [row[:] for row in STUDENT]
    for row, y in zip(shifted, [1, 3, 0]):
        row[y] += 5.0
    a = nkd(*_outputs(), _batch())["nkd_nontarget"].item()
    b = nkd(*_outputs(shifted), _batch())["nkd_nontarget"].item()
    assert a == pytest.approx(b, rel=1e-12)
    entropy = 0.0
    for t_row, y in zip(TEACHER, [1, 3, 0]):
        hat = _softmax([v for k, v in enumerate(t_row) if k != y], 2.0)
        entropy -= sum(p * math.log(p) for p in hat)
    at_teacher = nkd(*_outputs(TEACHER), _batch())["nkd_nontarget"].item()
    assert at_teacher == pytest.approx(4.0 * entropy / 3, rel=1e-12)
    assert a > at_teacher


def test_nkd_gradients_and_defaults():
    _assert_grads(NKD())
    nkd = NKD()
    assert (nkd.temperature, nkd.gamma, nkd.ce_weight) == (3.0, 3.5, 1.0)


def test_nkd_needs_two_classes():
    with pytest.raises(KdlabError, match="distill=nkd needs at least 2 classes"):
        NKD()(*_outputs([[1.0]], [[2.0]]), _batch([0]))


# -- WTTM --------------------------------------------------------------------------------------
def _wttm_expected(temperature: float, beta: float, student=STUDENT,
                   teacher=TEACHER) -> float:
    """The paper's WTTM term: power transform p^γ, its sum U as the sample's weight."""
    gamma, total = 1.0 / temperature, 0.0
    for s_row, t_row in zip(student, teacher):
        powered = [p**gamma for p in _softmax(t_row)]
        weight = sum(powered)
        transformed = [v / weight for v in powered]
        p_s = _softmax(s_row)
        total += weight * sum(a * math.log(a / b) for a, b in zip(transformed, p_s))
    return beta * total / len(student)


def test_wttm_matches_its_formula():
    terms = WTTM(temperature=4.0, beta=2.5)(*_outputs(), _batch())
    assert set(terms) == {"wttm"}
    assert terms["wttm"].item() == pytest.approx(_wttm_expected(4.0, 2.5), rel=1e-12)


def test_wttm_weights_smoother_teachers_more_and_vanishes_at_the_transformed_teacher():
    """A uniform teacher over C classes has the largest weight, U = C^(1 − γ); a student whose
    logits are the teacher's divided by T matches p̃ exactly: zero loss."""
    wttm = WTTM(temperature=2.0, beta=1.0)
    uniform = [[0.0] * 4]
    student = [[1.0, -1.0, 0.5, 2.0]]
    kl = sum(0.25 * math.log(0.25 / q) for q in _softmax(student[0]))
    value = wttm(*_outputs(student, uniform), _batch([0]))["wttm"].item()
    assert value == pytest.approx(4 ** (1 - 0.5) * kl, rel=1e-12)
    matched = [[v / 2.0 for v in row] for row in TEACHER]
    assert wttm(*_outputs(matched), _batch())["wttm"].item() == pytest.approx(0.0, abs=1e-12)


def test_wttm_tends_to_cross_entropy_on_the_teachers_class_for_a_one_hot_teacher():
    """A saturated teacher (logit gap 2000) has p ≈ one-hot: U → 1 and p̃ → one-hot, so the
    term is the student's cross-entropy on the teacher's class."""
    teacher = [[2000.0, 0.0, 0.0]]
    student = [[1.0, 0.0, -1.0]]
    value = WTTM(temperature=4.0, beta=1.0)(*_outputs(student, teacher), _batch([-1]))["wttm"]
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(-math.log(_softmax(student[0])[0]), rel=1e-12)


def test_wttm_gradients_and_defaults():
    _assert_grads(WTTM())
    wttm = WTTM()
    assert (wttm.temperature, wttm.beta, wttm.ce_weight) == (5.0, 4.0, 1.0)


# -- hyper-parameters and end to end -----------------------------------------------------------
@pytest.mark.parametrize("cls, kwargs, key", [
    (NKD, {"temperature": 0.0}, "temperature"),
    (NKD, {"temperature": float("inf")}, "temperature"),
    (NKD, {"gamma": -1.0}, "gamma"),
    (NKD, {"ce_weight": float("nan")}, "ce_weight"),
    (WTTM, {"temperature": -4.0}, "temperature"),
    (WTTM, {"beta": -1.0}, "beta"),
    (WTTM, {"beta": True}, "beta"),
    (WTTM, {"ce_weight": -0.1}, "ce_weight"),
])
def test_bad_hyper_parameters_name_the_key(cls, kwargs, key):
    with pytest.raises(KdlabError, match=rf"distill\.{key}="):
        cls(**kwargs)


@pytest.mark.parametrize("distill", ["nkd", "wttm"])
def test_a_short_run_learns(distill, tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short(distill, tmp_path)
    assert results["strategy"] == distill
    assert_learned(results)
