"""Where a model's class scores come from: its last spatial feature map and its linear classifier.

Class-map methods (CAT-KD, SDD) apply a network's classifier at every position of its final
feature map. :func:`final_head` finds, for any model, the module whose output is that map and
the ``nn.Linear`` that produces the logits, without running the model: it traces the model's
``forward`` symbolically (``torch.fx``, every submodule a leaf, so only the top-level data flow
is read; a wrapper whose top level ends in one opaque module — the torchvision wrapper's
``net`` — is traced one level further) and walks back from the logits:

* the logits must be the output of an ``nn.Linear`` (possibly inside a ``Sequential`` whose other
  members are dropout or identity: kdlab's ``CNN`` ``classifier = Dropout → Linear``,
  torchvision's ``Dropout → Linear`` heads);
* between it and the map only dropout, identity, flatten and *global average pooling*
  (``AdaptiveAvgPool2d(1)``, alone or in a parameter-free ``Sequential`` / wrapper with a
  flatten — kdlab's ``pool``, timm's ``SelectAdaptivePool2d`` — or ``F.adaptive_avg_pool2d(x,
  1)`` / ``x.mean((2, 3))``) may sit;
* the map is the output of a module (its path is returned; a ``Sequential`` is replaced by the
  member of its last-child chain that the model's ``taps()`` aliases name, e.g. ``stages`` →
  ``stages.1`` for the ``CNN``, ``net.features`` → ``net.features.18`` for torchvision's
  MobileNetV2).

Two kinds of heads qualify:

* **pooled** (every zoo family: ``pool = AdaptiveAvgPool2d(1) → Flatten``, then the Linear):
  ``logits = W · mean_{h,w} F(h, w) + b``, so the per-position class map ``M(h, w) = W · F(h, w)``
  satisfies ``mean_{h,w} M + b = logits``;
* **flat** (kdlab's ``CNN`` with ``hidden=0``: the Linear reads the flattened map): with ``W``
  reshaped to ``[K, C, H, W]``, ``logits = Σ_{c,h,w} W[k,c,h,w] F[c,h,w] + b``; the class map
  is ``M(h, w) = H·W · Σ_c W[:, c, h, w] F[c, h, w]`` (each position's exact contribution to the
  logits, times the number of positions), so that again ``mean_{h,w} M + b = logits``.

A classifier behind a hidden layer (``CNN`` with ``hidden > 0``, an ``MLP``), a normalisation
after the pooling (ConvNeXt), a token-based head (ViT) or logits from a convolution (SqueezeNet)
fail with a :class:`~kdlab.util.errors.KdlabError` saying why and what to set. The strategies
check on their probe batch that the class maps reproduce the logits (:meth:`Head.check`), so
a model whose forward the trace misreads fails at set-up, not silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from kdlab.util.errors import KdlabError

#: modules that pass their input on unchanged at evaluation (and carry no class information)
_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout, nn.FeatureAlphaDropout)
_PASS_OR_FLATTEN = (*_PASSTHROUGH, nn.Flatten)


@dataclass(frozen=True)
class Head:
    """A model's final feature map and linear classifier (see the module docstring).

    Attributes:
        feature_path: module path whose output is the final map ``F`` ``(N, C, H, W)``.
        classifier_path: module path of the ``nn.Linear`` that produces the logits.
        classifier: that ``nn.Linear`` (the model's own module: its current weights are read
            at every call, and the student's receive gradients).
        flat: the classifier reads the flattened map (``CNN`` with ``hidden=0``) rather than its
            global average.
    """

    feature_path: str
    classifier_path: str
    classifier: nn.Linear
    flat: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return self.classifier.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.classifier.bias

    def class_maps(self, features: torch.Tensor) -> torch.Tensor:
        """``M`` ``(N, K, H, W)`` with ``mean_{h,w} M + b = logits``: ``W · F(h, w)`` for a
        pooled head, ``H·W ·`` the per-position contribution for a flat one (no bias)."""
        return class_maps(self.weight, features, self.flat)

    def region_logits(self, features: torch.Tensor, size: int) -> torch.Tensor:
        """The classifier applied to the map average-pooled to ``size × size`` regions
        (``adaptive_avg_pool2d``): ``(N, K, size, size)``, bias included. ``size = 1`` gives the
        logits (without the classifier's dropout)."""
        bias = self.bias
        if self.flat:
            regions = F.adaptive_avg_pool2d(self.class_maps(features), size)
        else:  # pooling commutes with the 1×1 linear map: pool the C channels, not the K maps
            pooled = F.adaptive_avg_pool2d(features, size)
            regions = F.conv2d(pooled, self.weight[:, :, None, None].to(pooled.dtype))
        if bias is not None:
            regions = regions + bias.to(regions.dtype)[None, :, None, None]
        return regions

    def check(self, features: torch.Tensor, logits: torch.Tensor, role: str) -> None:
        """Fail unless ``mean_{h,w} M + b`` reproduces ``logits`` on a probe batch (evaluation
        mode): the proof that ``feature_path`` and ``classifier_path`` are the model's head."""
        if features.dim() != 4:
            raise KdlabError(f"{role}: the output of {self.feature_path} has shape "
                             f"{list(features.shape)}, not a (N, C, H, W) feature map")
        with torch.no_grad():
            got = self.region_logits(features.float() if features.dtype == torch.half
                                     else features, 1).flatten(1).to(logits.dtype)
            if got.shape != logits.shape:
                raise KdlabError(f"{role}: the classifier {self.classifier_path} applied to "
                                 f"{self.feature_path} gives shape {list(got.shape)}, the "
                                 f"model's logits have {list(logits.shape)}")
            error = (got - logits).abs().max().item()
            scale = 1.0 + logits.abs().max().item()
        if not error <= 1e-3 * scale:
            raise KdlabError(
                f"{role}: the classifier {self.classifier_path} applied to the map of "
                f"{self.feature_path} does not reproduce the model's logits (max difference "
                f"{error:.3g}); class-map methods need logits = Linear(global average or "
                "flatten of the last feature map)")


def class_maps(weight: torch.Tensor, features: torch.Tensor, flat: bool = False) -> torch.Tensor:
    """Per-position class scores ``(N, K, H, W)`` of a linear classifier ``weight`` ``(K, D)``
    on feature maps ``(N, C, H, W)``: ``Σ_c W[k, c] F[n, c, h, w]`` when the classifier reads
    the global average (``D = C``), ``H·W · Σ_c W[k, c, h, w] F[n, c, h, w]`` with ``W``
    reshaped to ``(K, C, H, W)`` when it reads the flattened map (``D = C·H·W``)."""
    n, c, h, w = features.shape
    k, d = weight.shape
    weight = weight.to(features.dtype)
    if flat:
        if d != c * h * w:
            raise KdlabError(f"a flat classifier with {d} inputs cannot read a {c}×{h}×{w} map")
        # one (N × C) @ (C × K) product per position: (H·W, N, C) @ (H·W, C, K)
        per_position = torch.bmm(features.reshape(n, c, h * w).permute(2, 0, 1).contiguous(),
                                 weight.reshape(k, c, h * w).permute(2, 1, 0).contiguous())
        return per_position.permute(1, 2, 0).reshape(n, k, h, w) * (h * w)
    if d != c:
        raise KdlabError(f"a classifier with {d} inputs cannot read a map of {c} channels")
    return F.conv2d(features, weight[:, :, None, None])


# -- finding the head --------------------------------------------------------------------------
class _TopLevel(fx.Tracer):
    """Traces only a module's own ``forward``: every submodule call is one graph node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _leaves(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """A ``Sequential``'s members in order, nested ``Sequential`` s expanded (relative paths);
    any other module is its own single leaf."""
    if not isinstance(module, nn.Sequential):
        return [("", module)]
    out = []
    for name, child in module.named_children():
        out += [(f"{name}.{p}" if p else name, m) for p, m in _leaves(child)]
    return out


def _is_global_pool(module: nn.Module) -> bool:
    """A parameter-free module made of ``AdaptiveAvgPool2d(1)`` and flatten / identity only."""
    if any(True for _ in module.parameters()):
        return False
    parts = [m for m in module.modules() if not list(m.children())] or [module]
    pools = [m for m in parts if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not pools or any(m.output_size not in (1, (1, 1), [1, 1]) for m in pools):
        return False
    return all(isinstance(m, nn.AdaptiveAvgPool2d | nn.Flatten | nn.Identity) for m in parts)


def _is_flatten_call(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (torch.flatten, torch.reshape) or node.target is torch.Tensor.view
    return node.op == "call_method" and node.target in ("flatten", "view", "reshape",
                                                         "squeeze")


def _is_pool_call(node: fx.Node) -> bool:
    """``F.adaptive_avg_pool2d(x, 1)`` or a mean over the two spatial dimensions."""
    args, kwargs = node.args, node.kwargs
    if node.op == "call_function" and (node.target is F.adaptive_avg_pool2d or getattr(
            node.target, "__name__", "") == "adaptive_avg_pool2d"):  # or its C binding
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean):
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        return isinstance(dims, tuple | list) and set(dims) in ({2, 3}, {-2, -1})
    return False


def _hint(model: nn.Module, role: str) -> str:
    from kdlab.models.cnn import CNN
    from kdlab.models.mlp import MLP

    if isinstance(model, CNN):
        return f"; set {role}.model.hidden=0 (the classifier then reads the flattened last map)"
    if isinstance(model, MLP):
        return f"; an MLP has no feature map: choose a convolutional {role}"
    return ""


def final_head(model: nn.Module, role: str = "student") -> Head:
    """The final feature map's module path and the linear classifier of ``model`` (see the
    module docstring); ``role`` (``"student"`` / ``"teacher"``) names the config group in
    errors. Raises :class:`KdlabError` for a model whose classifier does not read the
    (globally pooled or flattened) last map directly."""
    name = f"{role} ({type(model).__name__})"
    hint = _hint(model, role)
    return _find(model, model, "", name, hint)


def _trace(module: nn.Module, name: str, where: str) -> fx.Graph:
    try:
        return _TopLevel().trace(module)
    except Exception as err:  # noqa: BLE001 - any trace failure means: cannot read this forward
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KdlabError(f"{name}: cannot read the forward pass of {where or 'the model'} to "
                         f"find its final feature map and classifier ({first})") from None


def _find(model: nn.Module, root: nn.Module, prefix: str, name: str, hint: str) -> Head:
    feature_path, classifier_path, classifier, flat = _locate(root, prefix, name, hint)[1]
    return Head(_aliased(model, feature_path), classifier_path, classifier, flat)


#: what :func:`_locate` found at one level: the traced graph, the head
#: ``(feature path, classifier path, classifier, flat)``, the node of that graph whose output is
#: the final map (or the wrapper module's call when the head sits inside it) and, for a wrapper,
#: its target and what was found inside it
_Located = tuple[fx.Graph, tuple[str, str, nn.Linear, bool], fx.Node, "tuple[str, Any] | None"]


def _locate(root: nn.Module, prefix: str, name: str, hint: str) -> _Located:
    graph = _trace(root, name, prefix.rstrip("."))
    nodes = list(graph.nodes)
    output = next(n for n in nodes if n.op == "output")
    node = output.args[0]
    if (isinstance(node, fx.Node) and node.op == "call_function" and node.target is getattr
            and node.args[1] == "logits"):  # torchvision's Inception/GoogLeNet named outputs
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "call_module":
        raise KdlabError(f"{name}: its logits are the result of {_describe(node)}, not of a "
                         f"module; class-map methods need a final nn.Linear classifier{hint}")
    module = root.get_submodule(node.target)
    path = prefix + node.target
    if not isinstance(module, nn.Linear | nn.Sequential):
        if not list(module.children()):
            raise KdlabError(f"{name}: its logits come from {path} ({type(module).__name__}), "
                             f"not an nn.Linear classifier{hint}")
        inner = _locate(module, path + ".", name, hint)  # a wrapper: read inside it
        return graph, inner[1], node, (node.target, inner)
    classifier_path, classifier = _classifier(module, path, name, hint)
    feature_node, flat = _walk_back(root, node.args[0], prefix, classifier_path, name, hint)
    if any(n.op == "call_module" and n.target == feature_node.target
           for n in nodes[nodes.index(feature_node) + 1:]):
        raise KdlabError(f"{name}: {prefix + feature_node.target} runs again after it produces "
                         "the final feature map, so its output cannot be read by a hook")
    return graph, (prefix + feature_node.target, classifier_path, classifier, flat), \
        feature_node, None


def final_map_body(model: nn.Module, role: str = "student") -> nn.Module:
    """The part of ``model`` that produces its final feature map: ``model``'s forward cut
    where :func:`final_head` finds the map (the pooling and classifier after it dropped), as a
    ``torch.fx.GraphModule`` that shares ``model``'s submodules (and so its weights: training
    one trains the other). Raises :class:`KdlabError` where :func:`final_head` does."""
    name = f"{role} ({type(model).__name__})"
    return _cut(model, _locate(model, "", name, _hint(model, role)))


def _cut(root: nn.Module, located: _Located) -> fx.GraphModule:
    """``root``'s traced graph up to the located node, which becomes its output; a wrapper's
    call is replaced by the cut of what it wraps."""
    graph, _, stop, wrapper = located
    cut, env = fx.Graph(), {}
    for node in graph.nodes:
        env[node] = cut.node_copy(node, lambda n: env[n])
        if node is stop:
            break
    cut.output(env[stop])
    attributes: dict[str, Any] = {}
    for node in cut.nodes:
        if node.op == "call_module":
            attributes[node.target] = root.get_submodule(node.target)
        elif node.op == "get_attr":
            owner, _, attr = node.target.rpartition(".")
            attributes[node.target] = getattr(root.get_submodule(owner), attr)
    if wrapper is not None:
        target, inner = wrapper
        attributes[target] = _cut(root.get_submodule(target), inner)
    body = fx.GraphModule(attributes, cut, class_name=f"{type(root).__name__}Body")
    body.graph.eliminate_dead_code()  # what only the dropped head read
    body.delete_all_unused_submodules()
    body.recompile()
    return body


def _classifier(module: nn.Module, path: str, name: str, hint: str) -> tuple[str, nn.Linear]:
    """The Linear that ends ``module`` (itself, or the last of a Sequential of dropout /
    identity / flatten then one Linear)."""
    if isinstance(module, nn.Linear):
        return path, module
    leaves = _leaves(module)
    last_path, last = leaves[-1] if leaves else ("", module)
    if not isinstance(last, nn.Linear):
        raise KdlabError(f"{name}: its logits come from {path} ending in "
                         f"{type(last).__name__}, not an nn.Linear classifier{hint}")
    for sub, leaf in leaves[:-1]:
        if not isinstance(leaf, _PASS_OR_FLATTEN):
            what = "a hidden layer" if isinstance(leaf, nn.Linear) else type(leaf).__name__
            raise KdlabError(f"{name}: its classifier {path} applies {what} ({path}.{sub}) "
                             f"before its last nn.Linear; class-map methods need the Linear to "
                             f"read the final feature map directly{hint}")
    return f"{path}.{last_path}", last


def _walk_back(root: nn.Module, node: object, prefix: str, classifier: str, name: str,
               hint: str) -> tuple[fx.Node, bool]:
    """From the classifier's input back to the module that outputs the final map; returns
    that node and whether the classifier reads it flattened (no pooling on the way)."""
    flattened = False
    while True:
        if not isinstance(node, fx.Node) or node.op == "placeholder":
            raise KdlabError(f"{name}: its classifier {classifier} reads the input directly, "
                             f"not a feature map{hint}")
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            path = prefix + node.target
            leaves = [m for _, m in _leaves(module)]
            if _is_global_pool(module):
                node = node.args[0]
                break
            if all(isinstance(m, _PASS_OR_FLATTEN) for m in leaves):
                flattened |= any(isinstance(m, nn.Flatten) for m in leaves)
                node = node.args[0]
                continue
            if any(isinstance(m, nn.Linear) for m in module.modules()):
                raise KdlabError(f"{name}: its classifier {classifier} reads a hidden layer "
                                 f"({path}), not the final feature map; class-map methods "
                                 f"need the classifier on the (pooled) last map{hint}")
            if flattened:  # the classifier reads this module's output, flattened
                return node, True
            raise KdlabError(f"{name}: its classifier {classifier} reads {path} "
                             f"({type(module).__name__}); class-map methods need it to read the "
                             f"final feature map through global average pooling or a flatten "
                             f"only{hint}")
        if _is_pool_call(node):
            node = node.args[0]
            break
        if _is_flatten_call(node) or (node.op == "call_function" and node.target is F.dropout):
            flattened = flattened or _is_flatten_call(node)
            node = node.args[0]
            continue
        raise KdlabError(f"{name}: the classifier {classifier} reads the result of "
                         f"{_describe(node)}, not a pooled or flattened feature map{hint}")
    while isinstance(node, fx.Node) and node.op == "call_module" and isinstance(
            root.get_submodule(node.target), _PASSTHROUGH):
        node = node.args[0]  # a dropout or identity right after the map
    if not isinstance(node, fx.Node) or node.op != "call_module":
        raise KdlabError(f"{name}: the map its classifier {classifier} pools is "
                         f"{_describe(node)}, not the output of a module, so no hook can "
                         f"read it{hint}")
    return node, False


def _describe(node: object) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    target = node.target
    return f"{node.op} {getattr(target, '__name__', target) if callable(target) else target}"


def _aliased(model: nn.Module, path: str) -> str:
    """``path``, or the first member of its ``Sequential`` last-child chain (same output) that
    the model's ``taps()`` aliases name."""
    aliases = model.taps() if hasattr(model, "taps") else {}
    named = {p for paths in aliases.values() for p in paths}
    chain, module = [path], model.get_submodule(path)
    while isinstance(module, nn.Sequential) and len(module):
        last, module = list(module.named_children())[-1]
        chain.append(f"{chain[-1]}.{last}")
    return next((p for p in chain if p in named), path)
