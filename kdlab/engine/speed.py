"""Speed choices made from the device, the data and a measurement, not assumed.

- :func:`auto_compile`: what ``compile.student/teacher/mode=auto`` means on a device. On one CUDA
  device the networks are compiled with CUDA graphs (``mode="reduce-overhead"``) when every
  training batch has one shape; otherwise ``mode="default"``, with the reason in one log line.
  A small network at a small batch is bound by kernel launches, which CUDA graphs remove (the
  issue's H200 measurement: resnet32x4 → resnet8x4 at batch 64, 7.1k samples/s eager bf16,
  17.6k with CUDA graphs). On a CPU ``auto`` does not compile: a CPU compile takes minutes,
  longer than most CPU runs.
- :func:`probe_precision`: ``trainer.precision=auto`` times the student's forward and backward
  pass at the training batch size on the training device in float32 and under bfloat16 autocast
  (interleaved, median of ``steps``) and keeps bf16 only when it is clearly faster (by more than
  ``margin``): at small batches a GPU is launch-bound and autocast's casts make bf16 slower than
  float32 (the same H200 measurement: 7.1k vs 8.5k samples/s).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.engine.spec import CompileOptions

#: the precisions ``trainer.precision=auto`` chooses between (fp16 needs a loss scaler: never)
CANDIDATES = ("32-true", "bf16-mixed")


def device_type(accelerator: str) -> str:
    """The torch device type a Lightning ``accelerator`` runs on (``auto``: what is here)."""
    accelerator = str(accelerator)
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    return accelerator


def auto_compile(student: bool | str, teacher: bool | str, mode: str | None, device: str,
                 distributed: bool, dynamic: str | None) -> tuple[CompileOptions, list[str]]:
    """Resolve ``auto`` in the compile options for ``device`` (a torch device type);
    ``dynamic``: why the training batches' shapes can vary (``None``: one shape). Returns the
    options and the log lines that say what ``auto`` chose and why."""
    lines = []
    on_gpu = device == "cuda"
    if "auto" in (student, teacher):
        if on_gpu:
            lines.append("compile: auto on cuda: the networks are compiled")
        else:
            lines.append(f"compile: auto on {device}: not compiled (a compile costs minutes "
                         "off a GPU; compile.student=true asks for it)")
    student = on_gpu if student == "auto" else bool(student)
    teacher = on_gpu if teacher == "auto" else bool(teacher)
    if mode == "auto":
        if not (student or teacher):
            mode = None
        elif not on_gpu:
            mode = None  # CUDA graphs exist on CUDA only
        elif distributed:
            mode = None
            lines.append("compile: mode default, not reduce-overhead (CUDA graphs): the trainer "
                         "runs several processes (DDP); compile.mode=reduce-overhead asks for it")
        elif dynamic is not None:
            mode = None
            lines.append(f"compile: mode default, not reduce-overhead (CUDA graphs): {dynamic}")
        else:
            mode = "reduce-overhead"
            lines.append("compile: mode reduce-overhead (CUDA graphs): every training batch "
                         "has one shape")
    elif mode == "default":
        mode = None
    return CompileOptions(student=student, teacher=teacher, mode=mode), lines


def supported_precisions(device: torch.device) -> tuple[str, ...]:
    """The :data:`CANDIDATES` that ``device`` can run."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return ("32-true",)
    if device.type not in ("cuda", "cpu"):
        return ("32-true",)
    return CANDIDATES


def probe_precision(student: nn.Module, example: Callable[[int], Any], batch_size: int,
                    device: torch.device, channels_last: bool = False, steps: int = 10,
                    warmup: int = 3, margin: float = 0.05,
                    timer: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Time a copy of ``student`` (forward, cross-entropy against random labels, backward) on a
    batch of ``example(batch_size)`` inputs on ``device`` in each supported precision, the
    candidates interleaved step by step; returns ``{"choice", "ms_per_step": {precision: median
    ms}, "batch_size", "device", "steps"}``. bf16 is chosen only when its median is below
    ``(1 - margin)`` × float32's. The student itself is not touched."""
    candidates = supported_precisions(device)
    if len(candidates) == 1:
        return {"choice": candidates[0], "ms_per_step": {}, "batch_size": batch_size,
                "device": str(device), "steps": 0,
                "why": f"{device.type} has no bfloat16 autocast to compare with"}
    model = copy.deepcopy(student).to(device).train()
    x = example(batch_size)
    x = x.to(device) if isinstance(x, torch.Tensor) else x
    if channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step(precision: str) -> float:
        model.zero_grad(set_to_none=True)
        synchronize(device)
        start = timer()
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=precision == "bf16-mixed"):
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out = out.reshape(-1, out.shape[-1])
            labels = torch.randint(0, out.shape[-1], (out.shape[0],), device=out.device)
            loss = F.cross_entropy(out.float(), labels)
        loss.backward()
        synchronize(device)
        return timer() - start

    times: dict[str, list[float]] = {p: [] for p in candidates}
    for i in range(warmup + steps):
        for precision in candidates:
            elapsed = step(precision)
            if i >= warmup:
                times[precision].append(elapsed)
    ms = {p: 1000 * statistics.median(t) for p, t in times.items()}
    fast = ms["bf16-mixed"] < (1 - margin) * ms["32-true"]
    return {"choice": "bf16-mixed" if fast else "32-true", "ms_per_step": ms,
            "batch_size": batch_size, "device": str(device), "steps": steps}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_probe(probe: dict[str, Any]) -> str:
    """One log line for a :func:`probe_precision` result."""
    if not probe["ms_per_step"]:
        return f"precision: auto → {probe['choice']} ({probe.get('why', '')})"
    timings = ", ".join(f"{p} {ms:.2f} ms" for p, ms in probe["ms_per_step"].items())
    return (f"precision: auto → {probe['choice']} (student forward+backward at batch "
            f"{probe['batch_size']} on {probe['device']}, median of {probe['steps']}: {timings})")
