"""DOT (optimizer=dot): its update against the paper's formula written out by hand, the loop's
two backward passes that split the task and the distillation gradients, the options it refuses,
and a short distillation run that learns with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab.engine.module import DistillationModule
from kdlab.models import CNN
from kdlab.optim import DOT
from kdlab.strategies import KD
from kdlab.util.errors import KdlabError


def test_dot_update_matches_its_formula_for_each_kind_of_parameter():
    """Two steps by hand: ``b_ce ← (β−Δ)·b_ce + g_ce + λθ``, ``b_kd ← (β+Δ)·b_kd + g_kd``,
    ``θ ← θ − lr·(b_ce + b_kd)``; one-gradient parameters use ``β`` and their own decay."""
    lr, beta, delta, decay = 0.1, 0.9, 0.075, 0.01
    both, task_only, kd_only = (nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
                                for _ in range(3))
    dot = DOT([both, task_only, kd_only], lr=lr, momentum=beta, delta=delta,
              weight_decay=decay)
    g_kd = [torch.tensor([0.5, 0.25]), torch.tensor([-1.0, 2.0])]
    g_ce = [torch.tensor([0.1, -0.3]), torch.tensor([0.4, 0.2])]
    expected = {name: [1.0, -2.0] for name in ("both", "task", "kd")}
    buffers: dict[str, list[float]] = {}

    def accumulate(key: str, grad: list[float], momentum: float) -> list[float]:
        old = buffers.get(key)
        buffers[key] = grad if old is None else [momentum * b + g for b, g in zip(old, grad)]
        return buffers[key]

    for kd, ce in zip(g_kd, g_ce):
        both.grad, kd_only.grad = kd.double().clone(), kd.double().clone()
        dot.stash_distillation_gradients()
        assert both.grad is None and kd_only.grad is None
        both.grad, task_only.grad = ce.double().clone(), ce.double().clone()
        dot.step()
        for name in ("both", "task", "kd"):
            theta = expected[name]

            def decayed(g: torch.Tensor, theta: list[float] = theta) -> list[float]:
                return [gi + decay * t for gi, t in zip(g.tolist(), theta)]

            if name == "both":
                b = accumulate("both_ce", decayed(ce), beta - delta)
                k = accumulate("both_kd", kd.tolist(), beta + delta)
                update = [x + y for x, y in zip(b, k)]
            elif name == "task":
                update = accumulate("task", decayed(ce), beta)
            else:
                update = accumulate("kd", decayed(kd), beta)
            expected[name] = [t - lr * u for t, u in zip(theta, update)]
        for p in (both, task_only, kd_only):
            p.grad = None
    for name, param in (("both", both), ("task", task_only), ("kd", kd_only)):
        assert param.tolist() == pytest.approx(expected[name], rel=1e-12), name


def test_dot_with_delta_zero_and_task_gradients_only_is_torch_sgd():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    b.load_state_dict(a.state_dict())
    dot = DOT(a.parameters(), lr=0.05, momentum=0.9, delta=0.0, weight_decay=5e-4)
    sgd = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(4):
        x = torch.randn(8, 4, dtype=torch.float64)
        for model, opt in ((a, dot), (b, sgd)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("key, value", [("lr", 0.0), ("momentum", 1.0), ("delta", 0.2),
                                        ("weight_decay", -1.0)])
def test_dot_names_an_option_out_of_range(key, value):
    options = {"lr": 0.05, "momentum": 0.9, "delta": 0.075, "weight_decay": 5e-4, key: value}
    with pytest.raises(KdlabError, match=f"optimizer.{key}={value} is out of range"):
        DOT([nn.Parameter(torch.zeros(1))], **options)


def _module(**loop) -> DistillationModule:
    from kdlab.engine.spec import LoopOptions

    torch.manual_seed(0)
    student = CNN([1, 28, 28], 10, channels=[4], hidden=0, dropout=0.0)
    teacher = CNN([1, 28, 28], 10, channels=[4], hidden=0, dropout=0.0)
    return DistillationModule(student, 10, DOT, teacher=teacher, strategy=KD(4.0, 0.9),
                              loop=LoopOptions(**loop))


def test_the_loop_splits_task_and_distillation_gradients_into_their_buffers():
    """One DOT step of the loop's two backward passes: the task buffer holds exactly the
    gradient of the ``ce`` term (plus decay) and the distillation buffer that of ``kd``."""
    module = _module()
    dot = DOT(module.trainable_parameters(), lr=0.1, momentum=0.9, delta=0.075,
              weight_decay=0.0)
    module._dot = dot
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])
    terms = module._terms(x, y, torch.arange(6))
    params = list(module.trainable_parameters())
    g_ce = torch.autograd.grad(terms["ce"], params, retain_graph=True)
    g_kd = torch.autograd.grad(terms["kd"], params, retain_graph=True)
    module.dot_backward(terms, torch.Tensor.backward)
    dot.step()
    for p, ce, kd in zip(params, g_ce, g_kd):
        state = dot.state[p]
        assert torch.allclose(state["task_buffer"], ce, atol=1e-7)
        assert torch.allclose(state["kd_buffer"], kd, atol=1e-7)


@pytest.mark.parametrize("loop, bad", [
    ({"accumulate_grad_batches": 2}, "trainer.accumulate_grad_batches=2"),
    ({"gradient_clip_val": 1.0}, "trainer.gradient_clip_val=1.0")])
def test_the_loop_refuses_what_dot_cannot_do(loop, bad):
    module = _module(**loop)
    dot = DOT(module.trainable_parameters())
    with pytest.raises(KdlabError, match=f"optimizer=dot .* does not support {bad}"):
        module.dot_optimizer([dot], scaled=False)
    assert _module().dot_optimizer([dot], scaled=False) is dot
    with pytest.raises(KdlabError, match="float16 loss scaler"):
        _module().dot_optimizer([dot], scaled=True)


def test_a_dot_job_is_not_packed(tmp_path):
    from kdlab.modes.pack import unpackable
    from tests.conftest import make_cfg

    cfg = make_cfg(tmp_path, ["distill=kd", "optimizer=dot"])
    assert unpackable(cfg) == "optimizer=dot (two backward passes per member)"


def test_kd_with_dot_learns_and_logs_both_terms(tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short("kd", tmp_path, "optimizer=dot", "optimizer.lr=0.05")
    assert_learned(results)
    assert results["config"]["optimizer"]["_target_"] == "kdlab.optim.DOT"
