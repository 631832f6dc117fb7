"""What a network costs: parameters, FLOPs, weight size, CPU latency per batch size, and the
teacher/student ratios ``kdlab-eval`` reports."""

from __future__ import annotations

import io
import statistics
from collections.abc import Mapping, Sequence
from time import perf_counter
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdlab.util.inputs import example_inputs


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def cpu_latency_ms(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 128,
    repeats: int = 20,
    warmup: int = 3,
    channels_last: bool = False,
) -> float:
    """Median wall time in milliseconds of one eval-mode forward pass of a ``batch_size`` batch
    on the CPU, with the process's current thread count. ``model`` is left where it was."""
    return side_by_side_latency_ms({"model": model}, input_shape, batch_size, repeats, warmup,
                                   channels_last)["model"]


@torch.no_grad()
def side_by_side_latency_ms(models: Mapping[str, nn.Module], input_shape: tuple[int, ...],
                            batch_size: int, repeats: int, warmup: int = 3,
                            channels_last: bool = False) -> dict[str, float]:
    """Median wall time (ms) of one eval-mode CPU forward pass of each model on the same
    ``batch_size`` batch, measured side by side: every round runs each model once, in an order
    that reverses from one round to the next (A B, B A, A B …), so a machine that speeds up or
    slows down (other processes, clock boost, caches) weighs on every model alike, and no model
    always runs right after another. The models are left on their devices and in their modes."""
    states = {name: (_device(m), m.training) for name, m in models.items()}
    for model in models.values():
        model.cpu().eval()
    x = example_inputs(input_shape, batch_size)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            start = perf_counter()
            models[name](x)
            if round_ >= warmup:
                times[name].append(perf_counter() - start)
    for name, model in models.items():
        device, training = states[name]
        model.to(device).train(training)
    return {name: 1000.0 * statistics.median(t) for name, t in times.items()}


def _device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for one without: a quantised MLP)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def describe_model(
    model: nn.Module, input_shape: tuple[int, ...], latency: Mapping[str, Any], channels_last: bool
) -> dict[str, Any]:
    """Parameter count and CPU latency of ``model``."""
    return {
        "params": count_parameters(model),
        "latency_ms": cpu_latency_ms(
            model,
            input_shape,
            batch_size=int(latency["batch_size"]),
            repeats=int(latency["repeats"]),
            channels_last=channels_last,
        ),
        "latency_batch_size": int(latency["batch_size"]),
        "latency_threads": torch.get_num_threads(),
    }


@torch.no_grad()
def flops_per_sample(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Floating-point operations of one eval-mode forward pass of one sample, as counted by
    torch's ``FlopCounterMode`` (a multiply-add is 2 FLOPs; matmuls and convolutions only)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(example_inputs(input_shape, 1, zeros=True).to(device))
    model.train(was_training)
    return int(counter.get_total_flops())


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's ``state_dict`` saved with ``torch.save`` (what a deployment ships)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def footprint(model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 128),
              repeats: int = 20, channels_last: bool = False) -> dict[str, Any]:
    """Parameters, FLOPs per sample, state_dict bytes and the median CPU latency (ms) of one
    forward pass at each batch size, with the thread count it was measured with."""
    return {
        "params": count_parameters(model),
        "flops_per_sample": flops_per_sample(model, input_shape),
        "state_dict_bytes": state_dict_bytes(model),
        "latency_ms_by_batch": {
            int(b): cpu_latency_ms(model, tuple(input_shape), batch_size=int(b), repeats=repeats,
                                   channels_last=channels_last)
            for b in batch_sizes},
        "latency_threads": torch.get_num_threads(),
    }


def ratios(teacher: Mapping[str, Any], student: Mapping[str, Any]) -> dict[str, Any]:
    """Teacher ÷ student: compression (parameters, bytes), FLOPs reduction, CPU speed-up per
    batch size, and the accuracy the student gives up (points, test split)."""
    out: dict[str, Any] = {
        "compression_params": teacher["params"] / student["params"],
        "compression_bytes": teacher["state_dict_bytes"] / student["state_dict_bytes"],
        "flops_reduction": (teacher["flops_per_sample"] / student["flops_per_sample"]
                            if student["flops_per_sample"] else None),
        "speedup_by_batch": {
            b: teacher["latency_ms_by_batch"][b] / student["latency_ms_by_batch"][b]
            for b in student["latency_ms_by_batch"] if b in teacher["latency_ms_by_batch"]},
    }
    t_acc = teacher.get("metrics", {}).get("test/acc")
    s_acc = student.get("metrics", {}).get("test/acc")
    if t_acc is not None and s_acc is not None:
        out["accuracy_gap_points"] = 100 * (t_acc - s_acc)
    return out
