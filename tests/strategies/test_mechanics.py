"""Taps, connectors built from probed shapes, composition, and the pre-stage switch."""

import pytest
import torch
from torch import nn

from kdlab.cli import check_overrides
from kdlab.engine.module import DistillationModule
from kdlab.engine.taps import Taps
from kdlab.models import CNN, MLP
from kdlab.models.paths import resolve_paths
from kdlab.modes.build import build_strategy, strategy_name
from kdlab.strategies import KD, Batch, Composite, Outputs, Strategy
from kdlab.util.errors import KdlabError
from tests.conftest import make_cfg


class Hint(Strategy):
    """A minimal feature strategy for the tests: MSE between a 1×1-conv-projected student
    stage and the teacher stage (last pair), counting calls of its pre-stage."""

    def __init__(self, weight: float = 1.0, init_epochs: int = 0) -> None:
        super().__init__()
        self.student_layers, self.teacher_layers = "stages", "stages"
        self.weight, self.init_epochs = weight, init_epochs
        self.init_calls = 0

    def setup(self, student, teacher, num_train_samples):
        s, t = self.student_features(student)[-1], self.teacher_features(teacher)[-1]
        self.shapes = (tuple(s.shape), tuple(t.shape))
        self.connector = nn.Conv2d(s.shape[1], t.shape[1], 1)
        self.num_train_samples = num_train_samples

    def _mse(self, student, teacher):
        s = self.connector(self.student_features(student)[-1])
        t = self.teacher_features(teacher)[-1]
        return nn.functional.mse_loss(nn.functional.adaptive_avg_pool2d(s, t.shape[-2:]), t)

    def init_loss(self, student, teacher, batch):
        self.init_calls += 1
        return {"hint_init": self._mse(student, teacher)}

    def forward(self, student, teacher, batch):
        return {"hint": self.weight * self._mse(student, teacher)}


def _pair():
    torch.manual_seed(0)
    return CNN([1, 28, 28], 10, channels=[8, 16, 16], hidden=16), CNN([1, 28, 28], 10)


def test_resolve_paths_expands_aliases_and_lists_close_matches_for_bad_paths():
    model = CNN([1, 28, 28], 10)
    assert resolve_paths(model, "stages", "k") == ["stages.0", "stages.1"]
    assert resolve_paths(model, ["stages.1", "embedding"], "k") == ["stages.1", "embed"]
    with pytest.raises(KdlabError, match=r"distill.student_layers: 'stage.1' is not a module "
                                         r"of CNN \(did you mean stages.1.*aliases: stages"):
        resolve_paths(model, ["stage.1"], "distill.student_layers")
    with pytest.raises(KdlabError, match="'embedding' is not a module of Linear"):
        resolve_paths(nn.Linear(2, 2), "embedding", "k")


def test_taps_record_outputs_without_editing_the_model():
    model = MLP([1, 28, 28], 10, hidden=[32])
    taps = Taps(model, model.taps()["preact"] + model.taps()["stages"])
    x = torch.randn(3, 1, 28, 28)
    logits = model(x)
    features = taps.pop()
    pre, post = features["features.1"], features["features.2"]
    assert torch.equal(post, pre.clamp_min(0)) and (pre < 0).any()  # pre-ReLU kept intact
    assert torch.allclose(model.classifier(post), logits)
    taps.remove()
    model(x)
    assert taps.pop() == {}


def test_connectors_are_built_from_probed_shapes_train_and_are_checkpointed():
    student, teacher = _pair()
    hint = Hint()
    module = DistillationModule(student, 10, torch.optim.SGD, teacher=teacher, strategy=hint,
                                example_input=torch.zeros(2, 1, 28, 28), num_train_samples=77)
    assert hint.shapes == ((2, 16, 3, 3), (2, 64, 7, 7)) and hint.num_train_samples == 77
    params = {id(p) for p in module.trainable_parameters()}
    assert {id(p) for p in hint.connector.parameters()} <= params
    assert not params & {id(p) for p in teacher.parameters()}
    state = module.state_dict()
    assert "strategy.connector.weight" in state
    batch = (torch.randn(4, 1, 28, 28), torch.tensor([1, -1, 2, -1]), torch.arange(4))
    module.batch_loss(batch)[0].backward()
    assert hint.connector.weight.grad is not None and hint.connector.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_pre_stage_runs_init_loss_alone_for_init_epochs():
    student, teacher = _pair()
    hint = Hint(init_epochs=1)
    module = DistillationModule(student, 10, torch.optim.SGD, teacher=teacher, strategy=hint,
                                example_input=torch.zeros(2, 1, 28, 28))
    batch = (torch.randn(4, 1, 28, 28), torch.tensor([1, 0, 2, 3]), torch.arange(4))
    _, terms = module.batch_loss(batch)  # epoch 0: the pre-stage
    assert hint.init_calls == 1 and "hint_init" in terms and "ce" not in terms
    type(module).current_epoch = property(lambda self: 1)
    try:
        _, terms = module.batch_loss(batch)
    finally:
        del type(module).current_epoch
    assert hint.init_calls == 1 and {"ce", "hint"} <= set(terms)


