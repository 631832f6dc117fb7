"""``kdlab-export ckpt_path=…``: write a distilled student for deployment and check it.

The student is rebuilt from the config stored in its checkpoint (as ``kdlab-eval`` does) and
written as ONNX (``torch.onnx.export``, dynamo exporter), TorchScript (``torch.jit.trace``) and
a ``torch.export`` program (``.pt2``), each with a dynamic batch dimension. Every file is loaded
back and run on real test images (ONNX with onnxruntime when it is installed) and its outputs
compared with PyTorch's; a difference above ``atol`` fails the export. ``export.json`` records
the files, the differences and the input normalisation a deployment must apply.

``ckpt_path`` is a checkpoint file, or a finished run folder: then the student checkpoint whose
test accuracy the run's ``results.json`` reports. The files go beside the run they come from,
``<run>/export/<checkpoint>/``, or into ``out=DIR``.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from kdlab.cli import friendly_errors, guard_argv
from kdlab.modes.build import build_datamodule
from kdlab.modes.checkpoints import (
    deployed_student,
    load_run_config,
    output_folder,
    resolve_checkpoint,
)
from kdlab.util.config import CONF_DIR
from kdlab.util.errors import KdlabError
from kdlab.util.files import write_json
from kdlab.util.report import model_name

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "pt2")
_ONNX_PACKAGES = ("onnx", "onnxscript")


def _missing(packages: tuple[str, ...]) -> list[str]:
    return [p for p in packages if importlib.util.find_spec(p) is None]


def choose_formats(value: Any) -> list[str]:
    """``auto`` → every format whose packages are installed; otherwise the listed ones, which
    must exist and (for ONNX) be installable."""
    if value in (None, "auto"):
        chosen = [f for f in FORMATS if f != "onnx" or not _missing(_ONNX_PACKAGES)]
        if "onnx" not in chosen:
            log.warning("kdlab-export: no ONNX (needs %s: pip install 'kdlab[export]')",
                        " and ".join(_missing(_ONNX_PACKAGES)))
        return chosen
    names = [value] if isinstance(value, str) else list(value)
    for name in names:
        if name not in FORMATS:
            raise KdlabError(f"formats: '{name}' is not a format; choose from "
                             f"{', '.join(FORMATS)} (or auto)")
    if "onnx" in names and _missing(_ONNX_PACKAGES):
        raise KdlabError(f"formats=[onnx] needs {' and '.join(_missing(_ONNX_PACKAGES))}: "
                         "pip install 'kdlab[export]' (or leave onnx out of formats)")
    return names


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """ONNX with a dynamic batch dimension (input ``images``, output ``logits``)."""
    batch = torch.export.Dim("batch", min=1)
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines describe every optimiser pass
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False,
                                    input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},))
    program.save(str(path))


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor | None:
    """The ONNX file's outputs on ``x`` with onnxruntime, or ``None`` when it is missing (then
    only ``onnx.checker`` validates the file)."""
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))
    if _missing(("onnxruntime",)):
        log.warning("kdlab-export: onnxruntime is not installed, so the ONNX outputs are not "
                    "compared (pip install onnxruntime)")
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """A traced TorchScript module (torch marks TorchScript deprecated; kept for C++ users)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(model, example), str(path))


def run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))(x)


def export_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """A ``torch.export`` program with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)),
                      str(path))


def run_pt2(path: Path, x: torch.Tensor) -> torch.Tensor:
    return torch.export.load(str(path)).module()(x)


_WRITERS = {"onnx": (export_onnx, run_onnx, "student.onnx"),
            "torchscript": (export_torchscript, run_torchscript, "student.torchscript.pt"),
            "pt2": (export_pt2, run_pt2, "student.pt2")}


@torch.no_grad()
def export_model(model: nn.Module, x: torch.Tensor, out_dir: Path, formats: list[str],
                 atol: float) -> dict[str, Any]:
    """Write ``model`` in each format to ``out_dir``, run each file on ``x`` (whose batch size
    differs from the export example's, to exercise the dynamic batch) and compare with
    PyTorch. Returns ``{format: {"path", "bytes", "max_abs_diff"}}``."""
    model = model.cpu().eval()
    expected = model(x)
    example = x[:2].clone()
    report: dict[str, Any] = {}
    for name in formats:
        write, read, filename = _WRITERS[name]
        path = out_dir / filename
        try:
            write(model, example, path)
        except Exception as e:  # noqa: BLE001 - the exporter's message is what the user needs
            raise KdlabError(f"formats: {name} export of the student failed: "
                             f"{str(e).splitlines()[0]}") from None
        got = read(path, x)
        diff = None if got is None else float((got - expected).abs().max())
        report[name] = {"path": str(path), "bytes": path.stat().st_size, "max_abs_diff": diff}
        if diff is not None and diff > atol:
            raise KdlabError(f"{path}: outputs differ from PyTorch's by {diff:.3g} > atol={atol}")
        log.info("%s: %s (%d bytes), max |Δ| vs PyTorch %s", name, path, path.stat().st_size,
                 "not checked" if diff is None else f"{diff:.2e}")
    return report


def _plain(value: float | tuple[float, ...]) -> float | list[float]:
    """A normalisation constant for export.json: a number, or one per channel."""
    return float(value) if isinstance(value, (int, float)) else [float(v) for v in value]


@friendly_errors
def export(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the checkpoint's student, export it and check every file; write
    ``export.json``, all beside the run (:func:`~kdlab.modes.checkpoints.output_folder`) or
    into ``cfg.out``."""
    checkpoint = resolve_checkpoint(str(cfg.ckpt_path))
    out_dir = output_folder(checkpoint, cfg.get("out"), "export", cfg.get("member"))
    log.info("kdlab-export: %s (%s)", checkpoint.path, checkpoint.chosen)
    run_cfg = load_run_config(checkpoint.path)
    formats = choose_formats(cfg.get("formats", "auto"))
    data = build_datamodule(run_cfg, transfer=False)
    model, model_cfg = deployed_student(run_cfg, checkpoint.path, data, cfg.get("member"))
    data.setup("test")
    x = data.x_test[: int(cfg.check_samples)].cpu().contiguous()
    if len(x) < 3:
        raise KdlabError(f"check_samples={cfg.check_samples} must be at least 3")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = export_model(model, x, out_dir, formats, float(cfg.atol))
    result = {
        "ckpt_path": str(checkpoint.path),
        "chosen": checkpoint.chosen,
        "run_dir": str(checkpoint.run_dir),
        "model": model_name(model_cfg),
        "input_shape": [None, *data.input_shape],
        "input_normalisation": {"scale": 1 / 255, "mean": _plain(data.mean),
                                "std": _plain(data.std),
                                "rule": "x = (pixels / 255 - mean) / std (per channel when "
                                        "a list), float32, NCHW"},
        "checked_on": f"{len(x)} test images",
        "atol": float(cfg.atol),
        "files": files,
    }
    write_json(out_dir / "export.json", result)
    log.info("Wrote %s", out_dir / "export.json")
    for name, entry in files.items():
        diff = entry["max_abs_diff"]
        print(f"{name:12s} {entry['path']}  ({entry['bytes'] / 1024:.0f} KB, max |Δ| vs "
              f"PyTorch: {'not checked' if diff is None else f'{diff:.1e}'})")
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def _main(cfg: DictConfig) -> None:
    export(cfg)


def cli() -> None:
    """``kdlab-export ckpt_path=RUN_FOLDER|CKPT [out=DIR] [formats=[onnx,torchscript,pt2]]
    [atol=1e-4]``."""
    guard_argv("export")
    _main()
