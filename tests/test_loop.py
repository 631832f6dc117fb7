"""kdlab's training step: chunks of batches, accumulation, clipping, max_steps, throughput."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from kdlab.train import run
from kdlab.util.errors import KdlabError


def _weights(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


def test_chunked_steps_train_exactly_like_one_batch_per_step(fast_cfg, tmp_path):
    """steps_per_call=4 (2 training steps of 4 batches) = steps_per_call=1 (8 training steps),
    bit for bit: limit_train_batches counts batches either way."""
    common = ["distill=kd", "baseline=false", "trainer.max_epochs=1",
              "trainer.limit_train_batches=8"]
    one = run(fast_cfg(*common, "steps_per_call=1", tmp=tmp_path / "a"))
    four = run(fast_cfg(*common, "steps_per_call=4", tmp=tmp_path / "b"))
    a, b = _weights(one["student"]["last_ckpt"]), _weights(four["student"]["last_ckpt"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(four["student"]["last_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8  # optimizer steps, not calls


def test_every_optimizer_step_goes_through_lightnings_optimizer(fast_cfg, tmp_path,
                                                               monkeypatch):
    """The loop steps through Lightning's optimizer wrapper (public API): it counts
    trainer.global_step and runs the on_before_optimizer_step hooks at every step."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from kdlab.engine.module import DistillationModule

    lightning_steps, hooked = [], []
    original = LightningOptimizer.step

    def counting_step(self, *args, **kwargs):
        lightning_steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LightningOptimizer, "step", counting_step)
    monkeypatch.setattr(DistillationModule, "on_before_optimizer_step",
                        lambda self, optimizer: hooked.append(self.trainer.global_step),
                        raising=False)
    result = run(fast_cfg("distill=kd", "baseline=false", "trainer.max_epochs=1",
                          "steps_per_call=3", "trainer.limit_train_batches=6", tmp=tmp_path))
    # the teacher (trained into this run's own store) and the student: 6 steps each
    assert len(lightning_steps) == len(hooked) == 12 and hooked[-6:] == [0, 1, 2, 3, 4, 5]
    ckpt = torch.load(result["student"]["last_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6


def test_gradient_accumulation_matches_a_batch_twice_as_large(fast_cfg, tmp_path):
    # an MLP student: no batch norm, whose statistics would depend on the batch size
    common = ["distill=none", "student=mlp", "baseline=false", "trainer.max_epochs=1",
              "data.num_labels=null",
              "scheduler=none", "steps_per_call=1", "optimizer.weight_decay=0"]
    big = run(fast_cfg(*common, "data.batch_size=32", "trainer.limit_train_batches=3",
                       tmp=tmp_path / "a"))
    small = run(fast_cfg(*common, "data.batch_size=16", "trainer.limit_train_batches=6",
                         "trainer.accumulate_grad_batches=2", tmp=tmp_path / "b"))
    a, b = _weights(big["student"]["last_ckpt"]), _weights(small["student"]["last_ckpt"])
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    ckpt = torch.load(small["student"]["last_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3


class GradientProbe(L.Callback):
    """Records the student's gradient norm (L2 over all parameters) and largest absolute
    gradient when each optimizer step starts, after the loop's clipping."""

    norms: list[float] = []
    largest: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.student.parameters() if p.grad is not None]
        GradientProbe.norms.append(float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        GradientProbe.largest.append(max(float(g.abs().max()) for g in grads))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradients_are_clipped_before_every_step(fast_cfg, tmp_path, algorithm):
    GradientProbe.norms, GradientProbe.largest = [], []
    common = ["distill=none", "baseline=false", "trainer.max_epochs=1", "steps_per_call=4",
              "trainer.limit_train_batches=8", "+callbacks.probe._target_=tests.test_loop."
              "GradientProbe", "teacher_cache.enabled=false"]
    run(fast_cfg(*common, tmp=tmp_path / "free"))
    free = list(GradientProbe.norms), list(GradientProbe.largest)
    GradientProbe.norms, GradientProbe.largest = [], []
    clip = 0.01
    run(fast_cfg(*common, f"trainer.gradient_clip_val={clip}",
                 f"trainer.gradient_clip_algorithm={algorithm}", tmp=tmp_path / "clipped"))
    assert len(GradientProbe.norms) == 8  # every step of the student was seen
    if algorithm == "norm":
        assert min(free[0]) > clip  # unclipped gradients are larger: clipping had work to do
        assert all(n == pytest.approx(clip, rel=1e-4) for n in GradientProbe.norms)
    else:
        assert min(free[1]) > clip
        assert all(v <= clip * (1 + 1e-6) for v in GradientProbe.largest)


class Validations(L.Callback):
    """Records the optimizer step of every validation (sanity checks aside)."""

    steps: list[int] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            Validations.steps.append(trainer.global_step)


def test_limit_train_batches_and_val_check_interval_count_batches_inside_chunks(fast_cfg,
                                                                             tmp_path):
    Validations.steps = []
    result = run(fast_cfg("distill=none", "baseline=false", "trainer.max_epochs=1",
                          "steps_per_call=4", "trainer.limit_train_batches=12",
                          "trainer.val_check_interval=6",
                          "+callbacks.validations._target_=tests.test_loop.Validations",
                          tmp=tmp_path / "int"))
    ckpt = torch.load(result["student"]["last_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12 and Validations.steps == [6, 12]
    result = run(fast_cfg("distill=none", "baseline=false", "trainer.max_epochs=1",
                          "steps_per_call=64", "trainer.limit_train_batches=0.25",
                          "data.num_labels=null", tmp=tmp_path / "fraction"))
    ckpt = torch.load(result["student"]["last_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 429  # int(1,719 batches of 32 × 0.25), as Lightning counts


def test_max_steps_counts_batches_inside_chunks(fast_cfg, tmp_path):
    result = run(fast_cfg("distill=none", "baseline=false", "trainer.max_epochs=3",
                          "trainer.max_steps=5", "steps_per_call=4",
                          "trainer.limit_train_batches=null", "trainer.limit_val_batches=1",
                          tmp=tmp_path))
    ckpt = torch.load(result["student"]["last_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5


@pytest.mark.parametrize(("overrides", "message"), [
    (["steps_per_call=0"], "steps_per_call=0 must be >= 1"),
    (["steps_per_call=fast"], "steps_per_call='fast' must be a positive integer or auto"),
    (["steps_per_call=4", "trainer=ddp"], "steps_per_call=4 needs a single device"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 must be >= 1"),
    (["trainer.gradient_clip_algorithm=foo"], "trainer.gradient_clip_algorithm=foo"),
])
def test_bad_loop_options_fail_naming_the_key(fast_cfg, overrides, message):
    from kdlab.modes.build import loop_options

    with pytest.raises(KdlabError, match=message.replace("(", r"\(")):
        loop_options(fast_cfg(*overrides))


def test_auto_steps_per_call_is_one_under_ddp(fast_cfg):
    from kdlab.modes.build import AUTO_STEPS_PER_CALL, loop_options

    auto = fast_cfg("steps_per_call=auto")
    assert loop_options(auto).steps_per_call == AUTO_STEPS_PER_CALL
    assert loop_options(auto, in_memory=False).steps_per_call == 1  # ImageFolder: streamed
    assert loop_options(fast_cfg("trainer.fast_dev_run=true", "steps_per_call=auto")
                        ).steps_per_call == 1  # one batch, not one chunk
    assert loop_options(fast_cfg("trainer=ddp", "steps_per_call=auto")).steps_per_call == 1
    assert loop_options(fast_cfg("trainer.fast_dev_run=true", "steps_per_call=16")
                        ).steps_per_call == 1


def test_throughput_is_reported_per_epoch(fast_cfg, tmp_path):
    result = run(fast_cfg("distill=none", "baseline=false", tmp=tmp_path))
    speed = result["student"]["train_samples_per_s"]
    assert len(speed["per_epoch"]) == 2 and all(v > 0 for v in speed["per_epoch"])
    assert speed["median"] == speed["per_epoch"][1]


@pytest.mark.slow  # a CPU compile takes minutes; compile: auto compiles on a GPU only
def test_compiled_student_and_teacher_train_and_keep_checkpoint_keys(fast_cfg, tmp_path):
    result = run(fast_cfg("distill=kd", "baseline=false", "trainer.max_epochs=1",
                          "compile.student=true", "compile.teacher=true",
                          "teacher_cache.enabled=false", tmp=tmp_path))
    state = torch.load(result["student"]["last_ckpt"], weights_only=True)["state_dict"]
    assert state and not any("_orig_mod" in k for k in state)
    assert result["student"]["metrics"]["test/acc"] > 0.1


def test_an_optimizer_without_a_fused_kernel_fails_naming_the_key(fast_cfg, capsys):
    with pytest.raises(SystemExit):
        run(fast_cfg("distill=none", "baseline=false", "optimizer._target_=torch.optim.Adadelta",
                     "trainer.fast_dev_run=true"))
    err = capsys.readouterr().err
    assert "kdlab: error:" in err and "fused" in err and "~optimizer.fused" in err
