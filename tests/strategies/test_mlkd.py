"""MLKD: each level's loss against its formula written out, the confidence masks on hand-made
confidences, the temperatures summed as the authors' code sums them (quirks included), the
total, the strong view of the datamodule, a frozen teacher, the refusals (cache, packs, mixing,
disk data), option checks naming the key, and a short run end to end."""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kdlab.data.randaugment import StrongAugment
from kdlab.strategies.base import Batch, Outputs
from kdlab.strategies.composite import Composite
from kdlab.strategies.logits import KD
from kdlab.strategies.multilevel import (
    MLKD,
    batch_gram_gap,
    class_gram_gap,
    confidence_masks,
    instance_kl,
)
from kdlab.util.errors import KdlabError

S_WEAK = [[1.0, 2.0, 0.5, -0.3], [0.3, -1.0, 2.0, 0.1], [-0.5, 0.2, 0.4, 1.5],
          [0.0, 0.7, -0.2, 0.9]]
T_WEAK = [[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.0, 3.0], [1.0, -2.0, 0.5, 0.7],
          [4.0, 0.1, 0.2, 0.3]]
S_STRONG = [[0.2, 1.0, -0.5, 0.3], [1.3, 0.0, 1.0, -0.1], [0.5, 0.5, 0.4, 0.5],
            [-1.0, 0.7, 0.2, 0.1]]
T_STRONG = [[1.0, 1.5, 0.0, -0.5], [0.5, 0.0, 1.5, 2.0], [0.0, -1.0, 1.5, 0.2],
            [2.0, 0.3, 0.2, 1.3]]
TARGETS = [0, 3, -1, 0]  # the third sample is unlabelled
AUTHORS_T = [4.0, 3.0, 5.0, 2.0, 6.0]


# -- the formulas, written out -----------------------------------------------------------------
def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def _kl_rows(s: list[list[float]], t: list[list[float]], temp: float) -> list[float]:
    return [temp * temp * sum(a * math.log(a / b) for a, b in
                              zip(_softmax(tr, temp), _softmax(sr, temp)))
            for sr, tr in zip(s, t)]


def _gram(p: list[list[float]], rows: bool) -> list[list[float]]:
    """``P Pᵀ`` (rows) or ``Pᵀ P``."""
    if not rows:
        p = [list(col) for col in zip(*p)]
    return [[sum(a * b for a, b in zip(u, v)) for v in p] for u in p]


def _gap(s, t, temp: float, rows: bool) -> list[list[float]]:
    gs = _gram([_softmax(r, temp) for r in s], rows)
    gt = _gram([_softmax(r, temp) for r in t], rows)
    n = len(s) if rows else len(s[0])
    return [[(a - b) ** 2 / n for a, b in zip(ur, vr)] for ur, vr in zip(gt, gs)]


def _ce(rows: list[list[float]], targets: list[int]) -> float:
    losses = [-math.log(_softmax(r)[y]) for r, y in zip(rows, targets) if y >= 0]
    return statistics.fmean(losses)


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _outputs() -> tuple[Outputs, Outputs]:
    return (Outputs(_t(S_WEAK), strong=Outputs(_t(S_STRONG))),
            Outputs(_t(T_WEAK), strong=Outputs(_t(T_STRONG))))


def _batch() -> Batch:
    return Batch(torch.zeros(4, 1), torch.tensor(TARGETS), torch.arange(4))


# -- each level --------------------------------------------------------------------------------
@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_each_level_equals_its_formula(temp):
    s, t = _t(S_WEAK), _t(T_WEAK)
    assert instance_kl(s, t, temp).tolist() == pytest.approx(_kl_rows(S_WEAK, T_WEAK, temp),
                                                             rel=1e-12)
    batch = batch_gram_gap(s, t, temp)
    assert batch.shape == (4, 4)
    assert batch.flatten().tolist() == pytest.approx(
        sum(_gap(S_WEAK, T_WEAK, temp, rows=True), []), rel=1e-10, abs=1e-18)
    klass = class_gram_gap(s, t, temp)
    assert klass.shape == (4, 4)
    assert klass.flatten().tolist() == pytest.approx(
        sum(_gap(S_WEAK, T_WEAK, temp, rows=False), []), rel=1e-10, abs=1e-18)


def test_confidence_masks_on_hand_made_confidences():
    confidences = [0.9, 0.5, 0.7, 0.3, 0.6]
    rows = [[math.log(c)] + [math.log((1 - c) / 3)] * 3 for c in confidences]
    sample_mask, class_mask = confidence_masks(torch.tensor(rows), 50.0)
    # the median of the confidences is 0.6: the samples at or below it are kept
    assert sample_mask.tolist() == [False, True, False, True, True]
    sums = np.array([_softmax(r) for r in rows]).sum(axis=0)
    assert class_mask.tolist() == (sums <= np.percentile(sums, 50)).tolist()
    # an interpolated percentile, as numpy's
    sample_mask, _ = confidence_masks(torch.tensor(rows), 30.0)
    threshold = np.percentile(confidences, 30)
    assert sample_mask.tolist() == [c <= threshold for c in confidences]


