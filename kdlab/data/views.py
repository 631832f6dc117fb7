"""Augmented views drawn once: the random parameters of ``K`` views of every training sample.

Random augmentation gives the student a new view of each image every step, so a frozen
teacher's outputs cannot simply be computed once per *image*. They can be computed once per
*view*: a :class:`ViewBank` draws, up front and from its own seed, the random parameters of
``K`` augmented views of every training sample — shift offsets and flips, and for ``data.mix``
the partner sample and the mixing ratio (mixup) or the pasted box (CutMix) — and stores the
parameters, not the images. :meth:`ViewBank.render` turns ``(sample, view)`` pairs into images
with the same code the live augmentation uses (:func:`kdlab.data.augment.shift_flip`), so the
teacher's outputs computed on a rendered view (:mod:`kdlab.engine.cache`) are its outputs on
exactly the image the student trains on. This is the "fixed soft-label bank" of FKD (Shen &
Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022), which stores
crop coordinates and flips with the teacher's soft labels of each crop and reports no loss of
accuracy against a live teacher.

Which view a sample shows is :func:`view_schedule`'s: each sample's views come in a seeded
random rotation, one per appearance, so over ``K`` appearances (epochs, for a sample seen once
per epoch) every view is used exactly once. With ``K`` at least the number of epochs a student
never sees a view twice: the same distribution of inputs as live augmentation. Two differences
from the live path, both documented where the options are: views are the bank's (drawn from
``teacher_cache.view_seed``, shared by every run of a sweep, not from the run's seed), and
with ``data.mix`` every sample has its own partner from the whole training split and its own
ratio, where the live path draws one ratio per batch and partners within the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kdlab.data.augment import shift_flip
from kdlab.data.mix import cutmix_box_tensor
from kdlab.util.files import tensor_digest

#: the version of the drawing code: part of every bank's identity
VIEWS_FORMAT = 1


@dataclass
class ViewBank:
    """The random parameters of ``views`` augmented views of each of ``n`` training samples.

    Tensors are ``(n, views)``: ``flipped`` (bool, or ``None`` without flips), ``dy``/``dx``
    (offsets in ``0..2·shift``, or ``None`` without shifts), ``partner`` (the sample mixed in,
    ``None`` without mixing), ``lam`` (mixup's weight of the sample itself) and ``box``
    (``(n, views, 4)``: CutMix's pasted ``top, bottom, left, right``).
    """

    views: int
    shift: int
    flip: bool
    mix: str
    mix_alpha: float
    seed: int
    flipped: torch.Tensor | None
    dy: torch.Tensor | None
    dx: torch.Tensor | None
    partner: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    box: torch.Tensor | None = None

    @classmethod
    def draw(cls, n: int, views: int, height: int, width: int, shift: int, flip: bool,
             mix: str = "none", mix_alpha: float = 1.0, seed: int = 0) -> ViewBank:
        """Draw the parameters of ``views`` views of ``n`` samples of ``height×width`` from
        ``seed`` (a generator of its own: the global RNG is left alone)."""
        if views < 1:
            raise ValueError("a view bank needs at least one view per sample")
        g = torch.Generator().manual_seed(int(seed))
        shape = (n, views)
        flipped = torch.rand(shape, generator=g) < 0.5 if flip else None
        dy = dx = None
        if shift > 0:
            dy = torch.randint(0, 2 * shift + 1, shape, generator=g, dtype=torch.int16)
            dx = torch.randint(0, 2 * shift + 1, shape, generator=g, dtype=torch.int16)
        partner = lam = box = None
        if mix != "none":
            partner = torch.randint(0, n, shape, generator=g, dtype=torch.int32)
            ratio = _beta(shape, float(mix_alpha), g)
            if mix == "mixup":
                lam = ratio
            else:
                box = cutmix_box_tensor(ratio, height, width, g)
        return cls(views, int(shift), bool(flip), mix, float(mix_alpha), int(seed), flipped,
                   dy, dx, partner, lam, box)

    def describe(self) -> dict[str, object]:
        """What defines the bank: its options (its tensors follow from them)."""
        return {"views": self.views, "shift": self.shift, "flip": self.flip, "mix": self.mix,
                "mix_alpha": self.mix_alpha if self.mix != "none" else None,
                "seed": self.seed, "format": VIEWS_FORMAT}

    def digest(self) -> str:
        """A hash of the drawn parameters (the bank's identity in cache keys)."""
        tensors = [t for t in (self.flipped, self.dy, self.dx, self.partner, self.lam,
                               self.box) if t is not None]
        return tensor_digest(*tensors, extra=repr(sorted(self.describe().items())))

    def to(self, device: torch.device) -> ViewBank:
        """This bank with its parameters on ``device`` (itself when they are there): moved
        once, so rendering a batch gathers on the device without copying the bank."""
        tensors = {"flipped": self.flipped, "dy": self.dy, "dx": self.dx,
                   "partner": self.partner, "lam": self.lam, "box": self.box}
        if all(t is None or t.device == device for t in tensors.values()):
            return self
        return replace(self, **{k: t.to(device) if t is not None else None
                                for k, t in tensors.items()})

    def render(self, x_all: torch.Tensor, index: torch.Tensor, view: torch.Tensor,
               fill: float | torch.Tensor, images: torch.Tensor | None = None
               ) -> torch.Tensor:
        """The images of views ``view`` of samples ``index`` (positions in ``x_all``, the
        training split). ``images`` is ``x_all[index]`` when the caller has it already."""
        device = x_all.device
        moved = self.to(device)  # itself for the bank the datamodule moved once
        if moved is not self:
            return moved.render(x_all, index, view, fill, images)
        index, view = index.to(device).long(), view.to(device).long()
        if images is None:
            images = x_all.index_select(0, index)
        out = self._shift_flip(images, index, view, fill)
        if self.mix == "none":
            return out
        partner = self.partner[index, view].long()
        other = self._shift_flip(x_all.index_select(0, partner), partner, view, fill)
        if self.mix == "mixup":
            lam = self.lam[index, view].to(out.dtype)[:, None, None, None]
            return out * lam + other * (1.0 - lam)
        box = self.box[index, view].long()  # n, 4
        h, w = out.shape[-2:]
        rows = torch.arange(h, device=device)[None, :]
        cols = torch.arange(w, device=device)[None, :]
        inside_r = (rows >= box[:, 0:1]) & (rows < box[:, 1:2])  # n, h
        inside_c = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # n, w
        pasted = (inside_r[:, :, None] & inside_c[:, None, :])[:, None]  # n, 1, h, w
        return torch.where(pasted, other, out)

    def _shift_flip(self, images: torch.Tensor, index: torch.Tensor, view: torch.Tensor,
                    fill: float | torch.Tensor) -> torch.Tensor:
        flipped = self.flipped[index, view] if self.flipped is not None else None
        if self.dy is None:
            return shift_flip(images, 0, fill, flipped, None, None)
        dy = self.dy[index, view]
        dx = self.dx[index, view]
        return shift_flip(images, self.shift, fill, flipped, dy, dx)


def _beta(shape: tuple[int, ...], alpha: float, generator: torch.Generator) -> torch.Tensor:
    """``Beta(α, α)`` samples drawn reproducibly from ``generator``: torch's Beta sampler takes
    no generator, so it runs on the global RNG forked and seeded from ``generator`` (the
    caller's RNG state is left as it was)."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    a = torch.tensor(float(alpha))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Beta(a, a).sample(shape)


def view_schedule(order: torch.Tensor, epoch: int, views: int, n: int, seed: int
                  ) -> torch.Tensor:
    """The view each position of an epoch's ``order`` (sample indices in ``0..n-1``, a sample
    may repeat) shows: sample ``j``'s ``t``-th appearance since the first epoch shows view
    ``(offset_j + t) mod views``, ``offset_j`` drawn from ``seed``. The same for a resumed
    epoch (it depends only on the epoch and the order)."""
    device = order.device
    order = order.long().cpu()  # one copy; the arithmetic is O(n) once per epoch
    m = len(order)
    offsets = torch.randint(0, views, (n,), generator=torch.Generator().manual_seed(int(seed)))
    counts = torch.bincount(order, minlength=n)
    sorted_order, perm = torch.sort(order, stable=True)
    positions = torch.arange(m)
    starts = torch.ones(m, dtype=torch.bool)
    starts[1:] = sorted_order[1:] != sorted_order[:-1]
    group_start = torch.where(starts, positions, torch.zeros_like(positions)).cummax(0).values
    occurrence = torch.empty(m, dtype=torch.long)
    occurrence[perm] = positions - group_start
    appearance = int(epoch) * counts[order] + occurrence
    return ((offsets[order] + appearance) % views).to(device)
