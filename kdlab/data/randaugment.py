"""RandAugment and Cutout of image batches, drawn per sample: the *strong view* of MLKD.

Cubuk, Zoph, Shlens & Le, "RandAugment: Practical automated data augmentation with a reduced
search space" (CVPR Workshops 2020) applies ``N`` operations drawn at random from a fixed list;
DeVries & Taylor, "Improved Regularization of Convolutional Neural Networks with Cutout"
(arXiv:1708.04552) then blanks a square patch. MLKD (:class:`kdlab.strategies.multilevel.MLKD`)
trains on such a strong view besides the usual weak (shift/flip) view. kdlab follows the
variant of the authors' CIFAR-100 data code (Jin-Ying/Multi-Level-Logit-Distillation, built on
megvii-research/mdistiller; the FixMatch-style RandAugment):

- ``N = 2`` operations drawn *with replacement* from the 14 of :data:`OPS`, each with its
  strength drawn uniformly over its range (:data:`RANGES`). The authors construct it as
  ``RandAugment(2, 10)``, but their code never reads the magnitude 10: every strength is
  uniform over its whole range, and so it is here.
- then Cutout of a square of side ``U(0, 0.5) ·`` width, its corner at a uniform centre minus
  half the side (clamped to the image), filled with the grey ``(125, 123, 114) / 255``; a side
  of 0 leaves the image as it is.
- ranges: contrast-like factors ``[0.05, 0.95]`` (always a *reduction* toward the degenerate
  image, as in the released code), posterize ``[4, 8]`` bits, rotate ``[-30°, 30°]``, shear
  ``[-0.3, 0.3]``, translate ``[-0.3, 0.3]`` of the size, solarize threshold ``[0, 256]``.
  Geometric operations sample the nearest pixel and fill with black, as PIL's ``transform``;
  shears are about the top-left corner, rotations about the centre (counter-clockwise for a
  positive angle).

Every operation here takes a float batch ``(N, C, H, W)`` with values in ``[0, 1]`` and one
strength per sample, and returns a batch of the same shape, dtype and range; all of the batch's
samples go through every operation and each sample keeps its own (``torch.where``): no host
synchronisation, ~14× the arithmetic of one operation, which is small next to a forward pass
for CIFAR-sized images. Random draws come from ``generator`` (``None``: the global RNG) on the
batch's device, so ``torch.manual_seed`` makes a run's strong views reproducible.
:class:`StrongAugment` applies it to *normalised* training batches (the datamodule's).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from kdlab.util.errors import KdlabError

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: the grey of the authors' Cutout patch, per RGB channel, in [0, 1]
CUTOUT_FILL = (125 / 255, 123 / 255, 114 / 255)
#: ITU-R 601-2 luma, PIL's ``convert("L")``
LUMA = (0.299, 0.587, 0.114)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``degenerate + factor · (x − degenerate)`` clamped to ``[0, 1]`` (PIL's ImageEnhance)."""
    return (degenerate + _per_sample(factor) * (x - degenerate)).clamp(0.0, 1.0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma ``(N, 1, H, W)`` of RGB images; a one-channel image is its own."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def auto_contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each channel stretched to span ``[0, 1]`` (a constant channel is left); ``v`` unused."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    stretched = (x - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, stretched, x).clamp(0.0, 1.0)


def brightness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with black by factor ``v``."""
    return _blend(x, torch.zeros_like(x), v)


def color(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with the image's grey version by factor ``v`` (saturation; identity unless RGB)."""
    if x.shape[1] != 3:
        return x
    return _blend(x, _grey(x).expand_as(x), v)


def contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean grey level by factor ``v``."""
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), v)


def equalize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation over 256 levels (torchvision's); ``v`` unused."""
    return TF.equalize(x).clamp(0.0, 1.0)


def identity(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The image unchanged."""
    return x


def posterize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Keep the ``int(v)`` (at least 1) high bits of each 8-bit level."""
    bits = v.floor().clamp(1, 8)
    step = _per_sample(torch.pow(2.0, 8 - bits))
    levels = (x * 255).round()
    return (torch.floor(levels / step) * step / 255).clamp(0.0, 1.0)


def sharpness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's smoothed image (3×3 kernel, centre 5, others 1, over 13; the border
    keeps its pixels) by factor ``v``."""
    n, c, h, w = x.shape
    if h < 3 or w < 3:
        return x
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(x, smooth, v)


def solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Invert the 8-bit levels at or above the threshold ``v`` (in ``[0, 256]``)."""
    levels = (x * 255).round()
    return torch.where(levels >= _per_sample(v), 1.0 - x, x)


def affine(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.transform(AFFINE, (a, b, c, d, e, f))`` per sample: output pixel centre
    ``(x, y)`` reads the input at ``(a·x + b·y + c, d·x + e·y + f)`` (pixels, nearest), black
    outside the image. ``coefficients``: ``(N, 6)``."""
    n, ch, h, w = x.shape
    ys = torch.arange(h, dtype=x.dtype, device=x.device) + 0.5
    xs = torch.arange(w, dtype=x.dtype, device=x.device) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w)
    a, b, c, d, e, f = (k.view(n, 1, 1) for k in coefficients.to(x.dtype).unbind(1))
    src_x = torch.floor(a * gx + b * gy + c).long()
    src_y = torch.floor(d * gx + e * gy + f).long()
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)  # (n, h, w)
    flat = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(n, 1, h * w)
    out = x.reshape(n, ch, h * w).gather(2, flat.expand(n, ch, h * w)).view(n, ch, h, w)
    return out * inside.unsqueeze(1).to(x.dtype)


def _coefficients(n: int, device: torch.device, dtype: torch.dtype, **entries: torch.Tensor
                  ) -> torch.Tensor:
    """Identity affine coefficients ``(n, 6)`` with the given entries (``a`` … ``f``) set."""
    coefficients = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=device,
                                dtype=dtype).repeat(n, 1)
    for name, value in entries.items():
        coefficients[:, "abcdef".index(name)] = value
    return coefficients


def rotate(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotation by ``v`` degrees counter-clockwise about the centre."""
    n, _, h, w = x.shape
    theta = torch.deg2rad(v.to(x.dtype))
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = w / 2, h / 2
    # input = [[cos, -sin], [sin, cos]] · (output − centre) + centre
    coefficients = torch.stack([cos, -sin, cx - cos * cx + sin * cy,
                                sin, cos, cy - sin * cx - cos * cy], dim=1)
    return affine(x, coefficients)


def shear_x(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Horizontal shear by ``v`` about the top-left corner."""
    return affine(x, _coefficients(len(x), x.device, x.dtype, b=v))


def shear_y(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vertical shear by ``v`` about the top-left corner."""
    return affine(x, _coefficients(len(x), x.device, x.dtype, d=v))


def translate_x(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Horizontal translation by ``v`` of the width (content moves left for ``v > 0``)."""
    return affine(x, _coefficients(len(x), x.device, x.dtype, c=v * x.shape[3]))


def translate_y(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vertical translation by ``v`` of the height (content moves up for ``v > 0``)."""
    return affine(x, _coefficients(len(x), x.device, x.dtype, f=v * x.shape[2]))


#: the operations, in the authors' order, and the range each strength is drawn from
OPS: dict[str, tuple[Op, float, float]] = {
    "auto_contrast": (auto_contrast, 0.0, 1.0),
    "brightness": (brightness, 0.05, 0.95),
    "color": (color, 0.05, 0.95),
    "contrast": (contrast, 0.05, 0.95),
    "equalize": (equalize, 0.0, 1.0),
    "identity": (identity, 0.0, 1.0),
    "posterize": (posterize, 4.0, 8.0),
    "rotate": (rotate, -30.0, 30.0),
    "sharpness": (sharpness, 0.05, 0.95),
    "shear_x": (shear_x, -0.3, 0.3),
    "shear_y": (shear_y, -0.3, 0.3),
    "solarize": (solarize, 0.0, 256.0),
    "translate_x": (translate_x, -0.3, 0.3),
    "translate_y": (translate_y, -0.3, 0.3),
}
RANGES = {name: (lo, hi) for name, (_, lo, hi) in OPS.items()}


def apply_ops(x: torch.Tensor, ops: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
    """Sample ``i`` of ``x`` through operation ``ops[i]`` (an index into :data:`OPS`) at
    strength ``strengths[i]`` (in that operation's own units)."""
    out = x
    for k, (op, _, _) in enumerate(OPS.values()):
        chosen = _per_sample(ops == k)
        out = torch.where(chosen, op(x, strengths), out)
    return out


def cutout(x: torch.Tensor, size: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
           fill: torch.Tensor) -> torch.Tensor:
    """The authors' Cutout: side ``s = size · W`` pixels, corner ``(int(max(0, cx − s/2)),
    int(max(0, cy − s/2)))``, far corner the corner plus ``s`` clipped to the image, both ends
    inclusive as PIL draws a rectangle; ``s = 0`` leaves the image. ``cx``, ``cy`` are in
    pixels; ``fill`` has one value per channel."""
    n, c, h, w = x.shape
    side = size.to(x.dtype) * w
    x0 = (cx.to(x.dtype) - side / 2).clamp_min(0).floor()
    y0 = (cy.to(x.dtype) - side / 2).clamp_min(0).floor()
    x1 = torch.minimum(x0 + side, torch.full_like(x0, w))
    y1 = torch.minimum(y0 + side, torch.full_like(y0, h))
    cols = torch.arange(w, device=x.device, dtype=x.dtype)
    rows = torch.arange(h, device=x.device, dtype=x.dtype)
    in_x = (cols[None] >= x0[:, None]) & (cols[None] <= x1[:, None])  # (n, w)
    in_y = (rows[None] >= y0[:, None]) & (rows[None] <= y1[:, None])  # (n, h)
    box = (in_y[:, :, None] & in_x[:, None, :] & (side > 0)[:, None, None]).unsqueeze(1)
    return torch.where(box, fill.to(x.device, x.dtype).view(1, c, 1, 1), x)


def cutout_fill(channels: int) -> torch.Tensor:
    """The Cutout grey for ``channels`` channels (RGB: the authors'; otherwise its mean)."""
    if channels == 3:
        return torch.tensor(CUTOUT_FILL)
    return torch.full((channels,), sum(CUTOUT_FILL) / 3)


def rand_augment(x: torch.Tensor, num_ops: int = 2, cutout_max: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``num_ops`` random operations per sample, then Cutout of side up to ``cutout_max`` of
    the width (0: none), on a ``[0, 1]`` float batch (see the module docstring)."""
    n, c, h, w = x.shape
    device = generator.device if generator is not None else x.device
    names = list(OPS)
    lo = torch.tensor([OPS[k][1] for k in names], device=device)
    hi = torch.tensor([OPS[k][2] for k in names], device=device)
    for _ in range(num_ops):
        ops = torch.randint(len(names), (n,), device=device, generator=generator)
        u = torch.rand(n, device=device, generator=generator)
        strengths = lo[ops] + (hi[ops] - lo[ops]) * u
        x = apply_ops(x, ops.to(x.device), strengths.to(x.device, x.dtype))
    if cutout_max > 0:
        size = torch.rand(n, device=device, generator=generator) * cutout_max
        cx = torch.rand(n, device=device, generator=generator) * w
        cy = torch.rand(n, device=device, generator=generator) * h
        x = cutout(x, size.to(x.device), cx.to(x.device), cy.to(x.device), cutout_fill(c))
    return x


@dataclass(frozen=True)
class StrongAugment:
    """The strong view of a normalised batch: back to ``[0, 1]`` pixels (``x · std + mean``),
    :func:`rand_augment` with ``num_ops`` operations and Cutout up to ``cutout`` of the width,
    normalised again. The caller applies the data's shift/flip first (the authors' strong view
    starts from its own random crop and flip).

    Args:
        num_ops: operations per sample, ``>= 0``.
        cutout: the largest Cutout side as a fraction of the width, in ``[0, 1]``; 0: none.
    """

    num_ops: int = 2
    cutout: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.num_ops, bool) or int(self.num_ops) != self.num_ops \
                or self.num_ops < 0:
            raise KdlabError(f"distill.strong_ops={self.num_ops} must be an integer >= 0")
        if not (isinstance(self.cutout, (int, float)) and 0.0 <= self.cutout <= 1.0) \
                or not math.isfinite(self.cutout):
            raise KdlabError(f"distill.cutout={self.cutout} must be in [0, 1] (a fraction of "
                             "the width)")

    def __call__(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """The strong view of the normalised batch ``x`` (``mean``, ``std``: ``(C, 1, 1)``)."""
        mean = mean.to(x.device, x.dtype)
        std = std.to(x.device, x.dtype)
        pixels = (x * std + mean).clamp(0.0, 1.0)
        pixels = rand_augment(pixels, int(self.num_ops), float(self.cutout), generator)
        return ((pixels - mean) / std).contiguous()

    def describe(self) -> str:
        """One phrase for the log."""
        return f"RandAugment ({self.num_ops} ops) + Cutout (side up to {self.cutout:g})"
