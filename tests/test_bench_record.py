"""scripts/bench_record.py: a benchmark's record of finished sweeps is reused only under the
exact overrides it ran with and with the same teacher, and it carries that teacher to a new
machine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_record", ROOT / "scripts" /
                                               "bench_record.py")
bench_record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_record)

OVERRIDES = ["distill=kd", "distill.kd.alpha=0.5,1.0", "seed=0",
             "paths.teacher_store=/somewhere/teachers"]


def result(alpha: float, acc: float, teacher_acc: float = 0.9) -> dict:
    return {"config": {"seed": 0, "distill": {"kd": {"alpha": alpha, "temperature": 4}},
                       "data": {"batch_size": 128}},
            "student": {"metrics": {"val/acc": acc, "test/acc": acc - 0.01, "test/loss": 0.3},
                        "params": 100, "best_ckpt": "/x.ckpt"},
            "teacher": {"metrics": {"test/acc": teacher_acc}, "params": 1000,
                        "source": {"key": "cnn-abc"}}}


def store(tmp_path: Path, weights: bytes = b"weights") -> Path:
    entry = tmp_path / "teachers" / "cnn-abc"
    entry.mkdir(parents=True)
    (entry / "teacher.pt").write_bytes(weights)
    (entry / "teacher.json").write_text(json.dumps({"key": "cnn-abc",
                                                    "sha256": weights.hex()}))
    return entry.parent


def test_a_sweep_is_kept_compact_and_reused_under_the_same_overrides_only(tmp_path):
    teachers = store(tmp_path)
    record = bench_record.Record(tmp_path / "docs" / "table.json", ROOT)
    runs = record.add("transfer/kd/grid", OVERRIDES, [result(0.5, 0.8), result(1.0, 0.85)],
                      12.5, ["distill.kd.alpha"], teachers)
    assert runs[1] == {"config": {"seed": 0, "distill": {"kd": {"alpha": 1.0}}},
                       "student": {"metrics": {"val/acc": 0.85, "test/acc": 0.84},
                                   "params": 100},
                       "teacher": {"metrics": {"test/acc": 0.9}, "params": 1000,
                                   "key": "cnn-abc"}}
    again = bench_record.Record(tmp_path / "docs" / "table.json", ROOT)  # another session
    # the teacher store's place is not part of the key
    moved = [*OVERRIDES[:-1], "paths.teacher_store=/elsewhere"]
    assert again.recorded("transfer/kd/grid", moved, 2) == runs
    assert again.recorded("transfer/kd/grid", moved, 3) is None  # fewer runs than asked for
    assert again.recorded("transfer/kd/seeds", moved, 2) is None  # not recorded
    with pytest.raises(SystemExit, match="recorded with other overrides"):
        again.recorded("transfer/kd/grid", ["distill=kd", "distill.kd.alpha=0.5,2.0",
                                            "seed=0"], 2)


def test_runs_with_another_teacher_are_refused(tmp_path):
    teachers = store(tmp_path)
    record = bench_record.Record(tmp_path / "table.json", ROOT)
    record.add("a", OVERRIDES, [result(0.5, 0.8)], 1.0, [], teachers)
    (teachers / "cnn-abc" / "teacher.json").write_text(json.dumps({"sha256": "retrained"}))
    with pytest.raises(SystemExit, match="rows made with two teachers would not compare"):
        record.add("b", OVERRIDES, [result(0.5, 0.8)], 1.0, [], teachers)
    assert "b" not in json.loads((tmp_path / "table.json").read_text())["sweeps"]


def test_the_records_teacher_goes_into_an_empty_store(tmp_path):
    teachers = store(tmp_path, b"the weights")
    record = bench_record.Record(tmp_path / "docs" / "table.json", ROOT)
    record.add("a", OVERRIDES, [result(0.5, 0.8)], 1.0, [], teachers)
    fresh = tmp_path / "fresh" / "teachers"  # a new machine: no teacher yet
    bench_record.Record(tmp_path / "docs" / "table.json", ROOT).seed_store(fresh)
    assert (fresh / "cnn-abc" / "teacher.pt").read_bytes() == b"the weights"
    assert json.loads((fresh / "cnn-abc" / "teacher.json").read_text())["sha256"] == \
        b"the weights".hex()
