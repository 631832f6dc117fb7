"""Models addressable by name: the CIFAR families of the KD literature, torchvision's ImageNet
networks, and any torchvision or timm model.

    create("resnet8x4", input_shape=[3, 32, 32], num_classes=100)
    create("torchvision:efficientnet_b0", input_shape=[3, 224, 224], num_classes=1000)
    create("timm:convnext_tiny", input_shape=[3, 224, 224], num_classes=1000)   # needs timm
    create("hf:gpt2", input_shape=[128], num_classes=50257)     # needs transformers (kdlab[llm])

In a config: ``model: {_target_: kdlab.models.create, name: resnet8x4}`` (see
``conf/student/resnet8x4.yaml``); the framework fills in ``input_shape`` and ``num_classes``
from the data. Every model defines ``taps()`` with the aliases ``stages``, ``preact`` and
``embedding`` that feature-based strategies read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from kdlab.util.errors import KdlabError, close_matches

#: the modules whose ``MODELS`` dicts make up the registry, in the order they are listed
FAMILIES = ("resnet_cifar", "wrn", "vgg", "mobilenetv2", "shufflenet", "vit", "gpt", "hub")


def registry() -> dict[str, Callable[..., nn.Module]]:
    """Every named model: name → constructor ``(input_shape, num_classes, **kwargs)``."""
    models: dict[str, Callable[..., nn.Module]] = {}
    for family in FAMILIES:
        module = importlib.import_module(f"kdlab.models.{family}")
        for name, constructor in module.MODELS.items():
            if name in models:
                raise RuntimeError(f"model name {name!r} is defined twice (kdlab.models.{family})")
            models[name] = constructor
    return models


def available() -> list[str]:
    """The names :func:`create` accepts (besides ``torchvision:<name>``, ``timm:<name>`` and
    ``hf:<name-or-path>``)."""
    return sorted(registry())


def source_digest(name: str) -> str | None:
    """A digest of the local files model ``name`` is built from, when its config names files
    (``hf:<folder-or-file>``), for the identity of a network kdlab trains from them; ``None``
    for every model defined by its name and config alone."""
    if isinstance(name, str) and name.startswith("hf:"):
        from kdlab.models.hf import files_digest

        return files_digest(name[3:])
    return None


def create(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """The model called ``name``, for inputs ``[C, H, W]`` and ``num_classes`` outputs.

    ``torchvision:<name>`` and ``timm:<name>`` build any model of those libraries (extra
    keyword arguments go to their constructors, e.g. ``weights: DEFAULT``); ``hf:<name-or-path>``
    any causal language model of Hugging Face ``transformers`` (:mod:`kdlab.models.hf`)."""
    if not isinstance(name, str) or not name:
        raise KdlabError(f"model.name={name!r} must be a model name; known: "
                         f"{', '.join(available())}")
    if name.startswith("torchvision:") or name.startswith("timm:"):
        from kdlab.models.hub import TimmModel, TorchvisionModel

        library, model = name.split(":", 1)
        wrapper = TorchvisionModel if library == "torchvision" else TimmModel
        return wrapper(input_shape, num_classes, name=model, **kwargs)
    if name.startswith("hf:"):
        from kdlab.models.hf import HFCausalLM

        return HFCausalLM(input_shape, num_classes, name=name[3:], **kwargs)
    models = registry()
    if name not in models:
        hint = close_matches(name, list(models))
        raise KdlabError(f"model.name={name} is not a kdlab model{hint}; known: "
                         f"{', '.join(sorted(models))}, or torchvision:<name> / timm:<name> / "
                         "hf:<name-or-path>")
    return models[name](input_shape, num_classes, **kwargs)
