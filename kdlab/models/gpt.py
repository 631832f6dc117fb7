"""Small GPT-style decoders for next-token prediction, sized for CPU training on byte-level text.

The architecture is GPT-2's (Radford et al., "Language Models are Unsupervised Multitask
Learners", 2019) as nanoGPT writes it: learned position embeddings, pre-norm blocks of causal
self-attention (PyTorch's ``scaled_dot_product_attention`` with ``is_causal=True``, which picks
the fused kernel the device has) and a GELU MLP of width ``4·dim``, a final LayerNorm, and the
output projection tied to the token embedding (weight tying, Press & Wolf 2017). Init: normal
(0, 0.02), residual projections scaled by ``1/√(2·depth)`` as GPT-2.

Inputs are token ids ``[N, T]`` (``T ≤ context``); the output is ``[N, T, vocab]`` next-token
logits. Each block's output is a tap (``blocks.<k>``, alias ``blocks``: ``[N, T, D]``);
``embedding`` is the final normalised hidden state.

**Hidden-state matching.** kdlab's feature strategies (FitNets, AT, …) read ``[N, C, H, W]``
maps. ``stages`` (and ``preact``) therefore tap ``stage_maps.<k>``: a :class:`SequenceMap` view
of block ``k``'s hidden states as a map of one column, ``[N, D, T, 1]`` — channels are the hidden
dimension, positions run down the height. A 1×1 convolution on it is a per-token linear map, so
FitNets on GPTs is the per-token hidden-state regression of TinyBERT (Jiao et al. 2020):
``MSE(H_S W, H_T)``, and teacher and student of the same context line up position by position.

**Incremental decoding.** :meth:`GPT.decode` feeds new tokens through a :class:`KVCache` (each
block's keys and values of the positions decoded so far, preallocated for the whole context)
and returns the logits of the new positions only, so sampling a sequence of ``T`` tokens costs
one pass per token over one position instead of a pass over the whole prefix
(:func:`kdlab.engine.generate.sample`). ``forward(tokens)`` — what training runs — is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.util.errors import KdlabError


class KVCache:
    """The keys and values of the positions a :class:`GPT` has decoded so far, for every block:
    ``[depth, 2, N, heads, context, dim / heads]``, preallocated (:meth:`GPT.new_cache`);
    ``length`` positions are filled."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.length = 0

    @property
    def capacity(self) -> int:
        """Positions the cache can hold (the model's context)."""
        return self.tensor.shape[4]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                past: int = 0) -> torch.Tensor:
        """Attention over ``x`` ``[N, t, dim]``; with ``kv`` (this block's slice of a
        :class:`KVCache`, ``[2, N, heads, context, dim / heads]``) the new positions'
        keys and values are written at ``past …`` and the queries attend to every cached
        position before them too."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None
        causal = True
        if kv is not None:
            kv[0, :, :, past : past + t] = k
            kv[1, :, :, past : past + t] = v
            # read back in the queries' dtype (under autocast the cache keeps the weights')
            k, v = kv[0, :, :, : past + t].to(q.dtype), kv[1, :, :, : past + t].to(q.dtype)
            if past:  # query i (position past + i) sees keys 0 … past + i
                causal = False
                if t > 1:
                    mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class SequenceMap(nn.Module):
    """Hidden states ``[N, T, D]`` as a map ``[N, D, T, 1]`` (a view, no copy): what hint
    strategies tap (module docstring). The model calls it only so that a forward hook sees
    the map; its output is not used."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.transpose(1, 2).unsqueeze(-1)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                past: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), kv, past))
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
        self.stage_maps = nn.ModuleList(SequenceMap() for _ in range(depth))
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
        """Aliases for feature strategies: each block's hidden states ``[N, T, D]``
        (``blocks``), the same as one-column maps ``[N, D, T, 1]`` (``stages``, ``preact``:
        what hint strategies read) and the final hidden state (``embedding``)."""
        maps = [f"stage_maps.{k}" for k in range(len(self.stage_maps))]
        return {"blocks": [f"blocks.{k}" for k in range(len(self.blocks))],
                "stages": maps, "preact": list(maps), "embedding": ["ln_f"]}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.context:
            raise KdlabError(f"a GPT reads [N, T] token ids with T <= {self.context} "
                             f"(model.context), got shape {list(tokens.shape)}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.token(tokens) + self.position(positions))
        for block, as_map in zip(self.blocks, self.stage_maps):
            x = block(x)
            as_map(x)  # a view, for the hooks of feature strategies only
        return self.head(self.ln_f(x))

    def new_cache(self, batch: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``context`` tokens, on
        the model's device and in its dtype."""
        weight = self.token.weight
        attn = self.blocks[0].attn if len(self.blocks) else None
        heads = attn.heads if attn is not None else 1
        dim = weight.shape[1]
        return KVCache(torch.empty(len(self.blocks), 2, batch, heads, self.context,
                                   dim // heads, dtype=weight.dtype, device=weight.device))

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The logits ``[N, t, vocab]`` of ``tokens`` ``[N, t]``, the positions that follow the
        ``cache.length`` already in ``cache`` (whose keys and values are read, and to which
        those of ``tokens`` are added): the same as the last ``t`` positions of ``forward``
        over the whole sequence. Run it without gradients (sampling); ``forward`` trains."""
        past, t = cache.length, tokens.shape[1]
        if tokens.dim() != 2 or past + t > self.context:
            raise KdlabError(f"a GPT decodes at most {self.context} tokens (model.context): "
                             f"{past} cached + {list(tokens.shape)} new")
        positions = torch.arange(past, past + t, device=tokens.device)
        x = self.drop(self.token(tokens) + self.position(positions))
        for k, block in enumerate(self.blocks):
            x = block(x, cache.tensor[k], past)
        cache.length = past + t
        return self.head(self.ln_f(x))


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
