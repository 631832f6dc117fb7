"""kdlab's training step: chunks of batches, accumulation, clipping, max_steps, throughput."""

from __future__ import annotations

import pytest
import torch

from kdlab.train import run
from kdlab.util.errors import KdlabError


def _weights(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


def test_chunked_steps_train_exactly_like_one_batch_per_step(fast_cfg, tmp_path):
    """steps_per_call=4 over 2 calls = steps_per_call=1 over 8 calls, bit for bit."""
    common = ["distill=kd", "baseline=false", "trainer.max_epochs=1"]
    one = run(fast_cfg(*common, "steps_per_call=1", "trainer.limit_train_batches=8",
                       tmp=tmp_path / "a"))
    four = run(fast_cfg(*common, "steps_per_call=4", "trainer.limit_train_batches=2",
                        tmp=tmp_path / "b"))
    a, b = _weights(one["student"]["last_ckpt"]), _weights(four["student"]["last_ckpt"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(four["student"]["last_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8  # optimizer steps, not calls


def test_bare_optimizer_step_trains_like_lightnings_hooked_step(fast_cfg, tmp_path,
                                                                monkeypatch):
    """Without an on_before_optimizer_step hook the step skips Lightning's closure and hook
    dispatch; with one (here on the module) it goes through Lightning. Same weights, same
    global_step, and the hook sees every step."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from kdlab.engine.module import DistillationModule

    lightning_steps, hooked = [], []
    original = LightningOptimizer.step

    def counting_step(self, *args, **kwargs):
        lightning_steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LightningOptimizer, "step", counting_step)
    common = ["distill=kd", "baseline=false", "trainer.max_epochs=1", "steps_per_call=3",
              "trainer.limit_train_batches=2"]
    bare = run(fast_cfg(*common, tmp=tmp_path / "a"))
    assert lightning_steps == []
    monkeypatch.setattr(DistillationModule, "on_before_optimizer_step",
                        lambda self, optimizer: hooked.append(self.trainer.global_step),
                        raising=False)
    hooked_run = run(fast_cfg(*common, tmp=tmp_path / "b"))
    # the teacher (trained in each run's own store) and the student: 6 steps each
    assert len(lightning_steps) == len(hooked) == 12 and hooked[-6:] == [0, 1, 2, 3, 4, 5]
    a = _weights(bare["student"]["last_ckpt"])
    b = _weights(hooked_run["student"]["last_ckpt"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    for result in (bare, hooked_run):
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


def test_gradient_clipping_is_applied_before_each_step(fast_cfg, tmp_path, monkeypatch):
    from kdlab.engine.module import DistillationModule

    seen = []
    original = DistillationModule.clip_gradients

    def spy(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        seen.append((gradient_clip_val, gradient_clip_algorithm))
        return original(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    monkeypatch.setattr(DistillationModule, "clip_gradients", spy)
    run(fast_cfg("distill=none", "baseline=false", "trainer.max_epochs=1",
                 "trainer.gradient_clip_val=0.5", "trainer.gradient_clip_algorithm=value",
                 "steps_per_call=2", "trainer.limit_train_batches=2", tmp=tmp_path))
    assert seen[-4:] == [(0.5, "value")] * 4  # the student's 4 optimizer steps


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
    from kdlab.engine.build import loop_options

    with pytest.raises(KdlabError, match=message.replace("(", r"\(")):
        loop_options(fast_cfg(*overrides))


def test_auto_steps_per_call_is_one_under_ddp(fast_cfg):
    from kdlab.engine.build import AUTO_STEPS_PER_CALL, loop_options

    auto = fast_cfg("steps_per_call=auto")
    assert loop_options(auto).steps_per_call == AUTO_STEPS_PER_CALL
    assert loop_options(auto, in_memory=False).steps_per_call == 1  # ImageFolder: streamed
    assert loop_options(fast_cfg("trainer.fast_dev_run=true", "steps_per_call=auto")
                        ).steps_per_call == 1  # one batch, not one chunk
    assert loop_options(fast_cfg("trainer=ddp", "steps_per_call=auto")).steps_per_call == 1


def test_throughput_is_reported_per_epoch(fast_cfg, tmp_path):
    result = run(fast_cfg("distill=none", "baseline=false", tmp=tmp_path))
    speed = result["student"]["train_samples_per_s"]
    assert len(speed["per_epoch"]) == 2 and all(v > 0 for v in speed["per_epoch"])
    assert speed["median"] == speed["per_epoch"][1]


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
