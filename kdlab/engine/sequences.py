"""Sequence-level knowledge distillation — Kim & Rush, "Sequence-Level Knowledge Distillation",
EMNLP 2016 (arXiv:1606.07947): the student trains on the teacher's own sequences instead of
the corpus's.

For every training window of ``context + 1`` tokens, the first ``prompt`` tokens are kept and
the teacher writes the rest (:func:`teacher_windows`): greedily (``temperature`` 0, the
paper's beam search with a beam of one — beam search itself is not implemented) or sampled at
a temperature, optionally among the ``top_k`` most likely tokens. The student then trains on
these windows with the cross-entropy against the teacher's tokens (Kim & Rush's word-level
plus sequence-level mix is ``distill=kd`` on top); validation and test stay on the corpus.

The windows are generated once, with a progress bar, and kept beside the teacher store
(``<paths.teacher_store>/sequences/<key>.pt``, a :class:`~kdlab.util.files.VerifiedFile`
written atomically under a lock), so later runs with the same teacher and data reuse them. The
key hashes everything that defines them: the teacher's weights, the training windows (the
corpus, its split and context), the prompt, temperature, top-k, seed and length of the
generation, the batch the generator draws for, and the device type (a CPU and a GPU may break
a near tie between two tokens differently).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.engine.generate import sample
from kdlab.engine.spec import SequenceKDOptions
from kdlab.util.errors import KdlabError
from kdlab.util.files import ReadOnlyFolder, VerifiedFile, locked, tensor_digest

log = logging.getLogger(__name__)

SEQUENCE_FORMAT = 1
#: windows generated together (the random draws of a chunk come from one seeded generator)
GENERATION_BATCH = 256


def sequence_key(teacher: nn.Module, windows: torch.Tensor, options: SequenceKDOptions,
                 device: torch.device) -> str:
    """``<teacher hash>-<data hash>-<generation hash>``: what defines generated windows."""
    state = teacher.state_dict()
    weights = tensor_digest(*state.values(), extra=",".join(state))
    data = tensor_digest(windows)
    length = windows.shape[1] - options.prompt
    generation = tensor_digest(extra=f"{SEQUENCE_FORMAT}|prompt={options.prompt}|temperature="
                                     f"{float(options.temperature)!r}|top_k={options.top_k}|"
                                     f"seed={options.seed}|length={length}|batch="
                                     f"{GENERATION_BATCH}|device={device.type}")
    return f"{weights[:12]}-{data[:12]}-{generation[:8]}"


def generate_windows(teacher: nn.Module, windows: torch.Tensor, options: SequenceKDOptions
                     ) -> torch.Tensor:
    """``windows`` ``[N, L]`` with everything after the first ``options.prompt`` tokens of each
    written by ``teacher`` (on its device), in chunks of :data:`GENERATION_BATCH`; chunk ``c``
    draws from a generator seeded with ``(options.seed, c)``."""
    device = next(teacher.parameters(), torch.empty(0)).device
    out = torch.empty_like(windows)
    length = windows.shape[1] - options.prompt
    bar = _progress_bar(len(windows), options.progress)
    try:
        for c, start in enumerate(range(0, len(windows), GENERATION_BATCH)):
            prompt = windows[start : start + GENERATION_BATCH, : options.prompt].to(device)
            generator = None
            if options.temperature > 0:
                generator = torch.Generator(device=device).manual_seed(
                    options.seed * 1_000_003 + c)
            out[start : start + len(prompt)] = sample(teacher, prompt, length,
                                                      options.temperature, options.top_k,
                                                      generator).cpu()
            bar(len(prompt))
    finally:
        bar(None)
    return out


def teacher_windows(teacher: nn.Module, windows: torch.Tensor, options: SequenceKDOptions
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The training ``windows`` ``[N, context + 1]`` (token ids) with the teacher's
    continuations after each prompt: read from ``options.folder`` when an intact entry of the
    same key is there, generated (and saved there) otherwise. Returns them with a description
    for ``results.json``: the key, the file, and whether it was ``reused``."""
    if not 1 <= options.prompt < windows.shape[1] - 1:
        raise KdlabError(f"sequence_kd.prompt={options.prompt} must be at least 1 and below "
                         f"data.context={windows.shape[1] - 1}: the teacher writes the rest")
    device = next(teacher.parameters(), torch.empty(0)).device
    key = sequence_key(teacher, windows, options, device)
    info: dict[str, Any] = {"key": key, "windows": len(windows), "prompt": options.prompt,
                            "temperature": options.temperature, "top_k": options.top_k,
                            "seed": options.seed, "reused": False, "path": None}

    def build() -> torch.Tensor:
        start = time.perf_counter()
        out = generate_windows(teacher, windows, options)
        log.info("Sequence-level KD: the teacher wrote %d windows of %d tokens after %d-token "
                 "prompts (temperature %g) in %.1f s", len(out), out.shape[1] - options.prompt,
                 options.prompt, options.temperature, time.perf_counter() - start)
        return out

    if options.folder is None:
        return build(), info
    entry = VerifiedFile(Path(options.folder) / f"{key}.pt")
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(locked(entry.path.with_name(f".{key}.lock"),
                                      f"the teacher's windows {key}"))
        except ReadOnlyFolder as e:
            log.info("Sequence-level KD: %s, so the windows are generated for this run only", e)
            return build(), info
        stored = _load(entry, windows, options.prompt)
        info["path"] = str(entry.path)
        if stored is not None:
            log.info("Sequence-level KD: reusing the teacher's windows %s", entry.path)
            info["reused"] = True
            return stored, info
        out = build()
        entry.save({"format": SEQUENCE_FORMAT, "windows": out.to(_storage_dtype(out))},
                   {k: v for k, v in info.items() if k not in ("path", "reused")})
        log.info("Sequence-level KD: saved %s for reuse by later runs", entry.path)
    return out, info


def _storage_dtype(tokens: torch.Tensor) -> torch.dtype:
    """The smallest integer dtype that holds every token id of ``tokens``."""
    top = int(tokens.max()) if tokens.numel() else 0
    return torch.uint8 if top < 256 else torch.int16 if top < 2**15 else torch.int32


def _load(entry: VerifiedFile, windows: torch.Tensor, prompt: int) -> torch.Tensor | None:
    """A stored entry as ``long`` token ids, or ``None`` when missing; one that cannot be proven
    intact, cannot be read or does not continue these windows' prompts is moved aside and
    generated again."""
    if not entry.exists():
        return None
    problem = entry.problem()
    if problem is None:
        try:
            obj: Any = torch.load(entry.path, map_location="cpu", weights_only=True)
            stored = obj["windows"].long()
            if obj.get("format") != SEQUENCE_FORMAT or stored.shape != windows.shape or \
                    not torch.equal(stored[:, :prompt], windows[:, :prompt]):
                problem = f"windows of another format, size or data (not {list(windows.shape)})"
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            problem = f"unreadable content ({type(e).__name__})"
    if problem is not None:
        entry.move_aside(problem, "Sequence-level KD")
        return None
    return stored


def _progress_bar(total: int, enabled: bool):
    """``update(n)`` of a tqdm bar over ``total`` windows (``update(None)`` closes it)."""
    if not enabled:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="Sequence-level KD (teacher writes)", unit="window",
               dynamic_ncols=True, leave=False)

    def update(n: int | None) -> None:
        if n is None:
            bar.close()
        else:
            bar.update(n)

    return update
