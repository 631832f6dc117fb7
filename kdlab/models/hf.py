"""Any Hugging Face ``transformers`` causal language model as a kdlab teacher or student, by name
or path: ``model.name=hf:<name-or-path>`` (needs the ``llm`` extra, ``pip install
'kdlab[llm]'``).

    create("hf:gpt2", input_shape=[128], num_classes=50257)                   # Hub weights
    create("hf:/models/tiny", input_shape=[128], num_classes=256)             # a local folder
    create("hf:llama", input_shape=[128], num_classes=256, pretrained=False,  # random, offline
           config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 128})

The wrapper maps token ids ``[N, T]`` to next-token logits ``[N, T, V]`` like kdlab's own GPT
(:mod:`kdlab.models.gpt`), keeping the library's network as ``self.net`` (its module paths read
``net.<path>``). What kdlab taps for hidden-state matching: ``blocks.<k>`` is the hidden state
each decoder layer outputs (read by a forward hook on the layer, so it is a tensor whether the
layer returns a tensor, as in ``transformers`` 5, or a tuple, as in 4), aliases ``blocks`` and
``stages``; ``final`` is the hidden state the output head reads (after the final norm), alias
``embedding``. The same ``blocks.<k>`` paths name a kdlab GPT's blocks, so a feature strategy's
layers read alike on both.

**Weights.** ``pretrained=True`` (the default): ``AutoModelForCausalLM.from_pretrained(name)``,
a local folder (``save_pretrained``) or a Hub name (downloaded when online). ``pretrained=False``
builds a randomly initialised model from a configuration: ``name`` is a folder or
``config.json`` file, a model type of ``transformers`` (``gpt2``, ``llama``, ``qwen2``, … :
its default configuration, nothing to download), or a Hub name (its ``config.json`` is
downloaded); ``config`` overrides its keys, and its vocabulary is the data's tokenizer's unless
``config`` sets ``vocab_size``. The model runs in float32 (the run's ``trainer.precision``
decides any lower precision).

**Vocabulary.** The model must predict every token of the data's tokenizer: a model with a
smaller vocabulary is refused naming both sizes; a larger one (a padded embedding table, as many
Hub checkpoints have, or a teacher of another vocabulary for ``distill=uld``) is accepted, and
the engine refuses a teacher and a student of different vocabularies for every strategy not
built for them.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from kdlab.models.gpt import SequenceMap
from kdlab.util.errors import KdlabError

#: what a missing optional dependency asks for
INSTALL = "pip install 'kdlab[llm]'"
#: keyword arguments of ``from_pretrained`` that also say where a configuration is read from
WHERE = ("revision", "local_files_only", "trust_remote_code", "token", "cache_dir",
         "subfolder")


def _transformers(name: str) -> ModuleType:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise KdlabError(f"model.name=hf:{name} needs the transformers library, which is not "
                         f"installed: {INSTALL}") from None


def _plain(value: Any) -> Any:
    """A config value as plain dicts and lists (Hydra hands over its own containers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _local(name: str) -> str:
    """``name`` with ``~`` expanded; a name written as a path (``/``, ``.``, ``~``) must exist."""
    if name.startswith(("/", ".", "~")):
        path = Path(name).expanduser()
        if not path.exists():
            raise KdlabError(f"model.name=hf:{name}: no such folder or file")
        return str(path)
    return name


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def files_digest(name: str) -> str | None:
    """A digest of the local files an ``hf:<name>`` model is read from — every file under the
    folder (hidden ones left out), or the one ``config.json`` — so that a network kdlab trains
    from them is stored under their content, not their path; ``None`` for a Hub name or a model
    type (named by the config alone)."""
    path = Path(name).expanduser()
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" if file != path
                      else b"\0")
        with file.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


