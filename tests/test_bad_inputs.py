"""The catalogue of bad inputs (docs/TROUBLESHOOTING.md): each one ends in a single
``kdlab: error: …`` line naming the key or file and the fix, exit code 2, no results.json."""

from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

import pytest
import torch

from kdlab.cli import guard_argv
from kdlab.train import run
from tests.conftest import FAST, make_cfg

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "TROUBLESHOOTING.md").read_text()

#: command-line overrides caught before Hydra composes anything
CLI_CASES = [
    (["distill=kdd"], r"distill=kdd is not an option of the 'distill' group \(did you mean kd"),
    (["student=resnet18"], r"student=resnet18 is not an option .*choose one of: cnn, gpt, mlp, zoo "
                           r"\(resnet18 is a zoo model: student=zoo student.model.name=resnet18\)"),
    (["data=cifar_10"], r"data=cifar_10 is not an option .*did you mean cifar10.*choose one of: "
                        r"cifar10, cifar100, fashion_mnist"),
    (["mode=mutal"], r"mode=mutal is not an option .*did you mean mutual"),
    (["distill=[kd,atx]"], r"distill=atx is not an option of the 'distill' group \(did you "
                           r"mean at\b"),
    (["distill=kd,dkd"], r"distill=kd,dkd is a comma list, which Hydra runs as a sweep: add -m "
                         r".*distill=\[kd,dkd\] is one run that uses both"),
    (["scheduler=null"], r"scheduler=null selects no option .*write scheduler=none"),
    (["distill.kd.temprature=2"], r"distill.kd.temprature: no such key under distill.kd \(did you "
                                  r"mean temperature\?\)"),
    (["sed=3"], r"sed: no such key at the top level \(did you mean seed"),
]

