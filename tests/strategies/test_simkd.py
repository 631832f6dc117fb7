"""SimKD (kdlab/strategies/reused_classifier.py): the authors' projector, the loss against its
formula on hand-made maps, the spatial alignment, the deployed network (student body →
projector → pooling → frozen copy of the teacher's classifier) and the gradients, the engine
evaluating that network, a short run whose reported accuracy and size are the deployed
network's, a checkpoint rebuilt for kdlab-eval / kdlab-export, composites, the modes that
refuse it and bad options."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.engine.module import DistillationModule
from kdlab.models import CNN, MLP, create
from kdlab.models.head import final_head
from kdlab.modes.build import build_datamodule, build_strategy
from kdlab.modes.checkpoints import deployed_student, load_run_config
from kdlab.strategies import KD, Composite, SimKD
from kdlab.strategies.base import Batch, Outputs
from kdlab.strategies.reused_classifier import PROJECTED, ReusedClassifierNet, projector
from kdlab.train import run
from kdlab.util.errors import KdlabError
from tests.conftest import make_cfg


# -- hand-made networks ------------------------------------------------------------------------
class Toy(nn.Module):
    """``classifier(mean_{h,w} body(x))`` where ``body`` is a 1×1 convolution with hand-set
    weights and ``x`` is already a map: its final map is ``body``'s output."""

    def __init__(self, channels_in: int, channels: int, classes: int, seed: int) -> None:
        super().__init__()
        self.body = nn.Conv2d(channels_in, channels, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, classes)
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                p.copy_(torch.tensor(_values(p.numel(), seed + i)).view_as(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.body(x)))


def _values(n: int, seed: int) -> list[float]:
    """Deterministic, irregular hand-made values (no random generator)."""
    return [round(math.sin(seed + 1.3 * i) * 0.8, 3) for i in range(n)]


def _grid(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.tensor(_values(n * c * h * w, seed)).view(n, c, h, w)


def _connected(s_size: int, t_size: int, factor: int = 2, beta: float = 1.0):
    """A SimKD set up on a toy pair: student 3 → 4 channels, teacher 3 → 6 channels, 5 classes,
    on inputs of side ``s_size`` / ``t_size``; returns strategy, networks, inputs and outputs."""
    student, teacher = Toy(3, 4, 5, seed=1), Toy(3, 6, 5, seed=7).eval()
    strategy = SimKD(beta=beta, factor=factor)
    strategy.resolve(student, teacher)
    x_s, x_t = _grid(2, 3, s_size, s_size, 3), _grid(2, 3, t_size, t_size, 11)
    s_out = Outputs(student(x_s), {"body": student.body(x_s)})
    with torch.no_grad():
        t_out = Outputs(teacher(x_t), {"body": teacher.body(x_t)})
    strategy.setup(s_out, t_out, 10)
    return strategy, student, teacher, x_s, s_out, t_out


def _batch(n: int = 2) -> Batch:
    return Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n))


