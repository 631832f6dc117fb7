"""Example inputs of a network, by the kind of data it reads: images (float tensors of a shape)
or token ids (integers below a vocabulary size), for probes and latency measurements."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class TokenShape(tuple):
    """The input shape of a model that reads token ids, ``(context,)``, carrying the size of
    the vocabulary the ids come from (a plain tuple elsewhere: ``list(shape)``, ``len(shape)``)."""

    vocab: int

    def __new__(cls, shape: Sequence[int], vocab: int) -> TokenShape:
        obj = super().__new__(cls, (int(d) for d in shape))
        obj.vocab = int(vocab)
        return obj

    def __reduce__(self):  # noqa: ANN204 - keep the vocabulary through pickling / deepcopy
        return (TokenShape, (tuple(self), self.vocab))


def example_inputs(input_shape: Sequence[int], n: int, zeros: bool = False) -> torch.Tensor:
    """``n`` inputs of ``input_shape``: random token ids for a :class:`TokenShape`, else
    standard-normal images (all zeros with ``zeros``: id 0 for tokens)."""
    if isinstance(input_shape, TokenShape):
        if zeros:
            return torch.zeros(n, *input_shape, dtype=torch.long)
        return torch.randint(input_shape.vocab, (n, *input_shape))
    shape = (n, *(int(d) for d in input_shape))
    return torch.zeros(shape) if zeros else torch.randn(shape)
