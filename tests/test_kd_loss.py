"""The KD loss equals Hinton's formula computed by hand."""

import math

import pytest
import torch

from kdlab.strategies import KD, Outputs, kd_loss
from kdlab.util.errors import KdlabError


def _softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_hand_computation():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    temperature = 2.0
    expected = 0.0
    for s, t in zip(student, teacher):
        p_t, p_s = _softmax(t, temperature), _softmax(s, temperature)
        expected += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    expected = expected / len(student) * temperature**2
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_strategy_weights_soft_term_by_alpha_and_ce_by_one_minus_alpha():
    student = torch.tensor([[1.0, 2.0, 0.5]])
    teacher = torch.tensor([[2.0, 0.0, 1.0]])
    strategy = KD(temperature=3.0, alpha=0.7)
    terms = strategy(Outputs(student), Outputs(teacher), torch.tensor([0]))
    assert set(terms) == {"kd"}
    assert terms["kd"].item() == pytest.approx(0.7 * kd_loss(student, teacher, 3.0).item())
    assert strategy.ce_weight == pytest.approx(0.3)


def test_kd_loss_is_zero_when_student_matches_teacher_and_scales_with_t_squared():
    logits = torch.tensor([[0.3, -1.2, 2.0]])
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    # at a high temperature, T² · KL approaches ½ · mean squared logit difference / K
    # (Hinton §2.1): the T² factor keeps the magnitude from vanishing
    s, t = torch.tensor([[0.0, 1.0, -1.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    assert kd_loss(s, t, 100.0).item() > 0.1


@pytest.mark.parametrize("kwargs, key", [({"temperature": 0}, "distill.temperature"),
                                         ({"alpha": 1.5}, "distill.alpha")])
def test_kd_rejects_bad_hyperparameters(kwargs, key):
    with pytest.raises(KdlabError, match=key):
        KD(**kwargs)


def test_fused_soft_target_gradient_equals_autograd_and_teacher_side_falls_back():
    from kdlab.strategies.logits import soft_target_kl

    torch.manual_seed(0)
    s = torch.randn(6, 5, requires_grad=True)
    t = torch.randn(6, 5)
    log_pt = torch.log_softmax(t / 3.0, 1)
    fused = soft_target_kl(s, log_pt, 3.0, scale=2.5)
    (grad,) = torch.autograd.grad(fused, s)
    p_t = log_pt.exp()
    by_hand = 2.5 * (p_t * (log_pt - torch.log_softmax(s / 3.0, 1))).sum(1).mean()
    (expected,) = torch.autograd.grad(by_hand, s)
    assert fused.item() == pytest.approx(by_hand.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected)
    # a teacher side that needs gradients (e.g. mutual learning) goes through autograd
    t_var = log_pt.clone().requires_grad_(True)
    soft_target_kl(s, t_var, 3.0, 2.5).backward()
    assert t_var.grad is not None and t_var.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_the_chunked_soft_target_kl_equals_the_fused_one_in_value_and_gradient(chunk_rows):
    """A language model's tokens × vocabulary go through chunks of rows: same loss, same
    gradient, whatever the chunk."""
    from kdlab.strategies.logits import soft_target_kl

    torch.manual_seed(0)
    s = torch.randn(40, 300, requires_grad=True)
    t = torch.log_softmax(torch.randn(40, 300) / 2.0, 1)
    fused = soft_target_kl(s, t, 2.0, 4.0)
    (g_fused,) = torch.autograd.grad(fused * 3.0, s)
    chunked = soft_target_kl(s, t, 2.0, 4.0, chunk_rows=chunk_rows)
    (g_chunked,) = torch.autograd.grad(chunked * 3.0, s)
    torch.testing.assert_close(chunked, fused)
    torch.testing.assert_close(g_chunked, g_fused)
    # and the formula itself
    want = 4.0 * (t.exp() * (t - torch.log_softmax(s / 2.0, 1))).sum(1).mean()
    torch.testing.assert_close(chunked, want)


def test_logits_larger_than_the_threshold_are_chunked(monkeypatch):
    from kdlab.strategies import logits

    calls = []
    original = logits._ChunkedSoftTargetKL.apply
    monkeypatch.setattr(logits._ChunkedSoftTargetKL, "apply",
                        lambda *a: calls.append(a[-1]) or original(*a))
    monkeypatch.setattr(logits, "CHUNKED_ABOVE", 1000)
    monkeypatch.setattr(logits, "CHUNK_ELEMENTS", 600)
    s = torch.randn(20, 100, requires_grad=True)
    logits.soft_target_kl(s, torch.log_softmax(torch.randn(20, 100), 1), 1.0)
    assert calls == [6]  # 600 elements per chunk / 100 classes
    logits.soft_target_kl(s[:5], torch.log_softmax(torch.randn(5, 100), 1), 1.0)
    assert calls == [6]  # 500 elements: the fused form
