"""The no-teacher baseline is trained once per identity and reused by the other jobs of a sweep
(kdlab/modes/baseline.py); what defines it changes its key, what it never reads does not."""

from __future__ import annotations

import torch

from kdlab.modes.baseline import baseline_identity
from kdlab.modes.build import build_datamodule
from kdlab.modes.teacher import identity_key


def _key(cfg) -> str:
    return identity_key(baseline_identity(cfg, build_datamodule(cfg, transfer=False)), "b")


def test_the_key_holds_what_defines_the_baseline_only(fast_cfg, tmp_path):
    base = _key(fast_cfg("distill=kd"))
    # what a baseline never reads: the strategy, the teacher, compression, where files go
    for same in (["distill=dkd"], ["distill=[kd,at]", "distill.kd.temperature=8"],
                 ["teacher.train.max_epochs=3"], ["compress=prune"],
                 [f"paths.output_dir={tmp_path}/elsewhere"], ["student.init_from_teacher=true"]):
        assert _key(fast_cfg("distill=kd", *same)) == base, same
    # what it trains with: seed, recipe, epochs, batch size, data, student, Trainer settings
    for other in (["seed=1"], ["optimizer.lr=0.02"], ["trainer.max_epochs=3"],
                  ["data.batch_size=64"], ["data.num_labels=200"], ["student.model.dropout=0.3"],
                  ["trainer.limit_train_batches=64"], ["data.val_size=500"]):
        assert _key(fast_cfg("distill=kd", *other)) != base, other


def test_a_sweep_over_strategies_trains_the_baseline_once(fast_cfg, tmp_path, caplog):
    import logging

    from kdlab.train import execute

    caplog.set_level(logging.INFO)
    first = execute(fast_cfg("distill=kd", f"paths.output_dir={tmp_path}/kd"))["baseline"]
    assert "reused" not in first and (tmp_path / "kd" / "baseline" / "checkpoints").is_dir()
    second = execute(fast_cfg("distill=dkd", f"paths.output_dir={tmp_path}/dkd"))["baseline"]
    assert second["reused"] is True and second["key"] == first["key"]
    assert second["metrics"] == first["metrics"]
    assert not (tmp_path / "dkd" / "baseline").exists()  # nothing trained again
    assert f"Baseline: reusing {first['key']} from the store" in caplog.text
    stored = torch.load(second["stored"], weights_only=True)
    assert stored["metrics"]["metrics"] == first["metrics"]
    third = execute(fast_cfg("distill=kd", "seed=1", f"paths.output_dir={tmp_path}/s1"))
    assert "reused" not in third["baseline"] and third["baseline"]["key"] != first["key"]


def test_baseline_store_false_trains_it_in_every_run(fast_cfg, tmp_path):
    from kdlab.train import execute

    for name in ("a", "b"):
        entry = execute(fast_cfg("distill=kd", "baseline_store=false",
                                 f"paths.output_dir={tmp_path}/{name}"))["baseline"]
        assert "reused" not in entry and "key" not in entry
        assert (tmp_path / name / "baseline" / "checkpoints").is_dir()
