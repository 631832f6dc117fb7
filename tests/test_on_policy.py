"""On-policy distillation (GKD, Agarwal et al. 2024; kdlab/engine/on_policy.py): the student
writes a share of its batches, the teacher scores them, the loss covers the generated positions
only; batches are drawn from the seed and the step; bad options fail naming their key."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from kdlab.engine.module import DistillationModule, term_means
from kdlab.engine.on_policy import check_on_policy, generated_windows, on_policy_draw
from kdlab.engine.spec import OnPolicyOptions
from kdlab.models.gpt import GPT
from kdlab.modes.build import build_datamodule, build_model, build_strategy
from kdlab.modes.runner import train_stage
from kdlab.strategies.composite import Composite
from kdlab.strategies.divergences import GKD, generalized_jsd
from kdlab.strategies.logits import KD
from kdlab.train import run
from kdlab.util.errors import KdlabError
from tests.conftest import make_cfg
from tests.text_corpus import text_overrides


def _pair(vocab: int = 30, context: int = 12) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    student = GPT((context,), vocab, dim=16, depth=1, heads=2)
    teacher = GPT((context,), vocab, dim=32, depth=2, heads=4)
    return student, teacher


def _module(strategy, options: OnPolicyOptions) -> DistillationModule:
    student, teacher = _pair()
    return DistillationModule(student, 30, torch.optim.SGD, teacher=teacher,
                              strategy=Composite(**strategy),
                              example_input=torch.zeros(2, 12, dtype=torch.long),
                              on_policy=options)


def test_the_loss_of_an_on_policy_batch_is_the_strategy_on_the_generated_positions_only():
    options = OnPolicyOptions(fraction=1.0, prompt=5, temperature=1.0)
    module = _module({"gkd": GKD(beta=0.5)}, options)
    x = torch.randint(0, 30, (3, 12))
    terms = module.on_policy_terms(x, torch.arange(3), seed=11)
    assert list(terms) == ["gkd"]  # no cross-entropy against the student's own samples
    assert module.on_policy_batches == 1

    inputs, targets = generated_windows(module.student, x, options,
                                        torch.Generator().manual_seed(11))
    assert torch.equal(inputs[:, :5], x[:, :5])  # the prompt is the corpus's
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets: the same text, one ahead
    with torch.no_grad():
        s = module.student(inputs).flatten(0, 1)
        t = module.teacher(inputs).flatten(0, 1)
    # by hand: the divergence of every position, masked to positions 4 … 11 (each predicts a
    # generated token), averaged over the 3 × 8 unmasked ones
    per_row = torch.stack([generalized_jsd(s[i : i + 1], t[i : i + 1]) for i in range(36)])
    mask = (torch.arange(12) >= 4).repeat(3).float()
    expected = (per_row * mask).sum() / mask.sum()
    torch.testing.assert_close(terms["gkd"].detach(), expected)
    assert not torch.allclose(expected, per_row.mean())  # the prompt's positions are left out


def test_batches_are_drawn_from_the_seed_and_the_step():
    half = OnPolicyOptions(fraction=0.5, seed=3)
    draws = [on_policy_draw(half, step, 0) for step in range(2000)]
    assert draws == [on_policy_draw(half, step, 0) for step in range(2000)]  # a pure function
    assert 0.45 < sum(d is not None for d in draws) / 2000 < 0.55
    assert draws != [on_policy_draw(OnPolicyOptions(fraction=0.5, seed=4), s, 0)
                     for s in range(2000)]
    assert on_policy_draw(half, 7, 0) != on_policy_draw(half, 7, 1) or \
        on_policy_draw(half, 8, 0) != on_policy_draw(half, 8, 1)  # accumulation steps differ
    assert all(on_policy_draw(OnPolicyOptions(fraction=1.0), s, 0) is not None for s in range(99))
    assert all(on_policy_draw(OnPolicyOptions(fraction=0.0), s, 0) is None for s in range(99))


def test_fraction_zero_and_one_choose_the_batch_kind():
    x, y = torch.randint(0, 30, (2, 12)), torch.randint(0, 30, (2, 12))
    always = _module({"kd": KD(alpha=0.5)}, OnPolicyOptions(fraction=1.0, prompt=3))
    _, terms = always.batch_loss((x, y, torch.arange(2)))
    assert list(terms) == ["kd"]
    never = _module({"kd": KD(alpha=0.5)}, OnPolicyOptions(fraction=0.0, prompt=3))
    assert never.on_policy is None
    _, terms = never.batch_loss((x, y, torch.arange(2)))
    assert list(terms) == ["ce", "kd"]


def test_a_term_only_some_batches_have_is_averaged_over_those():
    losses = [torch.tensor(3.0), torch.tensor(1.0), torch.tensor(2.0)]
    terms = [{"ce": torch.tensor(2.0), "kd": torch.tensor(1.0)}, {"kd": torch.tensor(1.0)},
             {"ce": torch.tensor(4.0), "kd": torch.tensor(-2.0)}]
    means = term_means(losses, terms, [4, 4, 2])
    assert means["loss"][1] == means["kd"][1] == 10 and means["ce"][1] == 6
    assert float(means["loss"][0]) == pytest.approx((12 + 4 + 4) / 10)
    assert float(means["ce"][0]) == pytest.approx((8 + 8) / 6)
    assert float(means["kd"][0]) == pytest.approx((4 + 4 - 4) / 10)
    same = term_means(losses[:2], [terms[0], terms[0]], [4, 4])
    assert float(same["ce"][0]) == 2.0 and same["ce"][1] == 8


class StopAfter(L.Callback):
    """Interrupts training after ``epochs`` epochs, as a crash would."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _text_stage(tmp_path: Path, options: OnPolicyOptions, folder: str, *overrides: str,
                **stage: object):
    cfg = make_cfg(tmp_path, [*text_overrides(tmp_path), "distill=gkd", *overrides])
    data = build_datamodule(cfg, transfer=True)
    data.setup()
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher.model, data, "teacher.model")
    torch.manual_seed(1)
    student = build_model(cfg.student.model, data, "student.model")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    stage = train_stage(cfg, "student", tmp_path / folder, student, data, cfg.optimizer,
                        cfg.scheduler, teacher=teacher, strategy=build_strategy(cfg),
                        on_policy=options, **stage)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    return stage, student