# -- the whole loss, as the authors' code sums it ----------------------------------------------
def _expected(w: float = 0.9, ce_weight: float = 0.1, masking: str = "fraction",
              on_weak: tuple[float, ...] = (2.0, 6.0), relations: bool = False
              ) -> dict[str, float]:
    sample_mask, class_mask = (m.tolist() for m in
                               confidence_masks(_t(T_WEAK), 50.0))
    frac, class_frac = statistics.fmean(sample_mask), statistics.fmean(class_mask)

    def masked_instance(kl: list[float]) -> float:
        if masking == "fraction":
            return statistics.fmean(kl) * frac
        return sum(k for k, m in zip(kl, sample_mask) if m) / len(kl)

    def masked_matrix(gap: list[list[float]], mask: list[bool], fraction: float) -> float:
        if masking == "fraction":
            return sum(map(sum, gap)) * fraction
        return sum(v for row in gap for v, m in zip(row, mask) if m)

    def strong(temp: float) -> tuple[list, list]:
        return (S_WEAK, T_WEAK) if temp in on_weak else (S_STRONG, T_STRONG)

    out = {"kd_weak": 0.0, "kd_strong": 0.0, "class_weak": 0.0, "batch_weak": 0.0}
    if relations:
        out.update(class_strong=0.0, batch_strong=0.0)
    for temp in AUTHORS_T:
        out["kd_weak"] += w * masked_instance(_kl_rows(S_WEAK, T_WEAK, temp))
        out["kd_strong"] += w * statistics.fmean(_kl_rows(*strong(temp), temp))
        out["class_weak"] += w * masked_matrix(_gap(S_WEAK, T_WEAK, temp, False), class_mask,
                                               class_frac)
        out["batch_weak"] += w * masked_matrix(_gap(S_WEAK, T_WEAK, temp, True), sample_mask,
                                               frac)
        if relations:
            out["class_strong"] += w * sum(map(sum, _gap(*strong(temp), temp, False)))
            out["batch_strong"] += w * masked_matrix(_gap(S_STRONG, T_STRONG, temp, True),
                                                     sample_mask, frac)
    out["ce_strong"] = ce_weight * _ce(S_STRONG, TARGETS)
    return out


@pytest.mark.parametrize("options", [
    {},
    {"masking": "select"},
    {"strong_sum_on_weak": []},
    {"strong_relations": True, "kd_weight": 2.0, "ce_weight": 0.5},
])
def test_the_loss_sums_the_authors_temperatures_with_their_quirks(options):
    mlkd = MLKD(**options)
    assert mlkd.temperatures == AUTHORS_T and mlkd.views == 2
    terms = mlkd(*_outputs(), _batch())
    expected = _expected(w=options.get("kd_weight", 0.9), ce_weight=options.get("ce_weight", 0.1),
                         masking=options.get("masking", "fraction"),
                         on_weak=tuple(options.get("strong_sum_on_weak", (2.0, 6.0))),
                         relations=options.get("strong_relations", False))
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-9), name


def test_the_masks_scale_under_fraction_and_select_under_select():
    """The released code's mask on a batch-mean loss is a factor (the fraction kept)."""
    fraction = MLKD()(*_outputs(), _batch())["kd_weak"]
    unmasked = 0.9 * sum(instance_kl(_t(S_WEAK), _t(T_WEAK), t).mean()
                         for t in AUTHORS_T)
    kept = confidence_masks(_t(T_WEAK), 50.0)[0].double().mean()
    assert fraction.item() == pytest.approx((unmasked * kept).item(), rel=1e-12)
    assert MLKD(masking="select")(*_outputs(), _batch())["kd_weak"].item() != \
        pytest.approx(fraction.item(), rel=1e-6)


