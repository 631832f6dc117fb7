"""A stop cannot tear a run's metrics.csv, and a resume reads one that Lightning's own writer
tore (a stop while it widened the header) instead of crashing."""

from __future__ import annotations

import csv
import logging
import os
import signal

import pytest

import kdlab.engine.csv_logger as csv_logger
from kdlab.engine.csv_logger import CSVLogger
from kdlab.engine.history import rows_to_keep
from kdlab.util.runtime import RunStopped, signals_deferred, stop_on_signals


def _rows(path):
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return header, list(reader)


def test_a_new_metric_rewrites_the_file_with_the_wider_header(tmp_path):
    logger = CSVLogger(tmp_path, name="", version="")
    logger.log_metrics({"train/loss": 1.0, "epoch": 0}, step=0)
    logger.save()
    logger.log_metrics({"val/acc": 0.5, "epoch": 0}, step=1)
    logger.log_metrics({"train/loss": 0.5, "epoch": 1}, step=2)
    logger.save()
    header, rows = _rows(tmp_path / "metrics.csv")
    assert header == ["epoch", "step", "train/loss", "val/acc"]
    assert rows == [["0", "0", "1.0", ""], ["0", "1", "", "0.5"], ["1", "2", "0.5", ""]]


def test_a_stop_during_the_rewrite_leaves_the_last_good_file_and_the_next_save_completes(
        tmp_path, monkeypatch):
    logger = CSVLogger(tmp_path, name="", version="")
    logger.log_metrics({"train/loss": 1.0, "epoch": 0}, step=0)
    logger.save()
    before = (tmp_path / "metrics.csv").read_bytes()

    def stopped(path, data):
        raise RunStopped(signal.SIGTERM)

    logger.log_metrics({"val/acc": 0.5, "epoch": 0}, step=1)
    with monkeypatch.context() as patch:
        patch.setattr(csv_logger, "write_atomic", stopped)
        with pytest.raises(RunStopped):
            logger.save()
    assert (tmp_path / "metrics.csv").read_bytes() == before
    logger.save()  # what Lightning's teardown does after the stop
    header, rows = _rows(tmp_path / "metrics.csv")
    assert header == ["epoch", "step", "train/loss", "val/acc"]
    assert all(len(r) == len(header) for r in rows) and len(rows) == 2


def test_a_signal_inside_a_deferred_block_stops_the_run_when_the_block_ends():
    done = []
    with pytest.raises(RunStopped) as stop, stop_on_signals():
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("the block went on")
        done.append("after the block")
    assert done == ["the block went on"] and stop.value.exit_code == 128 + signal.SIGTERM


def test_an_error_inside_a_deferred_block_is_not_hidden_by_the_stop():
    with pytest.raises(ValueError), stop_on_signals(), signals_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        raise ValueError("the block's own error")


def _torn(path):
    """A metrics.csv as Lightning's writer leaves it when a stop lands between recording a
    new metric and rewriting the header: two rows under the old header, then rows with one
    more value, then a row cut short."""
    path.write_text("epoch,step,train/loss\n"
                    "0,0,1.0\n"
                    "0,1,0.9\n"
                    "1,2,0.8,0.6\n"
                    "1,3\n")


def test_a_resume_keeps_the_whole_rows_of_a_torn_file_and_says_it_left_some_out(
        tmp_path, caplog):
    metrics = tmp_path / "metrics.csv"
    _torn(metrics)
    with caplog.at_level(logging.WARNING, logger="kdlab.engine.history"):
        keep = rows_to_keep(metrics, epoch=1, epoch_done=True)
    assert [(r["epoch"], r["step"]) for r in keep] == [("0", "0"), ("0", "1")]
    assert "metrics.csv: left out 2 torn row(s)" in caplog.text
    backup = tmp_path / "metrics.csv.before-resume"
    assert _rows(backup) == (["epoch", "step", "train/loss"],
                             [["0", "0", "1.0"], ["0", "1", "0.9"]])


def test_the_default_logger_is_the_one_that_cannot_tear(fast_cfg):
    from hydra.utils import instantiate

    cfg = fast_cfg()
    assert isinstance(instantiate(cfg.logger.csv), CSVLogger)