def test_a_half_on_policy_stage_repeats_bit_for_bit_and_keeps_the_teacher(tmp_path):
    options = OnPolicyOptions(fraction=0.5, prompt=4, temperature=1.0, seed=0)
    a, student_a = _text_stage(tmp_path, options, "a", "trainer.limit_train_batches=8")
    b, student_b = _text_stage(tmp_path, options, "b", "trainer.limit_train_batches=8")
    expected = sum(on_policy_draw(options, step, 0) is not None for step in range(8))
    assert 0 < a.metrics["on_policy_batches"] == expected < 8
    assert b.metrics["on_policy_batches"] == expected
    for k, v in student_a.state_dict().items():
        assert torch.equal(v, student_b.state_dict()[k]), k


def test_a_resumed_on_policy_stage_ends_with_the_uninterrupted_weights(tmp_path):
    options = OnPolicyOptions(fraction=0.5, prompt=4, temperature=1.0, seed=0)
    two = ("trainer.max_epochs=2", "trainer.limit_train_batches=4")
    straight, student = _text_stage(tmp_path, options, "straight", *two)
    _text_stage(tmp_path, options, "cut", *two, callbacks=[StopAfter(1)])
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    cut = torch.load(last, weights_only=True)
    assert cut["epoch"] == 0 and cut["kdlab_on_policy_batches"] == sum(
        on_policy_draw(options, step, 0) is not None for step in range(4))
    resumed, again = _text_stage(tmp_path, options, "cut", *two, ckpt_path=str(last))
    assert resumed.metrics["on_policy_batches"] == straight.metrics["on_policy_batches"] > 0
    for k, v in student.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_every_batch_on_policy_runs_end_to_end_and_is_logged(tmp_path):
    results = run(make_cfg(tmp_path, [*text_overrides(tmp_path), "distill=gkd",
                                      "on_policy.fraction=1.0", "on_policy.prompt=6",
                                      "logger=csv", "steps_per_call=1"]))
    metrics = results["student"]["metrics"]
    assert metrics["on_policy_batches"] == 3 and metrics["test/bits_per_token"] > 0
    rows = list(csv.DictReader(next(Path(results["run_dir"]).glob(
        "logs/**/metrics.csv")).open()))
    logged = [float(r["train/on_policy_epoch"]) for r in rows if r.get("train/on_policy_epoch")]
    assert logged == [1.0]  # the share of the epoch's batches the student wrote
    assert "train/ce_epoch" not in rows[0] and "train/gkd_epoch" in rows[0]  # no CE at all