def _block_means(fmap: torch.Tensor, k: int) -> list:
    """Average pooling by ``k × k`` blocks, in plain Python."""
    n, c, h, w = fmap.shape
    v = fmap.tolist()
    return [[[[sum(v[i][j][y * k + a][x * k + b] for a in range(k) for b in range(k)) / k / k
               for x in range(w // k)] for y in range(h // k)] for j in range(c)]
            for i in range(n)]


def _mse(a: list, b: list) -> float:
    flat_a, flat_b = torch.tensor(a).flatten().tolist(), torch.tensor(b).flatten().tolist()
    return sum((p - q) ** 2 for p, q in zip(flat_a, flat_b)) / len(flat_a)


# -- the projector -----------------------------------------------------------------------------
def test_projector_is_the_authors_bottleneck():
    p = projector(64, 256, factor=2)
    kinds = [type(m) for m in p]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3
    convs = [m for m in p if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (64, 128, (1, 1), (0, 0)), (128, 128, (3, 3), (1, 1)), (128, 256, (1, 1), (0, 0))]
    assert all(c.bias is None and c.stride == (1, 1) for c in convs)
    assert [m.num_features for m in p if isinstance(m, nn.BatchNorm2d)] == [128, 128, 256]
    assert p(torch.randn(2, 64, 8, 8)).shape == (2, 256, 8, 8)
    assert projector(3, 6, factor=3)[0].out_channels == 2


#: kdlab's own models, then torchvision wrappers (the cut reaches inside ``net``); every family's
#: head is found in tests/strategies/test_class_maps.py, kept short here for time
BODIES = ["resnet8", "vgg8", "resnet18", "mobilenet_v2"]


@pytest.mark.parametrize("name", BODIES)
def test_the_body_of_every_zoo_family_outputs_its_final_map(name):
    from kdlab.engine.taps import Taps
    from kdlab.models.head import final_map_body

    torch.manual_seed(0)
    model = create(name, input_shape=[3, 32, 32], num_classes=7).eval()
    path = final_head(model).feature_path
    body = final_map_body(model)
    taps = Taps(model, [path])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        torch.testing.assert_close(body(x), taps.pop()[path])
    shared = {id(p) for p in model.parameters()}
    assert all(id(p) in shared for p in body.parameters())  # shared, not copied
    head = final_head(model)
    assert all(p is not head.classifier.weight for p in body.parameters())


# -- the loss ----------------------------------------------------------------------------------
def test_loss_is_beta_times_the_mse_of_the_projected_map_and_the_teacher_map():
    strategy, _, _, _, s_out, t_out = _connected(4, 4, beta=2.5)
    terms = strategy(s_out, t_out, _batch())
    assert set(terms) == {"simkd"} and strategy.ce_weight == 0.0
    with torch.no_grad():
        projected = strategy.projector(s_out.features["body"])
    expected = 2.5 * _mse(projected.tolist(), t_out.features["body"].tolist())
    assert terms["simkd"].item() == pytest.approx(expected, rel=1e-6)
    assert SimKD.feature_loss(torch.tensor([[[[1.0, 2.0]]]]),
                              torch.tensor([[[[0.5, 4.0]]]])).item() == pytest.approx(2.125)


def test_a_larger_student_map_is_pooled_to_the_teachers_size_before_the_projector():
    strategy, _, _, _, s_out, t_out = _connected(4, 2)  # student 4×4, teacher 2×2
    assert (strategy.source_size, strategy.target_size) == ((2, 2), None)
    replaced = strategy.student_outputs(s_out)
    pooled = torch.tensor(_block_means(s_out.features["body"].detach(), 2))
    with torch.no_grad():
        expected = strategy.projector(pooled)
    torch.testing.assert_close(replaced.features[PROJECTED], expected)
    terms = strategy(s_out, t_out, _batch())
    assert terms["simkd"].item() == pytest.approx(
        _mse(expected.tolist(), t_out.features["body"].tolist()), rel=1e-6)


def test_a_larger_teacher_map_is_pooled_to_the_students_size_in_the_loss():
    strategy, _, _, _, s_out, t_out = _connected(2, 4)  # student 2×2, teacher 4×4
    assert (strategy.source_size, strategy.target_size) == (None, (2, 2))
    with torch.no_grad():
        projected = strategy.projector(s_out.features["body"])
    target = _block_means(t_out.features["body"], 2)
    assert strategy(s_out, t_out, _batch())["simkd"].item() == pytest.approx(
        _mse(projected.tolist(), target), rel=1e-6)


# -- the deployed network and the gradients ----------------------------------------------------
def test_deployed_logits_are_the_teacher_classifier_on_the_pooled_projected_student_map():
    strategy, student, teacher, x_s, s_out, _ = _connected(4, 4)
    net = strategy.deployed(student)
    assert isinstance(net, ReusedClassifierNet) and strategy.deployed(student) is net
    net.eval()
    with torch.no_grad():
        by_hand = teacher.classifier(strategy.projector(student.body(x_s)).mean(dim=(2, 3)))
        torch.testing.assert_close(net(x_s), by_hand)
        # training reads the same logits: the replaced Outputs (eval-mode BN here)
        torch.testing.assert_close(strategy.student_outputs(s_out).logits, by_hand)
    # the copy is the teacher's classifier, frozen, and the student's own is not in the net
    assert torch.equal(strategy.classifier.weight, teacher.classifier.weight)
    assert strategy.classifier is not teacher.classifier
    assert not any(p.requires_grad for p in strategy.classifier.parameters())
    assert all(p is not student.classifier.weight for p in net.parameters())
    assert net.body.body is student.body  # shared, not copied


def test_gradients_reach_the_projector_and_student_body_never_the_teacher_or_its_classifier():
    strategy, student, teacher, _, s_out, t_out = _connected(4, 2)
    for p in teacher.parameters():
        p.requires_grad_(True)  # a teacher that could take gradients still gets none
    strategy.ce_weight = 1.0
    replaced = strategy.student_outputs(s_out)
    loss = strategy(replaced, t_out, _batch())["simkd"] + F.cross_entropy(
        replaced.logits, torch.tensor([1, 3]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in strategy.projector.parameters())
    assert student.body.weight.grad is not None and student.body.weight.grad.abs().sum() > 0
    assert student.classifier.weight.grad is None  # the student's own classifier is unused
    assert all(p.grad is None for p in strategy.classifier.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_the_module_evaluates_and_trains_through_the_deployed_network():
    torch.manual_seed(0)
    teacher = create("resnet8x4", [3, 32, 32], 10).eval()
    student = create("resnet8", [3, 32, 32], 10)
    strategy = Composite(simkd=SimKD())
    module = DistillationModule(student=student, teacher=teacher, strategy=strategy,
                                num_classes=10, optimizer=torch.optim.SGD,
                                example_input=torch.randn(2, 3, 32, 32))
    simkd = strategy.members["simkd"]
    assert module.deployed is simkd.deployed(student)
    assert simkd.source_size is None and simkd.projector[0].in_channels == 64
    names = [n for n, _ in module.named_parameters() if "classifier" in n and "strategy" in n]
    assert names and not any(p.requires_grad for n, p in module.named_parameters() if n in names)
    trainable = {id(p) for p in module.trainable_parameters()}
    assert all(id(p) in trainable for p in simkd.projector.parameters())
    assert not any(id(p) in trainable for p in simkd.classifier.parameters())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, terms = module.batch_loss((x, y, torch.arange(4)))
    assert set(terms) == {"simkd"}  # ce_weight 0: the authors' -c 0
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), module.deployed(x))
        assert not torch.allclose(module(x), student(x))


# -- composites, bad inputs --------------------------------------------------------------------
def test_composite_with_kd_reads_the_reused_classifiers_logits():
    strategy, student, teacher, x_s, s_out, t_out = _connected(4, 4)
    composite = Composite(simkd=strategy, kd=KD(temperature=4.0, alpha=0.9))
    assert composite.replaces_head and composite.deployed(student) is strategy.deployed(student)
    replaced = composite.student_outputs(s_out)
    terms = composite(replaced, t_out, _batch())
    assert set(terms) == {"simkd", "kd"}
    alone = KD(temperature=4.0, alpha=0.9)(replaced, t_out, _batch())["kd"]
    assert terms["kd"].item() == pytest.approx(alone.item())
    own = KD(temperature=4.0, alpha=0.9)(s_out, t_out, _batch())["kd"]
    assert terms["kd"].item() != pytest.approx(own.item())
    with pytest.raises(KdlabError, match="at most one"):
        Composite(simkd=SimKD(), other=SimKD())


@pytest.mark.parametrize("make,role,message", [
    (lambda: create("vit_nano", [1, 28, 28], 10), "student", "distill=deit"),
    (lambda: MLP(input_shape=[1, 28, 28], num_classes=10, hidden=[8]), "student", "distill=kd"),
    (lambda: CNN(input_shape=[1, 28, 28], num_classes=10, channels=[8], hidden=8), "teacher",
     "teacher.model.hidden=0"),
], ids=["vit-student", "mlp-student", "cnn-hidden-teacher"])
def test_a_model_without_a_usable_head_fails_saying_what_to_use(make, role, message):
    good = CNN(input_shape=[1, 28, 28], num_classes=10, channels=[8], hidden=0)
    student, teacher = (make(), good) if role == "student" else (good, make())
    with pytest.raises(KdlabError, match="distill=simkd") as err:
        SimKD().resolve(student, teacher)
    assert message in str(err.value)


def test_a_flat_teacher_head_needs_a_student_map_at_least_as_large():
    teacher = CNN(input_shape=[1, 28, 28], num_classes=10, channels=[8, 8], hidden=0).eval()
    student = CNN(input_shape=[1, 28, 28], num_classes=10, channels=[4, 4, 4], hidden=0)
    with pytest.raises(KdlabError, match="flattened 7×7 map.*3×3"):
        DistillationModule(student=student, teacher=teacher, strategy=SimKD(), num_classes=10,
                           optimizer=torch.optim.SGD, example_input=torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize("override,key", [
    ("distill.simkd.factor=0", "distill.simkd.factor"),
    ("distill.simkd.beta=-1", "distill.simkd.beta"),
    ("distill.simkd.ce_weight=nan", "distill.simkd.ce_weight"),
    ("+distill.simkd.alpha=0.5", "distill.simkd"),
])
def test_bad_options_fail_naming_the_key(override, key, tmp_path):
    with pytest.raises(KdlabError, match=key.replace(".", r"\.")):
        build_strategy(make_cfg(tmp_path, ["distill=simkd", override]))


def test_the_config_holds_the_authors_defaults(tmp_path):
    simkd = build_strategy(make_cfg(tmp_path, ["distill=simkd"])).members["simkd"]
    assert (simkd.beta, simkd.factor, simkd.ce_weight) == (1.0, 2, 0.0)


@pytest.mark.parametrize("overrides,what", [
    (["mode=born_again"], "mode=born_again"),
    (["mode=takd"], "mode=takd"),
    (["mode=transfer"], "mode=transfer"),
    (["mode=multi_teacher"], "mode=multi_teacher"),
    (["compress=prune"], r"compress \(prune, quantize\)"),
], ids=["born_again", "takd", "transfer", "multi_teacher", "compress"])
def test_modes_that_reuse_or_retrain_the_bare_student_refuse_it(overrides, what, tmp_path):
    from kdlab.modes import mode_runner

    cfg = make_cfg(tmp_path, ["distill=simkd", *overrides, "logger=none"])
    with pytest.raises(KdlabError, match=f"{what} does not support distill=simkd"):
        mode_runner(cfg.mode.name)(cfg, Path(cfg.paths.output_dir))
    assert not (tmp_path / "teachers").exists()  # refused before any training


def test_a_pack_runs_it_alone(tmp_path):
    from kdlab.modes.pack import unpackable

    assert "replaces the student's head" in unpackable(make_cfg(tmp_path, ["distill=simkd"]))


# -- a short run, its checkpoint ---------------------------------------------------------------
RUN = ["teacher=cnn", "teacher.model.hidden=0", "student=cnn", "student.model.channels=[8,16]",
       "student.model.hidden=0", "trainer.max_epochs=1", "trainer.limit_train_batches=40",
       "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
       "trainer.enable_progress_bar=false", "data.batch_size=32", "data.eval_batch_size=256",
       "data.num_labels=null", "teacher_cache.enabled=false", "baseline=false",
       "latency.repeats=1", "latency.batch_size=4", "logger=none"]


@pytest.fixture(scope="module")
def simkd_run():
    """One short ``distill=simkd`` run: a CNN 32-64 teacher whose classifier reads its
    flattened 7×7 map (trained here, 60 batches) and a CNN 8-16 student (7×7 map), 40
    batches. Yields the run folder, its results and the teacher's weights before the run."""
    from kdlab.modes.teacher import get_teacher

    folder = Path(tempfile.mkdtemp(prefix="kdlab-simkd-"))
    teacher_cfg = make_cfg(folder, ["teacher=cnn", "teacher.model.hidden=0",
                                    "teacher.train.max_epochs=1", "teacher.train.batch_size=64",
                                    "teacher.train.augment=false",
                                    "trainer.limit_train_batches=60",
                                    "trainer.limit_val_batches=1",
                                    "trainer.limit_test_batches=1",
                                    "trainer.enable_progress_bar=false", "logger=none"])
    teacher, _ = get_teacher(teacher_cfg, folder)
    torch.save(teacher.state_dict(), folder / "teacher.pt")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    results = run(make_cfg(folder / "job", ["distill=simkd", *RUN,
                                            f"teacher.ckpt={folder / 'teacher.pt'}"]))
    yield folder / "job" / "run", results, before
    shutil.rmtree(folder, ignore_errors=True)


def _by_hand(ckpt: Path, run_cfg, data) -> tuple[nn.Module, dict]:
    """The checkpoint's student and strategy tensors, read without kdlab's loaders."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    student = CNN(input_shape=list(data.input_shape), num_classes=10, channels=[8, 16], hidden=0)
    student.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")})
    prefix = "strategy.members.simkd."
    return student.eval(), {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_short_run_reports_the_deployed_network(simkd_run):
    run_dir, results, before = simkd_run
    student = results["student"]
    accuracy = student["metrics"]["test/acc"]
    assert accuracy > 0.3, f"test/acc {accuracy:.3f}: the student did not learn"
    ckpt = Path(student["best_ckpt"])
    run_cfg = load_run_config(ckpt)
    data = build_datamodule(run_cfg, transfer=False)
    data.setup("test")
    bare, tensors = _by_hand(ckpt, run_cfg, data)
    # the reported size is the deployed network's: student body + projector + teacher classifier
    body = sum(p.numel() for n, p in bare.named_parameters() if n.startswith("stages."))
    extra = sum(v.numel() for k, v in tensors.items()
                if k.endswith(("weight", "bias")) and "running" not in k)
    assert student["params"] == body + extra
    # the reported accuracy is the deployed network's on the tested images (1 batch of 256)
    x, y = data.x_test[:256], data.y_test[:256]
    with torch.no_grad():
        net, _ = deployed_student(run_cfg, ckpt, data)
        deployed_acc = (net(x).argmax(1) == y).float().mean().item()
        bare_acc = (bare(x).argmax(1) == y).float().mean().item()
    assert deployed_acc == pytest.approx(accuracy, abs=1e-6)
    assert bare_acc < accuracy - 0.2  # the student's own classifier is never trained
    # the teacher and the classifier copy are bit-identical to the teacher before the run
    after = torch.load(run_dir.parent.parent / "teacher.pt", weights_only=True)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(tensors["classifier.weight"], before["classifier.1.weight"])
    assert torch.equal(tensors["classifier.bias"], before["classifier.1.bias"])


def test_a_reloaded_checkpoint_gives_the_same_logits_and_exports(simkd_run, tmp_path):
    from kdlab.export import export

    _, results, _ = simkd_run
    ckpt = Path(results["student"]["best_ckpt"])
    run_cfg = load_run_config(ckpt)
    data = build_datamodule(run_cfg, transfer=False)
    data.setup("test")
    net, _ = deployed_student(run_cfg, ckpt, data)
    assert isinstance(net, ReusedClassifierNet) and not net.training
    bare, tensors = _by_hand(ckpt, run_cfg, data)
    proj = projector(16, 64)
    proj.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("projector.")})
    x = data.x_test[:64]
    with torch.no_grad():
        by_hand = F.linear(proj.eval()(bare.stages(x)).flatten(1), tensors["classifier.weight"],
                           tensors["classifier.bias"])
        torch.testing.assert_close(net(x), by_hand)
    exported = export(make_cfg(tmp_path, [f"ckpt_path={ckpt}", "check_samples=16",
                                          "formats=[torchscript]", f"out={tmp_path}/out"],
                               config_name="export"))
    scripted = torch.jit.load(exported["files"]["torchscript"]["path"])
    torch.testing.assert_close(scripted(x), by_hand, atol=1e-4, rtol=1e-4)
    saved = json.loads((tmp_path / "out" / "export.json").read_text())
    assert saved["files"]["torchscript"]["max_abs_diff"] <= 1e-4


def test_kdlab_eval_reads_the_deployed_network(simkd_run, tmp_path):
    from kdlab.evaluate import evaluate

    run_dir, results, _ = simkd_run
    evaluated = evaluate(make_cfg(tmp_path, [f"ckpt_path={run_dir}", "with_teacher=false",
                                             "latency.repeats=1", "latency.batch_sizes=[2]",
                                             f"out={tmp_path}/eval"], config_name="eval"))
    assert evaluated["student"]["params"] == results["student"]["params"]
    # kdlab-eval tests on the whole test split: the deployed network's accuracy there
    ckpt = Path(evaluated["ckpt_path"])
    run_cfg = load_run_config(ckpt)
    data = build_datamodule(run_cfg, transfer=False)
    data.setup("test")
    net, _ = deployed_student(run_cfg, ckpt, data)
    with torch.no_grad():
        right = sum(int((net(x).argmax(1) == y).sum())
                    for x, y in zip(data.x_test.split(1000), data.y_test.split(1000)))
    assert evaluated["student"]["metrics"]["test/acc"] == pytest.approx(
        right / len(data.y_test), abs=1e-6)