def test_total_is_the_weighted_sum_and_the_teacher_stays_frozen():
    """Through the training step's loss: ``ce_weight · (CE weak + CE strong)`` plus the terms;
    the teacher (with batch norm) is bit-identical after optimizer steps on both views."""
    torch.manual_seed(0)
    from kdlab.engine.module import DistillationModule

    def net(width: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4))

    teacher = net(8)
    teacher.train()
    for _ in range(2):  # non-trivial running statistics
        teacher(torch.randn(8, 1, 6, 6))
    before = copy.deepcopy(teacher.state_dict())
    module = DistillationModule(student=net(4), num_classes=4, teacher=teacher, strategy=MLKD(),
                                optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    module.train()
    optimizer = module.make_optimizer()
    x, strong = torch.randn(4, 1, 6, 6), torch.randn(4, 1, 6, 6)
    y = torch.tensor(TARGETS)
    for step in range(3):
        loss, terms = module.batch_loss((x, y, torch.arange(4), None, strong))
        if step == 0:
            assert set(terms) == {"ce", "ce_strong", "kd_weak", "kd_strong", "class_weak",
                                  "batch_weak"}
            assert loss.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)
            with torch.no_grad():
                s_w, s_s = module.student(x), module.student(strong)
                t_w, t_s = teacher(x), teacher(strong)
            ce = torch.nn.functional.cross_entropy
            labelled = y >= 0
            assert terms["ce"].item() == pytest.approx(
                0.1 * ce(s_w[labelled], y[labelled]).item(), rel=1e-5)
            assert terms["ce_strong"].item() == pytest.approx(
                0.1 * ce(s_s[labelled], y[labelled]).item(), rel=1e-5)
            direct = MLKD()(Outputs(s_w, strong=Outputs(s_s)), Outputs(t_w, strong=Outputs(t_s)),
                            Batch(x, y, torch.arange(4)))
            for name, value in direct.items():
                assert terms[name].item() == pytest.approx(value.item(), rel=1e-5), name
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not teacher.training
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_composite_passes_the_strong_view_through():
    composite = Composite(mlkd=MLKD(strong_ops=1), kd=KD())
    assert composite.views == 2 and composite.strong_augment == StrongAugment(num_ops=1)
    terms = composite(*_outputs(), _batch())
    assert {"kd_weak", "kd_strong", "kd", "ce_strong"} <= set(terms)
    assert composite.ce_weight == pytest.approx(0.1 * 0.1)
    assert Composite(kd=KD()).views == 1 and Composite(kd=KD()).strong_augment is None
    with pytest.raises(KdlabError, match="strong view"):
        MLKD()(Outputs(_t(S_WEAK)), Outputs(_t(T_WEAK)), _batch())


# -- the strong view ---------------------------------------------------------------------------
def _datamodule(**kwargs):
    from kdlab.data.synthetic import SyntheticDataModule

    data = SyntheticDataModule(input_shape=(3, 16, 16), num_classes=4, train_size=64,
                               test_size=16, val_size=16, batch_size=8, **kwargs)
    data.setup()
    data.trainer = SimpleNamespace(training=True, strategy=SimpleNamespace(
        root_device=torch.device("cpu")), global_rank=0, world_size=1)
    return data


def test_the_datamodule_adds_a_strong_view_that_differs_and_follows_the_seed():
    data = _datamodule(augment=True, shift=2)
    batch = next(iter(data.train_dataloader()))
    assert len(data.on_after_batch_transfer(batch, 0)) == 3  # no strong view unless asked
    data.strong_view = StrongAugment()
    torch.manual_seed(7)
    x, y, index, view, strong = data.on_after_batch_transfer(batch, 0)
    assert view is None and strong.shape == x.shape and torch.equal(y, batch[1])
    assert not torch.equal(strong, x)
    assert (strong - x).abs().flatten(1).amax(1).gt(0).all()  # every sample differs
    torch.manual_seed(7)
    again = data.on_after_batch_transfer(batch, 0)
    assert torch.equal(again[0], x) and torch.equal(again[4], strong)
    data.trainer.training = False  # evaluation batches: one view
    assert len(data.on_after_batch_transfer(batch, 0)) == 3
    assert "strong view" in data.describe()


# -- refusals ----------------------------------------------------------------------------------
def test_mixing_and_disk_data_are_refused_naming_the_key():
    from kdlab.engine.fit import check_views

    with pytest.raises(KdlabError, match=r"data\.mix=mixup"):
        check_views(SimpleNamespace(mix="mixup", strong_view=None), MLKD(), "student")
    with pytest.raises(KdlabError, match="in-memory"):
        check_views(SimpleNamespace(mix="none"), Composite(mlkd=MLKD()), "student")
    check_views(SimpleNamespace(mix="mixup"), KD(), "student")  # one view: not its business


def test_a_packed_sweep_runs_mlkd_jobs_alone(tmp_path):
    from kdlab.modes.pack import unpackable
    from tests.conftest import make_cfg

    reason = unpackable(make_cfg(tmp_path, ["distill=mlkd"]))
    assert reason is not None and "strong" in reason and "distill=mlkd" in reason
    assert unpackable(make_cfg(tmp_path, ["distill=[kd,mlkd]"])) is not None
    assert unpackable(make_cfg(tmp_path, ["distill=kd"])) is None


