"""CAT-KD and SDD (kdlab/strategies/class_maps.py) and the head finder they read
(kdlab/models/head.py): each loss against its paper's formula written out in plain Python on
hand-made maps and classifier weights, the gradient flow (student map and classifier, never the
teacher), bad options, models whose classifier sits behind a hidden layer, the head of every
zoo family, and a short run of each config that learns."""

from __future__ import annotations

import importlib.util
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.engine.taps import Taps
from kdlab.models import CNN, MLP, create
from kdlab.models.head import class_maps, final_head
from kdlab.strategies.base import Batch, Outputs
from kdlab.strategies.class_maps import CATKD, SDD
from kdlab.train import run
from kdlab.util.errors import KdlabError
from tests.conftest import make_cfg
from tests.strategies.harness import PAIR, assert_learned


# -- hand-made networks, maps and weights ------------------------------------------------------
class _Map(nn.Module):
    """Outputs its input: the tapped 'final map' of the toy networks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


class Toy(nn.Module):
    """``classifier(pool(body(x)))``: a pooled head, or a flat one (``flat=True``)."""

    def __init__(self, weight: list[list[float]], bias: list[float], flat: bool = False) -> None:
        super().__init__()
        self.body = _Map()
        self.pool = nn.Flatten() if flat else nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                                            nn.Flatten())
        self.classifier = nn.Linear(len(weight[0]), len(weight)).double()
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor(weight, dtype=torch.float64))
            self.classifier.bias.copy_(torch.tensor(bias, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.body(x)))


# student: 2 channels, 2×2 maps, 3 classes; teacher: 3 channels, 4×4 maps, 3 classes
W_S = [[0.5, -1.0], [1.5, 0.25], [-0.75, 1.0]]
B_S = [0.1, -0.2, 0.3]
W_T = [[1.0, 0.5, -0.5], [-1.0, 2.0, 0.5], [0.5, -0.25, 1.5]]
B_T = [-0.3, 0.2, 0.0]


def _grid(n: int, c: int, h: int, w: int, seed: int) -> list:
    """Deterministic, irregular hand-made values (no random generator)."""
    return [[[[round(math.sin(seed + 1.7 * i + 0.9 * j + 1.3 * y + 0.7 * x) * (1 + 0.1 * j), 3)
               for x in range(w)] for y in range(h)] for j in range(c)] for i in range(n)]


F_S = _grid(3, 2, 2, 2, seed=1)
F_T = _grid(3, 3, 4, 4, seed=5)
LABELS = [0, 2, -1]  # the third image is unlabelled


def _pair(**flat) -> tuple[Toy, Toy]:
    return Toy(W_S, B_S, flat.get("student", False)), Toy(W_T, B_T, flat.get("teacher", False))


def _outputs(student: nn.Module, teacher: nn.Module, fs=F_S, ft=F_T):
    """Outputs of both toys on the hand-made maps (their logits from their own forward)."""
    s_map = torch.tensor(fs, dtype=torch.float64, requires_grad=True)
    t_map = torch.tensor(ft, dtype=torch.float64, requires_grad=True)
    return (Outputs(student(s_map), {"body": s_map}), Outputs(teacher(t_map), {"body": t_map}))


def _connected(strategy, flat_student: bool = False):
    student, teacher = _pair(student=flat_student)
    strategy.resolve(student, teacher)
    s_out, t_out = _outputs(student, teacher,
                            fs=_flat_map() if flat_student else F_S)
    strategy.setup(s_out, t_out, 10)
    batch = Batch(torch.zeros(3, 1), torch.tensor(LABELS), torch.arange(3))
    return student, teacher, s_out, t_out, batch


# -- plain-Python references -------------------------------------------------------------------
def _cam(weight: list, fmap: list) -> list:
    """M[k][y][x] = Σ_c W[k][c] F[c][y][x] for one image."""
    h, w = len(fmap[0]), len(fmap[0][0])
    return [[[sum(wk[c] * fmap[c][y][x] for c in range(len(fmap))) for x in range(w)]
             for y in range(h)] for wk in weight]


def _pool(plane: list, r: int) -> list:
    """Adaptive average pooling to r × r: cell i spans rows floor(i·H/r) … ceil((i+1)·H/r) − 1
    (one input row repeated when r > H), columns alike."""
    h, w = len(plane), len(plane[0])

    def span(i: int, n: int) -> range:
        return range(i * n // r, -(-(i + 1) * n // r))

    return [[sum(plane[y][x] for y in span(i, h) for x in span(j, w))
             / (len(span(i, h)) * len(span(j, w))) for j in range(r)] for i in range(r)]


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _cat_expected(beta: float, r: int, normalize: bool, cams_s: list, cams_t: list) -> float:
    total, count = 0.0, 0
    for ms, mt in zip(cams_s, cams_t):
        for ps, pt in zip(ms, mt):
            a, b = _pool(ps, r), _pool(pt, r)
            if normalize:
                na = math.sqrt(sum(v * v for row in a for v in row))
                nb = math.sqrt(sum(v * v for row in b for v in row))
                a = [[v / na for v in row] for row in a]
                b = [[v / nb for v in row] for row in b]
            total += sum((x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb))
            count += r * r
    return beta * total / count


def _regions(weight: list, bias: list, fmap: list, scales: list[int]) -> list[list[float]]:
    """Region logits W · mean_cell(F) + b, scales in order, each grid row-major."""
    out = []
    for s in scales:
        pooled = [_pool(plane, s) for plane in fmap]
        for i in range(s):
            for j in range(s):
                out.append([sum(wk[c] * pooled[c][i][j] for c in range(len(fmap))) + bk
                            for wk, bk in zip(weight, bias)])
    return out


def _argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def _dkd_row(s: list[float], t: list[float], y: int, temp: float, a: float, b: float) -> float:
    p_s, p_t = _softmax(s, temp), _softmax(t, temp)
    tckd = _kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
    hat_s = [p / (1 - p_s[y]) for k, p in enumerate(p_s) if k != y]
    hat_t = [p / (1 - p_t[y]) for k, p in enumerate(p_t) if k != y]
    return temp**2 * (a * tckd + b * _kl(hat_t, hat_s))


def _sdd_expected(base: str, scales: list[int], temp: float, beta: float, weight: float,
                  alpha: float = 1.0, dbeta: float = 8.0) -> tuple[float, float, int, int]:
    """(consistent sum, complementary sum) / (N·R), times weight (β on the second), and the
    numbers of consistent and complementary (image, region) pairs."""
    con = com = 0.0
    n_con = n_com = 0
    rows = 0
    for i in range(len(F_S)):
        zs = _regions(W_S, B_S, F_S[i], scales)
        zt = _regions(W_T, B_T, F_T[i], scales)
        glob = _argmax(_regions(W_T, B_T, F_T[i], [1])[0])
        y = LABELS[i] if LABELS[i] >= 0 else glob
        for s_row, t_row in zip(zs, zt):
            if base == "kd":
                loss = temp**2 * _kl(_softmax(t_row, temp), _softmax(s_row, temp))
            else:
                loss = _dkd_row(s_row, t_row, y, temp, alpha, dbeta)
            if (_argmax(t_row) == y) != (glob == y):
                com, n_com = com + loss, n_com + 1
            else:
                con, n_con = con + loss, n_con + 1
            rows += 1
    return weight * con / rows, weight * beta * com / rows, n_con, n_com


# -- the head and its class maps ---------------------------------------------------------------
def test_class_maps_match_the_per_position_scores_and_average_to_the_logits():
    student, _ = _pair()
    head = final_head(student)
    assert (head.feature_path, head.classifier_path, head.flat) == ("body", "classifier", False)
    fmap = torch.tensor(F_S, dtype=torch.float64)
    maps = head.class_maps(fmap)
    for n in range(3):
        expected = _cam(W_S, F_S[n])
        for k in range(3):
            for y in range(2):
                for x in range(2):
                    assert maps[n, k, y, x].item() == pytest.approx(expected[k][y][x], rel=1e-12)
    logits = student(fmap)
    assert torch.allclose(maps.mean(dim=(2, 3)) + student.classifier.bias, logits)
    assert torch.allclose(head.region_logits(fmap, 1).flatten(1), logits)


def _flat_map() -> list:
    return _grid(3, 2, 2, 2, seed=9)


def test_flat_head_maps_are_the_positions_contributions_times_their_count():
    # a classifier on the flattened 2×2 map of 2 channels: 8 inputs per class
    weight = [[0.1 * (k + 1) * (-1) ** d + 0.05 * d for d in range(8)] for k in range(3)]
    net = Toy(weight, B_S, flat=True)
    head = final_head(net)
    assert head.flat and head.feature_path == "body"
    fmap = _flat_map()
    maps = class_maps(net.classifier.weight, torch.tensor(fmap, dtype=torch.float64), flat=True)
    for n in range(3):
        for k in range(3):
            for y in range(2):
                for x in range(2):
                    contribution = sum(weight[k][c * 4 + y * 2 + x] * fmap[n][c][y][x]
                                       for c in range(2))
                    assert maps[n, k, y, x].item() == pytest.approx(4 * contribution, rel=1e-12)
    logits = net(torch.tensor(fmap, dtype=torch.float64))
    assert torch.allclose(maps.mean(dim=(2, 3)) + net.classifier.bias, logits)


ZOO = [  # name, input shape, expected (final map path, classifier path)
    ("resnet8", [3, 32, 32], ("layer3", "classifier")),
    ("wrn_16_1", [3, 32, 32], ("relu", "classifier")),
    ("vgg8", [3, 32, 32], ("block4", "classifier")),
    ("mobilenetv2", [3, 32, 32], ("head", "classifier")),
    ("shufflenetv1", [3, 32, 32], ("stages.2", "classifier")),
    ("shufflenetv2", [3, 32, 32], ("head", "classifier")),
    ("resnet18", [3, 32, 32], ("net.layer4", "net.fc")),  # torchvision wrapper, pooled avgpool
    ("mobilenet_v2", [3, 32, 32], ("net.features.18", "net.classifier.1")),  # wrapper's trunk
    ("timm:resnet18", [3, 32, 32], ("net.layer4", "net.fc")),
]


@pytest.mark.parametrize("name,shape,expected", ZOO, ids=[z[0] for z in ZOO])
def test_final_head_of_every_zoo_family_reproduces_its_logits(name, shape, expected):
    if name.startswith("timm:") and importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    torch.manual_seed(0)
    model = create(name, input_shape=shape, num_classes=7).eval()
    head = final_head(model)
    assert (head.feature_path, head.classifier_path, head.flat) == (*expected, False)
    _assert_reproduces(model, head, shape)


def test_final_head_of_the_cnn_without_hidden_layer_is_flat():
    torch.manual_seed(0)
    model = CNN([1, 28, 28], 10, channels=(4, 8), hidden=0).eval()
    head = final_head(model)
    assert (head.feature_path, head.classifier_path, head.flat) == ("stages.1", "classifier.1",
                                                                    True)
    _assert_reproduces(model, head, [1, 28, 28])


def _assert_reproduces(model: nn.Module, head, shape: list[int]) -> None:
    taps = Taps(model, [head.feature_path])
    with torch.no_grad():
        logits = model(torch.randn(2, *shape))
    fmap = taps.pop()[head.feature_path]
    taps.remove()
    assert fmap.dim() == 4
    head.check(fmap, logits, "student")  # raises unless mean(M) + b == logits
    assert torch.allclose(head.class_maps(fmap).mean(dim=(2, 3)) + head.bias, logits, atol=1e-4)


@pytest.mark.parametrize("make,role,message", [
    (lambda: CNN([1, 28, 28], 10, channels=(4, 8), hidden=16), "student",
     "student.model.hidden=0"),
    (lambda: CNN([1, 28, 28], 10, channels=(4, 8), hidden=16), "teacher",
     "teacher.model.hidden=0"),
    (lambda: MLP([1, 28, 28], 10, hidden=[16]), "teacher", "an MLP has no feature map"),
])
def test_a_classifier_behind_a_hidden_layer_fails_saying_what_to_set(make, role, message):
    toy_s, toy_t = _pair()
    student, teacher = (make(), toy_t) if role == "student" else (toy_s, make())
    for strategy in (CATKD(), SDD()):
        with pytest.raises(KdlabError, match="hidden layer") as err:
            strategy.resolve(student, teacher)
        assert message in str(err.value) and f"{role} (" in str(err.value)


def test_setup_fails_when_the_maps_do_not_reproduce_the_logits():
    strategy = CATKD()
    student, teacher = _pair()
    strategy.resolve(student, teacher)
    s_out, t_out = _outputs(student, teacher)
    wrong = Outputs(t_out.logits + 1.0, t_out.features)
    with pytest.raises(KdlabError, match="teacher.*does not reproduce"):
        strategy.setup(s_out, wrong, 10)


def test_setup_fails_when_the_class_counts_differ():
    strategy = SDD()
    student = Toy(W_S[:2], B_S[:2])
    teacher = Toy(W_T, B_T)
    strategy.resolve(student, teacher)
    with pytest.raises(KdlabError, match="2 classes, the teacher 3"):
        strategy.setup(*_outputs(student, teacher), 10)


# -- CAT-KD ------------------------------------------------------------------------------------
@pytest.mark.parametrize("resolution,normalize", [(2, False), (2, True), (1, False), (3, True)])
def test_catkd_matches_its_formula(resolution, normalize):
    strategy = CATKD(beta=3.0, resolution=resolution, normalize=normalize)
    _, _, s_out, t_out, batch = _connected(strategy)
    terms = strategy(s_out, t_out, batch)
    assert set(terms) == {"cat"}
    expected = _cat_expected(3.0, resolution, normalize, [_cam(W_S, f) for f in F_S],
                             [_cam(W_T, f) for f in F_T])
    assert terms["cat"].item() == pytest.approx(expected, rel=1e-10)
    assert strategy.ce_weight == 1.0


def test_catkd_on_a_flat_student_head_uses_the_scaled_position_contributions():
    strategy = CATKD(beta=1.0, resolution=2)
    student = Toy([[0.1 * (k + 1) * (-1) ** d + 0.05 * d for d in range(8)] for k in range(3)],
                  B_S, flat=True)
    _, teacher = _pair()
    strategy.resolve(student, teacher)
    s_out, t_out = _outputs(student, teacher, fs=_flat_map())
    strategy.setup(s_out, t_out, 10)
    terms = strategy(s_out, t_out, Batch(torch.zeros(3, 1), torch.tensor(LABELS),
                                         torch.arange(3)))
    w = student.classifier.weight.tolist()
    cams_s = [[[[4 * sum(w[k][c * 4 + y * 2 + x] * f[c][y][x] for c in range(2))
                 for x in range(2)] for y in range(2)] for k in range(3)] for f in _flat_map()]
    expected = _cat_expected(1.0, 2, False, cams_s, [_cam(W_T, f) for f in F_T])
    assert terms["cat"].item() == pytest.approx(expected, rel=1e-10)


# -- SDD ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("base,scales", [("kd", [1, 2]), ("kd", [1, 2, 4]), ("dkd", [1, 2])])
def test_sdd_matches_its_formula_with_consistent_and_complementary_regions(base, scales):
    strategy = SDD(base=base, scales=scales, temperature=2.0, complementary=2.0, weight=0.7,
                   warmup=0, dkd_alpha=1.5, dkd_beta=3.0)
    _, _, s_out, t_out, batch = _connected(strategy)
    terms = strategy(s_out, t_out, batch)
    con, com, n_con, n_com = _sdd_expected(base, scales, 2.0, 2.0, 0.7, 1.5, 3.0)
    assert n_con > 0 and n_com > 0  # the hand-made case has both kinds of regions
    assert set(terms) == {"sdd_con", "sdd_com"}
    assert terms["sdd_con"].item() == pytest.approx(con, rel=1e-10)
    assert terms["sdd_com"].item() == pytest.approx(com, rel=1e-10)


def test_sdd_defaults_follow_the_base():
    kd, dkd = SDD(), SDD(base="dkd")
    assert (kd.scales, kd.temperature, kd.complementary) == ([1, 2], 4.0, 2.0)
    assert (kd.weight, kd.ce_weight, kd.warmup) == (0.9, 0.1, 0)
    assert (dkd.weight, dkd.ce_weight, dkd.warmup, dkd.dkd_alpha, dkd.dkd_beta) == (
        1.0, 1.0, 20, 1.0, 8.0)


def test_sdd_warms_up_linearly():
    strategy = SDD(base="dkd")  # warmup 20
    _, _, s_out, t_out, batch = _connected(strategy)
    full = sum(strategy(s_out, t_out, batch).values()).item()
    strategy.on_epoch_start(20)
    assert sum(strategy(s_out, t_out, batch).values()).item() > full
    strategy.on_epoch_start(4)
    assert sum(strategy(s_out, t_out, batch).values()).item() == pytest.approx(
        full * 5, rel=1e-10)


# -- gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [CATKD(beta=1.0), SDD(base="kd"), SDD(base="dkd", warmup=0)],
                         ids=["catkd", "sdd-kd", "sdd-dkd"])
def test_gradients_reach_the_student_map_and_classifier_never_the_teacher(strategy):
    student, teacher, s_out, t_out, batch = _connected(strategy)
    for p in teacher.parameters():
        p.requires_grad_(True)  # a teacher that could take gradients still gets none
    student.zero_grad()
    terms = strategy(s_out, t_out, batch)
    torch.stack(list(terms.values())).sum().backward()
    s_map = s_out.features["body"]
    assert s_map.grad is not None and s_map.grad.abs().sum() > 0
    assert student.classifier.weight.grad is not None
    assert student.classifier.weight.grad.abs().sum() > 0
    assert t_out.features["body"].grad is None
    assert all(p.grad is None for p in teacher.parameters())
    assert not list(strategy.parameters())  # the classifiers stay the networks' own


# -- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make,key", [
    (lambda: CATKD(beta=-1.0), "distill.beta"),
    (lambda: CATKD(resolution=0), "distill.resolution"),
    (lambda: CATKD(resolution=1.5), "distill.resolution"),
    (lambda: CATKD(normalize="yes"), "distill.normalize"),
    (lambda: CATKD(ce_weight=float("nan")), "distill.ce_weight"),
    (lambda: SDD(base="nkd"), "distill.base"),
    (lambda: SDD(scales=[0, 1]), "distill.scales"),
    (lambda: SDD(scales=[1, 1]), "distill.scales"),
    (lambda: SDD(scales=[]), "distill.scales"),
    (lambda: SDD(scales=2), "distill.scales"),
    (lambda: SDD(temperature=0.0), "distill.temperature"),
    (lambda: SDD(complementary=-1.0), "distill.complementary"),
    (lambda: SDD(weight=-0.5), "distill.weight"),
    (lambda: SDD(ce_weight=-0.5), "distill.ce_weight"),
    (lambda: SDD(warmup=-1), "distill.warmup"),
    (lambda: SDD(dkd_beta=-8.0), "distill.dkd_beta"),
])
def test_bad_options_fail_naming_the_key(make, key):
    with pytest.raises(KdlabError, match=key):
        make()


# -- short runs that learn ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def flat_teacher() -> Path:
    """The pair's teacher CNN 32-64 with ``hidden=0`` (its classifier on the flattened last
    map), trained once for this module like :func:`tests.strategies.harness.pair_teacher`."""
    from kdlab.modes.teacher import get_teacher

    folder = Path(tempfile.mkdtemp(prefix="kdlab-flat-teacher-"))
    cfg = make_cfg(folder, ["teacher=cnn", "teacher.model.hidden=0",
                            "teacher.train.max_epochs=1", "teacher.train.batch_size=64",
                            "teacher.train.augment=false", "trainer.limit_train_batches=150",
                            "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                            "logger=none"])
    model, _ = get_teacher(cfg, folder)
    torch.save(model.state_dict(), folder / "teacher.pt")
    yield folder / "teacher.pt"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("distill,extra", [
    ("catkd", []),
    ("sdd", []),
    ("sdd", ["distill.sdd.base=dkd"]),
], ids=["catkd", "sdd-kd", "sdd-dkd"])
def test_short_run_learns(distill, extra, flat_teacher, tmp_path):
    results = run(make_cfg(tmp_path, [f"distill={distill}", *PAIR, f"teacher.ckpt={flat_teacher}",
                                      "teacher.model.hidden=0", "student.model.hidden=0",
                                      *extra]))
    assert_learned(results)
