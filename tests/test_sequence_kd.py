"""Sequence-level KD (Kim & Rush 2016; kdlab/engine/sequences.py): the student's training windows
are the corpus's prompts continued by the teacher, generated once, stored under a key of what
defines them and reused; validation and test keep the corpus."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from kdlab.data.text import TextDataModule
from kdlab.engine.generate import sample
from kdlab.engine.sequences import teacher_windows
from kdlab.engine.spec import SequenceKDOptions
from kdlab.models.gpt import GPT
from kdlab.train import run
from kdlab.util.errors import KdlabError
from tests.conftest import make_cfg
from tests.text_corpus import text_overrides, write_corpus


def _teacher() -> GPT:
    torch.manual_seed(0)
    return GPT((12,), 30, dim=32, depth=2, heads=4).eval()


def _windows(n: int = 300) -> torch.Tensor:
    return torch.randint(0, 30, (n, 13), generator=torch.Generator().manual_seed(1))


def test_greedy_windows_are_the_corpus_prompts_continued_by_the_teacher():
    teacher, windows = _teacher(), _windows()
    out, info = teacher_windows(teacher, windows, SequenceKDOptions(prompt=4))
    assert out.shape == windows.shape and info["reused"] is False and info["path"] is None
    assert torch.equal(out[:, :4], windows[:, :4])
    assert torch.equal(out, sample(teacher, windows[:, :4], 9, temperature=0.0))
    assert not torch.equal(out[:, 4:], windows[:, 4:])


def test_sampled_windows_follow_their_seed():
    teacher, windows = _teacher(), _windows()
    options = SequenceKDOptions(prompt=4, temperature=1.0, seed=5)
    a, _ = teacher_windows(teacher, windows, options)
    b, _ = teacher_windows(teacher, windows, options)
    c, _ = teacher_windows(teacher, windows, dataclasses.replace(options, seed=6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :4], windows[:, :4])


def test_a_stored_entry_is_reused_and_another_generation_gets_its_own(tmp_path):
    teacher, windows = _teacher(), _windows()
    options = SequenceKDOptions(prompt=4, temperature=0.0, folder=tmp_path)
    first, info = teacher_windows(teacher, windows, options)
    assert info["reused"] is False and Path(info["path"]).is_file()
    again, info2 = teacher_windows(teacher, windows, options)
    assert info2["reused"] is True and info2["key"] == info["key"]
    assert torch.equal(first, again)
    for changed in (dataclasses.replace(options, temperature=0.7),
                    dataclasses.replace(options, prompt=5),
                    dataclasses.replace(options, top_k=3, temperature=1.0)):
        _, other = teacher_windows(teacher, windows, changed)
        assert other["reused"] is False and other["key"] != info["key"]
    _, other_data = teacher_windows(teacher, windows.flip(0), options)
    assert other_data["key"] != info["key"]
    with torch.no_grad():
        teacher.head.weight[0, 0] += 1e-3  # other teacher weights: another entry
    _, other_teacher = teacher_windows(teacher, windows, options)
    assert other_teacher["key"] != info["key"] and other_teacher["reused"] is False


def test_a_damaged_entry_is_moved_aside_and_generated_again(tmp_path):
    teacher, windows = _teacher(), _windows()
    options = SequenceKDOptions(prompt=4, folder=tmp_path)
    first, info = teacher_windows(teacher, windows, options)
    path = Path(info["path"])
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    again, info2 = teacher_windows(teacher, windows, options)
    assert info2["reused"] is False and torch.equal(first, again)
    assert list(tmp_path.glob("*.corrupt-*"))


def test_the_datamodule_trains_on_given_windows_and_keeps_its_evaluation_splits(tmp_path):
    data = TextDataModule(root=str(write_corpus(tmp_path)), context=16, val_fraction=0.15,
                          test_fraction=0.15)
    corpus = data.training_windows()
    assert torch.equal(corpus[:, :-1], data.x_train) and torch.equal(corpus[:, 1:], data.y_train)
    x_val, identity = data.x_val.clone(), data.identity()
    written = torch.randint(0, 256, corpus.shape)
    data.use_training_windows(written, "a test")
    assert torch.equal(data.x_train, written[:, :-1]) and torch.equal(data.y_train, written[:, 1:])
    assert torch.equal(data.x_val, x_val) and data.identity() == identity
    assert "training windows from a test" in data.describe()
    with pytest.raises(KdlabError, match="data.context"):
        data.use_training_windows(written[:, :-1], "a test")


def test_a_sequence_kd_run_trains_on_the_teachers_windows_and_a_second_run_reuses_them(
        tmp_path, caplog):
    common = [*text_overrides(tmp_path), "sequence_kd.enabled=true", "sequence_kd.prompt=6",
              "baseline=true"]
    with caplog.at_level(logging.INFO, logger="kdlab"):
        first = run(make_cfg(tmp_path, [*common, "distill=none"]))
    described = {line.split("]")[0][1:]: line for line in caplog.messages
                 if line.startswith("[") and "text (" in line}
    assert "training windows from the teacher" in described["student"]
    assert "training windows from" not in described["baseline"]  # the corpus
    info = first["sequence_kd"]
    assert info["reused"] is False and Path(info["path"]).is_file()
    assert Path(info["path"]).parent == tmp_path / "teachers" / "sequences"
    assert info["windows"] > 0 and first["student"]["metrics"]["test/bits_per_token"] > 0
    assert first["baseline"]["metrics"]["test/bits_per_token"] > 0  # on the corpus
    # another run (with the token-level strategy on top) reuses the stored teacher and windows
    second = run(make_cfg(tmp_path / "again", [*common, "distill=kd",
                                               f"paths.teacher_store={tmp_path}/teachers"]))
    assert second["sequence_kd"]["reused"] is True
    assert second["sequence_kd"]["key"] == info["key"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["sequence_kd.prompt=16"], "sequence_kd.prompt=16 must be below data.context=16"),
    (["sequence_kd.temperature=-0.5"], "sequence_kd.temperature=-0.5"),
    (["sequence_kd.top_k=0"], "sequence_kd.top_k=0"),
    (["sequence_kd.enabled=yes"], "sequence_kd.enabled='yes' must be true or false"),
    (["mode=mutual"], "sequence_kd.enabled=true is an option of mode=offline"),
])
def test_bad_sequence_kd_options_fail_naming_the_key(overrides, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(make_cfg(tmp_path, [*text_overrides(tmp_path), "sequence_kd.enabled=true",
                                "sequence_kd.prompt=4", *overrides]))
    assert message in capsys.readouterr().err
