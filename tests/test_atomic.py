"""Damaged state is detected and named: a teacher store entry by size and hash (moved aside and
trained again), a last.ckpt before a resume (never used silently)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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
    with pytest.raises(KdlabError, match=r"could not write .*results.json \(No space left on "
                                         r"device\): it needs 0.0 MB, .* MB free there; the "
                                         r"previous results.json is intact"):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text())["a"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _full_disk_at(monkeypatch, name: str, after: int) -> list[str]:
    """Make every write of a file called ``name`` after the first ``after`` ones fail half-way
    with ENOSPC, as a full disk does; returns the list of the paths written."""
    import errno

    from kdlab.util import files

    written: list[str] = []

    def write_all(handle, data):
        written.append(handle.name)
        if Path(handle.name).name.startswith(f".{name}.tmp") and \
                sum(Path(w).name.startswith(f".{name}.tmp") for w in written) > after:
            handle.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        handle.write(data)

    monkeypatch.setattr(files, "_write_all", write_all)
    return written


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(fast_cfg, tmp_path,
                                                                 monkeypatch):
    """Lightning's checkpoints go through the same atomic write (engine/checkpoint_io.py): the
    second last.ckpt fails half-way, the first stays whole, the run ends in one line naming
    the file and the space it needed, and no results.json is written."""
    from kdlab.train import execute

    cfg = fast_cfg("distill=none", "baseline=false", "trainer.max_epochs=3")
    written = _full_disk_at(monkeypatch, "last.ckpt", after=1)
    with pytest.raises(KdlabError, match=r"could not write .*last.ckpt \(No space left on "
                                         r"device\): it needs .* MB, .* MB free there; the "
                                         r"previous last.ckpt is intact"):
        execute(cfg)
    assert any(".last.ckpt.tmp" in w for w in written)
    (last,) = (tmp_path / "run").rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["epoch"] == 0  # the first epoch's, whole
    assert not list(last.parent.glob(".*tmp*"))
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_real_write_error_leaves_the_previous_file(tmp_path):
    """A write refused by the operating system (a file-size limit: EFBIG, as real as a full
    disk's ENOSPC) in a subprocess: the previous file is intact, nothing else is left."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        from kdlab.util.errors import KdlabError
        from kdlab.util.files import write_atomic
        path = Path({str(tmp_path / "big.bin")!r})
        write_atomic(path, b"old" * 1000)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            write_atomic(path, b"x" * 1_000_000)
        except KdlabError as e:
            print(e)
            sys.exit(2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "could not write" in proc.stdout and "big.bin (File too large)" in proc.stdout
    assert "it needs 1.0 MB" in proc.stdout and "previous big.bin is intact" in proc.stdout
    assert (tmp_path / "big.bin").read_bytes() == b"old" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]


def test_a_run_never_needs_the_temporary_folder(fast_cfg, tmp_path, monkeypatch):
    """Nothing of a run is staged in the system's temporary folder (Lightning's own writer
    stages checkpoints there): with an unusable one, the run still finishes."""
    import tempfile

    from kdlab.train import execute

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    results = execute(fast_cfg("distill=kd", "baseline=false"))
    assert (tmp_path / "run" / "results.json").exists() and results["student"]["metrics"]
