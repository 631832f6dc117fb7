"""The reproduction recipes run end to end on synthetic data of their real shapes
(``fast_dev_run``): zoo teacher and student, SGD + step schedule, scaled LR, last-epoch test."""

import pytest

from kdlab.models import available, create
from kdlab.train import run
from tests.conftest import make_cfg

SMALL = ["trainer.enable_progress_bar=false", "latency.repeats=1", "latency.batch_size=2",
         "data.batch_size=8", "data.eval_batch_size=16", "data.train_size=64",
         "data.val_size=16", "data.test_size=32"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # 40 s: the cifar100 experiment end to end (zoo pair, 32x32 synthetic data)
def test_cifar100_recipe_runs_kd_between_zoo_models(tmp_path):
    cfg = make_cfg(tmp_path, ["experiment=cifar100", "data=synthetic_cifar100", *SMALL,
                              "teacher.model.name=resnet14", "student.model.name=resnet8",
                              "trainer.max_epochs=2", "trainer.limit_train_batches=2",
                              "scheduler.milestones=[1]"])
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == pytest.approx(
        0.05 * 8 / 64)
    results = run(cfg)
    student, teacher = results["student"], results["teacher"]
    assert student["model"] == "resnet8" and teacher["model"] == "resnet14"
    assert student["params"] == sum(p.numel() for p in create("resnet8", [3, 32, 32], 100)
                                    .parameters())
    metrics = student["metrics"]
    assert 0 <= metrics["last/test/acc"] <= 1 and 0 <= metrics["test/acc"] <= 1
    assert metrics["epochs"] == 2
    # the stored teacher is keyed by its zoo name
    assert teacher["source"]["key"].startswith("resnet14-")


@pytest.mark.parametrize("distill", ["crd", "dkd", "fitnets", "reviewkd"])
def test_feature_strategies_wire_into_zoo_models(distill, tmp_path):
    cfg = make_cfg(tmp_path, ["experiment=cifar100", "data=synthetic_cifar100", *SMALL,
                              "teacher.model.name=wrn_16_2", "student.model.name=shufflenetv1",
                              f"distill={distill}", "trainer.fast_dev_run=true"])
    results = run(cfg)
    assert 0 <= results["student"]["metrics"]["test/acc"] <= 1


def test_imagenet_recipe_runs_on_synthetic_images(tmp_path):
    cfg = make_cfg(tmp_path, ["experiment=imagenet", "data=synthetic_imagenet", *SMALL,
                              "data.input_shape=[3,64,64]", "data.num_classes=20",
                              "teacher.model.weights=null", "trainer.fast_dev_run=true"])
    assert cfg.optimizer.lr == pytest.approx(0.1 * 8 / 256)
    assert list(cfg.scheduler.milestones) == [30, 60, 90]
    results = run(cfg)
    assert results["teacher"]["model"] == "resnet34" and results["student"]["model"] == "resnet18"
    assert results["teacher"]["source"]["source"] == "pretrained"


def test_unknown_zoo_name_fails_with_close_matches(tmp_path):
    from kdlab.util.errors import KdlabError

    with pytest.raises(KdlabError, match="model.name=resnet8x5 .*did you mean.*resnet8x4"):
        create("resnet8x5", [3, 32, 32], 100)
    assert {"resnet8x4", "wrn_40_2", "vgg13", "mobilenetv2", "shufflenetv2",
            "resnet18"} <= set(available())


def test_image_folder_data_trains_a_teacher_and_distils_from_disk(tmp_path):
    from tests.test_data_zoo import _image_folder

    root = _image_folder(tmp_path / "images", classes=3, train=8, test=2)
    cfg = make_cfg(tmp_path, ["data=imagenet", f"data.root={root}", "data.image_size=32",
                              "data.resize=36", "data.val_size=6", "data.batch_size=6",
                              "data.eval_batch_size=6", "data.num_workers=0",
                              "teacher=zoo", "teacher.model.name=resnet8",
                              "student=zoo", "student.model.name=resnet8",
                              "teacher.train.max_epochs=1", "trainer.max_epochs=2",
                              "baseline=false", "test_last=true",
                              "trainer.enable_progress_bar=false", "latency.repeats=1",
                              "latency.batch_size=2"])
    results = run(cfg)
    student = results["student"]["metrics"]
    assert student["epochs"] == 2 and 0 <= student["last/test/acc"] <= 1
    assert results["teacher"]["source"]["source"] == "trained"


def test_timm_model_by_name_distils_with_feature_taps(tmp_path):
    pytest.importorskip("timm")
    cfg = make_cfg(tmp_path, ["experiment=cifar100", "data=synthetic_cifar100", *SMALL,
                              "teacher.model.name=resnet8", "student.model.name=timm:resnet10t",
                              "distill=fitnets", "trainer.fast_dev_run=true"])
    results = run(cfg)
    assert results["student"]["model"] == "timm:resnet10t"
    assert 0 <= results["student"]["metrics"]["test/acc"] <= 1


def test_zoo_student_exports_with_per_channel_normalisation(tmp_path):
    from kdlab.evaluate import evaluate
    from kdlab.export import export
    from tests.test_data_zoo import _fake_cifar100

    _fake_cifar100(tmp_path / "data", n_train=120, n_test=40)
    cfg = make_cfg(tmp_path, ["experiment=cifar100", f"data.root={tmp_path / 'data'}",
                              "data.val_size=20", "data.batch_size=8", "data.eval_batch_size=20",
                              "distill=none", "student.model.name=resnet8",
                              "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                              "trainer.enable_progress_bar=false", "latency.repeats=1",
                              "latency.batch_size=2"])
    results = run(cfg)
    ckpt = results["student"]["best_ckpt"]
    evaluated = evaluate(make_cfg(tmp_path, [f"ckpt_path={ckpt}", "latency.repeats=1"],
                                  config_name="eval"))
    assert evaluated["student"]["metrics"]["test/acc"] == pytest.approx(
        results["student"]["metrics"]["test/acc"])
    out = tmp_path / "export"
    exported = export(make_cfg(tmp_path, [f"ckpt_path={ckpt}", "check_samples=8",
                                          "formats=[torchscript]", f"paths.output_dir={out}"],
                               config_name="export"))
    assert exported["files"]["torchscript"]["max_abs_diff"] <= 1e-4
    assert exported["input_normalisation"]["mean"] == pytest.approx([0.5071, 0.4867, 0.4408])
    assert exported["input_normalisation"]["std"] == pytest.approx([0.2675, 0.2565, 0.2761])
    assert exported["input_shape"] == [None, 3, 32, 32]