#: config values caught when the run builds its parts
CONFIG_CASES = [
    (["student=zoo", "student.model.name=resnet8x5"],
     r"student.model.name=resnet8x5 is not a kdlab model \(did you mean resnet8x4"),
    (["data=cifar100"], r"cifar100 not found: data.root=data has no cifar-100-python/ .*"
                        r"data=synthetic_cifar100"),
    (["data.root=/nonexistent/fashion"], r"data.root=/nonexistent/fashion does not exist: point "
                                         r"it at the folder with the four idx files"),
    (["distill=fitnets", "distill.fitnets.student_layers=[stages.9]"],
     r"distill.fitnets.student_layers: 'stages.9' is not a module of CNN \(did you mean stages.1"),
    (["distill=at", "distill.at.teacher_layers=[blocks.1]"],
     r"distill.at.teacher_layers: 'blocks.1' is not a module of MLP; aliases: stages"),
    (["+student.model.num_classes=5"],
     r"student.model outputs 5 classes but data=fashion_mnist has 10: drop "),
    (["student=mlp", "+student.model.input_shape=[1,32,32]"],
     r"student.model does not accept fashion_mnist inputs of shape \[1, 28, 28\]"),
    (["+student.model.width=3"], r"student.model: .*unexpected keyword argument 'width'"),
    (["distill.kd.temperature=0"], r"distill.kd.temperature=0 must be > 0"),
    (["distill=dkd", "distill.dkd.temperature=-1"], r"distill.dkd.temperature=-1 must be .*> 0"),
    (["distill.kd.alpha=1.5"], r"distill.kd.alpha=1.5 must be in \[0, 1\]"),
    (["distill=at", "distill.at.beta=-1"], r"distill.at.beta=-1 must be a finite number >= 0"),
    (["distill=crd", "distill.crd.nce_t=0"], r"distill.crd.nce_t=0 must be a finite number > 0"),
    (["distill=label_smoothing", "distill.label_smoothing.epsilon=1.5"],
     r"distill.label_smoothing.epsilon=1.5 must be in"),
    (["distill=[kd,at]", "distill.at.beta=-1"], r"distill.at.beta=-1 must be a finite number"),
    (["+distill.kd2.temperature=2"], r"distill.kd2 has no _target_, so it is not a strategy"),
    (["data.classes=[]"], r"data.classes=\[\] keeps fewer than 2 classes"),
    (["data.classes=[0,0]"], r"data.classes=\[0, 0\] repeats class ids \[0\]"),
    (["data.classes=[11,2]"], r"data.classes=\[11, 2\] has unknown class ids \[11\]"),
    (["data.num_labels=5"], r"data.num_labels=5 is below the number of classes \(10\)"),
    (["data.val_size=70000"], r"data.val_size=70000 leaves no training images"),
    (["data.batch_size=0"], r"data.batch_size=0 must be a positive integer"),
    (["data.mix=cutmixx"], r"data.mix=cutmixx must be one of none, mixup, cutmix"),
    (["ckpt_path=/nonexistent/last.ckpt"], r"ckpt_path=/nonexistent/last.ckpt does not exist"),
    (["trainer.accumulate_grad_batches=0"], r"trainer.accumulate_grad_batches=0 must be >= 1"),
    (["trainer.gradient_clip_algorithm=foo"], r"gradient_clip_algorithm=foo must be norm or"),
    (["trainer.max_epochs=-5"], r"trainer.max_epochs=-5 must be an integer >= -1"),
    (["trainer.max_epochs=two"], r"trainer.max_epochs='two' must be an integer >= -1"),
    (["seed=abc"], r"seed='abc' must be an integer"),
    (["optimizer.lr=abc"], r"optimizer.lr='abc' must be a number > 0"),
    (["data.num_labels=none"], r"data.num_labels='none' must be a positive integer, or null"),
    (["data.eval_batch_size=0"], r"data.eval_batch_size=0 must be a positive integer"),
    (["teacher.train.batch_size=-8"], r"teacher.train.batch_size=-8 must be a positive integer"),
    (["steps_per_call=0"], r"steps_per_call=0 must be >= 1 \(or auto\)"),
    (["nonfinite_loss=ignore"], r"nonfinite_loss=ignore must be one of stop, skip, off"),
    (["optimizer.lr=-1"], r"optimizer.lr=-1 must be a number > 0"),
    (["latency.batch_size=0"], r"latency.batch_size=0 must be a positive integer"),
    (["teacher_cache.dtype=float8"], r"teacher_cache.dtype=float8 must be one of float16"),
    (["compress=prune", "compress.prune.amount=1.5"], r"compress.prune.amount=1.5 must be a"),
    (["student.init_from_teacher=foo"], r"student.init_from_teacher=foo must be match, a "),
    (["mode=takd", "mode.assistants=[]"], r"mode.assistants is empty: give at least one"),
    (["mode=born_again", "mode.generations=0"], r"mode.generations=0 must be >= 1"),
    (["mode=multi_teacher", "mode.teachers=[]"], r"mode.teachers lists 0 teacher\(s\): give "),
    (["mode=mutual", "mode.models=[cnn]"], r"mode.models has 1 entry: a cohort needs >= 2"),
    (["mode=transfer", "mode.finetune=foo"], r"mode.finetune=foo must be one of full, linear"),
    (["logger.csv._target_=nope.Logger"], r"logger.csv could not be built: .*No module named"),
    (["teacher.train_if_missing=false"], r"no stored teacher .*teacher.train_if_missing=false"),
]


def _failed_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("kdlab: error: ")]
    assert len(lines) == 1, err[-1500:]
    return lines[0]


