"""CTKD: the loss equals KD / DKD / LSKD at the learned temperature, the temperature's gradient
is reversed (times −λ) while the student's is not, the λ curriculum against its formula, the
temperature's range, option checks naming the key, and short runs that learn."""

from __future__ import annotations

import functools
import math
import statistics

import pytest
import torch
from torch import nn

from kdlab.strategies.base import Batch, Outputs
from kdlab.strategies.curriculum import CTKD, cosine_ramp
from kdlab.strategies.logits import DKD, KD, LSKD
from kdlab.util.errors import KdlabError

STUDENT = [[1.0, 2.0, 0.5, -0.3], [0.3, -1.0, 2.0, 0.1], [-0.5, 0.2, 0.4, 1.5]]
TEACHER = [[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.0, 3.0], [1.0, -2.0, 0.5, 0.7]]
TARGETS = [1, -1, 0]  # the second sample is unlabelled: DKD uses the teacher's argmax (3)


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _batch() -> Batch:
    return Batch(torch.zeros(3, 1), torch.tensor(TARGETS), torch.arange(3))


def _outputs() -> tuple[Outputs, Outputs]:
    s = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(TEACHER, dtype=torch.float64, requires_grad=True)
    return Outputs(s), Outputs(t)


def _ctkd(loss: str, **kwargs) -> CTKD:
    """A CTKD in float64 (its temperature parameter too), for exact comparisons."""
    return CTKD(loss=loss, **kwargs).double()


def _total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(terms.values())).sum()


# -- the formulas, written out -----------------------------------------------------------------
def _kd_formula(alpha: float, t: float) -> float:
    kl = [_kl(_softmax(tr, t), _softmax(sr, t)) for sr, tr in zip(STUDENT, TEACHER)]
    return alpha * t * t * statistics.fmean(kl)


def _lskd_formula(alpha: float, t: float) -> float:
    def z(row: list[float]) -> list[float]:
        return [(v - statistics.fmean(row)) / statistics.stdev(row) for v in row]

    kl = [_kl(_softmax(z(tr), t), _softmax(z(sr), t)) for sr, tr in zip(STUDENT, TEACHER)]
    return alpha * t * t * statistics.fmean(kl)


def _dkd_formula(alpha: float, beta: float, t: float) -> tuple[float, float]:
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(STUDENT, TEACHER, TARGETS):
        if y < 0:
            y = max(range(len(t_row)), key=t_row.__getitem__)
        p_s, p_t = _softmax(s_row, t), _softmax(t_row, t)
        tckd += _kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        hat_s = [p / (1 - p_s[y]) for k, p in enumerate(p_s) if k != y]
        hat_t = [p / (1 - p_t[y]) for k, p in enumerate(p_t) if k != y]
        nckd += _kl(hat_t, hat_s)
    return alpha * t * t * tckd / 3, beta * t * t * nckd / 3


# -- the loss at the current temperature -------------------------------------------------------
def test_the_temperature_starts_where_the_authors_start_and_stays_in_its_range():
    ctkd = CTKD()
    assert ctkd.temperature.value().item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))
    for theta, bound in [(-100.0, 1.0), (100.0, 21.0)]:
        with torch.no_grad():
            ctkd.temperature.theta.fill_(theta)
        assert ctkd.temperature.value().item() == pytest.approx(bound, rel=1e-6)


def test_kd_loss_at_the_learned_temperature():
    ctkd = _ctkd("kd", init=-0.4, kd={"alpha": 0.7})
    t = ctkd.temperature.value().item()
    assert t == pytest.approx(1 + 20 / (1 + math.exp(0.4)))
    terms = ctkd(*_outputs(), _batch())
    assert set(terms) == {"kd"}
    assert terms["kd"].item() == pytest.approx(_kd_formula(0.7, t), rel=1e-9)
    assert terms["kd"].item() == pytest.approx(
        KD(temperature=t, alpha=0.7)(*_outputs(), _batch())["kd"].item(), rel=1e-9)
    assert ctkd.ce_weight == pytest.approx(0.3)


