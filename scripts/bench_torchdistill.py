"""Training throughput of vanilla KD (Hinton et al.) run by torchdistill's own machinery.

Measures samples/s of one epoch of torchdistill's `DistillationBox` training loop (teacher forward
without grad, student forward, `KDLoss`, backward, AdamW step) on in-memory tensors, on CPU, fp32,
without distributed training. It is the reference point kdlab's KD loop is compared against.

    python scripts/bench_torchdistill.py    # self-check: 2 epochs + loss equivalence on one batch

The config dict mirrors torchdistill's YAML configs (`train:` section of e.g.
`configs/sample/ilsvrc2012/kd/*.yaml`); the epoch loop mirrors its
`examples/torchvision/image_classification.py` minus its MetricLogger and validation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import RandomSampler, TensorDataset
from torchdistill.common.main_util import set_seed
from torchdistill.core.distillation import DistillationBox, get_distillation_box

DATASET_ID = "bench_train"


def kd_train_config(
    batch_size: int, lr: float, temperature: float, alpha: float, seed: int
) -> dict[str, Any]:
    """The `train:` section of a torchdistill config for vanilla KD (one epoch per call).

    Our convention: loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE.
    torchdistill's KDLoss computes `alpha * CE + beta * T^2 * KL` (beta defaults to 1 - alpha), i.e.
    its `alpha` weights the *hard-label CE* term and `beta` the soft KL term, so we pass
    alpha=1-alpha, beta=alpha. Caveat: when its alpha == 0 it returns the bare KL without T^2 (and
    without beta), so for our alpha == 1 the T^2 factor goes into the WeightedSumLoss term weight.
    """
    td_alpha = 1.0 - alpha
    weight = temperature**2 if td_alpha == 0 else 1.0
    return {
        "num_epochs": 1,
        "train_data_loader": {
            "dataset_id": DATASET_ID,
            # YAML: `class_or_func: !import_get {key: 'torch.utils.data.RandomSampler'}`
            "sampler": {
                "class_or_func": RandomSampler,
                "kwargs": {"generator": torch.Generator().manual_seed(seed)},
            },
            "kwargs": {"batch_size": batch_size, "num_workers": 0, "drop_last": False},
        },
        # torchdistill 1.1.5 has no default forward_proc: leaving it out raises
        # "No forward process function `None` registered", so name the plain model(x) one.
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": True},
        "optimizer": {"key": "AdamW", "kwargs": {"lr": lr, "weight_decay": 1e-4}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "kd": {
                        "criterion": {
                            "key": "KDLoss",
                            "kwargs": {
                                "student_module_path": ".", "student_module_io": "output",
                                "teacher_module_path": ".", "teacher_module_io": "output",
                                "temperature": temperature, "alpha": td_alpha, "beta": alpha,
                                "reduction": "batchmean",
                            },
                        },
                        "weight": weight,
                    }
                }
            },
        },
    }


def build_kd_box(
    teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
    batch_size: int, lr: float, temperature: float, alpha: float, seed: int,
) -> DistillationBox:
    """torchdistill's DistillationBox for KD of `student` from `teacher` on (x, y), on CPU."""
    set_seed(seed)
    # torchdistill never switches the teacher's mode (its pre-epoch hook only calls
    # student.train()), so eval mode set here holds; requires_grad=False gives no_grad forwards.
    teacher.eval()
    dataset_dict = {DATASET_ID: TensorDataset(x, y)}
    config = kd_train_config(batch_size, lr, temperature, alpha, seed)
    return get_distillation_box(
        teacher, student, dataset_dict, config, torch.device("cpu"),
        device_ids=None, distributed=False, lr_factor=1,
    )


def torchdistill_kd_runner(
    teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
    batch_size: int, lr: float, temperature: float, alpha: float, seed: int,
) -> Callable[[], int]:
    """Build torchdistill's KD machinery; the returned function trains one epoch with its loop
    and returns the number of samples it trained on."""
    box = build_kd_box(teacher, student, x, y, batch_size, lr, temperature, alpha, seed)
    epoch = 0

    def run_epoch() -> int:
        nonlocal epoch
        seen = 0
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            box.pre_forward_process(sample_batch, targets, supp_dict)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            seen += sample_batch.shape[0]
        box.post_epoch_process()
        epoch += 1
        return seen

    return run_epoch


def _self_check() -> None:
    import torch.nn.functional as F

    torch.set_num_threads(2)
    torch.manual_seed(0)
    teacher = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )
    student = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = torch.randn(4096, 1, 28, 28), torch.randint(0, 10, (4096,))
    kw: dict[str, Any] = {"batch_size": 128, "lr": 1e-3, "temperature": 4.0, "seed": 0}

    run_epoch = torchdistill_kd_runner(teacher, student, x, y, alpha=0.9, **kw)
    for ep in range(2):
        t0 = time.perf_counter()
        n = run_epoch()
        dt = time.perf_counter() - t0
        print(f"epoch {ep}: {n} samples in {dt:.2f}s -> {n / dt:,.0f} samples/s")
    assert not any(p.grad is not None for p in teacher.parameters()), "teacher got gradients"

    xb, yb = x[:256], y[:256]
    temp = kw["temperature"]
    for alpha in (0.9, 0.5, 1.0, 0.0):
        box = build_kd_box(teacher, student, x, y, alpha=alpha, **kw)
        box.pre_epoch_process(epoch=0)
        td_loss = box.forward_process(xb, yb, {}).detach()
        with torch.no_grad():
            s, t = student(xb), teacher(xb)
            kl = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1),
                          reduction="batchmean")
            ref = alpha * temp**2 * kl + (1 - alpha) * F.cross_entropy(s, yb)
        print(f"alpha={alpha}: torchdistill loss {td_loss.item():.6f}  by hand {ref.item():.6f}")
        torch.testing.assert_close(td_loss, ref, rtol=1e-5, atol=1e-6)
    print("OK: torchdistill KDLoss == alpha*T^2*KL + (1-alpha)*CE")


if __name__ == "__main__":
    _self_check()