@pytest.mark.parametrize("kwargs, key", [
    ({"temperatures": []}, "temperatures"),
    ({"temperatures": [4.0, -1.0]}, "temperatures"),
    ({"kd_weight": -1.0}, "kd_weight"),
    ({"ce_weight": float("nan")}, "ce_weight"),
    ({"percentile": 101.0}, "percentile"),
    ({"masking": "rows"}, "masking"),
    ({"strong_sum_on_weak": [7.0]}, "strong_sum_on_weak"),
    ({"strong_relations": "yes"}, "strong_relations"),
    ({"strong_ops": 1.5}, "strong_ops"),
    ({"cutout": -0.1}, "cutout"),
])
def test_bad_options_name_the_key(kwargs, key):
    with pytest.raises(KdlabError, match=rf"distill\.{key}[= ]"):
        MLKD(**kwargs)


def test_a_bad_config_key_fails_naming_it(tmp_path):
    from kdlab.modes.build import build_strategy
    from tests.conftest import make_cfg

    strategy = build_strategy(make_cfg(tmp_path, ["distill=mlkd"]))
    mlkd = strategy.members["mlkd"]
    assert mlkd.temperatures == AUTHORS_T and mlkd.kd_weight == 0.9 and mlkd.ce_weight == 0.1
    assert mlkd.masking == "fraction" and mlkd.strong_sum_on_weak == [2.0, 6.0]
    assert not mlkd.strong_relations and mlkd.strong_augment == StrongAugment(2, 0.5)
    with pytest.raises(KdlabError, match=r"distill\.mlkd\.masking="):
        build_strategy(make_cfg(tmp_path, ["distill=mlkd", "distill.mlkd.masking=rows"]))
    with pytest.raises(KdlabError, match=r"distill\.mlkd"):
        build_strategy(make_cfg(tmp_path, ["distill=mlkd", "+distill.mlkd.tempreature=3"]))


# -- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained_teacher(tmp_path_factory):
    """The harness pair's teacher architecture, untrained (the run only needs its outputs)."""
    from kdlab.modes.build import build_datamodule, build_model
    from tests.conftest import make_cfg
    from tests.strategies.harness import PAIR

    folder = tmp_path_factory.mktemp("mlkd-teacher")
    cfg = make_cfg(folder, PAIR)
    data = build_datamodule(cfg)
    data.setup()
    torch.manual_seed(0)
    path = folder / "teacher.pt"
    torch.save(build_model(cfg.teacher.model, data, "teacher.model").state_dict(), path)
    return path


def _run(tmp_path, teacher, *overrides):
    from kdlab.train import run
    from tests.conftest import make_cfg
    from tests.strategies.harness import PAIR

    return run(make_cfg(tmp_path, ["distill=mlkd", *PAIR, f"teacher.ckpt={teacher}",
                                   "trainer.limit_train_batches=6", "data.augment=true",
                                   *overrides]))


def test_a_short_run_logs_every_term_and_writes_results(tmp_path, untrained_teacher, caplog):
    caplog.set_level(logging.INFO)
    results = _run(tmp_path, untrained_teacher, "logger=csv")
    assert results["strategy"] == "mlkd"
    assert math.isfinite(results["student"]["metrics"]["test/acc"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["strategy"] == "mlkd"
    header = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    for term in ("ce", "ce_strong", "kd_weak", "kd_strong", "class_weak", "batch_weak"):
        assert f"train/{term}_epoch" in header, term
    assert "strong view per sample" in caplog.text


@pytest.mark.parametrize("enabled", ["true", "auto"])
def test_the_teacher_cache_is_refused_when_required_and_skipped_on_auto(
        tmp_path, untrained_teacher, enabled, caplog):
    from kdlab.engine.fit import build_module
    from kdlab.modes.build import build_datamodule, build_model, build_strategy
    from kdlab.modes.runner import stage_spec
    from tests.conftest import make_cfg
    from tests.strategies.harness import PAIR

    cfg = make_cfg(tmp_path, ["distill=mlkd", *PAIR, f"teacher_cache.enabled={enabled}"])
    data = build_datamodule(cfg)
    teacher = build_model(cfg.teacher.model, data, "teacher.model")
    teacher.load_state_dict(torch.load(untrained_teacher, weights_only=True))
    spec = stage_spec(cfg, "student", tmp_path / "run", build_model(cfg.student.model, data,
                                                                     "student.model"),
                      data, cfg.optimizer, cfg.get("scheduler"), teacher=teacher,
                      strategy=build_strategy(cfg))
    caplog.set_level(logging.INFO)
    if enabled == "true":
        with pytest.raises(KdlabError, match=r"teacher_cache\.enabled=true .*distill=mlkd"):
            build_module(spec)
    else:
        assert build_module(spec).teacher_cache is None
        assert "Teacher cache: off, the teacher runs every step (distill=mlkd" in caplog.text
