"""Every strategy of ``conf/distill/`` trains end to end (``fast_dev_run``: one batch of each
stage) with a CNN → CNN pair, a CNN teacher → ViT student and a ViT teacher → CNN student; where
a method cannot apply to a pair, the run fails at set-up with a message saying why. The default
suite runs the ViT student of every method that reads features; the logit-only methods on it,
the CNN pair (which every strategy's own tests in ``tests/strategies/`` already train) and the
ViT teacher run with ``-m slow``.

New strategy configs are picked up automatically: a method that neither runs nor is listed in
:data:`CANNOT` with the reason it gives fails here."""

from __future__ import annotations

import re

import pytest

from kdlab.train import run
from kdlab.util.config import group_options
from tests.conftest import make_cfg

COMMON = ["trainer.fast_dev_run=true", "trainer.enable_progress_bar=false", "logger=none",
          "baseline=false", "latency.repeats=1", "latency.batch_size=2", "data.batch_size=16",
          "data.eval_batch_size=64", "data.num_labels=null"]
CNN_TEACHER = ["teacher=cnn", "teacher.model.channels=[16,32]", "teacher.model.hidden=32"]
CNN_STUDENT = ["student=cnn", "student.model.channels=[8,16]", "student.model.hidden=16"]
VIT_TEACHER = ["teacher=zoo", "teacher.model.name=vit_nano"]
VIT_STUDENT = ["student=zoo", "student.model.name=vit_nano"]
PAIRS = {
    "cnn>cnn": [*CNN_TEACHER, *CNN_STUDENT],
    "cnn>vit": [*CNN_TEACHER, *VIT_STUDENT],
    "vit>cnn": [*VIT_TEACHER, *CNN_STUDENT],
}
#: (strategy, pair) → what the set-up error must say, for the pairs a method does not apply to
CANNOT = {
    ("deit", "cnn>cnn"): "has none: use a ViT built with a distillation token",
    ("deit", "vit>cnn"): "has none: use a ViT built with a distillation token",
    ("catkd", "cnn>vit"): "class-map methods need it to read the final feature map",
    ("catkd", "vit>cnn"): "class-map methods need it to read the final feature map",
    ("sdd", "cnn>vit"): "class-map methods need it to read the final feature map",
    ("sdd", "vit>cnn"): "class-map methods need it to read the final feature map",
    ("simkd", "cnn>vit"): "class-map methods need it to read the final feature map",
    ("simkd", "vit>cnn"): "class-map methods need it to read the final feature map",
}
#: extra overrides a method needs on a pair: DeiT reads the distillation token's head; the
#: class-map methods need the classifier on the last map (no hidden layer)
FLAT = ["teacher.model.hidden=0", "student.model.hidden=0"]
NEEDS = {("deit", "cnn>vit"): ["student.model.name=vit_nano_distilled"],
         ("catkd", "cnn>cnn"): FLAT, ("sdd", "cnn>cnn"): FLAT,
         ("catkd", "cnn>vit"): FLAT[:1], ("sdd", "cnn>vit"): FLAT[:1],
         ("catkd", "vit>cnn"): FLAT[1:], ("sdd", "vit>cnn"): FLAT[1:],
         ("simkd", "cnn>cnn"): FLAT, ("simkd", "cnn>vit"): FLAT[:1],
         ("simkd", "vit>cnn"): FLAT[1:]}


#: strategies that read logits only: on a ViT they run the code they run on a CNN, so their ViT
#: runs are in the slow set (checked below, so the list cannot go stale silently)
LOGITS_ONLY = {"none", "label_smoothing", "pseudo", "kd", "dkd", "dist", "lskd", "nkd", "wttm",
               "ctkd", "reverse_kl", "gkd", "skew_kl", "uld"}


def _cases() -> list:
    cases = []
    for distill in group_options("distill"):
        for pair in ("cnn>vit", "cnn>cnn", "vit>cnn"):
            slow = pair != "cnn>vit" or distill in LOGITS_ONLY
            cases.append(pytest.param(distill, pair, id=f"{distill}-{pair}",
                                      marks=[pytest.mark.slow] if slow else []))
    return cases


@pytest.mark.parametrize("distill", sorted(LOGITS_ONLY - {"none"}))
def test_the_logit_only_list_reads_no_layers(distill: str, tmp_path) -> None:
    from kdlab.modes.build import build_strategy

    strategy = build_strategy(make_cfg(tmp_path, [f"distill={distill}"]))
    for member in strategy.members.values():
        assert not member.student_layers and not member.teacher_layers, distill
        assert member.views == 1 and not member.replaces_head, distill


@pytest.mark.parametrize(("distill", "pair"), _cases())
def test_fast_dev_run(distill: str, pair: str, tmp_path, capsys) -> None:
    cfg = make_cfg(tmp_path, [f"distill={distill}", *COMMON, *PAIRS[pair],
                              *NEEDS.get((distill, pair), [])])
    if (distill, pair) in CANNOT:
        with pytest.raises(SystemExit):  # kdlab-train's exit on a KdlabError, message on stderr
            run(cfg)
        assert re.search(re.escape(CANNOT[distill, pair]), capsys.readouterr().err)
        return
    results = run(cfg)
    assert 0 <= results["student"]["metrics"]["test/acc"] <= 1
    assert ("teacher" in results) == (distill not in ("none", "label_smoothing"))
