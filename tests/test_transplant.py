"""Student initialised from the teacher (kdlab/models/transplant.py)."""

import pytest
import torch

from kdlab.models import CNN
from kdlab.models.transplant import init_from_teacher
from kdlab.train import run
from kdlab.util.errors import KdlabError

SHAPE = [1, 28, 28]


def _teacher():
    torch.manual_seed(0)
    return CNN(SHAPE, 10, channels=[32, 64], hidden=128)


def test_match_copies_exactly_the_tensors_with_equal_name_and_shape():
    teacher = _teacher()
    student = CNN(SHAPE, 10, channels=[32, 16], hidden=32)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = init_from_teacher(student, teacher, "match")
    ours, theirs = student.state_dict(), teacher.state_dict()
    # the first stage (conv + batch norm) and the classifier's bias (10 classes either way)
    assert set(report["copied"]) == {k for k in ours if k.startswith("stages.0.")} | {
        "classifier.1.bias"}
    assert "its layer's weights" in report["skipped"]["stages.1.1.num_batches_tracked"]
    for name in ours:
        if name in report["copied"]:
            assert torch.equal(ours[name], theirs[name])
        else:
            assert torch.equal(ours[name], before[name]), name
            assert name in report["skipped"]
    assert "shape [16, 32, 3, 3]" in report["skipped"]["stages.1.0.weight"]


def test_mapping_copies_every_other_block():
    teacher = CNN(SHAPE, 10, channels=[32, 32, 32], hidden=16)
    student = CNN(SHAPE, 10, channels=[32, 32], hidden=8)
    report = init_from_teacher(student, teacher, {"stages.0": "stages.0",
                                                  "stages.1": "stages.2"})
    assert report["copied"]["stages.1.0.weight"] == "stages.2.0.weight"
    assert torch.equal(student.stages[1][0].weight, teacher.stages[2][0].weight)
    assert report["skipped"]["classifier.1.weight"] == "not mapped"


@pytest.mark.parametrize("spec, message", [
    ("all", "must be match"),
    ({"stages.9": "stages.0"}, "'stages.9' names no tensor of the student"),
    ({"stages.0": "nope"}, "'nope' names no tensor of the teacher"),
])
def test_bad_specs_name_the_key(spec, message):
    with pytest.raises(KdlabError, match=f"student.init_from_teacher.*{message}|{message}"):
        init_from_teacher(CNN(SHAPE, 10, channels=[32], hidden=8), _teacher(), spec)


def test_nothing_to_copy_is_an_error():
    with pytest.raises(KdlabError, match="copied no weight"):
        init_from_teacher(CNN(SHAPE, 10, channels=[4], hidden=8), _teacher(), "match")


def test_run_records_the_initialisation(fast_cfg):
    results = run(fast_cfg("teacher.model.hidden=[64]", "student=mlp",
                           "student.model.hidden=[64,32]", "student.init_from_teacher=match",
                           "distill=none", "trainer.max_epochs=1"))
    init = results["student_init"]
    assert set(init["copied"]) == {"features.1.weight", "features.1.bias", "classifier.bias"}
    assert "no teacher tensor" in init["skipped"]["features.3.weight"]
    assert "shape" in init["skipped"]["classifier.weight"]
    assert "baseline" not in results  # distill=none: the teacher was fetched for the init only
