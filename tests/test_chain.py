"""Chains: born-again generations and teacher-assistant distillation (kdlab/modes/chain.py)."""

from pathlib import Path

import pytest
import torch

from kdlab.modes import chain
from kdlab.train import run
from kdlab.util.errors import KdlabError

SMALL = ["student=mlp", "student.model.hidden=[16]", "trainer.max_epochs=1"]


@pytest.fixture
def spy(monkeypatch):
    """Records, for every stage, the teacher's weights before and after the stage and the
    trained network's final weights."""
    stages = {}
    original = chain.train_stage

    def fit_stage(cfg, stage, stage_dir, student, data, *args, teacher=None, **kwargs):
        before = ({k: v.clone() for k, v in teacher.state_dict().items()}
                  if teacher is not None else None)
        result = original(cfg, stage, stage_dir, student, data, *args, teacher=teacher,
                          **kwargs)
        stages[stage] = {
            "teacher_before": before,
            "teacher_after": teacher.state_dict() if teacher is not None else None,
            "trained": {k: v.clone() for k, v in student.state_dict().items()},
        }
        return result

    monkeypatch.setattr(chain, "train_stage", fit_stage)
    return stages


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_born_again_each_generation_learns_from_the_previous(fast_cfg, spy):
    results = run(fast_cfg(*SMALL, "mode=born_again", "mode.generations=2"))
    assert [e["stage"] for e in results["stages"]] == ["gen0", "gen1", "gen2"]
    assert results["student"]["stage"] == "gen2" and results["baseline"]["stage"] == "gen0"
    assert spy["gen0"]["teacher_before"] is None  # generation 0 learns from the labels
    for k in (1, 2):
        stage = spy[f"gen{k}"]
        # the teacher of generation k is generation k-1 as it ended, and stays frozen
        assert _same(stage["teacher_before"], spy[f"gen{k - 1}"]["trained"])
        assert _same(stage["teacher_before"], stage["teacher_after"])
        assert not _same(stage["trained"], spy[f"gen{k - 1}"]["trained"])
    assert [e["seed"] for e in results["stages"]] == [0, 1, 2]
    assert 0 <= results["ensemble"]["test/acc"] <= 1
    assert "teacher" not in results  # no pre-trained teacher in a born-again chain


def test_takd_chain_stores_assistants_and_compares_with_direct_kd(fast_cfg, spy, tmp_path):
    overrides = [*SMALL, "mode=takd",
                 "mode.assistants=[{_target_: kdlab.models.MLP, hidden: [32]}]"]
    first = run(fast_cfg(*overrides))
    assert [e["stage"] for e in first["stages"]] == [
        "teacher", "assistant0", "student", "direct", "baseline"]
    assert first["stages"][1]["source"]["source"] == "trained"
    # the student learns from the assistant as it ended; the assistant from the teacher
    assert _same(spy["student"]["teacher_before"], spy["assistant0"]["trained"])
    assert _same(spy["assistant0"]["teacher_before"], spy["direct"]["teacher_before"])
    trained = spy["assistant0"]["trained"]
    spy.clear()
    second = run(fast_cfg(*overrides, "mode.direct=false", "baseline=false",
                          f"paths.output_dir={tmp_path}/run2"))
    assert second["stages"][1]["source"]["source"] == "store" and "assistant0" not in spy
    # the stored assistant, not a new one, teaches the student of the second run
    assert _same(spy["student"]["teacher_before"], trained)
    assert [e["stage"] for e in second["stages"]] == ["teacher", "assistant0", "student"]


def test_assistant_identity_changes_with_what_makes_the_assistant(fast_cfg):
    from kdlab.modes.build import build_datamodule

    cfg = fast_cfg(*SMALL, "mode=takd")
    node = cfg.mode.assistants[0]
    data = build_datamodule(cfg, transfer=True)
    base = chain.assistant_identity(cfg, {"key": "t"}, node, 100, data)
    assert base == chain.assistant_identity(cfg, {"key": "t"}, node, 100, data)
    assert base != chain.assistant_identity(cfg, {"key": "t"}, node, 101, data)
    assert base != chain.assistant_identity(cfg, {"key": "other"}, node, 100, data)
    for override in ("distill.kd.temperature=2", "data.num_labels=200", "trainer.max_epochs=3",
                     "optimizer.lr=0.01"):
        other = fast_cfg(*SMALL, "mode=takd", override)
        assert base != chain.assistant_identity(other, {"key": "t"}, node, 100,
                                                build_datamodule(other, transfer=True)), override
    # the data's content is part of it: other images of the same shape are other data
    other_data = build_datamodule(fast_cfg(*SMALL, "mode=takd", "data.val_size=4000"),
                                  transfer=True)
    assert base["data"]["content"] == chain.assistant_identity(
        cfg, {"key": "t"}, node, 100, other_data)["data"]["content"]


@pytest.mark.parametrize("overrides, key", [
    (["mode=born_again", "distill=none"], "distill=none"),
    (["mode=born_again", "mode.generations=0"], "mode.generations=0"),
    (["mode=takd", "mode.assistants=[]"], "mode.assistants"),
    (["mode=takd", "mode.assistants=[{hidden: [8]}]"], "mode.assistants[0]"),
])
def test_bad_chain_configs_name_the_key(fast_cfg, overrides, key):
    from kdlab.modes import mode_runner

    cfg = fast_cfg(*SMALL, *overrides)
    with pytest.raises(KdlabError, match=key.replace("[", r"\[")):
        mode_runner(cfg.mode.name)(cfg, Path(cfg.paths.output_dir))


def test_unknown_mode_lists_the_modes():
    from kdlab.modes import mode_runner

    with pytest.raises(KdlabError, match="born_again.*offline"):
        mode_runner("nope")
