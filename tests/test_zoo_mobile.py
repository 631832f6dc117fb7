"""The compact CIFAR students of the KD benchmarks (MobileNetV2, ShuffleNetV1/V2 as in
RepDistiller/CRD) and the torchvision/timm bridge: sizes, shapes, taps, gradients, errors."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
import torchvision
from torch import nn

from kdlab.models import mobilenetv2, shufflenet
from kdlab.models.hub import MODELS as HUB
from kdlab.models.hub import TimmModel, TorchvisionModel
from kdlab.util.errors import KdlabError

CIFAR = {**mobilenetv2.MODELS, **shufflenet.MODELS}

#: parameters in millions with 100 classes, as published by CRD (Tian et al., ICLR 2020)
CIFAR_PARAMS = {"mobilenetv2": 0.81, "shufflenetv1": 0.95, "shufflenetv2": 1.36}
#: parameters in millions with 1000 classes, as published by torchvision
IMAGENET_PARAMS = {"resnet18": 11.69, "resnet34": 21.80, "resnet50": 25.56, "mobilenet_v2": 3.50}


def millions(model: nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def check_taps(model: nn.Module, shape: list[int]) -> dict[str, dict[str, torch.Tensor]]:
    """Hook every tapped path, run a batch of 2, check the conventions, return the outputs."""
    taps = model.taps()
    modules = dict(model.named_modules())
    assert {"stages", "preact", "embedding"} <= set(taps)
    for paths in taps.values():
        assert paths and all(p in modules for p in paths), paths
    outputs: dict[str, dict[str, torch.Tensor]] = {alias: {} for alias in taps}
    handles = [
        modules[p].register_forward_hook(
            lambda m, i, o, a=alias, p=p: outputs[a].__setitem__(p, o.detach().clone())
        )
        for alias, paths in taps.items()
        for p in paths
    ]
    model.eval()
    logits = model(torch.randn(2, *shape))
    for handle in handles:
        handle.remove()
    assert logits.dim() == 2 and logits.shape[0] == 2
    stages = [outputs["stages"][p] for p in taps["stages"]]
    assert len(stages) >= 3
    sizes = [s.shape[-2] * s.shape[-1] for s in stages]
    assert all(s.dim() == 4 and s.shape[0] == 2 for s in stages)
    assert sizes == sorted(sizes, reverse=True), sizes
    preact = [outputs["preact"][p] for p in taps["preact"]]
    assert [p.shape for p in preact] == [s.shape for s in stages]
    (embedding,) = [outputs["embedding"][p] for p in taps["embedding"]]
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert embedding.shape == (2, classifier.in_features)
    return outputs


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS))
def test_cifar_students_have_the_published_size(name):
    assert millions(CIFAR[name]([3, 32, 32], 100)) == CIFAR_PARAMS[name]


@pytest.mark.parametrize("name", sorted(IMAGENET_PARAMS))
def test_torchvision_students_have_the_published_size(name):
    assert millions(HUB[name]([3, 32, 32], 1000)) == IMAGENET_PARAMS[name]


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_students_map_images_to_logits(name):
    model = CIFAR[name]([3, 32, 32], 100)
    x = torch.randn(2, 3, 32, 32)
    for train in (True, False):
        model.train(train)
        assert model(x).shape == (2, 100)
    gray = CIFAR[name]([1, 28, 28], 10).eval()
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_taps_follow_the_conventions(name):
    model = CIFAR[name]([3, 32, 32], 100)
    outputs = check_taps(model, [3, 32, 32])
    stages = [outputs["stages"][p] for p in model.taps()["stages"]]
    assert stages[0].shape[-1] == 16 and stages[-1].shape[-1] in (2, 4)
    for stage, pre in zip(model.taps()["stages"], model.taps()["preact"]):
        if name.startswith("shufflenet"):  # the stage output is the ReLU of its preact
            assert torch.equal(outputs["stages"][stage], torch.relu(outputs["preact"][pre]))
            assert (outputs["preact"][pre] < 0).any()
        else:  # linear bottlenecks: no activation after a stage
            assert pre == stage


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS))
def test_every_cifar_parameter_gets_a_gradient(name):
    model = CIFAR[name]([3, 32, 32], 100).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    missing = [p for p, w in model.named_parameters() if w.grad is None or not w.grad.any()]
    assert not missing


def test_shufflenetv2_sizes_are_checked():
    assert millions(shufflenet.ShuffleNetV2([3, 32, 32], 100, net_size=0.5)) < 0.5
    with pytest.raises(KdlabError, match="net_size.*0.5, 1, 1.5, 2"):
        shufflenet.ShuffleNetV2([3, 32, 32], 100, net_size=3)


def test_torchvision_resnet18_runs_small_and_taps_its_layers():
    model = HUB["resnet18"]([3, 64, 64], 10)
    taps = model.taps()
    assert taps["stages"] == [f"net.layer{i}" for i in range(1, 5)]
    assert taps["embedding"] == ["net.avgpool"]
    check_taps(model, [3, 64, 64])
    model.train()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    gray = TorchvisionModel([1, 28, 28], 10, "resnet18").eval()
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_torchvision_mobilenet_v2_stages_come_from_the_resolution_drops():
    model = HUB["mobilenet_v2"]([3, 32, 32], 10)
    assert model.taps()["stages"] == [f"net.features.{i}" for i in (1, 3, 6, 13, 18)]
    assert model.taps()["embedding"] == ["pool"]
    check_taps(model, [3, 32, 32])


def test_unknown_torchvision_names_and_weights_fail_with_suggestions():
    with pytest.raises(KdlabError, match=r"model\.name: 'resnet81'.*did you mean resnet18"):
        TorchvisionModel([3, 32, 32], 10, "resnet81")
    with pytest.raises(KdlabError, match=r"model\.weights: 'IMAGENET1K_V9'.*IMAGENET1K_V1"):
        TorchvisionModel([3, 32, 32], 10, "resnet18", weights="IMAGENET1K_V9")


def test_pretrained_torchvision_models_get_a_new_head(monkeypatch):
    built = {}
    real = torchvision.models.get_model

    def offline(name, weights=None, **kwargs):  # no download: random 1000-class weights
        built.update(weights=weights, **kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    model = TorchvisionModel([1, 32, 32], 10, "resnet18", weights="DEFAULT")
    assert built == {"weights": "DEFAULT"}  # built with its own 1000-class head
    assert model.net.fc.out_features == 10 and model.net.conv1.in_channels == 1
    assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_models_need_timm():
    with pytest.raises(KdlabError, match="pip install timm"):
        TimmModel([3, 32, 32], 10, "resnet18")


class _TinyTimm(nn.Module):
    """A stand-in for a timm model: ``feature_info``, ``forward_features``, ``forward_head``,
    ``get_classifier``."""

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(in_chans, 8, 3, 2, 1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, num_classes)
        self.feature_info = [dict(module=f"layer{i}", reduction=2**i) for i in (1, 2, 3)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def test_timm_bridge_reads_feature_info(monkeypatch):
    def create_model(name, pretrained=False, num_classes=1000, in_chans=3, **kwargs):
        if name != "tiny":
            raise RuntimeError(f"Unknown model ({name})")
        return _TinyTimm(num_classes, in_chans)

    fake = types.SimpleNamespace(create_model=create_model, list_models=lambda: ["tiny"])
    monkeypatch.setitem(sys.modules, "timm", fake)
    model = TimmModel([1, 28, 28], 10, "tiny")
    assert model.taps()["stages"] == ["net.layer1", "net.layer2", "net.layer3"]
    assert model.taps()["embedding"] == ["embed"]
    check_taps(model, [1, 28, 28])
    with pytest.raises(KdlabError, match="'tinny' is not a timm model.*did you mean tiny"):
        TimmModel([1, 28, 28], 10, "tinny")


def test_every_constructor_is_registered():
    assert set(CIFAR) == {"mobilenetv2", "mobilenetv2_1_0", "shufflenetv1", "shufflenetv2"}
    assert {"resnet18", "resnet34", "resnet50", "mobilenet_v2"} <= set(HUB)
