"""The transfer-learning pipeline (kdlab/modes/transfer.py)."""

from pathlib import Path

import pytest
import torch

from kdlab.modes import mode_runner, transfer
from kdlab.train import run
from kdlab.util.errors import KdlabError

SMALL = ["student=mlp", "student.model.hidden=[16]", "trainer.max_epochs=1",
         "mode=transfer", "mode.finetune_epochs=1", "mode.student_finetune_epochs=1",
         "mode.labels_per_class=10"]


@pytest.fixture
def spy(monkeypatch):
    """Per stage: the network trained, its weights before and after, the data's classes and
    the teacher's weights before and after."""
    seen = {}
    original = transfer.train_stage

    def fit_stage(cfg, stage, stage_dir, student, data, *args, teacher=None, **kwargs):
        def copy(model):
            return {k: v.clone() for k, v in model.state_dict().items()} if model else None

        record = {"before": copy(student), "teacher": copy(teacher), "data": data,
                  "cfg": cfg}
        result = original(cfg, stage, stage_dir, student, data, *args, teacher=teacher,
                          **kwargs)
        record["after"], record["teacher_after"] = copy(student), copy(teacher)
        seen[stage] = record
        return result

    monkeypatch.setattr(transfer, "train_stage", fit_stage)
    return seen


def _equal(a, b, keys=None):
    return all(torch.equal(a[k], b[k]) for k in (keys or a))


# the linear probe runs on a small CNN teacher: its batch norms must not move either
@pytest.mark.parametrize("finetune, teacher", [
    ("full", []),
    ("linear", ["teacher=cnn", "teacher.model.channels=[4,8]", "teacher.model.hidden=16",
                "teacher.train.max_epochs=1", "teacher.train.augment=false"]),
])
def test_pipeline_stages_feed_each_other(fast_cfg, spy, finetune, teacher):
    results = run(fast_cfg(*SMALL, f"mode.finetune={finetune}", *teacher))
    assert [e["stage"] for e in results["stages"]] == [
        "pretrain", "finetune", "distil", "student", "baseline"]
    pretrain = results["stages"][0]
    assert pretrain["source"]["source"] == "trained"
    ft = spy["finetune"]
    # the target task: 5 classes relabelled 0..4, 10 labels per class
    assert ft["data"].classes == [5, 6, 7, 8, 9] and ft["data"].num_classes == 5
    assert len(ft["data"].labelled) == 50
    stored = torch.load(pretrain["source"]["path"], weights_only=True)["state_dict"]
    backbone = [k for k in ft["before"] if not k.startswith("classifier")]
    assert any("running_mean" in k for k in backbone) == (finetune == "linear")
    assert _equal(ft["before"], stored, backbone)  # fine-tuning starts from the pretrained body
    head = [k for k in ft["before"] if k.startswith("classifier") and k.endswith("weight")][0]
    assert not torch.equal(ft["before"][head], stored[head])
    if finetune == "linear":  # the frozen backbone, batch-norm statistics included, is unchanged
        assert _equal(ft["after"], ft["before"], backbone)
    else:
        assert not _equal(ft["after"], ft["before"], backbone)
    assert not torch.equal(ft["after"][head], ft["before"][head])
    # the distillation's teacher is the fine-tuned teacher, frozen
    assert _equal(spy["distil"]["teacher"], ft["after"])
    assert _equal(spy["distil"]["teacher_after"], ft["after"])
    assert spy["distil"]["data"].transfer and len(spy["distil"]["data"].labelled) == 50
    # the student fine-tuning starts where the distillation ended, on the labels only
    assert _equal(spy["student"]["before"], spy["distil"]["after"])
    assert spy["student"]["teacher"] is None
    assert spy["student"]["cfg"].optimizer.lr == pytest.approx(0.001)
    assert results["student"]["stage"] == "student"
    assert results["teacher"]["finetune"] == finetune


@pytest.mark.parametrize("override, key", [
    ("mode.target_classes=[4,5,6]", "overlap"),
    ("mode.finetune=half", "mode.finetune=half"),
    ("mode.labels_per_class=0", "mode.labels_per_class=0"),
    ("distill=none", "distill=none"),
])
def test_bad_transfer_configs_name_the_key(fast_cfg, override, key):
    cfg = fast_cfg(*SMALL, override)
    with pytest.raises(KdlabError, match=key):
        mode_runner("transfer")(cfg, Path(cfg.paths.output_dir))
