"""Small Vision Transformers for 28×28 and 32×32 inputs, with DeiT's optional distillation
token.

ViT: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR 2021 (arXiv:2010.11929). DeiT (its training recipe at these widths, its weight
init and its distillation token): Touvron, Cord, Douze, Massa, Sablayrolles & Jégou, "Training
data-efficient image transformers & distillation through attention", ICML 2021
(arXiv:2012.12877); the architecture follows facebookresearch/deit ``models.py`` (timm 0.3.2's
``VisionTransformer``): pre-norm blocks, LayerNorm eps 1e-6, qkv bias, MLP ratio 4, GELU.

**The feature adapter.** kdlab's feature strategies read ``stages`` as ``[N, C, H, W]`` maps, but
a transformer block outputs tokens ``[N, T, D]``. Each tapped block's output is therefore passed
through a :class:`TokenMap` (``stage_maps.<k>``): it drops the cls (and distillation) token and
lays the patch tokens out on their grid, ``[N, D, h, w]`` — a view, no copy, no parameters. Its
result is not used by the forward pass (the next block reads the tokens), so the logits are the
same whether or not anything taps it; a strategy that taps it reads the residual stream of that
block with gradients flowing back into the student. So a CNN teaches a ViT with ``at``,
``fitnets``, ``sp`` … and a ViT teaches a CNN, pairing stages from the deepest as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.util.errors import KdlabError


class TokenMap(nn.Module):
    """The adapter that ``stages`` taps: tokens ``[N, P + h·w, D]`` → patch-token map
    ``[N, D, h, w]``, the ``P`` leading cls/distillation tokens dropped. A strided view of its
    input (no copy); the model calls it only so that a forward hook sees the map."""

    def __init__(self, prefix: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.prefix = prefix
        self.grid = grid

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.prefix:].transpose(1, 2).unflatten(2, self.grid)

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}, grid={self.grid}"


class TokenSelect(nn.Module):
    """Token ``index`` of ``[N, T, D]``: ``[N, D]`` (the cls or the distillation token)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.index]

    def extra_repr(self) -> str:
        return f"index={self.index}"


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., ECCV 2016) on a residual branch: in training, each
    sample's branch is zeroed with probability ``p`` and scaled by ``1 / (1 - p)`` otherwise."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention: one ``qkv`` projection (with bias), scaled dot-product
    attention over ``heads`` heads (:func:`torch.nn.functional.scaled_dot_product_attention`,
    scale ``1/√(D/heads)``), output projection ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [N, heads, T, D / heads]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (MLP
    ``fc1 → GELU → fc2``), each branch under stochastic depth."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def default_stage_blocks(depth: int) -> list[int]:
    """The blocks (1-based) whose outputs are the ``stages`` maps: 4 evenly spaced when 4
    divides the depth (12 → 3, 6, 9, 12; 4 → 1, 2, 3, 4), else 3 when 3 does (6 → 2, 4, 6),
    else ``min(depth, 4)`` roughly even ones; always ending with the last block."""
    n = 4 if depth % 4 == 0 else 3 if depth % 3 == 0 else min(depth, 4)
    return [depth * (k + 1) // n for k in range(n)]


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al., ICLR 2021) in DeiT's form (Touvron et al.,
    ICML 2021), sized for small images: a ``patch``×``patch`` strided convolution embeds the
    image into ``(H / patch)·(W / patch)`` tokens (patch 4: 7×7 for 28×28, 8×8 for 32×32), a
    learned cls token (and, with ``distill_token``, DeiT's distillation token) is prepended,
    learned position embeddings are added, ``depth`` pre-norm blocks, a final LayerNorm, and a
    linear ``classifier`` on the cls token.

    **Distillation token** (``distill_token=True``): a second token with its own head
    ``head_dist`` (DeiT's ``DistilledVisionTransformer``). In training mode the model returns the
    cls head's logits (what kdlab's cross-entropy reads) and the distillation head's logits are
    read through the ``distillation`` tap (``distill=deit``); in eval mode it returns the
    average of the two heads, as DeiT does at test time. Only ``distill=deit`` trains that head:
    with any other strategy (and in a run's teacher-free baseline) it stays at its
    initialisation and is still averaged in at test time (its logits are near 0, so the argmax
    mostly follows the cls head, but the test loss does not) — use the token with ``deit`` only.
    Evaluation also logs each head on its own (``val/acc_cls``, ``val/acc_dist``, and the same
    for ``test``; :meth:`averaged_heads`), as DeiT's Table 5 reports them.

    Module paths for feature strategies (see :meth:`taps`): ``stage_maps.<k>`` (the patch-token
    maps ``[N, D, h, w]`` of the blocks in ``stage_blocks``, see :class:`TokenMap`), ``pool``
    (the cls token after the final norm, ``[N, D]``), ``head_dist`` (the distillation head's
    logits). ``preact`` equals ``stages``: a block's output is the residual stream, to which no
    activation is applied.

    Weights: truncated normal (std 0.02) for every Linear, the position embeddings and the
    tokens, zero biases, LayerNorm 1 and 0 (DeiT / timm 0.3.2; truncation at ±2 as there); the
    patch convolution keeps PyTorch's default init, as in timm 0.3.2.

    Args:
        input_shape: shape of one input sample ``[C, H, W]``.
        num_classes: number of output logits.
        dim: token width ``D``.
        depth: number of transformer blocks.
        heads: attention heads (must divide ``dim``).
        patch: patch size (4 for 28×28 / 32×32; 16 for 224×224).
        mlp_ratio: MLP hidden width over ``dim``.
        distill_token: add DeiT's distillation token and head.
        drop_path: stochastic depth rate of the last block (linear from 0 over the blocks, as
            DeiT; DeiT's ImageNet recipe uses 0.1, default here 0).
        stage_blocks: 1-based indices of the blocks tapped as ``stages`` (default:
            :func:`default_stage_blocks`).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        patch: int = 4,
        mlp_ratio: float = 4.0,
        distill_token: bool = False,
        drop_path: float = 0.0,
        stage_blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        in_ch, height, width = (int(d) for d in input_shape)
        dim, depth, heads, patch = int(dim), int(depth), int(heads), int(patch)
        if dim < 1 or heads < 1 or dim % heads:
            raise KdlabError(f"model.heads={heads} must divide model.dim={dim}")
        if depth < 1:
            raise KdlabError(f"model.depth={depth} must be >= 1")
        if not 1 <= patch <= min(height, width):
            raise KdlabError(f"model.patch={patch} must be in [1, {min(height, width)}] for "
                             f"inputs {list(input_shape)}")
        if not 0.0 <= drop_path < 1.0:
            raise KdlabError(f"model.drop_path={drop_path} must be in [0, 1)")
        blocks = list(stage_blocks) if stage_blocks is not None else default_stage_blocks(depth)
        if not blocks or sorted(set(blocks)) != blocks or not 1 <= blocks[0] <= blocks[-1] <= depth:
            raise KdlabError(f"model.stage_blocks={blocks} must be increasing block numbers in "
                             f"[1, {depth}]")
        self.grid = (height // patch, width // patch)
        self.distill_token = bool(distill_token)
        self.num_prefix = 2 if self.distill_token else 1
        self.patch_embed = nn.Conv2d(in_ch, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if self.distill_token else None
        tokens = self.num_prefix + self.grid[0] * self.grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        rates = torch.linspace(0, float(drop_path), depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, r) for r in rates)
        self.stage_blocks = [int(b) for b in blocks]
        self.stage_maps = nn.ModuleList(TokenMap(self.num_prefix, self.grid) for _ in blocks)
        #: block index (0-based) → the TokenMap called on its output
        self._maps_after = {b - 1: k for k, b in enumerate(self.stage_blocks)}
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pool = TokenSelect(0)
        self.classifier = nn.Linear(dim, num_classes)
        self.pool_dist = TokenSelect(1) if self.distill_token else None
        self.head_dist = nn.Linear(dim, num_classes) if self.distill_token else None
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.pos_embed, self.cls_token, self.dist_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def taps(self) -> dict[str, list[str]]:
        """Aliases of the module paths strategies read: the patch-token maps of the
        ``stage_blocks`` (``stages``, and ``preact`` — the same maps), the normed cls feature
        (``embedding``), and with a distillation token its head's logits (``distillation``)."""
        stages = [f"stage_maps.{k}" for k in range(len(self.stage_maps))]
        taps = {"stages": stages, "preact": list(stages), "embedding": ["pool"]}
        if self.distill_token:
            taps["distillation"] = ["head_dist"]
        return taps

    def averaged_heads(self) -> dict[str, str]:
        """The heads whose average eval mode returns (name → module path): with a distillation
        token ``cls`` (``classifier``) and ``dist`` (``head_dist``), which evaluation also
        measures on their own (``val/acc_cls``, ``test/acc_dist``, ...); else none."""
        return {"cls": "classifier", "dist": "head_dist"} if self.distill_token else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, h·w, D]
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._maps_after:  # for the hooks of feature strategies only
                self.stage_maps[self._maps_after[i]](x)
        x = self.norm(x)
        logits = self.classifier(self.pool(x))
        if self.head_dist is None:
            return logits
        dist = self.head_dist(self.pool_dist(x))
        return logits if self.training else (logits + dist) / 2


#: ``(dim, depth, heads)`` by name: DeiT-Ti / DeiT-S widths, and two CPU-sized ones
SIZES: dict[str, tuple[int, int, int]] = {
    "vit_nano": (64, 4, 4),
    "vit_micro": (128, 6, 4),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
}

#: ViT constructors ``(input_shape, num_classes, **kwargs)`` by name; ``<name>_distilled``
#: adds DeiT's distillation token (for ``distill=deit``)
MODELS: dict[str, Callable[..., nn.Module]] = {
    **{name: partial(ViT, dim=d, depth=n, heads=h) for name, (d, n, h) in SIZES.items()},
    **{f"{name}_distilled": partial(ViT, dim=d, depth=n, heads=h, distill_token=True)
       for name, (d, n, h) in SIZES.items()},
}
