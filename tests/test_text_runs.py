"""Language models through the same engine as images: ``kdlab-train data=text`` trains a GPT
teacher into the store and distils a smaller GPT, one row per token; the teacher stays frozen;
bits per token are reported."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.engine.module import as_rows
from kdlab.train import run
from tests.conftest import make_cfg

TEXT = ["data=text", "data.max_bytes=400000", "data.context=32", "data.batch_size=16",
        "data.eval_batch_size=64", "student=zoo", "student.model.name=gpt_nano",
        "teacher=zoo", "teacher.model.name=gpt_nano", "+teacher.model.dim=96",
        "teacher.train.max_epochs=1", "teacher.train.augment=false",
        "teacher.train.batch_size=16", "trainer.max_epochs=1",
        "trainer.limit_train_batches=30", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false", "logger=none",
        "latency.repeats=1", "latency.batch_size=2", "baseline=false"]


def test_as_rows_makes_one_row_per_token_and_leaves_images_alone():
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    assert as_rows(logits).shape == (10, 7) and torch.equal(as_rows(logits)[6], logits[1, 1])
    assert as_rows(targets).shape == (10,)
    images, labels = torch.randn(4, 10), torch.arange(4)
    assert as_rows(images) is images and as_rows(labels) is labels


@pytest.mark.slow
def test_a_gpt_teacher_distils_into_a_gpt_student_on_text(tmp_path):
    """30 batches of each stage (the fast_dev_run of the main text job below is the default
    suite's check)."""
    results = run(make_cfg(tmp_path, ["distill=kd", *TEXT]))
    for role in ("teacher", "student"):
        metrics = results[role]["metrics"]
        assert 0 < metrics["test/bits_per_token"] < 8  # below a uniform byte's 8 bits
        assert abs(metrics["test/bits_per_token"] * math.log(2) - metrics["test/loss"]) < 1e-4
    assert results["teacher"]["params"] > results["student"]["params"]
    assert results["config"]["data"]["_target_"] == "kdlab.data.TextDataModule"


@pytest.mark.parametrize(("overrides", "message"), [
    (["distill=kd", "teacher.train.augment=true"], "set teacher.train.augment=false"),
    (["distill=mlkd", "trainer.fast_dev_run=true"], "data=text is text, which has no "
                                                     "augmentation"),
])
def test_text_refuses_image_options_saying_why(overrides, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(make_cfg(tmp_path, [*TEXT, *overrides]))
    assert message in capsys.readouterr().err


def test_the_main_text_job_composes_and_runs_in_fast_dev_run(tmp_path):
    results = run(make_cfg(tmp_path, ["experiment=text_kd", "trainer.fast_dev_run=true",
                                      "data.max_bytes=300000", "logger=none",
                                      "trainer.enable_progress_bar=false", "latency.repeats=1",
                                      "latency.batch_size=2"]))
    assert results["teacher"]["model"] == "gpt_micro"
    assert results["student"]["model"] == results["baseline"]["model"] == "gpt_nano"
    assert results["teacher"]["params"] > results["student"]["params"]
    for role in ("teacher", "student", "baseline"):
        metrics = results[role]["metrics"]
        assert abs(metrics["test/bits_per_token"] * math.log(2) - metrics["test/loss"]) < 1e-4
    # held-out KL(teacher || student) per token: logged where a teacher is present
    assert results["student"]["metrics"]["test/teacher_kl"] > 0
    assert "test/teacher_kl" not in results["baseline"]["metrics"]
    # a few continuations of test prompts, by the teacher and the student
    for role in ("teacher", "student"):
        samples = results[role]["samples"]
        assert len(samples) == 3 and all(len(s["prompt"].encode()) <= 24 for s in samples)
        assert samples[0]["continuation"]
    assert results["teacher"]["samples"][0]["prompt"] == \
        results["student"]["samples"][0]["prompt"]
    speed = results["student"]
    assert speed["train_tokens_per_s"]["median"] == pytest.approx(
        speed["train_samples_per_s"]["median"] * 64)  # windows of the job's 64 tokens


def test_the_teacher_kl_is_the_mean_per_token_kl_divergence():
    from kdlab.engine.module import DistillationModule
    from kdlab.models.gpt import GPT
    from kdlab.strategies import KD

    torch.manual_seed(0)
    student, teacher = GPT((8,), 11, dim=8, depth=1, heads=2), GPT((8,), 11, dim=8, depth=1,
                                                                       heads=2)
    module = DistillationModule(student, 11, torch.optim.SGD, teacher=teacher, strategy=KD())
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    x = torch.randint(0, 11, (3, 8))
    logits = as_rows(student(x))
    module._log_teacher_kl(x, logits, "test")
    p, q = torch.softmax(as_rows(teacher(x)).double(), 1), torch.softmax(logits.double(), 1)
    want = sum(float((p[i] * (p[i] / q[i]).log()).sum()) for i in range(24)) / 24
    assert logged["test/teacher_kl"] == pytest.approx(want, rel=1e-4)
    module._log_teacher_kl(x, as_rows(teacher(x)), "test")
    assert logged["test/teacher_kl"] == pytest.approx(0, abs=1e-6)


def test_the_readme_command_for_another_divergence_on_the_text_job_builds_it(tmp_path):
    """``experiment=text_kd`` sets ``distill.kd.*``: with ``distill=gkd`` those settings must be
    dropped (``'~distill.kd'``), as the README shows; without, the error names the fix."""
    from kdlab.modes.build import strategy_configs
    from kdlab.util.errors import KdlabError

    cfg = make_cfg(tmp_path, ["experiment=text_kd", "distill=gkd", "~distill.kd"])
    assert list(strategy_configs(cfg)) == ["gkd"]
    with pytest.raises(KdlabError, match="'~distill.kd'"):
        strategy_configs(make_cfg(tmp_path, ["experiment=text_kd", "distill=gkd"]))
