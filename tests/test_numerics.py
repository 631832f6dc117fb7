"""Guarded numerics: a non-finite loss stops the run at that batch with one line naming the
term, the step and the last good checkpoint (left intact), or skips the batch when asked."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kdlab.modes.build import loop_options
from kdlab.strategies.base import Strategy
from kdlab.train import run
from kdlab.util.errors import KdlabError


class NaNAfter(Strategy):
    """A test strategy: a finite ``probe`` term for ``after`` batches, then NaN."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, student, teacher, batch):
        self.calls += 1
        probe = 0.0 * student.logits.sum()
        return {"probe": probe + (float("nan") if self.calls > self.after else 0.0)}


def _nan_cfg(fast_cfg, *extra):
    # 4 batches per epoch, 2 epochs; batch 6 is the 2nd batch of the 2nd epoch
    return fast_cfg("distill=none", "+distill.nan._target_=tests.test_numerics.NaNAfter",
                    "+distill.nan.after=5", "baseline=false", "steps_per_call=1",
                    "trainer.limit_train_batches=4", *extra)


class Diverge(Strategy):
    """A test strategy whose term is NaN and poisons the gradients: the weights diverge."""

    def forward(self, student, teacher, batch):
        return {"probe": float("nan") * student.logits.sum()}


def test_a_nan_loss_stops_the_run_naming_term_step_and_checkpoint(fast_cfg, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(_nan_cfg(fast_cfg))
    assert exit_info.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("kdlab: error")]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert "non-finite loss at epoch 1, optimizer step 5, batch 6: probe = nan" in line
    assert f"the last good checkpoint is {last} (left as it was)" in line
    assert "nonfinite_loss=skip" in line
    assert not (tmp_path / "run" / "results.json").exists()
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0  # written at the end of the first epoch, not after the NaN
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values()
               if v.is_floating_point())


def test_skip_drops_the_bad_batches_and_counts_them(fast_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        results = run(_nan_cfg(fast_cfg, "nonfinite_loss=skip"))
    # counted in the final table and flagged last: 3 of the 8 batches
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| student (skipped 3 batches, 37.5%) |" in table
    assert results["student"]["metrics"]["skipped_fraction"] == pytest.approx(3 / 8)
    assert caplog.records[-1].getMessage().startswith(
        "kdlab: warning: stage student skipped 37.5% of its training batches")
    assert results["student"]["metrics"]["skipped_batches"] == 3  # batches 6, 7, 8
    ckpt = torch.load(results["student"]["last_ckpt"], weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
               if v.is_floating_point())
    assert json.loads((tmp_path / "run" / "results.json").read_text())["student"]


def test_nonfinite_loss_choice_is_checked(fast_cfg):
    with pytest.raises(KdlabError, match="nonfinite_loss=ignore must be one of stop, skip, off"):
        loop_options(fast_cfg("nonfinite_loss=ignore"))


def test_off_writes_null_for_what_diverged_and_says_why(fast_cfg, tmp_path, caplog):
    cfg = fast_cfg("distill=none", "+distill.nan._target_=tests.test_numerics.Diverge",
                   "baseline=false", "nonfinite_loss=off", "trainer.limit_train_batches=4")
    with caplog.at_level(logging.WARNING):  # NaN gradients from the first batch
        run(cfg)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    results = json.loads((tmp_path / "run" / "results.json").read_text(),
                         parse_constant=refuse)  # a strict reader: no NaN anywhere
    keys = results["nonfinite"]["keys"]
    assert "student.metrics.test/loss" in keys
    assert results["student"]["metrics"]["test/loss"] is None
    assert "JSON has no NaN, so they are written as null" in results["nonfinite"]["why"]
    assert "were not finite and are null in results.json" in caplog.text