def test_composite_sums_and_names_member_terms():
    student, teacher = _pair()
    combo = Composite(kd=KD(temperature=2.0, alpha=0.5), hint=Hint(weight=3.0))
    assert combo.ce_weight == 0.5
    module = DistillationModule(student, 10, torch.optim.SGD, teacher=teacher, strategy=combo,
                                example_input=torch.zeros(2, 1, 28, 28))
    x = torch.randn(4, 1, 28, 28)
    loss, terms = module.batch_loss((x, torch.tensor([1, 0, 2, 3]), torch.arange(4)))
    assert {"ce", "kd", "hint"} == set(terms)
    total = sum(float(terms[k]) for k in ("ce", "kd", "hint"))
    assert loss.item() == pytest.approx(total, rel=1e-5)
    terms = Composite(a=KD(), b=KD())(Outputs(torch.zeros(2, 3)), Outputs(torch.ones(2, 3)),
                                      Batch(x, torch.zeros(2), torch.arange(2)))
    assert set(terms) == {"a_kd", "b_kd"}


def test_distill_lists_compose_through_hydra_itself(tmp_path):
    cfg = make_cfg(tmp_path, ["distill=[kd,at]", "distill.at.beta=500", "seed=2"])
    assert list(cfg.distill) == ["kd", "at"] and cfg.distill.at.beta == 500
    assert cfg.distill.kd.temperature == 4.0 and strategy_name(cfg) == "kd+at"
    strategy = build_strategy(cfg)
    assert strategy.names == ["kd", "at"] and strategy.ce_weight == pytest.approx(0.1)
    single = build_strategy(make_cfg(tmp_path, ["distill=kd"]))
    assert single.names == ["kd"] and strategy_name(make_cfg(tmp_path, ["distill=none"])) == "none"
    with pytest.raises(KdlabError, match=r"distill=kdd is not an option .*did you mean kd\b"):
        check_overrides(["distill=[kd,kdd]"])
    check_overrides(["-m", "distill=[kd,at],[kd,fitnets]"])


def test_a_members_error_names_its_full_key(tmp_path):
    cfg = make_cfg(tmp_path, ["distill=[kd,at]", "distill.kd.temperature=0"])
    with pytest.raises(KdlabError, match=r"^distill\.kd\.temperature=0 must be > 0"):
        build_strategy(cfg)
    cfg = make_cfg(tmp_path, ["distill=[kd,at]", "+distill.at.gamma=2"])
    with pytest.raises(KdlabError, match=r"distill\.at: .*unexpected keyword argument 'gamma'"):
        build_strategy(cfg)


@pytest.mark.parametrize("distill", ["kd", "[kd,at]"])
def test_a_short_run_learns(distill, tmp_path):
    from tests.strategies.harness import assert_learned, run_short

    results = run_short(distill, tmp_path)
    assert_learned(results)
    assert results["teacher"]["params"] == 421738
    assert results["strategy"] == distill.strip("[]").replace(",", "+")


@pytest.mark.slow  # 40 s: a three-job multirun; single strategy-list runs are in the default suite
def test_a_multirun_over_strategy_lists_logs_every_member_term(tmp_path):
    import csv
    import json
    import subprocess
    import sys

    args = [sys.executable, "-m", "kdlab.train", "-m", "distill=[kd,at],[kd,fitnets]",
            "distill.kd.temperature=2",
            f"paths.log_dir={tmp_path}", "baseline=false", "teacher.train.max_epochs=1",
            "trainer.max_epochs=1", "trainer.limit_train_batches=3", "steps_per_call=32",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
            "latency.repeats=1", "data.batch_size=16", "data.eval_batch_size=64"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {}
    for path in tmp_path.glob("multiruns/*/*/results.json"):
        results = json.loads(path.read_text())
        runs[results["strategy"]] = (results, path.parent)
    assert set(runs) == {"kd+at", "kd+fitnets"}
    for name, (results, folder) in runs.items():
        assert results["config"]["distill"]["kd"]["temperature"] == 2
        (metrics_path,) = folder.glob("logs/metrics.csv")
        header = set(next(csv.reader(metrics_path.open())))
        second = name.split("+")[1]
        assert {"train/ce_epoch", "train/kd_epoch", f"train/{second}_epoch",
                "train/loss_epoch"} <= header


def test_bad_tap_path_in_a_run_fails_naming_the_key_and_close_matches(tmp_path, capsys):
    from tests.strategies.harness import run_short

    with pytest.raises(SystemExit) as exit_info:
        run_short("at", tmp_path, "distill.at.student_layers=[stages.9]")
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kdlab: error: distill.at.student_layers: 'stages.9' is not a module "
                           "of CNN (did you mean stages.")
    assert "aliases: stages, preact, embedding" in line
    assert not list(tmp_path.rglob("results.json"))
