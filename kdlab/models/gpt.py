"""Small GPT-style decoders for next-token prediction, sized for CPU training on byte-level text.

The architecture is GPT-2's (Radford et al., "Language Models are Unsupervised Multitask
Learners", 2019) as nanoGPT writes it: learned position embeddings, pre-norm blocks of causal
self-attention (PyTorch's ``scaled_dot_product_attention`` with ``is_causal=True``, which picks
the fused kernel the device has) and a GELU MLP of width ``4·dim``, a final LayerNorm, and the
output projection tied to the token embedding (weight tying, Press & Wolf 2017). Init: normal
(0, 0.02), residual projections scaled by ``1/√(2·depth)`` as GPT-2.

Inputs are token ids ``[N, T]`` (``T ≤ context``); the output is ``[N, T, vocab]`` next-token
logits. Each block's output is a tap (``blocks.<k>``, alias ``blocks``) for hidden-state
matching; ``embedding`` is the final normalised hidden state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.util.errors import KdlabError


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """A GPT-2-style causal language model (see the module docstring).

    Args:
        input_shape: ``(context,)``, the longest sequence the model reads.
        num_classes: the vocabulary size.
        dim: width of the residual stream; ``heads`` must divide it.
        depth: number of blocks.
        heads: attention heads.
        dropout: dropout on attention weights and residual branches (0 by default: the corpora
            here are large against these models).
        tie_weights: share the output projection with the token embedding.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, dim: int = 128,
                 depth: int = 4, heads: int = 4, dropout: float = 0.0,
                 tie_weights: bool = True) -> None:
        super().__init__()
        if len(input_shape) != 1 or int(input_shape[0]) < 1:
            raise KdlabError(f"a GPT reads token sequences: its input shape must be (context,), "
                             f"got {tuple(input_shape)}")
        if dim % heads:
            raise KdlabError(f"model.dim={dim} must be a multiple of model.heads={heads}")
        if not 0.0 <= dropout < 1.0:
            raise KdlabError(f"model.dropout={dropout} must be in [0, 1)")
        self.context = int(input_shape[0])
        self.vocab = int(num_classes)
        self.token = nn.Embedding(self.vocab, dim)
        self.position = nn.Embedding(self.context, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, dropout) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.vocab, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))
        if tie_weights:
            self.head.weight = self.token.weight

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def taps(self) -> dict[str, list[str]]:
        """Aliases for feature strategies: each block's output and the final hidden state."""
        return {"blocks": [f"blocks.{k}" for k in range(len(self.blocks))],
                "stages": [f"blocks.{k}" for k in range(len(self.blocks))],
                "embedding": ["ln_f"]}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.context:
            raise KdlabError(f"a GPT reads [N, T] token ids with T <= {self.context} "
                             f"(model.context), got shape {list(tokens.shape)}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.token(tokens) + self.position(positions))
        return self.head(self.ln_f(self.blocks(x)))


#: ``(dim, depth, heads)`` by name: CPU-sized teacher and student widths
SIZES: dict[str, tuple[int, int, int]] = {
    "gpt_nano": (64, 2, 4),
    "gpt_micro": (128, 4, 4),
    "gpt_mini": (192, 6, 6),
    "gpt_small": (384, 6, 6),
}

#: GPT constructors ``(input_shape, num_classes, **kwargs)`` by name
MODELS: dict[str, Callable[..., nn.Module]] = {
    name: partial(GPT, dim=d, depth=n, heads=h) for name, (d, n, h) in SIZES.items()
}
