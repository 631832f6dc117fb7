"""``data.mix``: mixup / CutMix batches, seen identically by the live teacher and the student
(Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and consistent")."""

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdlab.data import UNLABELLED, FashionMNISTDataModule
from kdlab.data.mix import check_stage, mix_batch
from kdlab.engine.cache import prepare_cache
from kdlab.engine.module import DistillationModule
from kdlab.modes.build import cache_options
from kdlab.strategies import KD
from kdlab.train import run
from kdlab.util.errors import KdlabError


def test_mixup_is_the_convex_combination_with_the_drawn_lambda():
    x = torch.randn(16, 1, 6, 6)
    torch.manual_seed(3)
    out, drawn = mix_batch(x, "mixup", 0.4)
    lam, perm = drawn["lam"], drawn["perm"]
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(16))
    assert torch.allclose(out, lam * x + (1 - lam) * x[perm], atol=1e-6)
    torch.manual_seed(3)  # seeded by the global RNG
    again, _ = mix_batch(x, "mixup", 0.4)
    assert torch.equal(out, again)
    assert not torch.equal(mix_batch(x, "mixup", 0.4)[0], out)


def test_cutmix_pastes_one_box_of_the_partner():
    x = torch.randn(32, 2, 10, 12)
    torch.manual_seed(0)
    for _ in range(20):
        out, drawn = mix_batch(x, "cutmix", 1.0)
        top, bottom, left, right = drawn["box"]
        inside = torch.zeros(10, 12, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(out[..., inside], x[drawn["perm"]][..., inside])
        assert torch.equal(out[..., ~inside], x[..., ~inside])
        assert drawn["lam"] == pytest.approx(1 - inside.sum().item() / 120)
    assert inside.any() and not inside.all()


def test_bad_values_fail_naming_the_key():
    with pytest.raises(KdlabError, match="data.mix=blend must be one of none, mixup, cutmix"):
        FashionMNISTDataModule(mix="blend")
    with pytest.raises(KdlabError, match="data.mix_alpha=0.0 must be a positive number"):
        FashionMNISTDataModule(mix="mixup", mix_alpha=0)
    with pytest.raises(KdlabError, match="data.mix_alpha"):
        FashionMNISTDataModule(mix="cutmix", mix_alpha="a lot")
    assert FashionMNISTDataModule(mix=None).mix == "none"


def test_mixing_needs_a_soft_target_only_strategy(caplog):
    data = FashionMNISTDataModule(mix="mixup")
    with pytest.raises(KdlabError, match=r"data.mix=mixup .* label cross-entropy by 0.1"):
        check_stage(data, KD(alpha=0.9), "student")
    with pytest.raises(KdlabError, match="data.mix=mixup needs a teacher's soft targets"):
        check_stage(data, None, "student")
    check_stage(data, KD(alpha=1.0), "student")  # function matching
    assert data.mix == "mixup"
    with caplog.at_level(logging.INFO, logger="kdlab"):
        check_stage(data, None, "baseline")  # the no-teacher baseline trains unmixed
    assert data.mix == "none" and "[baseline] data.mix=mixup is off" in caplog.text


def test_without_stored_views_mixing_runs_the_teacher_live_or_fails_when_forced(fast_cfg,
                                                                              caplog):
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = SimpleNamespace(x_train=torch.randn(10, 1, 2, 2), augmented=True, mix="cutmix")
    with caplog.at_level(logging.INFO, logger="kdlab"):
        assert prepare_cache(cache_options(fast_cfg("teacher_cache.views=0")), teacher, None,
                             data, False) is None
    assert "Teacher cache: off" in caplog.text and "data.mix gives the student" in caplog.text
    with pytest.raises(KdlabError, match="teacher_cache.enabled=true but data.mix gives"):
        prepare_cache(cache_options(fast_cfg("teacher_cache.enabled=true",
                                             "teacher_cache.views=0")), teacher, None, data,
                      False)


def test_the_live_teacher_sees_exactly_the_students_mixed_batch(fast_cfg, monkeypatch, caplog):
    """A whole run: the teacher (trained here, without mixing — its stage has no strategy, so
    mixing would fail) runs on the same mixed, label-hidden batch as the student."""
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": [], "raw": []}
    recording = [False]
    terms = DistillationModule._terms

    def spy(self, x, y, index, view=None):
        if self.teacher is None:  # the teacher's own training: never mixed
            assert (y != UNLABELLED).all()
            return terms(self, x, y, index)
        if not hasattr(self, "_spied"):
            for role in ("student", "teacher"):
                getattr(self, role).register_forward_pre_hook(
                    lambda m, args, role=role: seen[role].append(args[0].detach().clone())
                    if recording[0] else None)
            self._spied = True
        assert (y == UNLABELLED).all()  # a mixed image has no single label
        seen["raw"].append(self.trainer.datamodule.x_train[index].clone())
        recording[0] = True
        try:
            return terms(self, x, y, index)
        finally:
            recording[0] = False

    monkeypatch.setattr(DistillationModule, "_terms", spy)
    cfg = fast_cfg("distill.kd.alpha=1.0", "data.augment=true", "data.mix=mixup",
                   "trainer.max_epochs=1", "latency.repeats=1", "steps_per_call=1",
                   "trainer.limit_train_batches=4", "teacher_cache.views=0")
    with caplog.at_level(logging.INFO, logger="kdlab"):
        results = run(cfg)
    assert 0 <= results["student"]["metrics"]["test/acc"] <= 1
    assert len(seen["student"]) == len(seen["teacher"]) == len(seen["raw"]) == 4
    for student, teacher, raw in zip(seen["student"], seen["teacher"], seen["raw"]):
        assert torch.equal(student, teacher)
        assert not torch.allclose(student, raw)  # augmented and mixed
    assert "data.mix gives the student a new random view" in caplog.text
    assert "[baseline] data.mix=mixup is off" in caplog.text
