"""kdlab-export: every format is written, loaded back and matches PyTorch; bad requests fail.
kdlab-eval and kdlab-export read a checkpoint or a finished run folder (the checkpoint its
results.json reports) and write beside that run, or into ``out=``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab import export as export_mod
from kdlab.evaluate import evaluate
from kdlab.export import choose_formats, export, export_model
from kdlab.modes.checkpoints import output_folder, resolve_checkpoint
from kdlab.util.errors import KdlabError
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def student_ckpt(multirun_2x2):
    folder, proc = multirun_2x2
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = next(p for p in sorted(folder.glob("multiruns/*/*/results.json"))
               if json.loads(p.read_text())["strategy"] == "kd")
    return json.loads(run.read_text())["student"]["best_ckpt"]


def test_export_writes_and_checks_every_format(student_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    cfg = make_cfg(tmp_path, [f"ckpt_path={student_ckpt}", "check_samples=50",
                              f"out={tmp_path}/exported"], config_name="export")
    result = export(cfg)
    files = result["files"]
    assert set(files) == {"onnx", "torchscript", "pt2"}
    for entry in files.values():
        assert entry["bytes"] > 10_000
        assert entry["max_abs_diff"] is not None and entry["max_abs_diff"] <= 1e-4
        assert Path(entry["path"]).parent == tmp_path / "exported"  # out= is where they go
    saved = json.loads((tmp_path / "exported" / "export.json").read_text())
    assert saved["files"]["onnx"]["path"] == files["onnx"]["path"]
    assert saved["input_shape"] == [None, 1, 28, 28]

    # the ONNX file runs on a batch size it was not exported with, like the PyTorch student
    import onnxruntime as ort

    session = ort.InferenceSession(files["onnx"]["path"], providers=["CPUExecutionProvider"])
    x = torch.randn(7, 1, 28, 28)
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    scripted = torch.jit.load(files["torchscript"]["path"])
    assert logits.shape == (7, 10)
    torch.testing.assert_close(torch.from_numpy(logits), scripted(x), atol=1e-4, rtol=1e-4)


def test_a_difference_above_atol_fails_naming_the_file(tmp_path):
    pytest.importorskip("onnxruntime")
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    x = torch.randn(16, 8) * 100
    with pytest.raises(KdlabError, match=r"student\.onnx: outputs differ from PyTorch's by .* "
                                         r"> atol=0"):
        export_model(model, x, tmp_path, ["onnx"], atol=0.0)
    report = export_model(model, x, tmp_path, ["pt2", "torchscript"], atol=0.0)
    assert report["pt2"]["max_abs_diff"] == 0.0


def test_format_choice(monkeypatch):
    with pytest.raises(KdlabError, match="'tflite' is not a format; choose from onnx, "
                                         "torchscript, pt2"):
        choose_formats(["tflite"])
    monkeypatch.setattr(export_mod, "_missing", lambda packages: list(packages))
    assert choose_formats("auto") == ["torchscript", "pt2"]
    with pytest.raises(KdlabError, match=r"formats=\[onnx\] needs onnx and onnxscript: "
                                         r"pip install 'kdlab\[export\]'"):
        choose_formats(["onnx"])


# -- which checkpoint, and where the outputs go -------------------------------------------------
@pytest.fixture
def kd_run(student_ckpt, tmp_path):
    """A copy of a finished kd run folder (results.json names checkpoints of the original)."""
    original = Path(student_ckpt).parent.parent
    return Path(shutil.copytree(original, tmp_path / "copied_run"))


def test_a_run_folder_means_its_reported_checkpoint_and_outputs_go_beside_it(kd_run, tmp_path):
    results = json.loads((kd_run / "results.json").read_text())
    best = Path(results["student"]["best_ckpt"])
    assert best.parent.parent != kd_run  # the copy: the recorded path is the original's
    result = export(make_cfg(tmp_path, [f"ckpt_path={kd_run}", "check_samples=8",
                                        "formats=[pt2]"], config_name="export"))
    assert result["ckpt_path"] == str(kd_run / "checkpoints" / best.name)
    assert "best_ckpt" in result["chosen"]
    beside = kd_run / "export" / best.stem
    assert result["files"]["pt2"]["path"] == str(beside / "student.pt2")
    assert json.loads((beside / "export.json").read_text())["ckpt_path"] == result["ckpt_path"]
    assert not (tmp_path / "run").exists()  # not in paths.output_dir (Hydra's folder)

    evaluated = evaluate(make_cfg(tmp_path, [f"ckpt_path={kd_run}", "with_teacher=false",
                                             "latency.repeats=1", "latency.batch_sizes=[2]"],
                                  config_name="eval"))
    assert evaluated["ckpt_path"] == result["ckpt_path"]
    saved = json.loads((kd_run / "eval" / best.stem / "eval.json").read_text())
    assert saved["student"]["params"] == results["student"]["params"]


def test_the_commands_write_nothing_where_they_are_started(kd_run, tmp_path):
    """``kdlab-eval`` / ``kdlab-export`` as commands: no Hydra folder under outputs/, no
    .hydra/ or log file in the current folder; ``out=`` is a key of both."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    last = kd_run / "checkpoints" / "last.ckpt"
    for module, args in (
            ("kdlab.evaluate", [f"ckpt_path={kd_run}", "with_teacher=false",
                                "latency.repeats=1", "latency.batch_sizes=[2]"]),
            ("kdlab.export", [f"ckpt_path={last}", "formats=[pt2]", "check_samples=8",
                              f"out={tmp_path}/deploy"])):
        proc = subprocess.run([sys.executable, "-c", f"from {module} import cli; cli()", *args],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(cwd.iterdir()) == []
    assert len(list((kd_run / "eval").glob("best-*/eval.json"))) == 1
    assert (tmp_path / "deploy" / "student.pt2").is_file()
    assert json.loads((tmp_path / "deploy" / "export.json").read_text())["ckpt_path"] == str(last)


def test_an_unfinished_run_folder_is_one_line(kd_run, tmp_path, capsys):
    (kd_run / "results.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        export(make_cfg(tmp_path, [f"ckpt_path={kd_run}"], config_name="export"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kdlab: error: ckpt_path={kd_run}: this folder has no results.json (an "
                   "unfinished run, or not a run folder), so no reported checkpoint to pick; "
                   f"give a checkpoint file instead: ckpt_path={kd_run}/checkpoints/last.ckpt"]
    assert not (kd_run / "export").exists()


def _write_results(run: Path, student: dict, recorded_run: str | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps(
        {"run_dir": recorded_run or str(run), "student": student}))


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_checkpoint_choice_and_output_folder(tmp_path):
    run = tmp_path / "run"
    best = _touch(run / "checkpoints" / "best-epoch03-acc0.9000.ckpt")
    last = _touch(run / "checkpoints" / "last.ckpt")
    _write_results(run, {"best_ckpt": str(best), "last_ckpt": str(last)})
    chosen = resolve_checkpoint(str(run))
    assert (chosen.path, chosen.run_dir, chosen.name) == (best, run, "best-epoch03-acc0.9000")
    assert output_folder(chosen, None, "eval") == run / "eval" / "best-epoch03-acc0.9000"
    assert output_folder(chosen, str(tmp_path / "mine"), "eval") == tmp_path / "mine"
    assert output_folder(chosen, None, "export", member=1) == \
        run / "export" / "best-epoch03-acc0.9000-member1"
    # no best checkpoint: the last one, whose weights the stage tested
    _write_results(run, {"best_ckpt": None, "last_ckpt": str(last)})
    assert resolve_checkpoint(str(run)).path == last
    # a moved run folder: its own copy of the recorded checkpoint
    _write_results(run, {"best_ckpt": "/gone/run/checkpoints/best-epoch03-acc0.9000.ckpt"},
                   recorded_run="/gone/run")
    assert resolve_checkpoint(str(run)).path == best
    # a checkpoint file is used as given; its run folder is the one above its stage
    baseline = _touch(run / "baseline" / "checkpoints" / "last.ckpt")
    given = resolve_checkpoint(str(baseline))
    assert (given.path, given.run_dir, given.name) == (baseline, run.resolve(), "baseline-last")
    assert output_folder(given, None, "eval") == run.resolve() / "eval" / "baseline-last"
    loose = _touch(tmp_path / "models" / "student.ckpt")
    assert output_folder(resolve_checkpoint(str(loose)), None, "export") == \
        (tmp_path / "models" / "export" / "student").resolve()


@pytest.mark.parametrize("student,message", [
    ({"best_ckpt": None, "last_ckpt": None},
     "the student entry records no checkpoint (a trainer.fast_dev_run run saves none)"),
    ({"best_ckpt": "/gone/checkpoints/best.ckpt"},
     "the student's best_ckpt /gone/checkpoints/best.ckpt is missing (moved or deleted?)"),
])
def test_a_run_folder_without_a_usable_checkpoint_is_refused(tmp_path, student, message):
    _write_results(tmp_path / "run", student)
    with pytest.raises(KdlabError, match=re.escape(message)):
        resolve_checkpoint(str(tmp_path / "run"))
