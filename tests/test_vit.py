"""The small ViTs (kdlab/models/vit.py): sizes, shapes, the stage-map adapter, DeiT's two heads,
CNN ↔ ViT feature strategies, and short runs that learn on Fashion-MNIST."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.engine.module import DistillationModule
from kdlab.engine.taps import Taps
from kdlab.models import CNN, available, create
from kdlab.models.vit import MODELS, SIZES, ViT, default_stage_blocks
from kdlab.strategies.attention import AT
from kdlab.strategies.hints import FitNets
from kdlab.strategies.relations import SP
from kdlab.train import run
from kdlab.util.errors import KdlabError
from tests.conftest import make_cfg
from tests.strategies import harness

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [((1, 28, 28), 10, (7, 7)), ((3, 32, 32), 100, (8, 8))]


def _vit(name: str = "vit_nano", shape=(1, 28, 28), classes: int = 10, **kw) -> ViT:
    torch.manual_seed(0)
    return create(name, list(shape), classes, **kw)


def _expected_params(dim: int, depth: int, c: int, grid: tuple[int, int], k: int,
                     token: bool) -> int:
    """Parameters counted by hand: patch conv, tokens, positions, blocks, norm, head(s)."""
    tokens = (2 if token else 1) + grid[0] * grid[1]
    block = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim \
        + (4 * dim * dim + 4 * dim) + (4 * dim * dim + dim)
    heads = (2 if token else 1) * (dim * k + k)
    return (c * 16 * dim + dim) + dim * (2 if token else 1) + tokens * dim + depth * block \
        + 2 * dim + heads


def test_zoo_names() -> None:
    names = set(available())
    for name in SIZES:
        assert {name, f"{name}_distilled"} <= names
    assert SIZES["vit_tiny"] == (192, 12, 3) and SIZES["vit_nano"] == (64, 4, 4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count(name: str) -> None:
    dim, depth, _ = SIZES[name.removesuffix("_distilled")]
    for shape, k, grid in SHAPES:
        model = create(name, list(shape), k)
        count = sum(p.numel() for p in model.parameters())
        assert count == _expected_params(dim, depth, shape[0], grid, k,
                                         name.endswith("_distilled"))
    pinned = {"vit_nano": 213_924, "vit_micro": 1_217_508, "vit_tiny": 5_380_132,
              "vit_small": 21_376_996}
    if name in pinned:  # 3×32×32, 100 classes
        assert sum(p.numel() for p in create(name, [3, 32, 32], 100).parameters()) == \
            pinned[name]


@pytest.mark.parametrize(("shape", "classes", "grid"), SHAPES)
@pytest.mark.parametrize("token", [False, True])
def test_shapes_and_taps(shape, classes, grid, token) -> None:
    model = _vit("vit_nano", shape, classes, distill_token=token).train()
    taps = model.taps()
    assert set(taps) == {"stages", "preact", "embedding"} | ({"distillation"} if token else set())
    assert taps["stages"] == taps["preact"] and len(taps["stages"]) == 4
    paths = [p for alias in taps.values() for p in alias]
    recorder = Taps(model, paths)
    x = torch.randn(3, *shape)
    assert model(x).shape == (3, classes)
    features = recorder.pop()
    for path in taps["stages"]:
        assert features[path].shape == (3, 64, *grid)
    assert features["pool"].shape == (3, 64)
    if token:
        assert features["head_dist"].shape == (3, classes)
    assert model.eval()(x).shape == (3, classes)


def test_stage_map_is_the_patch_tokens() -> None:
    """Map position (r, c) is patch token r·w + c of the tapped block, cls/dist tokens dropped."""
    model = _vit("vit_nano_distilled", (3, 32, 32), 100).eval()
    assert model.stage_blocks == [1, 2, 3, 4]
    seen = {}
    model.blocks[2].register_forward_hook(lambda m, i, out: seen.__setitem__("tokens", out))
    model.stage_maps[2].register_forward_hook(lambda m, i, out: seen.__setitem__("map", out))
    model(torch.randn(2, 3, 32, 32))
    tokens, fmap = seen["tokens"], seen["map"]
    for r, c in [(0, 0), (0, 7), (3, 5), (7, 7)]:
        torch.testing.assert_close(fmap[:, :, r, c], tokens[:, 2 + 8 * r + c])


def test_default_stage_blocks() -> None:
    assert default_stage_blocks(12) == [3, 6, 9, 12]
    assert default_stage_blocks(6) == [2, 4, 6]
    assert default_stage_blocks(4) == [1, 2, 3, 4]
    assert default_stage_blocks(1) == [1]
    assert _vit("vit_micro").stage_blocks == [2, 4, 6]
    assert _vit(stage_blocks=[4]).taps()["stages"] == ["stage_maps.0"]


@pytest.mark.parametrize("train", [True, False])
def test_taps_do_not_change_logits(train: bool) -> None:
    model = _vit("vit_nano_distilled").train(train)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        plain = model(x)
        taps = Taps(model, sorted({p for alias in model.taps().values() for p in alias}))
        tapped = model(x)
        assert len(taps.pop()) == 6  # 4 maps (stages = preact), pool, head_dist
    assert torch.equal(plain, tapped)


def test_eval_returns_the_average_of_the_two_heads() -> None:
    model = _vit("vit_nano_distilled")
    x = torch.randn(5, 1, 28, 28)
    seen = {}
    model.norm.register_forward_hook(lambda m, i, out: seen.__setitem__("normed", out))
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
        normed = seen["normed"]
        cls = normed[:, 0] @ model.classifier.weight.T + model.classifier.bias
        dist = normed[:, 1] @ model.head_dist.weight.T + model.head_dist.bias
    torch.testing.assert_close(train_out, cls)
    torch.testing.assert_close(eval_out, (cls + dist) / 2)
    assert not torch.allclose(cls, dist)
    plain = _vit("vit_nano")
    with torch.no_grad():  # without the token: the cls head in both modes
        torch.testing.assert_close(plain.train()(x), plain.eval()(x))


def test_init_is_deit() -> None:
    model = _vit("vit_micro")
    weights = torch.cat([m.weight.flatten() for m in model.modules()
                         if isinstance(m, nn.Linear)])
    assert abs(weights.std().item() - 0.02) < 0.002
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, nn.Linear))
    assert abs(model.pos_embed.std().item() - 0.02) < 0.003


def test_gradient_reaches_the_student_through_a_stage_map() -> None:
    model = _vit().train()
    taps = Taps(model, ["stage_maps.1"])
    model(torch.randn(2, 1, 28, 28))
    taps.pop()["stage_maps.1"].pow(2).mean().backward()
    assert model.patch_embed.weight.grad.abs().sum() > 0
    assert model.blocks[1].mlp[2].weight.grad.abs().sum() > 0
    assert model.blocks[2].attn.qkv.weight.grad is None  # after the tapped block


def test_bad_options_name_the_key() -> None:
    with pytest.raises(KdlabError, match=r"model\.heads=5 must divide model\.dim=64"):
        create("vit_nano", [1, 28, 28], 10, heads=5)
    with pytest.raises(KdlabError, match=r"model\.patch=40"):
        create("vit_nano", [1, 28, 28], 10, patch=40)
    with pytest.raises(KdlabError, match=r"model\.stage_blocks"):
        create("vit_nano", [1, 28, 28], 10, stage_blocks=[3, 9])


@pytest.mark.parametrize("strategy", [AT, FitNets, SP])
@pytest.mark.parametrize("vit_teaches", [False, True])
def test_feature_strategies_across_cnn_and_vit(strategy, vit_teaches: bool) -> None:
    """The stage maps let a CNN teach a ViT with map-reading strategies and the reverse: one
    training loss is finite, reaches the student and never the teacher."""
    torch.manual_seed(0)
    cnn = CNN([1, 28, 28], 10, channels=(8, 16), hidden=16)
    vit = _vit()
    student, teacher = (cnn, vit) if vit_teaches else (vit, cnn)
    module = DistillationModule(student, 10, torch.optim.SGD, teacher=teacher,
                                strategy=strategy(), example_input=torch.randn(4, 1, 28, 28))
    module.train()
    batch = (torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.arange(8))
    loss, terms = module.batch_loss(batch)
    name = {AT: "at", FitNets: "fitnets", SP: "sp"}[strategy]
    assert math.isfinite(loss.item()) and terms[name].item() > 0
    terms[name].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# -- short runs on Fashion-MNIST --------------------------------------------------------------
def run_vit(distill: str, tmp_path: Path, *overrides: str) -> dict:
    """:func:`tests.strategies.harness.run_short` with a zoo student instead of the pair's CNN
    (the harness's ``student.model.*`` overrides are CNN keys, so they are left out)."""
    pair = [o for o in harness.PAIR if not o.startswith("student")]
    return run(make_cfg(tmp_path, [f"distill={distill}", *pair, "student=zoo",
                                   f"teacher.ckpt={harness.pair_teacher()}", *overrides]))


def test_vit_student_learns_with_kd(tmp_path) -> None:
    # KD's CE weight is 0.1: at the harness's 120 batches vit_nano reaches ~0.34, at 200 ~0.41
    results = run_vit("kd", tmp_path, "student.model.name=vit_nano",
                      "trainer.limit_train_batches=200")
    assert results["student"]["model"] == "vit_nano"
    harness.assert_learned(results)


def test_cnn_teacher_vit_student_learns_with_at(tmp_path) -> None:
    harness.assert_learned(run_vit("at", tmp_path, "student.model.name=vit_nano"))
