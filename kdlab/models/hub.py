"""Any torchvision or timm classifier as a kdlab teacher or student, chosen by name.

The wrappers keep the library's network as ``self.net`` (so its own module paths read
``net.<path>``) and add what kdlab reads features by: ``taps()`` with ``stages`` /
``preact`` / ``embedding`` module paths, and a module whose output is the ``(N, C)`` pooled
penultimate vector. How the stages are found:

* torchvision ResNet, Wide ResNet, ResNeXt: ``net.layer1`` … ``net.layer4``.
* timm models with ``feature_info``: its module names (e.g. ``net.layer1``, ``net.blocks.2``).
* anything else: a dry forward pass at construction, on one zero image of ``input_shape``,
  records each module's input and output shape. Starting at the network, its children are
  listed in execution order, and a child that is an ``nn.Sequential`` in which at least two
  children change the spatial size (``features`` of a MobileNet, VGG or DenseNet,
  ``trunk_output`` of a RegNet) is replaced by its children, recursively; other modules
  (residual blocks, stages that downsample once) stay whole. Of that list, pooling, dropout,
  flatten, linear layers and the classifier are dropped, and the last module of each spatial
  size is a stage. For torchvision MobileNetV2 this gives ``net.features.1``, ``.3``, ``.6``,
  ``.13``, ``.18``: the blocks after which the resolution drops, and the last one.
  Transformers without 4-D feature maps (ViT) get only their patch embedding, and Swin's
  feature maps are channels-last, so its stages are not meaningful.

``preact`` equals ``stages`` for every hub model: library blocks apply their activation
inside, so no pre-activation tensor is a module output.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torchvision
from torch import nn

from kdlab.util.errors import KdlabError, close_matches

#: module types that never end a feature stage
_NOT_A_STAGE = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Flatten,
    nn.Linear,
)


def _pooled() -> nn.Sequential:
    """``(N, C, H, W) → (N, C)`` by global average pooling."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _final_layer(net: nn.Module) -> tuple[str, nn.Module] | None:
    """The layer that produces the logits: the last ``nn.Linear`` registered, else the last
    ``nn.Conv2d`` (SqueezeNet)."""
    for kind in (nn.Linear, nn.Conv2d):
        found = [(p, m) for p, m in net.named_modules() if isinstance(m, kind)]
        if found:
            return found[-1]
    return None


