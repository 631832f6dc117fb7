"""Compression of the student: magnitude pruning (schedules, masks, checkpoints), dynamic int8,
the report, and whole runs with compress=prune."""

import copy
import json

import pytest
import torch
from torch import nn

from kdlab.engine.compression import (
    cubic_sparsity,
    global_magnitude_prune,
    make_permanent,
    prunable_weights,
    quantize_dynamic_int8,
    sparsity,
)
from kdlab.engine.teachers import load_into, load_weights
from kdlab.models import CNN
from kdlab.modes.compress import (
    Compression,
    compression_report,
    report_table,
    side_by_side_latency_ms,
)
from kdlab.train import run
from kdlab.util import measure as measure_mod
from kdlab.util.errors import KdlabError


def student() -> CNN:
    torch.manual_seed(0)
    return CNN([1, 28, 28], 10, channels=[8, 16], hidden=32, dropout=0.0)


def layer_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach().flatten() for _, m in prunable_weights(model)])


def test_global_pruning_hits_the_target_and_masks_are_nested():
    model = student()
    total = layer_weights(model).numel()
    global_magnitude_prune(model, 0.5)
    first = {n: m.weight_mask.clone() for n, m in prunable_weights(model)}
    assert int((torch.cat([m.weight_mask.flatten() for _, m in prunable_weights(model)]) == 0)
               .sum()) == round(0.5 * total)
    global_magnitude_prune(model, 0.8)
    for name, module in prunable_weights(model):  # what was pruned stays pruned
        assert bool((module.weight_mask <= first[name]).all())
    make_permanent(model)
    assert not any(hasattr(m, "weight_mask") for _, m in prunable_weights(model))
    assert int((layer_weights(model) == 0).sum()) == round(0.8 * total)
    assert sparsity(model) == pytest.approx(0.8, abs=1 / total)
    # global: the smallest magnitudes over all layers, not per layer
    kept = layer_weights(model)[layer_weights(model) != 0].abs()
    assert kept.min() > 0


def test_permanent_pruning_keeps_the_weights_memory_layout():
    # channels_last conv weights stay channels_last: a first conv with one input channel used
    # to come out of prune.remove in NCHW strides, and ran twice as slow on channels_last input
    model = student().to(memory_format=torch.channels_last)
    before = {n: m.weight.stride() for n, m in prunable_weights(model)}
    global_magnitude_prune(model, 0.9)
    make_permanent(model)
    assert {n: m.weight.stride() for n, m in prunable_weights(model)} == before
    assert sparsity(model) == pytest.approx(0.9, abs=1e-3)


def test_cubic_schedule():
    s = [cubic_sparsity(e, 0.9, 2, 8) for e in range(12)]
    assert s[:3] == [0.0, 0.0, 0.0]
    assert s[5] == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert s[3] == pytest.approx(0.9 * (1 - (5 / 6) ** 3))
    assert s[8:] == [0.9] * 4
    assert all(a <= b for a, b in zip(s, s[1:]))
    assert cubic_sparsity(0, 0.5, 0, 0) == 0.5  # one shot before the first epoch


