"""``data.classes``: class subsets relabelled 0..k-1, validation split kept, teacher identity."""

import pytest
import torch

from kdlab.data import UNLABELLED, FashionMNISTDataModule, memory
from kdlab.modes.build import build_datamodule, build_model
from kdlab.modes.teacher import teacher_key
from kdlab.util.errors import KdlabError


@pytest.fixture(scope="module")
def full():
    dm = FashionMNISTDataModule()
    dm.setup()
    return dm


def test_subset_keeps_the_classes_relabelled_in_the_given_order(full):
    classes = [7, 2, 5]
    dm = FashionMNISTDataModule(classes=classes)
    dm.setup()
    assert dm.num_classes == 3 and FashionMNISTDataModule.num_classes == 10
    for x, y, x_full, y_full in [(dm.x_train, dm.y_train, full.x_train, full.y_train),
                                 (dm.x_val, dm.y_val, full.x_val, full.y_val),
                                 (dm.x_test, dm.y_test, full.x_test, full.y_test)]:
        keep = (y_full == 7) | (y_full == 2) | (y_full == 5)
        assert torch.equal(x, x_full[keep])
        assert torch.equal(torch.tensor(classes)[y], y_full[keep])  # i -> classes[i]
        assert set(y.tolist()) == {0, 1, 2}
    # the shared full splits are untouched and still shared
    assert torch.equal(full.y_train.unique(), torch.arange(10))
    assert len(memory._SPLITS) == 1


def test_validation_split_is_the_full_one_restricted_never_trained_on(full):
    source = FashionMNISTDataModule(classes=[0, 1, 2, 3, 4])
    target = FashionMNISTDataModule(classes=[5, 6, 7, 8, 9])
    source.setup()
    target.setup()
    val = set(full.split_indices["val"].tolist())
    for dm in (source, target):
        assert set(dm.split_indices["val"].tolist()) <= val
        assert not set(dm.split_indices["train"].tolist()) & val
    trained = set(source.split_indices["train"].tolist()) | set(target.split_indices["train"]
                                                                .tolist())
    assert trained == set(full.split_indices["train"].tolist())
    assert len(source.x_val) + len(target.x_val) == len(full.x_val)


def test_num_labels_is_stratified_within_the_subset():
    dm = FashionMNISTDataModule(classes=[3, 8], num_labels=101, transfer=True, label_seed=1)
    dm.setup()
    labelled = dm.targets[dm.targets != UNLABELLED]
    assert sorted(torch.bincount(labelled, minlength=2).tolist()) == [50, 51]
    assert len(dm.targets) == len(dm.x_train) == int(((dm.y_train == 0) | (dm.y_train == 1))
                                                     .sum())
    assert "classes [3, 8]" in dm.describe()


@pytest.mark.parametrize("classes, match", [
    ([0, 10], r"data.classes=\[0, 10\] has unknown class ids \[10\]"),
    ([-1, 2], "unknown class ids"),
    ([1, 2, 1], r"data.classes=\[1, 2, 1\] repeats class ids \[1\]"),
    ([4], "fewer than 2 classes"),
    ([], "fewer than 2 classes"),
    ("0,1", "must be a list"),
])
def test_bad_classes_fail_naming_the_key(classes, match):
    with pytest.raises(KdlabError, match=match):
        FashionMNISTDataModule(classes=classes)


def test_num_labels_is_checked_against_the_subset():
    with pytest.raises(KdlabError, match="data.num_labels=2 is below the number of classes"):
        FashionMNISTDataModule(classes=[0, 1, 2], num_labels=2)
    FashionMNISTDataModule(classes=[0, 1], num_labels=2)


def test_models_get_k_outputs_and_teacher_key_depends_on_classes(fast_cfg):
    cfg = fast_cfg("data.classes=[0,1,2,3,4]")
    data = build_datamodule(cfg)
    assert data.num_classes == 5
    model = build_model(cfg.student.model, data, "student.model")
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    full_cfg = fast_cfg()
    assert teacher_key(cfg) != teacher_key(full_cfg)
    assert teacher_key(fast_cfg("data.classes=[0,1,2,3,4]")) == teacher_key(cfg)
    assert teacher_key(fast_cfg("data.classes=[4,3,2,1,0]")) != teacher_key(cfg)


def test_a_class_subset_is_part_of_the_teachers_identity(fast_cfg):
    from kdlab.modes.teacher import teacher_identity

    assert teacher_identity(fast_cfg())["data"]["classes"] is None
    subset = teacher_identity(fast_cfg("data.classes=[1,2]"))["data"]
    assert subset["classes"] == [1, 2] and subset["num_classes"] == 2


def test_a_whole_run_on_a_subset_trains_k_way_models(fast_cfg):
    from kdlab.train import run

    results = run(fast_cfg("data.classes=[9,0,4]", "trainer.max_epochs=1", "latency.repeats=1"))
    for role in ("teacher", "student", "baseline"):
        assert 0 <= results[role]["metrics"]["test/acc"] <= 1
    ckpt = torch.load(results["student"]["last_ckpt"], weights_only=True)
    head = [v for k, v in ckpt["state_dict"].items() if "classifier" in k and k.endswith("bias")]
    assert [len(v) for v in head] == [3]
