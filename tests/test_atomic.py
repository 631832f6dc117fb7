"""Damaged state is detected and named: a teacher store entry by size and hash (moved aside and
trained again), a last.ckpt before a resume (never used silently)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kdlab.modes.resume import resume_checkpoint, set_resuming
from kdlab.modes.teacher import get_teacher
from kdlab.util.errors import KdlabError
from kdlab.util.files import sha256


def _entry(tmp_path):
    (folder,) = [p for p in (tmp_path / "teachers").iterdir() if p.is_dir() and p.name != "cache"]
    return folder / "teacher.pt", json.loads((folder / "teacher.json").read_text())


def test_store_entry_records_size_and_hash(fast_cfg, tmp_path):
    get_teacher(fast_cfg(), tmp_path)
    weights, meta = _entry(tmp_path)
    assert meta["bytes"] == weights.stat().st_size and meta["sha256"] == sha256(weights)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_store_entry_is_named_moved_aside_and_retrained(fast_cfg, tmp_path, caplog,
                                                                  damage):
    first, _ = get_teacher(fast_cfg(), tmp_path)
    weights, _ = _entry(tmp_path)
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # same size, one byte changed inside the tensors
        data[-200] ^= 0xFF
    weights.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    second, info = get_teacher(fast_cfg(), tmp_path)
    assert info["source"] == "trained"
    assert f"Teacher: the stored file {weights} has" in caplog.text
    assert ("truncated" if damage == "truncate" else "corrupted") in caplog.text
    assert list(weights.parent.glob("teacher.pt.corrupt-*"))
    _, meta = _entry(tmp_path)
    assert meta["sha256"] == sha256(weights)  # the new entry is whole again
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 second.state_dict().values()))


def test_a_damaged_last_checkpoint_is_never_resumed_from(tmp_path):
    stage = tmp_path / "run"
    (stage / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, stage / "checkpoints" / "last.ckpt")
    set_resuming(True)
    try:
        assert resume_checkpoint(stage) == str(stage / "checkpoints" / "last.ckpt")
        last = stage / "checkpoints" / "last.ckpt"
        last.write_bytes(last.read_bytes()[:300])
        with pytest.raises(KdlabError, match=r"last.ckpt is truncated or corrupted .*delete it "
                                             r"to train that stage from its start"):
            resume_checkpoint(stage)
    finally:
        set_resuming(False)


def test_a_failed_json_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    """results.json and the sidecars go through a temporary file in the same folder and a
    rename: a write that fails (here the rename) leaves the old file and no temporary."""
    import os

    from kdlab.util.files import write_json

    path = tmp_path / "results.json"
    write_json(path, {"a": 1, "nan": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1, "nan": None}  # strict JSON

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text())["a"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
