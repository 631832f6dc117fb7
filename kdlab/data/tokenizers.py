"""Tokenizers of text data, chosen by name: ``bytes`` (UTF-8 bytes, vocabulary 256, nothing to
install or download) or ``hf:<name-or-path>`` (a Hugging Face tokenizer: a ``tokenizer.json``
file, a folder saved by ``save_pretrained``, or a Hub name when online; needs the ``llm`` extra,
``pip install 'kdlab[llm]'``).

A tokenizer turns the files of a split into one token sequence and says how many bytes of the
text each token stands for (:meth:`ByteTokenizer.encode_files`), so that bits per byte can be
measured for any tokenizer: a split's cross-entropy in nats, summed over its target tokens,
divided by ``ln 2`` times the bytes those tokens cover. Every byte of the text is counted once,
by the first token whose span reaches it (a character split over two byte-level tokens counts
for the first; whitespace a tokenizer drops counts for the next token). Files are joined by a
separator that stands for one byte: NUL for bytes; for a Hugging Face tokenizer its end-of-text
token when it has one, else its tokens of ``"\\0"``.

A tokenizer's :attr:`identity` is what it maps text to, never where it was read from: ``bytes``,
or a digest of the Hugging Face tokenizer's full definition (its ``tokenizer.json``) and the
separator, so stored teachers follow the tokens they were trained on.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from kdlab.util.errors import KdlabError

#: the byte that separates files in a split of byte tokens
SEPARATOR = 0
#: what a missing optional dependency asks for
INSTALL = "pip install 'kdlab[llm]'"


class Tokenizer(Protocol):
    """What :class:`~kdlab.data.text.TextDataModule` asks of a tokenizer."""

    #: the name it was chosen by (``bytes``, ``hf:<name-or-path>``), for logs
    name: str
    #: what defines its tokens (for the identity of the data)
    identity: str
    #: number of token ids (every id is below it)
    vocab_size: int

    def encode_files(self, texts: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """The files of a split as one 1-D sequence of token ids, joined by a separator, and
        the bytes of the text each token stands for (same length, summing to the split's
        bytes)."""
        ...

    def decode(self, tokens: torch.Tensor) -> str:
        """The text of ``tokens``."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless on any text; a token is one byte."""

    vocab_size = 256
    name = "bytes"
    identity = "bytes"

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as a 1-D ``uint8`` tensor of its UTF-8 bytes."""
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()

    def decode(self, tokens: torch.Tensor) -> str:
        """The text of byte tokens (invalid UTF-8 sequences, e.g. a cut multi-byte character,
        become U+FFFD)."""
        return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")

    def encode_files(self, texts: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """The files joined by a NUL byte, as ``uint8`` tokens; every token is one byte."""
        joined = bytes([SEPARATOR]).join(texts)
        tokens = (torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined
                  else torch.empty(0, dtype=torch.uint8))
        return tokens, torch.ones(len(tokens), dtype=torch.uint8)


def token_bytes(text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """The bytes of ``text`` (UTF-8) each token stands for, from the tokens' character
    ``offsets``: each byte counts once, for the first token whose span reaches past it; bytes
    after the last token's span count for the last token. Sums to ``len(text.encode())``."""
    total = len(text.encode("utf-8"))
    if not offsets:
        return np.zeros(0, dtype=np.int64)
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
    byte_at = np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])  # char index → byte
    ends = byte_at[np.asarray([end for _, end in offsets], dtype=np.int64)]
    reached = np.maximum.accumulate(ends)
    counts = np.diff(reached, prepend=0)
    counts[-1] += total - reached[-1]
    return counts


