"""GPU-first defaults, decided on the CPU: ``compile: auto`` and ``trainer.precision=auto``
(kdlab/engine/speed.py, kdlab/modes/speed.py). The speed itself is measured in
scripts/bench_gpu.py, never in a test."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdlab.engine.speed import auto_compile, probe_precision
from kdlab.evaluate import evaluate
from kdlab.modes.build import compile_options
from kdlab.modes.checks import check_values
from kdlab.train import run
from kdlab.util.errors import KdlabError
from tests.conftest import make_cfg


def test_auto_compiles_with_cuda_graphs_on_one_gpu_when_shapes_are_static():
    options, lines = auto_compile("auto", "auto", "auto", "cuda", distributed=False,
                                  dynamic=None)
    assert (options.student, options.teacher, options.mode) == (True, True, "reduce-overhead")
    assert any("reduce-overhead" in line for line in lines)


@pytest.mark.parametrize(("distributed", "dynamic", "said"), [
    (False, "data X is read batch by batch", "data X is read batch by batch"),
    (True, None, "DDP"),
])
def test_auto_falls_back_to_the_default_mode_and_says_why(distributed, dynamic, said):
    options, lines = auto_compile("auto", "auto", "auto", "cuda", distributed, dynamic)
    assert options.student and options.mode is None  # compiled, without CUDA graphs
    fallback = [line for line in lines if "not reduce-overhead" in line]
    assert len(fallback) == 1 and said in fallback[0]


def test_auto_does_not_compile_on_a_cpu_but_an_explicit_request_does():
    options, lines = auto_compile("auto", "auto", "auto", "cpu", False, None)
    assert (options.student, options.teacher, options.mode) == (False, False, None)
    assert "not compiled" in lines[0]
    options, _ = auto_compile(True, False, "auto", "cpu", False, None)
    assert options.student and not options.teacher and options.mode is None
    options, lines = auto_compile(True, True, "max-autotune", "cuda", False, None)
    assert options.mode == "max-autotune" and lines == []  # explicit: nothing decided, no line


def test_compile_auto_reads_the_trainers_device_and_the_data(fast_cfg):
    cpu = compile_options(fast_cfg("distill=kd"))
    assert not cpu.student and not cpu.teacher
    gpu = fast_cfg("distill=kd", "trainer=gpu")  # resolved only: nothing runs on a GPU here

    class InMemory:
        in_memory = True

    class Streamed:
        in_memory = False

    assert compile_options(gpu, InMemory()).mode == "reduce-overhead"
    assert compile_options(gpu, Streamed()).mode is None
    on_policy = fast_cfg("distill=kd", "trainer=gpu", "on_policy.fraction=0.5")
    assert compile_options(on_policy, InMemory()).mode is None


@pytest.mark.parametrize(("key", "value"), [("compile.mode", "fastest"),
                                            ("compile.student", "yes")])
def test_a_bad_compile_value_fails_naming_the_key(fast_cfg, key, value):
    with pytest.raises(KdlabError, match=f"^{key}='{value}' must be one of"):
        check_values(fast_cfg(f"{key}={value}"))


_CLOCK = [0.0]  # shared with the copy of the model that the probe times


class _Clocked(nn.Module):
    """A linear layer whose forward advances a fake clock: 1.0 in float32, ``bf16`` under
    bfloat16 autocast."""

    def __init__(self, bf16: float) -> None:
        super().__init__()
        self.fc, self.bf16 = nn.Linear(4, 3), bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _CLOCK[0] += self.bf16 if torch.is_autocast_enabled("cpu") else 1.0
        return self.fc(x)


@pytest.mark.parametrize(("bf16", "choice"), [(0.5, "bf16-mixed"), (0.97, "32-true"),
                                              (2.0, "32-true")])
def test_the_precision_probe_keeps_bf16_only_when_clearly_faster(bf16, choice):
    model = _Clocked(bf16)
    probe = probe_precision(model, lambda n: torch.randn(n, 4), 8, torch.device("cpu"),
                            steps=3, warmup=1, timer=lambda: _CLOCK[0])
    assert probe["choice"] == choice
    assert probe["ms_per_step"] == pytest.approx({"32-true": 1000.0, "bf16-mixed": 1000 * bf16})
    assert model.fc.weight.grad is None  # the probe trains a copy


def test_precision_auto_is_measured_once_recorded_and_kept_on_resume(fast_cfg, tmp_path):
    cfg = fast_cfg("distill=kd", "baseline=false", "trainer.max_epochs=1",
                   "trainer.precision=auto")
    result = run(cfg)
    probe = result["precision"]
    assert probe["choice"] in ("32-true", "bf16-mixed")
    assert set(probe["ms_per_step"]) == {"32-true", "bf16-mixed"}
    assert result["config"]["trainer"]["precision"] == probe["choice"]  # what the run used
    kept = tmp_path / "run" / "precision.json"
    assert json.loads(kept.read_text()) == probe
    # kdlab-eval with trainer.precision=auto (as trainer=gpu gives) evaluates in the run's choice
    def evaluated(precision: str) -> float:
        out = evaluate(make_cfg(tmp_path, [f"ckpt_path={result['student']['best_ckpt']}",
                                           "latency.repeats=1", f"+trainer.precision={precision}"],
                                config_name="eval"))
        return out["student"]["metrics"]["test/acc"]

    assert evaluated("auto") == evaluated(probe["choice"])
    # the same command resumes the run and reads the choice back instead of measuring again
    other = "bf16-mixed" if probe["choice"] == "32-true" else "32-true"
    kept.write_text(json.dumps({**probe, "choice": other}))
    again = run(fast_cfg("distill=kd", "baseline=false", "trainer.max_epochs=1",
                         "trainer.precision=auto"))
    assert again["precision"]["choice"] == other
    assert again["config"]["trainer"]["precision"] == other


def test_precision_auto_refuses_a_multi_device_trainer(fast_cfg, capsys):
    cfg = fast_cfg("distill=none", "baseline=false", "trainer=ddp", "trainer.accelerator=cpu",
                   "trainer.precision=auto")
    with pytest.raises(SystemExit):
        run(cfg)
    assert "trainer.precision=auto measures on one device" in capsys.readouterr().err


def test_a_pack_measures_the_precision_once_for_all_its_members(tmp_path):
    import kdlab
    from tests.conftest import FAST

    common = [*FAST, "baseline=false", "trainer.max_epochs=1", "trainer.precision=auto",
              f"paths.teacher_store={tmp_path}/teachers", f"paths.log_dir={tmp_path}/logs"]
    results = kdlab.run_packed([["distill.kd.temperature=2"], ["distill.kd.temperature=4"]],
                               common=["distill=kd", *common], output_dir=tmp_path / "pack")
    first, second = results
    assert first["precision"] == second["precision"]
    choice = first["precision"]["choice"]
    assert first["config"]["trainer"]["precision"] == choice
    assert second["config"]["trainer"]["precision"] == choice
    for k in (0, 1):
        kept = json.loads((tmp_path / "pack" / str(k) / "precision.json").read_text())
        assert kept["choice"] == choice
