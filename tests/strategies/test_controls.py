"""The controls: pseudo-labels from the teacher and teacher-free label smoothing."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.engine.module import DistillationModule
from kdlab.models import CNN
from kdlab.strategies.base import Batch, Outputs
from kdlab.strategies.controls import LabelSmoothing, PseudoLabels
from kdlab.util.errors import KdlabError

STUDENT = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [-0.5, 0.2, 0.4], [0.0, 1.0, -1.0]]
TEACHER = [[0.1, 3.0, 0.0], [2.0, 0.5, 1.0], [0.0, 0.0, 4.0], [1.0, 0.0, -1.0]]
TARGETS = [1, -1, 0, -1]


def _log_softmax(row: list[float]) -> list[float]:
    log_z = math.log(sum(math.exp(v) for v in row))
    return [v - log_z for v in row]


def _outputs(teacher=True) -> tuple[Outputs, Outputs]:
    s = Outputs(torch.tensor(STUDENT, requires_grad=True))
    t = Outputs(torch.tensor(TEACHER, requires_grad=True) if teacher else torch.empty(0))
    return s, t


def _batch(targets=TARGETS) -> Batch:
    return Batch(torch.zeros(len(targets), 1), torch.tensor(targets), torch.arange(len(targets)))


# -- PseudoLabels ------------------------------------------------------------------------------
def test_pseudo_labels_are_the_teachers_argmax_on_every_sample():
    argmax = [row.index(max(row)) for row in TEACHER]  # [1, 0, 2, 0]
    expected = -sum(_log_softmax(s)[k] for s, k in zip(STUDENT, argmax)) / len(STUDENT)
    pseudo = PseudoLabels(weight=2.0)
    terms = pseudo(*_outputs(), _batch())
    assert set(terms) == {"pseudo"}
    assert terms["pseudo"].item() == pytest.approx(2.0 * expected, rel=1e-6)
    assert pseudo.ce_weight == 1.0
    assert PseudoLabels(replace_labels=True).ce_weight == 0.0


def test_pseudo_labels_gradients():
    student, teacher = _outputs()
    PseudoLabels()(student, teacher, _batch())["pseudo"].backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
    assert teacher.logits.grad is None


@pytest.mark.parametrize("kwargs, key", [({"weight": -1.0}, "weight"),
                                         ({"replace_labels": "yes"}, "replace_labels")])
def test_pseudo_labels_bad_hyper_parameters(kwargs, key):
    with pytest.raises(KdlabError, match=rf"distill\.{key}="):
        PseudoLabels(**kwargs)


# -- LabelSmoothing ----------------------------------------------------------------------------
def test_label_smoothing_matches_smoothed_cross_entropy_on_labelled_samples():
    eps, classes = 0.2, 3
    total, count = 0.0, 0
    for row, y in zip(STUDENT, TARGETS):
        if y < 0:
            continue
        q = [(1 - eps) * (k == y) + eps / classes for k in range(classes)]
        total -= sum(qk * lp for qk, lp in zip(q, _log_softmax(row)))
        count += 1
    ls = LabelSmoothing(epsilon=eps, weight=0.5)
    assert LabelSmoothing.needs_teacher is False and ls.ce_weight == 0.0
    terms = ls(*_outputs(teacher=False), _batch())
    assert set(terms) == {"ls"}
    assert terms["ls"].item() == pytest.approx(0.5 * total / count, rel=1e-6)


def test_label_smoothing_gradients_and_an_unlabelled_batch():
    student, teacher = _outputs(teacher=False)
    LabelSmoothing()(student, teacher, _batch())["ls"].backward()
    assert student.logits.grad.abs().sum() > 0
    student, teacher = _outputs(teacher=False)
    zero = LabelSmoothing()(student, teacher, _batch([-1] * 4))["ls"]
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert student.logits.grad is not None and not student.logits.grad.any()


@pytest.mark.parametrize("kwargs, key", [({"epsilon": -0.1}, "epsilon"),
                                         ({"epsilon": 1.5}, "epsilon"),
                                         ({"weight": -1.0}, "weight")])
def test_label_smoothing_bad_hyper_parameters(kwargs, key):
    with pytest.raises(KdlabError, match=rf"distill\.{key}="):
        LabelSmoothing(**kwargs)


def test_label_smoothing_trains_without_a_teacher():
    torch.manual_seed(0)
    student = CNN([1, 28, 28], 10, channels=[8, 16, 16], hidden=16)
    module = DistillationModule(student, 10, torch.optim.SGD, strategy=LabelSmoothing(),
                                example_input=torch.zeros(2, 1, 28, 28))
    batch = (torch.randn(4, 1, 28, 28), torch.tensor([1, -1, 2, 3]), torch.arange(4))
    loss, terms = module.batch_loss(batch)
    loss.backward()
    assert "ls" in terms and "ce" not in terms
    assert all(p.grad is not None for p in student.parameters())


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.parametrize("distill", ["pseudo", "label_smoothing"])
def test_a_short_run_learns(distill, tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short(distill, tmp_path)
    assert results["strategy"] == distill
    assert_learned(results)
    assert ("teacher" in results) == (distill == "pseudo")