def test_dkd_loss_at_the_learned_temperature_with_its_warmup():
    ctkd = _ctkd("dkd", init=0.5, t_start=2.0, t_range=3.0,
                 dkd={"alpha": 1.5, "beta": 2.0, "warmup": 4, "ce_weight": 0.5})
    t = 2.0 + 3.0 / (1 + math.exp(-0.5))
    tckd, nckd = _dkd_formula(1.5, 2.0, t)
    terms = ctkd(*_outputs(), _batch())
    assert set(terms) == {"tckd", "nckd"}
    assert terms["tckd"].item() == pytest.approx(tckd / 4, rel=1e-9)  # epoch 0: warm-up 1/4
    assert terms["nckd"].item() == pytest.approx(nckd / 4, rel=1e-9)
    ctkd.on_epoch_start(5)
    terms = ctkd(*_outputs(), _batch())
    assert terms["tckd"].item() == pytest.approx(tckd, rel=1e-9)
    reference = DKD(alpha=1.5, beta=2.0, temperature=t, warmup=0)(*_outputs(), _batch())
    assert terms["nckd"].item() == pytest.approx(reference["nckd"].item(), rel=1e-9)
    assert ctkd.ce_weight == 0.5


def test_lskd_loss_at_the_learned_temperature():
    ctkd = _ctkd("lskd", init=-3.0, lskd={"alpha": 2.0, "ce_weight": 0.2})
    t = 1 + 20 / (1 + math.exp(3.0))
    terms = ctkd(*_outputs(), _batch())
    assert set(terms) == {"lskd"}
    assert terms["lskd"].item() == pytest.approx(_lskd_formula(2.0, t), rel=1e-6)
    reference = LSKD(temperature=t, alpha=2.0)(*_outputs(), _batch())["lskd"].item()
    assert terms["lskd"].item() == pytest.approx(reference, rel=1e-9)
    assert ctkd.ce_weight == 0.2


# -- gradient reversal -------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["kd", "dkd", "lskd"])
def test_the_temperature_gradient_is_reversed_and_scaled_by_lambda(loss):
    ctkd = _ctkd(loss, init=0.3, dkd={"warmup": 0})
    ctkd.on_epoch_start(3)
    lam = ctkd.strength
    assert 0 < lam < 1
    student, teacher = _outputs()
    _total(ctkd(student, teacher, _batch())).backward()
    reversed_grad = ctkd.temperature.theta.grad.item()

    # the same loss without reversal: a copy of theta, the temperature map written out, and the
    # fixed-temperature class's own loss function evaluated at that (tensor) temperature
    theta = ctkd.temperature.theta.detach().clone().requires_grad_(True)
    t = 1.0 + 20.0 * torch.sigmoid(theta)
    plain = _ctkd(loss, init=0.3, dkd={"warmup": 0})
    plain.temperature.forward = lambda strength: t  # the learned temperature, no GRL
    s2, t2 = _outputs()
    total = _total(plain(s2, t2, _batch()))
    grad_theta, grad_s = torch.autograd.grad(total, [theta, s2.logits])

    assert grad_theta.item() != 0
    assert reversed_grad == pytest.approx(-lam * grad_theta.item(), rel=1e-9)
    # the student's gradient is not reversed, and the teacher gets none
    assert torch.allclose(student.logits.grad, grad_s, rtol=1e-12, atol=0)
    assert teacher.logits.grad is None


def test_the_temperature_is_trained_and_saved_with_the_student():
    from kdlab.engine.module import DistillationModule

    ctkd = CTKD()
    module = DistillationModule(nn.Linear(4, 3), 3, functools.partial(torch.optim.SGD, lr=0.1),
                                teacher=nn.Linear(4, 3), strategy=ctkd)
    assert any(p is ctkd.temperature.theta for p in module.trainable_parameters())
    assert "strategy.temperature.theta" in module.state_dict()
    assert list(ctkd.parameters()) == [ctkd.temperature.theta]


