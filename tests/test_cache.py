"""The teacher-output cache: exact, reused across runs, refused when it would be wrong."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from kdlab.engine.cache import TeacherCache, cache_key, compute_outputs, prepare_cache
from kdlab.engine.taps import Taps
from kdlab.models import CNN
from kdlab.modes.build import cache_options
from kdlab.train import run
from kdlab.util.errors import KdlabError


def _data(x: torch.Tensor) -> SimpleNamespace:
    """What prepare_cache reads of a datamodule without augmentation: its training split."""
    return SimpleNamespace(x_train=x, augmented=False)


def _teacher() -> CNN:
    torch.manual_seed(0)
    return CNN([1, 28, 28], 10, channels=[4, 8], hidden=16).eval()


def test_cached_logits_and_features_equal_live_ones():
    teacher, x = _teacher(), torch.randn(300, 1, 28, 28)
    taps = Taps(teacher, ["stages.0"])
    logits, features = compute_outputs(teacher, taps, x, batch_size=64)
    cache = TeacherCache(logits, features)
    index = torch.tensor([5, 299, 0, 5])
    with torch.no_grad():
        live = teacher(x[index])
    live_features = taps.pop()["stages.0"]
    out = cache.lookup(index)
    torch.testing.assert_close(out.logits, live, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.features["stages.0"], live_features, rtol=1e-5, atol=1e-5)
    # log-probabilities come from a per-temperature table, equal to the softmax of the logits
    torch.testing.assert_close(out.log_probs(4.0), torch.log_softmax(live / 4.0, 1),
                               rtol=1e-5, atol=1e-5)
    half = TeacherCache(logits.half(), {}).lookup(index)
    torch.testing.assert_close(half.logits, live, rtol=1e-3, atol=1e-3)


def test_key_changes_with_teacher_weights_data_taps_and_dtype():
    teacher, x = _teacher(), torch.randn(10, 1, 28, 28)
    key = cache_key(teacher, x, [], "float16")
    assert cache_key(teacher, x.clone(), [], "float16") == key
    assert cache_key(teacher, x + 1, [], "float16") != key
    assert cache_key(teacher, x, ["stages.0"], "float16") != key
    assert cache_key(teacher, x, [], "float32") != key
    with torch.no_grad():
        teacher.classifier[1].bias[0] += 1
    assert cache_key(teacher, x, [], "float16") != key


KD = ["distill=kd", "baseline=false", "trainer.max_epochs=1", "steps_per_call=1"]


def test_a_cached_run_ends_where_a_live_run_does_and_the_cache_is_reused(
        fast_cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdlab.engine.cache")
    live = run(fast_cfg(*KD, "teacher_cache.enabled=false", f"paths.output_dir={tmp_path}/live"))
    assert "Teacher cache: off" in caplog.text
    caplog.clear()
    cached = run(fast_cfg(*KD, "teacher_cache.dtype=float32"))
    assert live["student"]["last_ckpt"] != cached["student"]["last_ckpt"]  # two runs' files
    assert "computed the teacher's outputs" in caplog.text
    files = list((tmp_path / "teachers" / "cache").glob("*.pt"))
    assert len(files) == 1
    a = torch.load(live["student"]["last_ckpt"], weights_only=True)["state_dict"]
    b = torch.load(cached["student"]["last_ckpt"], weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    caplog.clear()
    again = run(fast_cfg(*KD, "teacher_cache.dtype=float32", "seed=1"))
    assert f"reusing {files[0]}" in caplog.text
    assert again["student"]["metrics"]["test/acc"] > 0


def test_augmentation_without_stored_views_runs_the_teacher_live_or_fails_when_required(
        fast_cfg, caplog, capsys):
    caplog.set_level(logging.INFO, logger="kdlab.engine.cache")
    run(fast_cfg(*KD, "data.augment=true", "teacher_cache.views=0",
                 "trainer.limit_train_batches=4"))
    assert "Teacher cache: off" in caplog.text and "teacher_cache.views=0" in caplog.text
    with pytest.raises(SystemExit) as exit_info:
        run(fast_cfg(*KD, "data.augment=true", "teacher_cache.views=0",
                     "teacher_cache.enabled=true"))
    assert exit_info.value.code == 2
    assert "teacher_cache.enabled=true but data.augment gives the student a new random view" \
        in capsys.readouterr().err


def test_fast_dev_run_runs_the_teacher_live_instead_of_over_the_whole_split(fast_cfg, tmp_path,
                                                                          caplog):
    caplog.set_level(logging.INFO, logger="kdlab.engine.cache")
    run(fast_cfg(*KD, "trainer.fast_dev_run=true"))
    assert "Teacher cache: off under trainer.fast_dev_run" in caplog.text
    assert not list((tmp_path / "teachers").glob("cache/*.pt"))


def test_features_too_large_for_the_budget_run_live(fast_cfg, tmp_path):
    cfg = fast_cfg("teacher_cache.max_mb=0.001")
    teacher, x = _teacher(), torch.randn(50, 1, 28, 28)
    taps = Taps(teacher, ["stages.0"])
    assert prepare_cache(cache_options(cfg), teacher, taps, _data(x), False) is None
    forced = cache_options(fast_cfg("teacher_cache.max_mb=0.0001", "teacher_cache.enabled=true"))
    with pytest.raises(KdlabError, match="teacher_cache.max_mb"):
        prepare_cache(forced, teacher, Taps(teacher, []), _data(x), False)


def test_a_corrupted_cache_file_is_reported_and_rebuilt(fast_cfg, caplog):
    cfg = fast_cfg()
    teacher, x = _teacher(), torch.randn(50, 1, 28, 28)
    first = prepare_cache(cache_options(cfg), teacher, Taps(teacher, []), _data(x), False)
    first.path.write_bytes(first.path.read_bytes()[:100])  # truncated
    caplog.set_level(logging.INFO, logger="kdlab.engine.cache")
    again = prepare_cache(cache_options(cfg), teacher, Taps(teacher, []), _data(x), False)
    assert "(truncated)" in caplog.text and str(first.path) in caplog.text
    torch.testing.assert_close(again.logits.float(), first.logits.float())
    with pytest.raises(KdlabError, match="teacher_cache.dtype=int8"):
        prepare_cache(cache_options(fast_cfg("teacher_cache.dtype=int8")), teacher, None, _data(x),
                      False)


def test_a_cache_file_with_flipped_bytes_is_caught_by_its_hash(fast_cfg, caplog):
    cfg = fast_cfg()
    teacher, x = _teacher(), torch.randn(50, 1, 28, 28)
    first = prepare_cache(cache_options(cfg), teacher, Taps(teacher, []), _data(x), False)
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["bytes"] == first.path.stat().st_size
    data = bytearray(first.path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte of the stored logits changed
    first.path.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger="kdlab.engine.cache")
    again = prepare_cache(cache_options(cfg), teacher, Taps(teacher, []), _data(x), False)
    assert f"{first.path} has a SHA-256 that differs" in caplog.text
    assert "building it again" in caplog.text
    assert json.loads(first.path.with_suffix(".json").read_text()) == meta  # rebuilt whole
    torch.testing.assert_close(again.logits.float(), first.logits.float())
