"""The teacher store trains a teacher once and reuses it; teacher checkpoints are checked."""

import logging

import pytest
import torch

import kdlab.engine.teachers as teachers
from kdlab.engine.teachers import get_teacher, teacher_key
from kdlab.util.errors import KdlabError


def test_store_trains_once_then_reuses(fast_cfg, tmp_path, monkeypatch, caplog):
    cfg = fast_cfg()
    calls = []
    real_train = teachers.train_teacher
    monkeypatch.setattr(teachers, "train_teacher",
                        lambda *a, **k: calls.append(1) or real_train(*a, **k))
    first, info = get_teacher(cfg, tmp_path / "run1")
    assert info["source"] == "trained" and info["stored"] and len(calls) == 1
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    with caplog.at_level(logging.INFO, logger="kdlab.engine.teachers"):
        second, info2 = get_teacher(fast_cfg("seed=5", "distill.kd.temperature=2"), tmp_path / "r2")
    assert info2["source"] == "store" and len(calls) == 1
    assert "reusing" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 second.state_dict().values()))


def test_key_depends_on_what_defines_the_teacher_only(fast_cfg):
    base = teacher_key(fast_cfg())
    assert teacher_key(fast_cfg("seed=7", "distill.kd.alpha=0.5", "student=mlp")) == base
    assert teacher_key(fast_cfg("data.num_labels=null")) == base
    assert teacher_key(fast_cfg("teacher.seed=1")) != base
    assert teacher_key(fast_cfg("teacher.train.max_epochs=3")) != base
    assert teacher_key(fast_cfg("teacher.model.hidden=[32]")) != base
    assert teacher_key(fast_cfg("data.val_size=1000")) != base


def test_teacher_ckpt_is_used_and_a_kdlab_checkpoint_works_as_teacher(fast_cfg, tmp_path):
    cfg = fast_cfg()
    model, _ = get_teacher(cfg, tmp_path / "run")
    path = tmp_path / "teacher_state.pt"
    torch.save(model.state_dict(), path)
    loaded, info = get_teacher(fast_cfg(f"teacher.ckpt={path}"), tmp_path / "run2")
    assert info["source"] == "ckpt"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 loaded.state_dict().values()))
    lightning_style = tmp_path / "student.ckpt"
    torch.save({"state_dict": {f"student.{k}": v for k, v in model.state_dict().items()}},
               lightning_style)
    get_teacher(fast_cfg(f"teacher.ckpt={lightning_style}"), tmp_path / "run3")


def test_missing_teacher_ckpt_and_wrong_architecture_are_reported(fast_cfg, tmp_path):
    with pytest.raises(KdlabError, match=r"teacher.ckpt=.*does not exist"):
        get_teacher(fast_cfg(f"teacher.ckpt={tmp_path}/nope.pt"), tmp_path)
    other = torch.nn.Linear(3, 2)
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(KdlabError, match=r"does not fit teacher.model — missing: "):
        get_teacher(fast_cfg(f"teacher.ckpt={path}"), tmp_path)


def test_teacher_checkpoint_for_other_number_of_classes_is_reported(fast_cfg, tmp_path):
    cfg = fast_cfg("teacher.model.hidden=[64]", "+teacher.model.num_classes=5")
    with pytest.raises(KdlabError, match=r"teacher.model outputs 5 classes .* has 10"):
        get_teacher(cfg, tmp_path)


def test_train_if_missing_false_fails_clearly(fast_cfg, tmp_path):
    with pytest.raises(KdlabError, match="teacher.train_if_missing=false"):
        get_teacher(fast_cfg("teacher.train_if_missing=false"), tmp_path)


def test_teacher_training_is_reproducible(fast_cfg, tmp_path):
    a, _ = get_teacher(fast_cfg(tmp=tmp_path / "a"), tmp_path / "a")
    b, _ = get_teacher(fast_cfg(tmp=tmp_path / "b"), tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