def _adapt_input_channels(net: nn.Module, channels: int, pretrained: bool) -> None:
    """Give the first 3-channel convolution ``channels`` inputs. Pretrained filters are summed
    over RGB for one channel, otherwise tiled and scaled by ``3 / channels``."""
    stem = next(
        ((p, m) for p, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3),
        None,
    )
    if stem is None or channels == 3:
        return
    path, old = stem
    new = nn.Conv2d(
        channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        old.groups,
        old.bias is not None,
        old.padding_mode,
    )
    if pretrained:
        with torch.no_grad():
            w = old.weight
            if channels == 1:
                new.weight.copy_(w.sum(1, keepdim=True))
            else:
                reps = -(-channels // 3)
                new.weight.copy_(w.repeat(1, reps, 1, 1)[:, :channels] * (3 / channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    _set_module(net, path, new)
    if getattr(net, "transform_input", False):  # Inception's RGB re-normalisation
        net.transform_input = False


@torch.no_grad()
def _resolution_stages(
    root: nn.Module, start: nn.Module, example: torch.Tensor, head: str | None = None
) -> list[str]:
    """Paths (relative to ``root``) of the last feature module of each spatial size inside
    ``start``, found by one forward pass of ``example`` through ``root`` (see the module
    docstring). ``head`` (the logits layer's path) and its ancestors are never stages."""
    names = {id(m): p for p, m in root.named_modules()}
    seen: dict[str, tuple[int, tuple[int, ...] | None, tuple[int, ...] | None]] = {}
    handles = []

    def size(t: object) -> tuple[int, ...] | None:
        return tuple(t.shape[-2:]) if isinstance(t, torch.Tensor) and t.dim() == 4 else None

    for path, module in root.named_modules():

        def hook(mod: nn.Module, args: tuple, out: object, path: str = path) -> None:
            order = seen[path][0] if path in seen else len(seen)
            seen[path] = (order, size(args[0]) if args else None, size(out))

        handles.append(module.register_forward_hook(hook))
    training = root.training
    root.eval()
    try:
        root(example)
    finally:
        root.train(training)
        for handle in handles:
            handle.remove()

    def fired(module: nn.Module) -> bool:
        return any(names[id(m)] in seen for m in module.modules())

    def first(module: nn.Module) -> int:
        return min(seen[names[id(m)]][0] for m in module.modules() if names[id(m)] in seen)

    def resizes(module: nn.Module) -> bool:
        _, before, after = seen.get(names[id(module)], (0, None, None))
        return before is not None and after is not None and before != after

    def expand(module: nn.Module, top: bool = False) -> list[str]:
        path = names[id(module)]
        children = sorted((c for c in module.children() if fired(c)), key=first)
        if path in seen and not top:
            if not isinstance(module, nn.Sequential):
                return [path]
            if sum(resizes(c) for c in children) < 2:
                return [path]
        out: list[str] = []
        for child in children:
            out += expand(child)
        return out

    def is_head(path: str) -> bool:
        return head is not None and (head == path or head.startswith(path + "."))

    candidates = [
        p
        for p in expand(start, top=True)
        if seen[p][2] is not None
        and not is_head(p)
        and not isinstance(root.get_submodule(p), _NOT_A_STAGE)
    ]
    stages: list[str] = []
    for i, path in enumerate(candidates):
        if i + 1 == len(candidates) or seen[candidates[i + 1]][2] != seen[path][2]:
            stages.append(path)
    # keep the sizes non-increasing (a side branch at a larger size is dropped)
    kept: list[str] = []
    for path in stages:
        h, w = seen[path][2]
        if not kept or h * w <= seen[kept[-1]][2][0] * seen[kept[-1]][2][1]:
            kept.append(path)
    return kept


class TorchvisionModel(nn.Module):
    """A torchvision classification model by name (``torchvision.models.list_models()``), e.g.
    ``resnet18``, ``mobilenet_v2``, ``efficientnet_b0``, ``convnext_tiny``; the ImageNet
    architectures of He et al. 2016 (ResNet), Sandler et al. 2018 (MobileNetV2) and the others
    torchvision implements, built with ``torchvision.models.get_model(name, weights=weights,
    num_classes=num_classes, **kwargs)``.

    With ``weights`` (``"DEFAULT"``, ``"IMAGENET1K_V1"``, …; torchvision downloads them) the
    model is built with its own head, which is then replaced by a freshly initialised layer
    with ``num_classes`` outputs when the counts differ. An input with other than 3 channels
    gets a new stem convolution (pretrained filters summed over RGB for 1 channel). GoogLeNet
    and Inception v3 are built without auxiliary heads unless ``aux_logits`` is passed, and
    ``forward`` returns the main logits only.

    Embedding (a module with the ``(N, C)`` vector the classifier reads):

    * ResNet-like, RegNet, GoogLeNet, Inception, MobileNetV3, EfficientNet, Swin: their
      ``net.avgpool`` becomes ``AdaptiveAvgPool2d(1) → Flatten`` (torchvision's own flatten
      after it is then a no-op, and parameter names stay torchvision's);
    * MobileNetV2, MNASNet: ``pool`` (this wrapper pools ``net.features`` / ``net.layers`` and
      calls ``net.classifier`` on the vector);
    * others: the final linear layer is wrapped as ``Sequential(embed=Identity, fc=Linear)``
      and ``embedding`` is that ``embed``, i.e. the classifier's input (VGG: after its hidden
      layers and dropout); SqueezeNet has no linear classifier and no ``embedding``.

    Args:
        input_shape: shape of one input sample ``[C, H, W]`` (the dry pass that finds the
            stages uses it).
        num_classes: number of output logits.
        name: torchvision model name.
        weights: torchvision weights name, or ``None`` for random initialisation.
        **kwargs: passed on to the torchvision builder (e.g. ``dropout``).
    """

    #: classes whose ``avgpool`` is followed by a flatten and a layer that takes the vector
    _POOL_THEN_FLATTEN = (
        "ResNet",
        "RegNet",
        "GoogLeNet",
        "Inception3",
        "MobileNetV3",
        "EfficientNet",
        "SwinTransformer",
    )
    #: classes whose trunk module is pooled by a function before ``classifier``
    _TRUNK_THEN_CLASSIFIER = {"MobileNetV2": "features", "MNASNet": "layers"}

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        name: str,
        weights: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        self.name = name
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            raise KdlabError(
                f"model.name: '{name}' is not a torchvision classification model"
                f"{close_matches(name, known)}"
            )
        if name in ("googlenet", "inception_v3"):
            kwargs.setdefault("aux_logits", False)
        if weights is not None:
            try:
                torchvision.models.get_model_weights(name).verify(weights)
            except (KeyError, ValueError):
                options = ["DEFAULT", *(w.name for w in torchvision.models.get_model_weights(name))]
                raise KdlabError(
                    f"model.weights: '{weights}' are not weights of torchvision '{name}'"
                    f"{close_matches(str(weights), options)}; choose from {', '.join(options)}"
                ) from None
            net = torchvision.models.get_model(name, weights=weights, **kwargs)
        else:
            net = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
        final = _final_layer(net)
        if weights is not None and final is not None:
            path, layer = final
            outputs = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            if outputs != num_classes:
                if isinstance(layer, nn.Linear):
                    head = nn.Linear(layer.in_features, num_classes, layer.bias is not None)
                else:
                    head = nn.Conv2d(layer.in_channels, num_classes, layer.kernel_size)
                _set_module(net, path, head)
        _adapt_input_channels(net, int(input_shape[0]), weights is not None)
        self.net = net

        kind = type(net).__name__
        self._trunk: str | None = None
        if kind in self._TRUNK_THEN_CLASSIFIER:
            self._trunk = self._TRUNK_THEN_CLASSIFIER[kind]
            self.pool = _pooled()
            embedding = ["pool"]
        elif kind in self._POOL_THEN_FLATTEN and isinstance(
            getattr(net, "avgpool", None), nn.AdaptiveAvgPool2d
        ):
            net.avgpool = _pooled()
            embedding = ["net.avgpool"]
        elif final is not None and isinstance(net.get_submodule(final[0]), nn.Linear):
            path = final[0]
            fc = net.get_submodule(path)
            _set_module(net, path, nn.Sequential(OrderedDict(embed=nn.Identity(), fc=fc)))
            embedding = [f"net.{path}.embed"]
        else:
            embedding = []

        if isinstance(net, torchvision.models.ResNet):
            stages = [f"net.layer{i}" for i in range(1, 5)]
        else:
            example = torch.zeros(1, *(int(d) for d in input_shape))
            try:
                head = _final_layer(self.net)
                stages = _resolution_stages(self, self.net, example, head and f"net.{head[0]}")
            except RuntimeError as err:
                raise KdlabError(
                    f"model.name: torchvision '{name}' cannot run on inputs of shape "
                    f"{list(input_shape)}: {_first_line(err)}"
                ) from None
        self._taps = {"stages": stages, "preact": list(stages), "embedding": embedding}

    def taps(self) -> dict[str, list[str]]:
        """Aliases of module paths (see the class and module docstrings): ``stages`` (ResNets:
        ``net.layer1..4``; others: the last feature module of each resolution), ``preact``
        (equal to ``stages``: torchvision blocks end in their activation), ``embedding`` (the
        pooled vector the classifier reads; absent for SqueezeNet)."""
        return {alias: list(paths) for alias, paths in self._taps.items() if paths}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._trunk is not None:
            return self.net.classifier(self.pool(getattr(self.net, self._trunk)(x)))
        out = self.net(x)
        return out if isinstance(out, torch.Tensor) else out.logits


class TimmModel(nn.Module):
    """A timm (PyTorch Image Models, Wightman 2019) classifier by name, built with
    ``timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=C,
    **kwargs)`` (timm replaces a pretrained head and adapts the stem itself). timm is optional:
    without it construction fails with a hint to ``pip install timm``.

    Stages are the modules named in the model's ``feature_info`` (``net.<module>``), else found
    by the dry pass of the module docstring. The forward pass is ``forward_features →
    forward_head(pre_logits=True) → embed → get_classifier()``, so ``embed`` (an identity) holds
    the pooled penultimate vector; a model without that interface runs its own ``forward`` and
    has no ``embedding``.

    Args:
        input_shape: shape of one input sample ``[C, H, W]``.
        num_classes: number of output logits.
        name: timm model name (``timm.list_models()``), optionally with a pretrained tag.
        pretrained: load timm's pretrained weights (timm downloads them).
        **kwargs: passed on to ``timm.create_model`` (e.g. ``drop_rate``).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        name: str,
        pretrained: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        self.name = name
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            raise KdlabError(
                f"model.name: timm model '{name}' needs timm, which is not installed; "
                "pip install timm"
            ) from None
        try:
            net = timm.create_model(
                name,
                pretrained=pretrained,
                num_classes=num_classes,
                in_chans=int(input_shape[0]),
                **kwargs,
            )
        except RuntimeError as err:
            if "Unknown model" not in str(err):
                raise
            raise KdlabError(
                f"model.name: '{name}' is not a timm model{close_matches(name, timm.list_models())}"
            ) from None
        self.net = net
        head = net.get_classifier() if hasattr(net, "get_classifier") else None
        self._split = hasattr(net, "forward_head") and isinstance(head, nn.Module)
        self.embed = nn.Identity()

        modules = dict(self.named_modules())
        stages = [f"net.{m}" for m in self._feature_modules(net) if f"net.{m}" in modules]
        if not stages:
            example = torch.zeros(1, *(int(d) for d in input_shape))
            final = _final_layer(net)
            stages = _resolution_stages(self, self.net, example, final and f"net.{final[0]}")
        embedding = ["embed"] if self._split else []
        self._taps = {"stages": stages, "preact": list(stages), "embedding": embedding}

    @staticmethod
    def _feature_modules(net: nn.Module) -> list[str]:
        info = getattr(net, "feature_info", None)
        if isinstance(info, list):
            return [d["module"] for d in info if isinstance(d, dict) and d.get("module")]
        if info is not None and hasattr(info, "module_name"):
            return list(info.module_name())
        return []

    def taps(self) -> dict[str, list[str]]:
        """Aliases of module paths: ``stages`` (timm's ``feature_info`` modules, shallow to
        deep), ``preact`` (equal to ``stages``: timm blocks end in their activation),
        ``embedding`` (``embed``, the pre-logits vector)."""
        return {alias: list(paths) for alias, paths in self._taps.items() if paths}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._split:
            return self.net(x)
        features = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return self.net.get_classifier()(self.embed(features))


def resnet18(input_shape: Sequence[int], num_classes: int, **kwargs) -> TorchvisionModel:
    """torchvision ResNet-18 (11.69M parameters at 1000 classes), random init by default."""
    return TorchvisionModel(input_shape, num_classes, "resnet18", **kwargs)


def resnet34(input_shape: Sequence[int], num_classes: int, **kwargs) -> TorchvisionModel:
    """torchvision ResNet-34 (21.80M parameters at 1000 classes), random init by default."""
    return TorchvisionModel(input_shape, num_classes, "resnet34", **kwargs)


def resnet50(input_shape: Sequence[int], num_classes: int, **kwargs) -> TorchvisionModel:
    """torchvision ResNet-50 (25.56M parameters at 1000 classes), random init by default."""
    return TorchvisionModel(input_shape, num_classes, "resnet50", **kwargs)


def mobilenet_v2(input_shape: Sequence[int], num_classes: int, **kwargs) -> TorchvisionModel:
    """torchvision ImageNet MobileNetV2 (3.50M parameters at 1000 classes), random init by
    default; not the CIFAR ``mobilenetv2`` of :mod:`kdlab.models.mobilenetv2`."""
    return TorchvisionModel(input_shape, num_classes, "mobilenet_v2", **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
}
