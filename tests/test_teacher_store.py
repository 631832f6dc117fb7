"""The teacher store trains a teacher once and reuses it; teacher checkpoints are checked."""

import logging

import pytest
import torch

import kdlab.modes.teacher as teachers
from kdlab.modes.teacher import get_teacher, teacher_key
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
    with caplog.at_level(logging.INFO, logger="kdlab"):
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


STUDENT_SWEEP = ["optimizer.lr=0.01", "trainer.max_epochs=7", "data.batch_size=64",
                 "scheduler=cosine", "optimizer=sgd", "data.augment=true", "distill=[kd,at]"]


@pytest.mark.parametrize("teacher", [[], ["experiment=cifar100", "data=synthetic_cifar100",
                                          "data.train_size=600", "data.val_size=100",
                                          "data.test_size=100", "teacher.model.name=resnet8"]],
                         ids=["cnn", "zoo-cifar100"])
def test_sweeping_the_students_recipe_reuses_one_teacher(fast_cfg, teacher):
    """The teacher's recipe is its own: the student's optimizer, schedule, epochs, batch size
    and augmentation never change its key; its own recipe does."""
    base = teacher_key(fast_cfg("teacher=cnn", *teacher))
    for override in STUDENT_SWEEP:
        assert teacher_key(fast_cfg("teacher=cnn", *teacher, override)) == base, override
    for override in ("teacher.train.optimizer.lr=0.01", "teacher.train.batch_size=32",
                     "teacher.train.augment=false", "teacher.train.max_epochs=3",
                     "trainer.precision=bf16-mixed"):
        assert teacher_key(fast_cfg("teacher=cnn", *teacher, override)) != base, override


def _idx(folder, images, labels):
    """Fashion-MNIST's four idx files in ``folder`` (images ``(n, 28, 28)`` uint8)."""
    import numpy as np

    folder.mkdir(parents=True)
    for prefix, x, y in (("train", images, labels), ("t10k", images[:100], labels[:100])):
        n = len(x)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">i4").tobytes() + x.numpy().tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + np.array([n], ">i4").tobytes() + y.numpy().tobytes())


def test_the_data_content_is_part_of_the_key_not_its_folder(fast_cfg, tmp_path):
    """Other images in the same format under another data.root are another teacher; the same
    images in another folder are the same teacher."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (600, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.arange(600, dtype=torch.uint8) % 10
    _idx(tmp_path / "a", images, labels)
    _idx(tmp_path / "copy", images, labels)
    _idx(tmp_path / "other", 255 - images, labels)
    small = ["data.val_size=100", "data.num_labels=null"]
    key = {name: teacher_key(fast_cfg(f"data.root={tmp_path / name}", *small))
           for name in ("a", "copy", "other")}
    assert key["a"] == key["copy"] != key["other"]


def test_a_teacher_stored_under_the_old_key_is_reported_with_the_command(fast_cfg, tmp_path,
                                                                        caplog):
    cfg = fast_cfg()
    legacy = tmp_path / "teachers" / teachers.legacy_teacher_key(cfg) / "teacher.pt"
    legacy.parent.mkdir(parents=True)
    model, _ = get_teacher(fast_cfg("teacher_cache.enabled=false", tmp=tmp_path / "elsewhere"),
                           tmp_path / "elsewhere")
    torch.save({"state_dict": model.state_dict()}, legacy)
    with caplog.at_level(logging.WARNING):
        _, info = get_teacher(cfg, tmp_path / "run")
    assert info["source"] == "trained"  # not reused silently
    assert caplog.text.count(f"teacher.ckpt={legacy}") == 1
    assert "does not capture the training data's content" in caplog.text
    reused, info = get_teacher(fast_cfg(f"teacher.ckpt={legacy}"), tmp_path / "run2")
    assert info["source"] == "ckpt"


def _in_read_only(folder, command: list[str]) -> list[str] | None:
    """``command`` run with ``folder`` mounted read-only (a user namespace: a real EROFS, even
    for root), or ``None`` where this machine cannot do that."""
    import shlex
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {folder} {folder}"
                            f" && ! touch {folder}/.probe"], capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {shlex.quote(str(folder))} "
            f"{shlex.quote(str(folder))} && exec {shlex.join(command)}"]


def test_a_read_only_store_holding_the_teacher_is_used(tmp_path):
    """A shared store of trained teachers mounted read-only: the teacher it holds is reused
    (no lock needed), a missing teacher-output cache is computed for the run only, and a
    teacher it does not hold is one line saying so."""
    import subprocess
    import sys

    from tests.conftest import FAST

    store = tmp_path / "store"

    def command(folder: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "kdlab.train", *FAST, f"hydra.run.dir={tmp_path / folder}",
                f"paths.teacher_store={store}", f"paths.log_dir={tmp_path}", *extra]

    first = subprocess.run(command("a"), cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    for cached in (store / "cache").glob("*.pt"):
        cached.unlink()
    wrapped = _in_read_only(store, command("b"))
    if wrapped is None:
        pytest.skip("this machine cannot mount a folder read-only in a user namespace")
    reuse = subprocess.run(wrapped, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert reuse.returncode == 0, reuse.stderr[-2000:]
    out = reuse.stdout + reuse.stderr
    assert "from the store (trained once" in out
    assert "not writable (Read-only file system), so the teacher's outputs are computed for " \
           "this run only" in out
    missing = subprocess.run(_in_read_only(store, command("c", "teacher.train.max_epochs=2")),
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2
    (line,) = [x for x in missing.stderr.splitlines() if x.startswith("kdlab: error: ")]
    assert f"paths.teacher_store={store} cannot be written (" in line
    assert "Read-only file system) and it holds no teacher " in line
    assert not (tmp_path / "c" / "results.json").exists()


def test_a_process_waiting_for_a_lock_says_for_what_and_whom(tmp_path, caplog, monkeypatch):
    import os
    import threading
    import time

    from kdlab.util import files

    monkeypatch.setattr(files, "WAIT_NOTE_S", 0.2)
    lock = tmp_path / ".key.lock"
    taken, release = threading.Event(), threading.Event()

    def holder():
        with files.locked(lock, "teacher x"):
            taken.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    taken.wait(5)
    threading.Timer(0.7, release.set).start()
    caplog.set_level(logging.INFO)
    start = time.monotonic()
    with files.locked(lock, "teacher resnet56-abc (its training)"):
        waited = time.monotonic() - start
    thread.join()
    assert waited >= 0.5
    assert (f"Waiting for teacher resnet56-abc (its training): another process (pid "
            f"{os.getpid()} on ") in caplog.text
    assert "Still waiting for teacher resnet56-abc (its training) (held by pid " in caplog.text
    assert "Done waiting for teacher resnet56-abc (its training)" in caplog.text