@pytest.mark.parametrize(("overrides", "message"), [
    (["on_policy.fraction=1.5"], "on_policy.fraction=1.5 must be a number in [0, 1]"),
    (["on_policy.fraction=0.5", "on_policy.prompt=16"],
     "on_policy.prompt=16 must be at least 1 and below data.context=16"),
    (["on_policy.fraction=0.5", "on_policy.temperature=-1"], "on_policy.temperature=-1"),
    (["on_policy.fraction=0.5", "on_policy.top_k=0"], "on_policy.top_k=0"),
    (["on_policy.fraction=0.5", "on_policy.prompt=4", "distill=none"],
     "on_policy.fraction=0.5 needs a teacher"),
    (["on_policy.fraction=0.5", "on_policy.prompt=4", "distill=fitnets"],
     "on_policy.fraction=0.5 with a strategy that reads hidden states"),
    (["on_policy.fraction=0.5", "mode=mutual"], "on_policy.fraction=0.5 is an option of "
                                                "mode=offline"),
])
def test_bad_on_policy_options_fail_naming_the_key(overrides, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(make_cfg(tmp_path, [*text_overrides(tmp_path), "distill=gkd", *overrides]))
    assert message in capsys.readouterr().err


def test_image_data_is_refused_naming_the_key():
    class Images:
        name, input_shape = "cifar100", (3, 32, 32)

    with pytest.raises(KdlabError, match=r"on_policy.fraction=0.5: .* data=cifar100 is not text"):
        check_on_policy(OnPolicyOptions(fraction=0.5), Images(), GKD(), tapped=False)


def test_generated_text_leaves_the_baseline_alone_and_runs_outside_packs(tmp_path):
    from kdlab.modes.baseline import baseline_identity
    from kdlab.modes.pack import unpackable

    text = [*text_overrides(tmp_path), "distill=gkd"]
    plain = make_cfg(tmp_path, text)
    on_policy = make_cfg(tmp_path, [*text, "on_policy.fraction=0.5", "on_policy.prompt=4"])
    sequence = make_cfg(tmp_path, [*text, "sequence_kd.enabled=true", "sequence_kd.prompt=4"])
    data = build_datamodule(plain)
    assert baseline_identity(on_policy, data) == baseline_identity(plain, data) == \
        baseline_identity(sequence, data)  # the baseline trains on the corpus either way
    assert unpackable(on_policy).startswith("on_policy.fraction is set")
    assert unpackable(sequence).startswith("sequence_kd.enabled")


def test_the_text_presets_compose_and_share_text_kds_teacher(tmp_path):
    from kdlab.modes.build import strategy_name
    from kdlab.modes.teacher import teacher_key

    cfgs = {name: make_cfg(tmp_path, [f"experiment={name}", "data.max_bytes=300000"])
            for name in ("text_kd", "text_on_policy", "text_seqkd")}
    assert strategy_name(cfgs["text_on_policy"]) == "gkd"
    assert cfgs["text_on_policy"].on_policy.fraction == 0.5
    assert strategy_name(cfgs["text_seqkd"]) == "none" and cfgs["text_seqkd"].sequence_kd.enabled
    keys = {teacher_key(cfg) for cfg in cfgs.values()}
    assert len(keys) == 1  # one stored teacher for the three jobs