def _run_fails(cfg, capsys, tmp: Path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    assert exit_info.value.code == 2
    assert not list(tmp.rglob("results.json"))
    return _failed_line(capsys)


@pytest.mark.parametrize("argv, pattern", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_command_line_case(argv, pattern, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kdlab-train", *argv])
    with pytest.raises(SystemExit) as exit_info:
        guard_argv()
    assert exit_info.value.code == 2
    assert re.search(pattern, _failed_line(capsys))
    assert f"`{' '.join(argv)}`" in DOC


@pytest.mark.parametrize("overrides, pattern", CONFIG_CASES,
                         ids=[" ".join(o) for o, _ in CONFIG_CASES])
def test_config_case(overrides, pattern, tmp_path, capsys):
    cfg = make_cfg(tmp_path, [*FAST, "trainer.fast_dev_run=true", *overrides])
    line = _run_fails(cfg, capsys, tmp_path)
    assert re.search(pattern, line), line
    assert f"`{' '.join(overrides)}`" in DOC


def test_teacher_checkpoint_of_another_architecture_lists_the_keys(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    cfg = make_cfg(tmp_path, [*FAST, f"teacher.ckpt={path}"])
    line = _run_fails(cfg, capsys, tmp_path / "run")
    assert f"teacher.ckpt={path} does not fit teacher.model — missing: " in line
    assert "unexpected: bias, weight" in line and "use the teacher.model it was trained" in line


class _Payload:
    """Unpickling this would run code: ``weights_only=True`` must refuse it."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_a_checkpoint_that_needs_code_execution_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    line = _run_fails(make_cfg(tmp_path, [*FAST, f"teacher.ckpt={path}"]), capsys,
                      tmp_path / "run")
    assert f"teacher.ckpt={path} could not be loaded with weights_only=True" in line
    assert "code ran" not in capsys.readouterr().out


def test_missing_data_files_say_how_to_get_them(tmp_path, capsys, monkeypatch):
    import kdlab.data.fashion_mnist as fm

    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    line = _run_fails(make_cfg(tmp_path, [*FAST, f"data.root={tmp_path}/empty"]), capsys,
                      tmp_path / "run")
    assert f"data.root={tmp_path}/empty does not exist" in line
    assert "apt-get install dataset-fashion-mnist" in line and "data.download=true" in line


def test_an_unwritable_output_folder_is_named(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    cfg = make_cfg(tmp_path, [*FAST, f"paths.output_dir={tmp_path}/a_file/run"])
    line = _run_fails(cfg, capsys, tmp_path)
    assert f"paths.output_dir={tmp_path}/a_file/run is not a writable folder" in line


def test_wandb_unreachable_fails_instead_of_hanging(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    line = _run_fails(make_cfg(tmp_path, [*FAST, "logger=wandb", "distill=none"]), capsys,
                      tmp_path / "run")
    assert "logger=wandb could not start a W&B run (CommError" in line
    assert "WANDB_MODE=offline" in line


def test_kdlab_eval_of_a_file_that_is_no_kdlab_checkpoint(tmp_path, capsys):
    from kdlab.evaluate import evaluate

    path = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(SystemExit) as exit_info:
        evaluate(make_cfg(tmp_path, [f"ckpt_path={path}"], config_name="eval"))
    assert exit_info.value.code == 2
    assert f"ckpt_path={path} is not a kdlab checkpoint (no stored config)" in \
        _failed_line(capsys)


def test_the_catalogue_has_at_least_25_cases():
    assert len(CLI_CASES) + len(CONFIG_CASES) + 6 >= 25


def _idx_files(folder: Path, images, labels, test_labels=None) -> None:
    """Fashion-MNIST's four idx files in ``folder``: ``images`` ``(n, h, w)`` uint8."""
    import numpy as np

    folder.mkdir(parents=True)
    for prefix, x, y in (("train", images, labels),
                         ("t10k", images[:50], labels[:50] if test_labels is None
                          else test_labels)):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + np.array(x.shape, ">i4").tobytes() + x.numpy().tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + np.array([len(y)], ">i4").tobytes() + y.numpy().tobytes())


def _broken_data(kind: str, folder: Path) -> None:
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8)
    labels = (torch.arange(300) % 10).to(torch.uint8)
    if kind == "count":
        _idx_files(folder, images, labels[:250])
    elif kind == "shape":
        _idx_files(folder, torch.zeros(300, 32, 32, dtype=torch.uint8), labels)
    elif kind == "labels":
        _idx_files(folder, images, torch.full((300,), 12, dtype=torch.uint8))
    else:
        _idx_files(folder, images, labels)
        target = folder / "train-images-idx3-ubyte"
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"GIF89a" * 100)


@pytest.mark.parametrize("kind, pattern", [
    ("garbage", r"cannot be read: .*train-images-idx3-ubyte is not an IDX file"),
    ("truncated", r"cannot be read: .*train-images-idx3-ubyte is truncated"),
    ("count", r"the training split has 300 images but 250 labels"),
    ("shape", r"training images of shape \[1, 32, 32\], not \[1, 28, 28\]"),
    ("labels", r"300 training labels outside 0\.\.9, e\.g\. \[12\]"),
])
def test_bad_data_files_are_one_line_naming_the_folder(kind, pattern, tmp_path, capsys):
    folder = tmp_path / "fashion"
    _broken_data(kind, folder)
    line = _run_fails(make_cfg(tmp_path, [*FAST, f"data.root={folder}", "data.val_size=50",
                                          "data.num_labels=null"]), capsys, tmp_path / "run")
    assert re.search(pattern, line), line
    assert str(folder) in line


@pytest.mark.parametrize("kind, pattern", [
    ("folder", r"ckpt_path=.* is a folder: give the last\.ckpt"),
    ("text", r"ckpt_path=.* could not be loaded with weights_only=True"),
    ("state_dict", r"ckpt_path=.* is not a Lightning checkpoint \(no state_dict and epoch\)"),
    ("evil", r"ckpt_path=.* could not be loaded with weights_only=True"),
])
def test_a_ckpt_path_that_is_not_a_checkpoint_is_one_line(kind, pattern, tmp_path, capsys):
    path = tmp_path / "thing"
    if kind == "folder":
        path.mkdir()
    elif kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "state_dict":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    else:
        with path.open("wb") as f:
            pickle.dump({"state_dict": _Payload()}, f)
    line = _run_fails(make_cfg(tmp_path, [*FAST, f"ckpt_path={path}"]), capsys, tmp_path / "run")
    assert re.search(pattern, line), line
    assert "code ran" not in capsys.readouterr().out


def test_a_folder_as_teacher_ckpt_is_named(tmp_path, capsys):
    line = _run_fails(make_cfg(tmp_path, [*FAST, f"teacher.ckpt={tmp_path}"]), capsys,
                      tmp_path / "run")
    assert f"teacher.ckpt={tmp_path} is a folder: give the teacher.pt" in line


def test_a_warmup_longer_than_the_schedule_is_said_in_one_line(fast_cfg, caplog):
    """DKD's and ReviewKD's 20-epoch warm-up on a 3-epoch run would leave their loss at 15%
    of its weight: one warning line each, naming the key and the value that fits."""
    import logging

    from kdlab.modes.build import build_strategy

    caplog.set_level(logging.WARNING)
    build_strategy(fast_cfg("distill=[dkd,reviewkd]", "trainer.max_epochs=3"))
    for name in ("dkd", "reviewkd"):
        assert (f"distill.{name}.warmup=20 epochs is longer than the schedule "
                f"(trainer.max_epochs=3): its loss reaches only 3/20 = 15% of its weight in the "
                f"last epoch; set distill.{name}.warmup=3 or less") in caplog.text
    caplog.clear()
    build_strategy(fast_cfg("distill=dkd", "trainer.max_epochs=3", "distill.dkd.warmup=3"))
    build_strategy(fast_cfg("distill=dkd", "trainer.max_epochs=240"))
    assert "warmup" not in caplog.text


def test_a_read_only_output_folder_is_one_line_before_hydra(tmp_path):
    """Hydra creates the run folder before kdlab runs; on a read-only disk that was a
    traceback from mkdir. Now: one line naming the folder, exit code 2."""
    import subprocess
    import sys

    from tests.test_teacher_store import _in_read_only

    for args, key in (([f"hydra.run.dir={tmp_path}/run"], "hydra.run.dir"),
                      (["-m", f"paths.log_dir={tmp_path}/logs", "seed=1,2"], "hydra.sweep.dir")):
        command = _in_read_only(tmp_path, [sys.executable, "-m", "kdlab.train", *args,
                                           "trainer.fast_dev_run=true"])
        if command is None:
            pytest.skip("this machine cannot mount a folder read-only in a user namespace")
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"kdlab: error: {key}={tmp_path}/")
        assert f"cannot be created: {tmp_path} is not writable (Read-only file system)" in line