class LayerOutput(nn.Module):
    """An identity whose input is another module's hidden state: its :meth:`after` is a forward
    hook of a decoder layer and :meth:`before` a forward pre-hook of the output head, so tapping
    this module (kdlab's taps hook module outputs) reads that hidden state. The hooks are bound
    methods, so a deep copy of the model calls the copy's own ``LayerOutput``."""

    def __init__(self, as_map: bool = False) -> None:
        super().__init__()
        #: the hidden states as one-column maps ``[N, D, T, 1]``, what hint strategies read
        #: (:class:`kdlab.models.gpt.SequenceMap`)
        self.as_map = SequenceMap() if as_map else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.as_map is not None:
            self.as_map(hidden)
        return hidden

    def after(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook: pass the layer's hidden state (its output, or the output's first
        element) through this module; the layer's output is left as it is."""
        self(output[0] if isinstance(output, tuple) else output)

    def before(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: pass the module's first input through this module."""
        if args:
            self(args[0])


def decoder_layers(net: nn.Module, depth: int) -> nn.ModuleList | None:
    """The decoder's layers: the first ``nn.ModuleList`` of ``depth`` modules (``depth`` is the
    configuration's ``num_hidden_layers``)."""
    return next((m for m in net.modules() if isinstance(m, nn.ModuleList) and len(m) == depth),
                None)


class HFCausalLM(nn.Module):
    """A ``transformers`` causal language model by name or path (see the module docstring).

    Args:
        input_shape: ``(context,)``, the longest sequence the model reads (at most the
            model's ``max_position_embeddings``).
        num_classes: the vocabulary of the data's tokenizer (at most the model's).
        name: a local folder, a Hub name, or with ``pretrained=False`` also a ``config.json``
            or a ``transformers`` model type.
        pretrained: load the weights (``from_pretrained``) or build a random model from the
            configuration (``from_config``).
        config: keys of the model's configuration to override (e.g. ``{"resid_pdrop": 0.0}``,
            or the sizes of a random model).
        **kwargs: passed on to ``from_pretrained`` / ``from_config`` (e.g. ``revision``,
            ``attn_implementation``, ``trust_remote_code``).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, name: str,
                 pretrained: bool = True, config: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        if len(input_shape) != 1 or int(input_shape[0]) < 1:
            raise KdlabError(f"model.name=hf:{name} reads token sequences: its input shape must "
                             f"be (context,), got {tuple(input_shape)}")
        transformers = _transformers(name)
        self.name = name
        name = _local(name)
        self.context = int(input_shape[0])
        overrides = _plain(dict(config or {}))
        kwargs = _plain(kwargs)
        if pretrained:
            net = self._load(transformers, name, overrides, kwargs)
        else:
            where = {k: v for k, v in kwargs.items() if k in WHERE}
            settings = self._configuration(transformers, name, overrides, where,
                                           int(num_classes))
            kwargs = {k: v for k, v in kwargs.items()
                      if k not in WHERE or k == "trust_remote_code"}
            net = self._build(transformers.AutoModelForCausalLM.from_config, name, settings,
                              kwargs)
        self.net = net.float()
        settings = self.net.config
        head = self.net.get_output_embeddings()
        self.vocab = int(head.out_features if isinstance(head, nn.Linear)
                         else settings.vocab_size)
        if self.vocab < int(num_classes):
            raise KdlabError(
                f"model.name=hf:{name} predicts {self.vocab} tokens but the data's tokenizer has "
                f"{num_classes}: the model cannot read or predict every token id; use the "
                f"model's own tokenizer (data.tokenizer=hf:{name}) or a model of that "
                "vocabulary")
        limit = getattr(settings, "max_position_embeddings", None)
        if isinstance(limit, int) and self.context > limit:
            raise KdlabError(f"data.context={self.context} is longer than model.name=hf:{name} "
                             f"reads (max_position_embeddings={limit}): use a shorter context")

        layers = decoder_layers(self.net, int(getattr(settings, "num_hidden_layers", -1)))
        self.blocks = nn.ModuleList(LayerOutput(as_map=True) for _ in (layers or []))
        for layer, tap in zip(layers or [], self.blocks, strict=True):
            layer.register_forward_hook(tap.after)
        self.final = LayerOutput()
        if isinstance(head, nn.Module):
            head.register_forward_pre_hook(self.final.before)

    @staticmethod
    def _load(transformers: ModuleType, name: str, overrides: dict[str, Any],
              kwargs: dict[str, Any]) -> nn.Module:
        try:
            return transformers.AutoModelForCausalLM.from_pretrained(name, **overrides, **kwargs)
        except OSError as e:
            raise KdlabError(f"model.name=hf:{name} is neither a model folder nor a model on the "
                             f"Hugging Face Hub (offline?): {_first_line(e)}; for a random "
                             "model from a configuration set model.pretrained=false") from None
        except ValueError as e:
            raise KdlabError(f"model.name=hf:{name} is not a causal language model of "
                             f"transformers: {_first_line(e)}") from None

    @staticmethod
    def _configuration(transformers: ModuleType, name: str, overrides: dict[str, Any],
                       where: dict[str, Any], vocab: int) -> Any:
        """The configuration of a random model (see the module docstring); ``where``: the
        arguments of ``from_pretrained`` that say where to read it (``revision``, …)."""
        overrides = {"vocab_size": vocab, **overrides}
        try:
            if name in transformers.CONFIG_MAPPING and not Path(name).exists():
                return transformers.AutoConfig.for_model(name, **overrides)
            return transformers.AutoConfig.from_pretrained(name, **where, **overrides)
        except (OSError, ValueError) as e:
            raise KdlabError(f"model.name=hf:{name} (model.pretrained=false) is neither a "
                             "configuration folder or file, nor a transformers model type "
                             f"(gpt2, llama, …), nor a model on the Hub (offline?): "
                             f"{_first_line(e)}") from None

    @staticmethod
    def _build(factory: Callable[..., nn.Module], name: str, settings: Any,
               kwargs: dict[str, Any]) -> nn.Module:
        try:
            return factory(settings, **kwargs)
        except ValueError as e:
            raise KdlabError(f"model.name=hf:{name} is not a causal language model of "
                             f"transformers: {_first_line(e)}") from None

    def taps(self) -> dict[str, list[str]]:
        """Aliases for feature strategies: each decoder layer's output hidden state
        ``[N, T, D]`` (``blocks``), the same as one-column maps ``[N, D, T, 1]`` (``stages``,
        ``preact``: what hint strategies read, as for kdlab's GPT) and the hidden state the
        output head reads (``embedding``)."""
        blocks = [f"blocks.{k}" for k in range(len(self.blocks))]
        out = {"embedding": ["final"]}
        if blocks:
            maps = [f"{b}.as_map" for b in blocks]
            out.update(blocks=blocks, stages=maps, preact=list(maps))
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.context:
            raise KdlabError(f"model hf:{self.name} reads [N, T] token ids with T <= "
                             f"{self.context} (data.context), got shape {list(tokens.shape)}")
        return self.net(input_ids=tokens, use_cache=False).logits