def test_masks_hold_through_training():
    model = student()
    global_magnitude_prune(model, 0.9)
    zeros = layer_weights_effective(model) == 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(torch.randn(16, 1, 28, 28)),
                                           torch.randint(0, 10, (16,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert bool((layer_weights_effective(model)[zeros] == 0).all())
    make_permanent(model)
    assert bool((layer_weights(model)[zeros] == 0).all())


def layer_weights_effective(model: nn.Module) -> torch.Tensor:
    return torch.cat([(m.weight_orig * m.weight_mask).detach().flatten()
                      for _, m in prunable_weights(model)])


def test_int8_outputs_close_to_fp32_and_report():
    model = student().eval()
    global_magnitude_prune(model, 0.5)
    make_permanent(model)
    quantized, linear, convs = quantize_dynamic_int8(model)
    assert linear == ["embed.2", "classifier.1"] and convs == ["stages.0.0", "stages.1.0"]
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        ref, out = model(x), quantized(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9

    class Data:  # what the report reads: the test split's batches and the classes
        num_classes = 10
        x, y = torch.randn(300, 1, 28, 28), torch.randint(0, 10, (300,))

        def test_dataloader(self):
            return [(self.x[i:i + 128], self.y[i:i + 128]) for i in range(0, 300, 128)]

    latency = ((1, 28, 28), {"batch_size": 8, "repeats": 2}, False)
    report = compression_report(student(), model, "dynamic_int8", Data(), latency)
    dense, pruned, int8 = (report["models"][k] for k in ("dense", "pruned", "pruned_int8"))
    for entry in (dense, pruned, int8):
        assert 0 <= entry["test_acc"] <= 1 and entry["latency_ms"] > 0
    assert pruned["params"] == dense["params"] == int8["params"]
    assert pruned["nonzero_params"] < dense["nonzero_params"]
    assert int8["nonzero_params"] <= pruned["nonzero_params"]  # int8 keeps the zeros
    assert pruned["sparse_bytes"] < pruned["bytes"] and pruned["zipped_bytes"] < dense[
        "zipped_bytes"]
    assert int8["bytes"] < pruned["bytes"]
    assert report["quantized_modules"] == linear


class TinyData:
    """What the report reads: a test split of 4-feature samples in 2 classes."""

    num_classes = 2
    x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))

    def test_dataloader(self):
        return [(self.x, self.y)]


def test_report_counts_the_non_zero_weights_of_the_pruned_model():
    # hand-checked: 12 layer weights |1..8|, |0.5, 9, 10, 0|; pruning half (6) removes
    # 0, 0.5, 1, 2, 3, 4 and keeps 5..10; one bias of 4 is non-zero: 7 of 16 parameters
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2, 3, -4], [5, -6, 7, -8]]))
        model[0].bias.copy_(torch.tensor([0.0, 1.0]))
        model[2].weight.copy_(torch.tensor([[0.5, -9], [10, 0]]))
        model[2].bias.zero_()
    dense = copy.deepcopy(model)
    global_magnitude_prune(model, 0.5)
    make_permanent(model)
    latency = ((4,), {"batch_size": 2, "repeats": 2}, False)
    report = compression_report(dense, model, None, TinyData(), latency)
    pruned = report["models"]["pruned"]
    assert (pruned["params"], pruned["nonzero_params"]) == (16, 7)
    assert pruned["nonzero_params"] == sum(int((p != 0).sum()) for p in model.parameters())
    assert (report["models"]["dense"]["params"], report["models"]["dense"]["nonzero_params"]) \
        == (16, 12)
    # the printed report puts the non-zero count next to the parameter count
    table = report_table(report).splitlines()
    assert "| params | non-zero params |" in table[0]
    assert table[3].startswith("| pruned | ") and "| 16 | 7 |" in table[3]
    assert "| 16 | 12 |" in table[2]


class Recorder(nn.Module):
    """A fake network: each forward pass is logged and advances a fake clock by ``cost``
    plus a drift that grows with every call (a machine that slows down)."""

    def __init__(self, name: str, calls: list, clock: list, cost: float) -> None:
        super().__init__()
        self.name, self.calls, self.clock, self.cost = name, calls, clock, cost
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.clock[0] += self.cost + 0.01 * len(self.calls)
        self.calls.append(self.name)
        return x


def test_latencies_are_measured_side_by_side(monkeypatch):
    calls, clock = [], [0.0]
    monkeypatch.setattr(measure_mod, "perf_counter", lambda: clock[0])
    a, b = Recorder("a", calls, clock, 1.0), Recorder("b", calls, clock, 1.0)
    b.eval()
    ms = side_by_side_latency_ms({"a": a, "b": b}, (3,), batch_size=2, repeats=4, warmup=1)
    # one warm-up round, then four rounds that alternate their order
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    # under a steady drift, two identical networks measure the same (one after the other,
    # the second would measure slower)
    assert ms["a"] == pytest.approx(ms["b"])
    assert a.training and not b.training  # their modes are restored
    calls.clear()
    slow = Recorder("slow", calls, clock, 2.0)
    ms = side_by_side_latency_ms({"a": a, "slow": slow}, (3,), batch_size=2, repeats=6)
    assert ms["slow"] - ms["a"] == pytest.approx(1000.0)  # 1 s more per call, drift cancels


