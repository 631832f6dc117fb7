"""DeiT's distillation token (kdlab/strategies/deit.py): the loss against the paper's formula on
hand-made tensors, the two heads read through the student's taps, the errors, a short run."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kdlab.engine.module import DistillationModule
from kdlab.models import CNN, create
from kdlab.strategies.base import Batch, Outputs
from kdlab.strategies.deit import DeiT
from kdlab.train import run
from kdlab.util.errors import KdlabError
from tests.conftest import make_cfg
from tests.strategies import harness

pytestmark = pytest.mark.usefixtures("one_thread")

DIST = [[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.0, 1.5, 0.0, 0.3]]
TEACHER = [[0.5, 2.5, -0.5, 1.0], [1.0, 0.0, 2.0, -1.0], [3.0, 0.0, 0.1, 0.2]]


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def _hard(dist: list[list[float]], teacher: list[list[float]]) -> float:
    """mean_n −log softmax(z_dist)[argmax z_t]."""
    losses = [-math.log(_softmax(d)[t.index(max(t))]) for d, t in zip(dist, teacher)]
    return sum(losses) / len(losses)


def _soft(dist, teacher, t: float, per: str) -> float:
    """T² Σ_{n,c} p_t (log p_t − log p_s), divided by N·K (``mean``) or N (``batchmean``)."""
    total = 0.0
    for d, z in zip(dist, teacher):
        ps, pt = _softmax(d, t), _softmax(z, t)
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
    n, k = len(dist), len(dist[0])
    return t * t * total / (n * k if per == "mean" else n)


def _terms(strategy: DeiT, dist: torch.Tensor, teacher: torch.Tensor) -> dict:
    strategy.student_paths = ["head_dist"]
    n = dist.shape[0]
    student = Outputs(torch.zeros(n, dist.shape[1], dtype=dist.dtype), {"head_dist": dist})
    batch = Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n))
    return strategy(student, Outputs(teacher), batch)


def test_hard_loss_matches_the_formula() -> None:
    strategy = DeiT()
    assert (strategy.kind, strategy.alpha, strategy.temperature) == ("hard", 0.5, 1.0)
    assert strategy.ce_weight == 0.5
    terms = _terms(strategy, torch.tensor(DIST, dtype=torch.float64),
                   torch.tensor(TEACHER, dtype=torch.float64))
    assert list(terms) == ["deit"]
    assert terms["deit"].item() == pytest.approx(0.5 * _hard(DIST, TEACHER), rel=1e-12)
    strategy = DeiT(alpha=0.2)
    assert strategy.ce_weight == pytest.approx(0.8)
    terms = _terms(strategy, torch.tensor(DIST, dtype=torch.float64),
                   torch.tensor(TEACHER, dtype=torch.float64))
    assert terms["deit"].item() == pytest.approx(0.2 * _hard(DIST, TEACHER), rel=1e-12)


@pytest.mark.parametrize("per", ["mean", "batchmean"])
@pytest.mark.parametrize("t", [1.0, 3.0])
def test_soft_loss_matches_the_formula(per: str, t: float) -> None:
    strategy = DeiT(kind="soft", alpha=0.7, temperature=t, kl_reduction=per)
    terms = _terms(strategy, torch.tensor(DIST, dtype=torch.float64),
                   torch.tensor(TEACHER, dtype=torch.float64))
    assert terms["deit"].item() == pytest.approx(0.7 * _soft(DIST, TEACHER, t, per), rel=1e-10)


def test_soft_mean_warns_once_on_a_transfer_set_only() -> None:
    """The authors' sum/(N·K) with unlabelled samples in the batch: one warning naming the fix;
    none with every sample labelled, with batchmean or with hard targets."""
    dist, teacher = torch.tensor(DIST), torch.tensor(TEACHER)
    n = dist.shape[0]
    student = Outputs(torch.zeros_like(dist), {"head_dist": dist})
    labelled = Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n))
    transfer = Batch(torch.zeros(n, 1), torch.full((n,), -1), torch.arange(n))
    for strategy, batch in ((DeiT(kind="soft"), labelled),
                            (DeiT(kind="soft", kl_reduction="batchmean"), transfer),
                            (DeiT(kind="hard"), transfer)):
        strategy.student_paths = ["head_dist"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            strategy(student, Outputs(teacher), batch)
    strategy = DeiT(kind="soft")
    strategy.student_paths = ["head_dist"]
    with pytest.warns(UserWarning, match="kl_reduction=batchmean") as caught:
        strategy(student, Outputs(teacher), transfer)
        strategy(student, Outputs(teacher), transfer)
    assert len(caught) == 1


def test_soft_gradient_reaches_the_distillation_logits_only() -> None:
    dist = torch.tensor(DIST, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor(TEACHER, dtype=torch.float64, requires_grad=True)
    for kind in ("hard", "soft"):
        _terms(DeiT(kind=kind), dist, teacher)["deit"].backward()
    assert dist.grad.abs().sum() > 0 and teacher.grad is None


def _module(student, kind: str = "hard") -> DistillationModule:
    torch.manual_seed(1)
    teacher = CNN([1, 28, 28], 10, channels=(4,), hidden=0)
    return DistillationModule(student, 10, torch.optim.SGD, teacher=teacher,
                              strategy=DeiT(kind=kind), example_input=torch.zeros(2, 1, 28, 28))


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_the_training_loss_reads_both_heads(kind: str) -> None:
    """In training, kdlab's CE reads the cls head (the model's output) and the strategy the
    distillation head (tapped): loss = (1 − α)·CE(cls, y) + α·L_dist(dist, teacher)."""
    torch.manual_seed(0)
    student = create("vit_nano_distilled", [1, 28, 28], 10)
    module = _module(student, kind).train()
    assert student.training and not module.teacher.training
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    loss, terms = module.batch_loss((x, y, torch.arange(6)))
    with torch.no_grad():
        cls = student.train()(x)
        dist = 2 * student.eval()(x) - cls  # eval returns (cls + dist) / 2
        teacher = module.teacher(x)
    student.train()
    ce = torch.nn.functional.cross_entropy(cls, y)
    distill = (_hard(dist.tolist(), teacher.tolist()) if kind == "hard"
               else _soft(dist.tolist(), teacher.tolist(), 1.0, "mean"))
    assert terms["ce"].item() == pytest.approx(0.5 * ce.item(), rel=1e-5)
    assert terms["deit"].item() == pytest.approx(0.5 * distill, rel=1e-4)
    loss.backward()
    assert student.head_dist.weight.grad.abs().sum() > 0
    assert student.classifier.weight.grad.abs().sum() > 0
    assert student.dist_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teacher.parameters())


def test_validation_and_test_run_the_student_in_eval_mode() -> None:
    """Lightning's loops call model.eval(): the student answers with the heads' average."""
    student = create("vit_nano_distilled", [1, 28, 28], 10)
    module = _module(student)
    modes = []
    student.register_forward_hook(lambda m, i, out: modes.append(m.training))
    data = DataLoader(TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)),
                                    torch.arange(8)), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, data, verbose=False)
    trainer.test(module, data, verbose=False)
    assert modes == [False] * 4


def test_each_head_is_also_tested_on_its_own() -> None:
    """As DeiT's Table 5: ``acc_cls`` is the cls head's accuracy, ``acc_dist`` the distillation
    head's, ``acc`` that of their average, each counted by hand here. The distillation head is
    made to answer class 3 always, so the three differ."""
    student = create("vit_nano_distilled", [1, 28, 28], 10)
    with torch.no_grad():
        student.head_dist.weight.zero_()
        student.head_dist.bias.copy_(torch.nn.functional.one_hot(torch.tensor(3), 10) * 50.0)
    module = _module(student)
    hooks = len(student.classifier._forward_hooks), len(student.head_dist._forward_hooks)
    torch.manual_seed(2)
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    y[:8] = 3
    with torch.no_grad():
        cls = student.train()(x)  # training mode: the cls head alone
        both = student.eval()(x)
    data = DataLoader(TensorDataset(x, y, torch.arange(40)), batch_size=16)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    val = trainer.validate(module, data, verbose=False)[0]
    test = trainer.test(module, data, verbose=False)[0]

    def hits(logits: torch.Tensor) -> float:
        return (logits.argmax(1) == y).float().mean().item()

    for split, metrics in (("val", val), ("test", test)):
        assert metrics[f"{split}/acc_cls"] == pytest.approx(hits(cls))
        assert metrics[f"{split}/acc_dist"] == pytest.approx((y == 3).float().mean().item())
        assert metrics[f"{split}/acc"] == pytest.approx(hits(both))
    assert hits(cls) != pytest.approx((y == 3).float().mean().item())
    # the hooks live only for the evaluation forward pass (the strategy's own tap stays)
    assert (len(student.classifier._forward_hooks), len(student.head_dist._forward_hooks)) == hooks


def test_a_one_head_student_logs_no_head_metrics() -> None:
    """Only a student that averages heads gets ``acc_<head>`` metrics."""
    student = create("vit_nano", [1, 28, 28], 10)
    module = DistillationModule(student, 10, torch.optim.SGD)
    assert module.head_acc is None
    data = DataLoader(TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)),
                                    torch.arange(8)), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    assert sorted(trainer.test(module, data, verbose=False)[0]) == ["test/acc", "test/loss"]


@pytest.mark.parametrize("student", ["cnn", "vit_nano"])
def test_a_student_without_the_token_fails_naming_the_fix(student: str) -> None:
    model = (CNN([1, 28, 28], 10, channels=(4,), hidden=0) if student == "cnn"
             else create("vit_nano", [1, 28, 28], 10))
    with pytest.raises(KdlabError, match=r"student\.model\.distill_token=true") as e:
        _module(model)
    assert "vit_nano_distilled" in str(e.value)


@pytest.mark.parametrize(("key", "kwargs"), [
    ("kind", {"kind": "medium"}), ("alpha", {"alpha": 1.5}), ("alpha", {"alpha": -0.1}),
    ("temperature", {"temperature": 0.0}), ("kl_reduction", {"kl_reduction": "sum"}),
])
def test_bad_options_name_the_key(key: str, kwargs: dict) -> None:
    with pytest.raises(KdlabError, match=rf"distill\.{key}="):
        DeiT(**kwargs)


def test_deit_student_learns(tmp_path: Path) -> None:
    """A short run of the pair's CNN teacher → vit_nano_distilled (harness settings)."""
    pair = [o for o in harness.PAIR if not o.startswith("student")]
    results = run(make_cfg(tmp_path, ["distill=deit", *pair, "student=zoo",
                                      "student.model.name=vit_nano_distilled",
                                      f"teacher.ckpt={harness.pair_teacher()}"]))
    harness.assert_learned(results)
