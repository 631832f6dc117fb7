"""The teacher stays frozen, out of the optimizer and out of checkpoints; resume works."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from kdlab.engine.fit import build_trainer
from kdlab.engine.module import DistillationModule
from kdlab.modes.build import build_datamodule, build_model, build_strategy
from kdlab.modes.runner import stage_spec, train_stage


def _setup(cfg):
    data = build_datamodule(cfg, transfer=True)
    data.setup()
    teacher = build_model(cfg.teacher.model, data, "teacher.model")
    student = build_model(cfg.student.model, data, "student.model")
    return data, teacher, student, build_strategy(cfg)


class RecordingTeacher(torch.nn.Module):
    """Wraps a teacher and records its training flag at every forward pass."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.inner(x)


def test_teacher_is_bit_identical_after_fit_and_in_eval_mode_in_training_step(fast_cfg):
    cfg = fast_cfg()
    data, teacher, student, strategy = _setup(cfg)
    teacher = RecordingTeacher(teacher)
    teacher.train()  # even a teacher handed over in train mode must be used in eval mode
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    train_stage(cfg, "student", Path(cfg.paths.output_dir), student, data, cfg.optimizer,
              cfg.scheduler, teacher=teacher, strategy=strategy)
    assert teacher.modes and not any(teacher.modes)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats included
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())


def test_user_calling_train_keeps_teacher_in_eval_mode(fast_cfg):
    cfg = fast_cfg()
    _, teacher, student, strategy = _setup(cfg)
    module = DistillationModule(student, 10, torch.optim.SGD, teacher=teacher, strategy=strategy)
    module.train()
    assert module.student.training and not module.teacher.training
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_optimizer_holds_no_teacher_parameter(fast_cfg):
    cfg = fast_cfg()
    data, teacher, student, strategy = _setup(cfg)
    module = DistillationModule(student, 10, torch.optim.SGD, teacher=teacher, strategy=strategy)
    optimizer = module.optimizer_factory(params=list(module.trainable_parameters()))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in student.parameters()} <= in_optimizer


def test_checkpoint_has_no_teacher_keys_loads_weights_only_and_resumes(fast_cfg, tmp_path):
    cfg = fast_cfg("trainer.max_epochs=2")
    data, teacher, student, strategy = _setup(cfg)
    stage = train_stage(cfg, "student", tmp_path / "a", student, data, cfg.optimizer,
                      cfg.scheduler, teacher=teacher, strategy=strategy)
    last = Path(stage.last_ckpt)
    assert last.name == "last.ckpt" and last.parent.name == "checkpoints"
    assert stage.best_ckpt and Path(stage.best_ckpt).is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert all(k.startswith("student.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["config"]["distill"]["kd"]["_target_"] == "kdlab.strategies.KD"
    assert ckpt["epoch"] == 1



class StopAfter(L.Callback):
    """Interrupts training after ``epochs`` epochs, as a crash would."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _module(cfg, student, teacher, strategy):
    return DistillationModule(student, 10, instantiate(cfg.optimizer),
                              instantiate(cfg.scheduler), teacher=teacher, strategy=strategy)


def _trainer(cfg, folder, module, data):
    """The engine's Trainer for a stage of ``cfg`` in ``folder`` (one batch per step)."""
    spec = stage_spec(cfg, "student", folder, module.student, data, cfg.optimizer, cfg.scheduler)
    return build_trainer(spec, module)[0]


def test_resuming_from_last_ckpt_continues_at_the_next_epoch(fast_cfg, tmp_path):
    cfg = fast_cfg("trainer.max_epochs=4")
    data, teacher, student, strategy = _setup(cfg)
    module = _module(cfg, student, teacher, strategy)
    trainer = _trainer(cfg, tmp_path / "a", module, data)
    trainer.callbacks.append(StopAfter(2))
    trainer.fit(module, datamodule=data)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1

    data, teacher2, student2, strategy2 = _setup(cfg)
    teacher2.load_state_dict(teacher.state_dict())
    module = _module(cfg, student2, teacher2, strategy2)
    seen_epochs = []
    module.on_train_epoch_start = lambda: seen_epochs.append(module.current_epoch)
    trainer = _trainer(cfg, tmp_path / "b", module, data)
    trainer.fit(module, datamodule=data, ckpt_path=str(last))
    assert seen_epochs == [2, 3]
    assert trainer.global_step == 4 * int(cfg.trainer.limit_train_batches)
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 3
    # the LR schedule went on from where it stopped rather than restarting
    assert resumed["lr_schedulers"][0]["last_epoch"] == trainer.global_step


def test_training_step_ce_covers_labelled_samples_only_and_kd_covers_all():
    from kdlab.strategies import KD, kd_loss

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    strategy = KD(temperature=2.0, alpha=0.25)
    module = DistillationModule(student, 3, torch.optim.SGD, teacher=teacher, strategy=strategy)
    x = torch.randn(5, 4)
    y = torch.tensor([2, -1, 0, -1, -1])  # two labelled, three transfer-set samples
    loss, terms = module.batch_loss((x, y, torch.arange(5)))
    s, t = student(x), teacher(x)
    ce = torch.nn.functional.cross_entropy(s[[0, 2]], y[[0, 2]])
    expected = 0.75 * ce + 0.25 * kd_loss(s, t, 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(terms) == {"ce", "kd"}

    # a batch with no label at all contributes no cross-entropy (and no NaN)
    unlabelled = torch.full((5,), -1)
    loss, _ = module.batch_loss((x, unlabelled, torch.arange(5)))
    assert loss.item() == pytest.approx(0.25 * kd_loss(s, t, 2.0).item(), rel=1e-6)