def _load_hf(name: str) -> tuple[Any, int, list[int]]:
    """The ``tokenizers.Tokenizer`` of ``name``, its vocabulary size and its separator ids."""
    path = Path(name).expanduser()
    if path.is_file() or (path.is_dir() and (path / "tokenizer.json").is_file()
                          and not (path / "tokenizer_config.json").is_file()):
        try:
            tokenizers = importlib.import_module("tokenizers")
        except ImportError:
            raise KdlabError(f"data.tokenizer=hf:{name} needs the tokenizers library, which is "
                             f"not installed: {INSTALL}") from None
        file = path if path.is_file() else path / "tokenizer.json"
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises plain Exceptions
            raise KdlabError(f"data.tokenizer=hf:{name}: {file} is not a tokenizers file "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                             ) from None
        eos = next((backend.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
                    if backend.token_to_id(t) is not None), None)
        vocab = backend.get_vocab_size(with_added_tokens=True)
    else:
        try:
            transformers = importlib.import_module("transformers")
        except ImportError:
            raise KdlabError(f"data.tokenizer=hf:{name} needs the transformers library, which "
                             f"is not installed: {INSTALL}") from None
        try:
            wrapper = transformers.AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise KdlabError(f"data.tokenizer=hf:{name} is neither a tokenizer folder or file "
                             "nor a tokenizer on the Hugging Face Hub (offline?): "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                             ) from None
        if not getattr(wrapper, "is_fast", False):
            raise KdlabError(f"data.tokenizer=hf:{name} has no fast (Rust) tokenizer, which "
                             "kdlab needs for the bytes of each token; convert it with "
                             "transformers or give its tokenizer.json")
        backend = wrapper.backend_tokenizer
        eos = wrapper.eos_token_id
        vocab = len(wrapper)
    separator = [int(eos)] if eos is not None else backend.encode(
        "\0", add_special_tokens=False).ids
    return backend, int(vocab), list(separator)


class HFTokenizer:
    """A Hugging Face tokenizer by name or path (see the module docstring); text is encoded
    without special tokens, files joined by its end-of-text token (else its tokens of NUL).

    Args:
        name: a ``tokenizer.json`` file, a folder holding one (saved by ``save_pretrained`` or
            ``tokenizers``), or a Hub name (downloaded by ``transformers`` when online).
    """

    def __init__(self, name: str) -> None:
        self.name = f"hf:{name}"
        self.backend, self.vocab_size, self.separator = _load_hf(name)
        definition = self.backend.to_str() + f"\nseparator={self.separator}"
        self.identity = "hf-" + hashlib.sha256(definition.encode()).hexdigest()[:32]

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as a 1-D ``int64`` tensor of token ids (no special tokens added)."""
        return torch.tensor(self.backend.encode(text, add_special_tokens=False).ids,
                            dtype=torch.long)

    def decode(self, tokens: torch.Tensor) -> str:
        """The text of ``tokens``."""
        return self.backend.decode([int(t) for t in tokens], skip_special_tokens=False)

    def encode_files(self, texts: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """The files (decoded as UTF-8, an invalid sequence becoming U+FFFD) encoded one by
        one and joined by the separator, which stands for one byte."""
        strings = [t.decode("utf-8", errors="replace") for t in texts]
        encodings = self.backend.encode_batch(strings, add_special_tokens=False)
        ids: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        sep_ids = np.asarray(self.separator, dtype=np.int64)
        sep_bytes = np.zeros(len(sep_ids), dtype=np.int64)
        if len(sep_bytes):
            sep_bytes[0] = 1
        for k, (text, encoding) in enumerate(zip(strings, encodings, strict=True)):
            if k:
                ids.append(sep_ids)
                counts.append(sep_bytes)
            ids.append(np.asarray(encoding.ids, dtype=np.int64))
            counts.append(token_bytes(text, encoding.offsets))
        if not ids:
            return torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32)
        return (torch.from_numpy(np.concatenate(ids).astype(np.int32)),
                torch.from_numpy(np.concatenate(counts).astype(np.int32)))


def get_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """The tokenizer ``data.tokenizer`` names: ``bytes`` or ``hf:<name-or-path>``."""
    if name == "bytes":
        return ByteTokenizer()
    if isinstance(name, str) and name.startswith("hf:") and len(name) > 3:
        return HFTokenizer(name[3:])
    raise KdlabError(f"data.tokenizer={name}: choose bytes (UTF-8 bytes, vocabulary 256) or "
                     "hf:<name-or-path> (a Hugging Face tokenizer; needs the llm extra, "
                     f"{INSTALL})")
