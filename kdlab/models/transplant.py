"""Initialise a student from its teacher's weights.

``student.init_from_teacher=match`` copies every teacher tensor whose name and shape match a
student tensor (a student that keeps the teacher's first layers starts from them). A mapping
``{student prefix: teacher prefix}`` copies by prefix instead, e.g. DistilBERT's "one layer in
two" (Sanh et al. 2019, "DistilBERT, a distilled version of BERT"):
``{stages.0: stages.0, stages.1: stages.2}``. Every tensor copied and every tensor left at its
random initialisation (with the reason) is logged and returned for ``results.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdlab.util.errors import KdlabError

log = logging.getLogger(__name__)
KEY = "student.init_from_teacher"


def _source(name: str, mapping: Mapping[str, str] | None) -> str | None:
    """The teacher tensor name for student tensor ``name`` (``None``: not mapped)."""
    if mapping is None:
        return name
    best = None
    for prefix in mapping:
        if name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return None if best is None else str(mapping[best]) + name[len(best):]


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module,
                      spec: str | Mapping[str, str]) -> dict[str, Any]:
    """Copy teacher tensors (parameters and buffers) into ``student`` per ``spec`` (``match``
    or a prefix mapping); returns ``{"copied": {student: teacher}, "skipped": {student:
    reason}}``. Fails when no weight matrix or kernel can be copied (biases alone are no
    initialisation), or when a mapped prefix names no tensor."""
    if isinstance(spec, str):
        if spec != "match":
            raise KdlabError(f"{KEY}={spec} must be match, a mapping "
                             "{student prefix: teacher prefix}, or null")
        mapping = None
    elif isinstance(spec, Mapping):
        mapping = {str(k): str(v) for k, v in spec.items()}
    else:
        raise KdlabError(f"{KEY} must be match or a mapping, not {type(spec).__name__}")
    theirs = teacher.state_dict()
    ours = student.state_dict()
    if mapping is not None:
        for s_prefix, t_prefix in mapping.items():
            if not any(n == s_prefix or n.startswith(s_prefix + ".") for n in ours):
                raise KdlabError(f"{KEY}: '{s_prefix}' names no tensor of the student")
            if not any(n == t_prefix or n.startswith(t_prefix + ".") for n in theirs):
                raise KdlabError(f"{KEY}: '{t_prefix}' names no tensor of the teacher")
    copied: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, tensor in ours.items():
        source = _source(name, mapping)
        if source is None:
            skipped[name] = "not mapped"
        elif source not in theirs:
            skipped[name] = f"no teacher tensor {source}"
        elif theirs[source].shape != tensor.shape:
            skipped[name] = (f"shape {list(tensor.shape)} ≠ teacher {source} "
                             f"{list(theirs[source].shape)}")
        elif name.endswith("num_batches_tracked") and \
                name.replace("num_batches_tracked", "weight") not in copied:
            skipped[name] = "its layer's weights are not copied"
        else:
            tensor.copy_(theirs[source])
            copied[name] = source
    if not any(ours[n].is_floating_point() and ours[n].dim() >= 2 for n in copied):
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
        raise KdlabError(f"{KEY} copied no weight from the teacher ({reasons} …): give a "
                         "mapping {student prefix: teacher prefix} between layers of equal "
                         "shape, or null")
    log.info("Student init from teacher: copied %d tensors (%s), left %d at random init",
             len(copied), ", ".join(copied), len(skipped))
    for name, reason in skipped.items():
        log.info("  not copied: %s (%s)", name, reason)
    return {"copied": copied, "skipped": skipped}
