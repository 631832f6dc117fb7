"""kdlab.util.measure (FLOPs, size, latency, ratios) and kdlab-eval's teacher choice."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from kdlab.util.measure import flops_per_sample, footprint, ratios, state_dict_bytes
from tests.conftest import make_cfg


def test_flops_follow_the_formulas():
    # Linear 10 → 5: one multiply-add per weight, 2 FLOPs each
    assert flops_per_sample(nn.Linear(10, 5), [10]) == 2 * 10 * 5
    # Conv 1 → 2 channels, 3x3 kernel, 5x5 input: 3x3 outputs per channel
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 4))
    assert flops_per_sample(conv, [1, 5, 5]) == 2 * (2 * 9) * (1 * 9) + 2 * 18 * 4


def test_state_dict_bytes_is_what_torch_save_writes():
    model = nn.Linear(100, 50)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert state_dict_bytes(model) == len(buffer.getvalue())
    assert state_dict_bytes(model) > (100 * 50 + 50) * 4


def test_footprint_and_ratios():
    big = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))
    small = nn.Linear(32, 10)
    t = footprint(big, [32], batch_sizes=(1, 8), repeats=2)
    s = footprint(small, [32], batch_sizes=(1, 8), repeats=2)
    assert t["params"] == 32 * 256 + 256 + 256 * 10 + 10
    assert set(s["latency_ms_by_batch"]) == {1, 8}
    assert all(v > 0 for v in s["latency_ms_by_batch"].values())
    t["metrics"], s["metrics"] = {"test/acc": 0.9}, {"test/acc": 0.85}
    r = ratios(t, s)
    assert r["compression_params"] == pytest.approx(t["params"] / 330)
    assert r["flops_reduction"] == pytest.approx((2 * 32 * 256 + 2 * 256 * 10) / (2 * 32 * 10))
    assert r["speedup_by_batch"][8] == pytest.approx(
        t["latency_ms_by_batch"][8] / s["latency_ms_by_batch"][8])
    assert r["accuracy_gap_points"] == pytest.approx(5.0)


def test_eval_of_a_run_without_teacher(multirun_2x2, tmp_path, capsys):
    from kdlab.evaluate import evaluate

    folder, proc = multirun_2x2
    assert proc.returncode == 0, proc.stderr[-2000:]
    none_run = next(p for p in folder.glob("multiruns/*/*/results.json")
                    if json.loads(p.read_text())["strategy"] == "none")
    ckpt = json.loads(none_run.read_text())["student"]["best_ckpt"]
    cfg = make_cfg(tmp_path, [f"ckpt_path={ckpt}", "latency.repeats=1"], config_name="eval")
    result = evaluate(cfg)
    assert "teacher" not in result and "distill=none" in result["teacher_skipped"]
    cfg = make_cfg(tmp_path, [f"ckpt_path={ckpt}", "latency.repeats=1", "with_teacher=true"],
                   config_name="eval")
    with pytest.raises(SystemExit) as exit_info:
        evaluate(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "with_teacher=true but the teacher cannot be evaluated" in err and "distill=none" in err
