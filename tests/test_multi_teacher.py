"""Multi-teacher distillation (kdlab/modes/ensemble.py, kdlab/modes/multi_teacher.py)."""

import pytest
import torch
from torch import nn

from kdlab.modes.ensemble import TeacherEnsemble
from kdlab.train import run
from kdlab.util.errors import KdlabError


class Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits.expand(len(x), -1) if self.logits.dim() == 1 else self.logits


A = [[2.0, 0.0, 0.0], [0.0, 0.5, 0.0]]
B = [[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_mean_gives_the_average_soft_target_at_the_temperature(t):
    ensemble = TeacherEnsemble([Fixed(A), Fixed(B)], "mean", temperature=t)
    z = ensemble(torch.zeros(2, 1))
    expected = ((torch.tensor(A) / t).softmax(-1) + (torch.tensor(B) / t).softmax(-1)) / 2
    torch.testing.assert_close((z / t).softmax(-1), expected)


def test_weighted_uses_normalised_weights():
    ensemble = TeacherEnsemble([Fixed(A), Fixed(B)], "weighted", weights=[3, 1])
    z = ensemble(torch.zeros(2, 1))
    expected = 0.75 * torch.tensor(A).softmax(-1) + 0.25 * torch.tensor(B).softmax(-1)
    torch.testing.assert_close(z.softmax(-1), expected)


def test_confident_picks_per_sample_the_most_confident_teacher():
    z = TeacherEnsemble([Fixed(A), Fixed(B)], "confident")(torch.zeros(2, 1))
    # sample 0: A's top class is more probable (2.0 vs 1.0); sample 1: B's (3.0 vs 0.5)
    torch.testing.assert_close(z, torch.tensor([A[0], B[1]]))


def test_the_rule_is_part_of_the_state_dict():
    """The teacher-output cache keys on the state dict: another rule is another cache."""
    mean = TeacherEnsemble([Fixed(A), Fixed(B)], "mean").state_dict()
    confident = TeacherEnsemble([Fixed(A), Fixed(B)], "confident").state_dict()
    assert not torch.equal(mean["rule"], confident["rule"])


@pytest.mark.parametrize("kwargs, message", [
    ({"combine": "max"}, "mode.combine=max"),
    ({"combine": "weighted"}, "mode.weights"),
    ({"combine": "weighted", "weights": [1, -1]}, "mode.weights"),
    ({"combine": "mean", "weights": [1, 1]}, "mode.weights"),
])
def test_bad_rules_name_the_key(kwargs, message):
    with pytest.raises(KdlabError, match=message):
        TeacherEnsemble([Fixed(A), Fixed(B)], **kwargs)


def test_run_reports_every_teacher_and_the_combination(fast_cfg):
    results = run(fast_cfg("mode=multi_teacher", "mode.teachers=[{seed: 0}, {seed: 1}]",
                           "student=mlp", "student.model.hidden=[16]", "trainer.max_epochs=1",
                           "baseline=false", "trainer.limit_test_batches=null"))
    stages = [e["stage"] for e in results["stages"]]
    assert stages == ["teacher0", "teacher1", "teacher", "student"]
    t0, t1, combined = results["stages"][:3]
    assert t0["source"]["key"] != t1["source"]["key"]  # two teachers, two store entries
    assert combined["params"] == t0["params"] + t1["params"]
    for entry in (t0, t1, combined):
        assert 0 < entry["metrics"]["test/acc"] <= 1
    assert results["mode"] == "multi_teacher"


def test_teacher_entries_must_be_teacher_keys(fast_cfg):
    from pathlib import Path

    from kdlab.modes import mode_runner

    cfg = fast_cfg("mode=multi_teacher", "mode.teachers=[{seed: 0}, {sed: 1}]")
    with pytest.raises(KdlabError, match=r"mode.teachers\[1\].*sed"):
        mode_runner("multi_teacher")(cfg, Path(cfg.paths.output_dir))