# -- the curriculum ----------------------------------------------------------------------------
def test_lambda_follows_the_cosine_curriculum_over_1_based_epochs():
    ctkd = CTKD()  # lambda 0 -> 1 over 10 epochs
    for epoch, expected in [(0, (1 - math.cos(math.pi / 10)) / 2), (4, 0.5), (9, 1.0),
                            (10, 1.0), (239, 1.0)]:
        ctkd.on_epoch_start(epoch)
        assert ctkd.strength == pytest.approx(expected, abs=1e-12)
        assert ctkd.logged()["lambda"].item() == pytest.approx(expected)
    # the paper's form, λ_min + ½(λ_max − λ_min)(1 + cos((1 + min(n, E) / E) π)), n = e + 1
    low, high, loops = 0.2, 0.8, 6
    ctkd = CTKD(lambda_min=low, lambda_max=high, loops=loops)
    for epoch in range(9):
        n = min(epoch + 1, loops)
        paper = low + 0.5 * (high - low) * (1 + math.cos((1 + n / loops) * math.pi))
        ctkd.on_epoch_start(epoch)
        assert ctkd.strength == pytest.approx(paper, abs=1e-12)
    assert cosine_ramp(0, 0, 0.0, 0.7) == 0.7  # no ramp: λ_max from the start


def test_metrics_report_the_temperature():
    ctkd = CTKD(init=0.0)
    assert ctkd.logged()["temperature"].item() == pytest.approx(11.0)


# -- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, key", [
    ({"loss": "ce"}, "loss"),
    ({"t_start": 0.0}, "t_start"),
    ({"t_range": -1.0}, "t_range"),
    ({"init": float("nan")}, "init"),
    ({"lambda_min": -0.1}, "lambda_min"),
    ({"lambda_max": -1.0}, "lambda_max"),
    ({"loops": -1}, "loops"),
    ({"loops": 2.5}, "loops"),
    ({"kd": {"alpha": 2.0}}, "kd.alpha"),
    ({"kd": {"gamma": 1.0}}, "kd.gamma"),
    ({"dkd": {"beta": -1.0}}, "dkd.beta"),
    ({"dkd": {"warmup": 1.5}}, "dkd.warmup"),
    ({"dkd": {"temperature": 4.0}}, "dkd.temperature"),
    ({"lskd": {"ce_weight": -0.1}}, "lskd.ce_weight"),
])
def test_bad_options_name_the_key(kwargs, key):
    with pytest.raises(KdlabError, match=rf"distill\.{key}[= ]"):
        CTKD(**kwargs)


def test_the_config_nests_each_losss_options(tmp_path):
    from kdlab.modes.build import build_strategy
    from tests.conftest import make_cfg

    strategy = build_strategy(make_cfg(tmp_path, ["distill=ctkd", "distill.ctkd.loss=dkd",
                                                  "distill.ctkd.dkd.beta=2"]))
    ctkd = strategy.members["ctkd"]
    assert isinstance(ctkd.base, DKD) and ctkd.base.beta == 2.0 and ctkd.loops == 10
    with pytest.raises(KdlabError, match=r"distill\.ctkd\.dkd\.beta="):
        build_strategy(make_cfg(tmp_path, ["distill=ctkd", "distill.ctkd.dkd.beta=-1"]))


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [("logger=csv",), ("distill.ctkd.loss=dkd",)])
def test_a_short_run_learns(overrides, tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short("ctkd", tmp_path, *overrides)
    assert results["strategy"] == "ctkd"
    assert_learned(results)
    # the temperature was trained and checkpointed with the student
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    theta = state["strategy.members.ctkd.temperature.theta"]
    assert torch.isfinite(theta) and theta.item() != 1.0
    if "logger=csv" in overrides:  # the learned temperature and the reversal strength are logged
        rows = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        assert {"train/temperature_epoch", "train/lambda_epoch"} <= set(header)
        logged = [dict(zip(header, row.split(",")))["train/temperature_epoch"]
                  for row in rows[1:]]
        assert any(logged) and all(1.0 < float(t) < 21.0 for t in logged if t)
