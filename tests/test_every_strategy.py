"""Every strategy of ``conf/distill/`` trains end to end (``fast_dev_run``: one batch of each
stage) with a CNN → CNN pair, a CNN teacher → ViT student and a ViT teacher → CNN student; where
a method cannot apply to a pair, the run fails at set-up with a message saying why. The default
suite runs the ViT student; the CNN pair (which every strategy's own tests in
``tests/strategies/`` already train) and the ViT teacher run with ``-m slow``.

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


@pytest.mark.parametrize("pair", ["cnn>vit", *(pytest.param(pair, marks=pytest.mark.slow)
                                              for pair in ("cnn>cnn", "vit>cnn"))])
@pytest.mark.parametrize("distill", group_options("distill"))
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
