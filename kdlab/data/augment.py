"""kdlab's shift/flip augmentation of image batches: random draws, or stored parameters."""

from __future__ import annotations

import torch


def random_shift_flip(x: torch.Tensor, pad: int, fill: float | torch.Tensor,
                      flip: bool) -> torch.Tensor:
    """Per-sample random translation by up to ``pad`` pixels (padding with ``fill``, a number or
    one value per channel) and, if ``flip``, a random horizontal flip. With ``pad=4`` this is
    CIFAR's ``RandomCrop(32, padding=4)``. Vectorised over the batch, on ``x``'s device; the
    random parameters come from the global RNG and are applied by :func:`shift_flip`."""
    n = len(x)
    flipped = torch.rand(n, device=x.device) < 0.5 if flip else None
    if pad <= 0:
        return shift_flip(x, pad, fill, flipped, None, None)
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    return shift_flip(x, pad, fill, flipped, dy, dx)


def shift_flip(x: torch.Tensor, pad: int, fill: float | torch.Tensor,
               flipped: torch.Tensor | None, dy: torch.Tensor | None,
               dx: torch.Tensor | None) -> torch.Tensor:
    """``x`` flipped horizontally where ``flipped`` (``None``: nowhere), then padded by ``pad``
    pixels of ``fill`` and cropped back to its size at offsets ``dy``, ``dx`` in
    ``0..2·pad`` (``pad`` is the unshifted image): the one implementation of kdlab's
    shift/flip augmentation, for random draws and for stored views
    (:mod:`kdlab.data.views`) alike."""
    n, c, h, w = x.shape
    if flipped is not None:
        x = torch.where(flipped.to(x.device)[:, None, None, None], x.flip(3), x)
    if pad <= 0:
        return x
    if isinstance(fill, torch.Tensor) and fill.numel() > 1:
        padded = fill.to(x.device, x.dtype).view(1, c, 1, 1).expand(
            n, c, h + 2 * pad, w + 2 * pad).clone()
        padded[:, :, pad:pad + h, pad:pad + w] = x
    else:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=float(fill))
    dy, dx = dy.to(x.device).long(), dx.to(x.device).long()
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])[:, :, None]  # n,h,1
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])[:, None, :]  # n,1,w
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # n,h,w,c
    return out.permute(0, 3, 1, 2).contiguous()
