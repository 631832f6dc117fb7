"""kdlab-export: every format is written, loaded back and matches PyTorch; bad requests fail."""

from __future__ import annotations

import json

import pytest
import torch

from kdlab import export as export_mod
from kdlab.export import choose_formats, export, export_model
from kdlab.util.errors import KdlabError
from tests.conftest import make_cfg


@pytest.fixture(scope="module")
def student_ckpt(multirun_2x2):
    folder, proc = multirun_2x2
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = next(p for p in sorted(folder.glob("multiruns/*/*/results.json"))
               if json.loads(p.read_text())["strategy"] == "kd")
    return json.loads(run.read_text())["student"]["best_ckpt"]


def test_export_writes_and_checks_every_format(student_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    cfg = make_cfg(tmp_path, [f"ckpt_path={student_ckpt}", "check_samples=50"],
                   config_name="export")
    result = export(cfg)
    files = result["files"]
    assert set(files) == {"onnx", "torchscript", "pt2"}
    for entry in files.values():
        assert entry["bytes"] > 10_000
        assert entry["max_abs_diff"] is not None and entry["max_abs_diff"] <= 1e-4
    saved = json.loads((tmp_path / "run" / "export.json").read_text())
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