@pytest.mark.parametrize("override,key", [
    ("compress.prune.amount=1.0", "compress.prune.amount"),
    ("compress.prune.amount=-0.1", "compress.prune.amount"),
    ("compress.prune.schedule=sometimes", "compress.prune.schedule"),
    ("compress.prune.end_epoch=12", "compress.prune.end_epoch"),
    ("compress.prune.start_epoch=9", "compress.prune.end_epoch"),
    ("compress.quantize=fp16", "compress.quantize"),
])
def test_bad_config_names_the_key(fast_cfg, override, key):
    cfg = fast_cfg("compress=prune", "trainer.max_epochs=12", override)
    with pytest.raises(KdlabError, match=key.replace(".", r"\.")):
        Compression(cfg)


def test_bad_config_fails_before_training(fast_cfg, tmp_path, capsys):
    cfg = fast_cfg("compress=prune", "compress.prune.end_epoch=5")  # trainer.max_epochs=2
    with pytest.raises(SystemExit):
        run(cfg)
    assert "compress.prune.end_epoch=5 must be < trainer.max_epochs=2" in capsys.readouterr().err
    assert not (tmp_path / "teachers").exists()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One teacher store for the whole runs of this file (the teacher is trained once)."""
    return f"paths.teacher_store={tmp_path_factory.mktemp('teachers')}"


#: whole runs of 4 batches per epoch (limit_train_batches counts chunks of steps_per_call)
RUN = ("baseline=false", "steps_per_call=1")


def _sparse_checkpoint(path: str) -> float:
    state = load_weights(path)
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in state)
    model = load_into(student(), state, path)  # plain keys: loads into a dense CNN
    return sparsity(model)


def test_run_prune_during(fast_cfg, tmp_path, store):
    cfg = fast_cfg("compress=prune", "compress.prune.amount=0.8", "trainer.max_epochs=2",
                   "compress.prune.start_epoch=0", "compress.prune.end_epoch=1",
                   "trainer.limit_test_batches=null", *RUN, store)
    results = run(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    report = saved["compress"]
    assert [s["stage"] for s in saved["stages"]] == [
        "teacher", "student", "student_dense", "student_pruned_int8"]
    dense, pruned, int8 = (report["models"][k] for k in ("dense", "pruned", "pruned_int8"))
    assert pruned["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert dense["sparsity"] < 0.01 and int8["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert pruned["nonzero_params"] < 0.35 * dense["nonzero_params"]
    assert report["prune"]["history"] == [[1, 0.8]]
    assert report["quantized_modules"] == ["embed.2", "classifier.1"]
    # the best checkpoint is one at the final sparsity (epoch 1; the dense epoch 0 does not
    # compete and its file is gone), with plain sparse weights
    best = results["student"]["best_ckpt"]
    assert "epoch01" in best
    assert _sparse_checkpoint(best) == pytest.approx(0.8, abs=1e-4)
    assert len(list((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))) == 1
    # the stage's test (of the best checkpoint) and the report's CPU test agree
    assert results["student"]["metrics"]["test/acc"] == pytest.approx(pruned["test_acc"])
    header = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "prune/sparsity" in header.split(",")
    # the run's table shows the latencies measured side by side and the non-zero counts
    assert report["latency"]["method"].startswith("side by side")
    stages = {s["stage"]: s for s in saved["stages"]}
    for stage, name in (("student", "pruned"), ("student_dense", "dense"),
                        ("student_pruned_int8", "pruned_int8")):
        assert stages[stage]["latency_ms"] == report["models"][name]["latency_ms"]
        assert stages[stage]["nonzero_params"] == report["models"][name]["nonzero_params"]


def test_run_prune_after(fast_cfg, tmp_path, store):
    cfg = fast_cfg("compress=prune", "compress.prune.schedule=after", "trainer.max_epochs=1",
                   "compress.prune.amount=0.5", "compress.prune.finetune_epochs=1",
                   "compress.quantize=null", *RUN, store)
    results = run(cfg)
    report = results["compress"]
    assert set(report["models"]) == {"dense", "pruned"}
    assert [s["stage"] for s in results["stages"]] == ["teacher", "student", "student_pruned"]
    assert report["models"]["pruned"]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert report["models"]["dense"]["sparsity"] < 0.01
    assert _sparse_checkpoint(results["stages"][2]["best_ckpt"]) == pytest.approx(0.5, abs=1e-4)
