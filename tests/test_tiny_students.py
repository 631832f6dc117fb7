"""The smallest students: logistic regression on soft targets only."""

import torch

from kdlab.data.memory import UNLABELLED
from kdlab.engine.module import DistillationModule
from kdlab.modes.build import build_model, build_strategy
from kdlab.train import run
from tests.conftest import make_cfg


def test_the_soft_target_student_never_reads_a_label(fast_cfg):
    cfg = fast_cfg("experiment=logistic_regression", "data.num_labels=null")
    strategy = build_strategy(cfg)
    assert strategy.ce_weight == 0
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)

    class Data:
        input_shape, num_classes = (1, 28, 28), 10

    student = build_model(cfg.student.model, Data, "student.model")
    assert sum(p.numel() for p in student.parameters()) == 784 * 10 + 10
    module = DistillationModule(student, 10, torch.optim.SGD, teacher=teacher,
                                strategy=strategy)
    labels = torch.randint(0, 10, (16,))
    loss, terms = module.batch_loss((x, labels, torch.arange(16)))
    for other in (torch.randint(0, 10, (16,)), torch.full((16,), UNLABELLED)):
        again, _ = module.batch_loss((x, other, torch.arange(16)))
        assert torch.equal(loss, again)
    assert set(terms) == {"kd"}


def test_experiment_runs_against_the_hard_label_baseline(fast_cfg, tmp_path):
    plain = make_cfg(tmp_path, ["experiment=logistic_regression"])
    assert plain.data.num_labels is None and plain.distill.kd.alpha == 1.0
    assert list(plain.student.model.hidden) == []
    results = run(fast_cfg("experiment=logistic_regression", "trainer.max_epochs=1",
                           "data.num_labels=null"))
    student, baseline = results["student"], results["baseline"]
    assert student["params"] == baseline["params"] == 7850
