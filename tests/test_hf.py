"""Hugging Face causal language models (``hf:<name-or-path>``) and tokenizers
(``data.tokenizer=hf:<name-or-path>``), the ``llm`` extra: tiny models and a tokenizer built
here in temporary folders (nothing is downloaded); logits, taps, errors, the data's identity,
bits per byte, and short runs through the CLI's ``run``."""

from __future__ import annotations

import copy
import importlib
import math
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from kdlab.data.text import TextDataModule  # noqa: E402
from kdlab.data.tokenizers import HFTokenizer, get_tokenizer, token_bytes  # noqa: E402
from kdlab.engine.taps import Taps  # noqa: E402
from kdlab.models import create  # noqa: E402
from kdlab.models.hf import HFCausalLM  # noqa: E402
from kdlab.train import run  # noqa: E402
from kdlab.util.errors import KdlabError  # noqa: E402
from tests.conftest import make_cfg  # noqa: E402

TEXT = "def f(x):\n    return 'ünïcode ✓ 文字' + str(x)  # a comment\n" * 40
#: a tiny corpus for data.root: 30 files of Python-like text
LINES = ["import os", "def main(argv):", "    return argv[1:]", "class Point:", "    x: int",
         "# ünïcode ✓", "if __name__ == '__main__':", "    print('hello, world')"]


def tiny_gpt2(folder, vocab: int = 256, seed: int = 0) -> str:
    """A random two-layer GPT-2 (width 32, context 64) saved with ``save_pretrained``."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


def tiny_tokenizer(folder, vocab: int = 320, raw: bool = False) -> str:
    """A byte-level BPE of ``vocab`` tokens trained on :data:`TEXT` and :data:`LINES`, saved as a
    ``transformers`` folder (or ``raw``: a bare ``tokenizer.json``)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, "\n".join(LINES) * 20], trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    if raw:
        tok.save(str(folder / "tokenizer.json"))
        return str(folder / "tokenizer.json")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok,
                                         eos_token="<|endoftext|>").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Paths of the tiny models, tokenizers and corpus shared by this module's tests."""
    root = tmp_path_factory.mktemp("hf")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(30):
        lines = [LINES[(i + k) % len(LINES)] for k in range(60)]
        (corpus / f"mod{i:02d}.py").write_text(f"# module {i}\n" + "\n".join(lines) + "\n")
    tok = tiny_tokenizer(root / "tok")
    vocab = len(transformers.AutoTokenizer.from_pretrained(tok))
    return {"gpt2": tiny_gpt2(root / "gpt2"), "gpt2_300": tiny_gpt2(root / "gpt2_300", 300),
            "tok": tok, "tok_raw": tiny_tokenizer(root / "raw", raw=True),
            "tok_other": tiny_tokenizer(root / "other", vocab=300), "vocab": vocab,
            "gpt2_tok": tiny_gpt2(root / "gpt2_tok", vocab), "corpus": str(corpus)}


# -- models ---------------------------------------------------------------------------------------
def test_logits_are_the_wrapped_models_and_taps_read_each_layer(hf):
    model = create(f"hf:{hf['gpt2']}", input_shape=[32], num_classes=256).eval()
    assert isinstance(model, HFCausalLM) and model.vocab == 256
    taps = model.taps()
    assert taps["blocks"] == ["blocks.0", "blocks.1"]
    assert taps["stages"] == taps["preact"] == ["blocks.0.as_map", "blocks.1.as_map"]
    assert taps["embedding"] == ["final"]
    x = torch.randint(0, 256, (3, 32))
    hooks = Taps(model, ["blocks.0", "blocks.1", "final", "blocks.0.as_map"])
    logits = model(x)
    features = hooks.pop()
    reference = model.net(input_ids=x, output_hidden_states=True)
    assert logits.shape == (3, 32, 256) and torch.equal(logits, reference.logits)
    # hidden_states: the embeddings, then each layer's output (GPT-2 normalises the last one)
    torch.testing.assert_close(features["blocks.0"], reference.hidden_states[1])
    # the same hidden states as one-column maps [N, D, T, 1], for hint strategies
    torch.testing.assert_close(features["blocks.0.as_map"][..., 0].transpose(1, 2),
                               reference.hidden_states[1])
    torch.testing.assert_close(features["final"], reference.hidden_states[2])
    assert features["blocks.1"].shape == (3, 32, 32)
    assert not torch.allclose(features["blocks.1"], features["final"])
    # a deep copy (a frozen teacher copy) taps its own layers, not the original's
    hooks.remove()
    twin = copy.deepcopy(model)
    twin_hooks, hooks = Taps(twin, ["blocks.1"]), Taps(model, ["blocks.1"])
    twin(x)
    assert list(twin_hooks.pop()) == ["blocks.1"] and hooks.pop() == {}


def test_a_random_model_from_a_model_type_or_a_config_file(hf, tmp_path):
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    llama = create("hf:llama", input_shape=[16], num_classes=300, pretrained=False,
                   config=sizes)
    assert type(llama.net).__name__ == "LlamaForCausalLM"
    assert llama.vocab == 300 and len(llama.taps()["blocks"]) == 3  # vocabulary: the data's
    assert llama(torch.randint(0, 300, (2, 16))).shape == (2, 16, 300)
    transformers.AutoConfig.from_pretrained(hf["gpt2"]).save_pretrained(tmp_path)
    from_file = create(f"hf:{tmp_path / 'config.json'}", input_shape=[16], num_classes=256,
                       pretrained=False, config={"n_layer": 1})
    assert from_file.vocab == 256 and len(from_file.blocks) == 1
    assert all(p.dtype == torch.float32 for p in from_file.parameters())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_classes": 300}, "predicts 256 tokens but the data's tokenizer has 300"),
    ({"input_shape": [128]}, r"data.context=128 is longer .*max_position_embeddings=64"),
    ({"input_shape": [1, 28, 28]}, r"its input shape must be \(context,\)"),
])
def test_a_model_that_cannot_read_the_data_names_the_sizes(hf, kwargs, message):
    args = {"input_shape": [32], "num_classes": 256, **kwargs}
    with pytest.raises(KdlabError, match=message):
        create(f"hf:{hf['gpt2']}", **args)


def test_a_missing_model_or_configuration_is_named(tmp_path):
    with pytest.raises(KdlabError, match="no such folder or file"):
        create(f"hf:{tmp_path / 'nothing'}", input_shape=[8], num_classes=256)
    with pytest.raises(KdlabError, match="nor a transformers model type"):
        create("hf:no-such-architecture-xyz", input_shape=[8], num_classes=256,
               pretrained=False, local_files_only=True)


def test_a_missing_extra_names_the_install(monkeypatch, hf):
    real = importlib.import_module

    def without_hf(name, *args, **kwargs):
        if name in ("transformers", "tokenizers"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_hf)
    with pytest.raises(KdlabError, match=r"needs the transformers library.*pip install "
                                         r"'kdlab\[llm\]'"):
        create("hf:gpt2", input_shape=[8], num_classes=256)
    with pytest.raises(KdlabError, match=r"pip install 'kdlab\[llm\]'"):
        get_tokenizer(f"hf:{hf['tok']}")
    with pytest.raises(KdlabError, match=r"needs the tokenizers library.*kdlab\[llm\]"):
        get_tokenizer(f"hf:{hf['tok_raw']}")


# -- tokenizers -----------------------------------------------------------------------------------
def test_each_byte_counts_once_for_the_first_token_that_reaches_it():
    text = "ab ü✓"  # bytes: a b ' ' ü(2) ✓(3) = 8
    # overlapping spans (a character split over two byte tokens) and a gap (a dropped space)
    offsets = [(0, 1), (1, 2), (3, 4), (3, 4), (4, 5)]
    assert token_bytes(text, offsets).tolist() == [1, 1, 3, 0, 3]
    assert token_bytes(text, offsets[:3]).tolist() == [1, 1, 6]  # the tail: the last token
    assert token_bytes("", []).tolist() == []


def test_a_hugging_face_tokenizer_by_folder_or_file(hf, tmp_path):
    tok = get_tokenizer(f"hf:{hf['tok']}")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == hf["vocab"]
    assert tok.name == f"hf:{hf['tok']}" and tok.decode(tok.encode(TEXT)) == TEXT
    ids, per_token = tok.encode_files([TEXT.encode(), b"x = 1\n"])
    assert len(ids) == len(per_token) and int(ids.max()) < tok.vocab_size
    assert int(per_token.sum()) == len(TEXT.encode()) + 1 + 6  # + the separator's one byte
    assert len(ids) < len(TEXT.encode())  # BPE: fewer tokens than bytes
    eos = tok.backend.token_to_id("<|endoftext|>")
    assert tok.separator == [eos] and eos in ids.tolist()
    raw = get_tokenizer(f"hf:{hf['tok_raw']}")  # the same tokens from a bare tokenizer.json
    assert raw.vocab_size == tok.vocab_size and torch.equal(raw.encode(TEXT), tok.encode(TEXT))
    moved = tmp_path / "moved" / "tokenizer.json"  # the identity is the content, not the path
    moved.parent.mkdir()
    shutil.copy(hf["tok_raw"], moved)
    assert get_tokenizer(f"hf:{moved}").identity == raw.identity
    assert get_tokenizer(f"hf:{hf['tok_other']}").identity != tok.identity
    with pytest.raises(KdlabError, match="choose bytes .* or hf:<name-or-path>"):
        get_tokenizer("sentencepiece")


def test_the_tokenizer_sets_the_vocabulary_and_the_identity_of_the_data(hf):
    def data(tokenizer: str) -> TextDataModule:
        module = TextDataModule(root=hf["corpus"], context=16, val_fraction=0.2,
                                test_fraction=0.2, tokenizer=tokenizer)
        module.setup()
        return module

    byte, bpe = data("bytes"), data(f"hf:{hf['tok']}")
    assert (byte.num_classes, byte.input_shape.vocab) == (256, 256)
    assert bpe.num_classes == bpe.input_shape.vocab == hf["vocab"]
    assert byte.identity()["tokenizer"] == "bytes"
    assert bpe.identity()["tokenizer"] == bpe.tokenizer.identity
    assert bpe.identity() != byte.identity() != data(f"hf:{hf['tok_other']}").identity()
    assert bpe.identity() == data(f"hf:{hf['tok']}/").identity()  # tokens, not the path
    for module in (byte, bpe):
        assert module.bytes == byte.bytes  # the same text, whatever its tokens
    # every window of bytes covers `context` bytes; a BPE window more
    assert torch.equal(byte.target_bytes["val"], torch.full((len(byte.x_val),), 16))
    assert (bpe.target_bytes["train"] > 16).all()
    assert int(bpe.x_train.max()) < bpe.num_classes


# -- runs -----------------------------------------------------------------------------------------
def quick(hf, *overrides: str) -> list[str]:
    """A one-batch run (fast_dev_run) on the tiny corpus, context 16, no baseline."""
    return ["data=text", f"data.root={hf['corpus']}", "data.context=16", "data.batch_size=8",
            "data.eval_batch_size=32", "data.val_fraction=0.2", "data.test_fraction=0.2",
            "teacher=gpt", "student=gpt", "trainer.fast_dev_run=true", "logger=none",
            "trainer.enable_progress_bar=false", "latency.repeats=1", "latency.batch_size=2",
            "baseline=false", *overrides]


def test_a_hugging_face_teacher_distils_into_a_kdlab_gpt(hf, tmp_path):
    results = run(make_cfg(tmp_path, quick(hf, "distill=kd", f"teacher.model.name=hf:{hf['gpt2']}",
                                           "teacher.ckpt=pretrained")))
    assert results["teacher"]["source"]["source"] == "pretrained"
    assert results["teacher"]["model"] == f"hf:{hf['gpt2']}"
    for role in ("teacher", "student"):
        metrics = results[role]["metrics"]
        # byte tokens: bits per byte are bits per token
        assert metrics["test/bits_per_byte"] == pytest.approx(metrics["test/bits_per_token"])
        assert abs(metrics["test/bits_per_token"] * math.log(2) - metrics["test/loss"]) < 1e-4


def test_hf_to_hf_on_a_hugging_face_tokenizer(hf, tmp_path):
    """An hf teacher of the tokenizer's vocabulary into a random hf student built from a
    model type (its vocabulary: the tokenizer's)."""
    results = run(make_cfg(tmp_path, quick(
        hf, "distill=kd", f"data.tokenizer=hf:{hf['tok']}",
        f"teacher.model.name=hf:{hf['gpt2_tok']}", "teacher.ckpt=pretrained",
        "student.model.name=hf:gpt2", "+student.model.pretrained=false",
        "+student.model.config={n_layer:2,n_embd:16,n_head:2,n_positions:32}",
        "test_last=true")))
    assert results["student"]["model"] == "hf:gpt2"
    assert 0 <= results["student"]["metrics"]["last/test/acc"] <= 1  # over tokens
    for role in ("teacher", "student"):
        metrics = results[role]["metrics"]
        # a token covers several bytes: fewer bits per byte than per token
        assert 0 < metrics["test/bits_per_byte"] < metrics["test/bits_per_token"]
    assert results["student"]["params"] < results["teacher"]["params"]


def test_different_vocabularies_train_with_uld_and_are_refused_by_kd(hf, tmp_path, capsys):
    teacher = [f"teacher.model.name=hf:{hf['gpt2_300']}", "teacher.ckpt=pretrained"]
    results = run(make_cfg(tmp_path / "uld", quick(hf, "distill=uld", *teacher)))
    assert math.isfinite(results["student"]["metrics"]["test/loss"])
    assert math.isfinite(results["teacher"]["metrics"]["test/acc"])  # over its 300 outputs
    with pytest.raises(SystemExit):
        run(make_cfg(tmp_path / "kd", quick(hf, "distill=kd", *teacher)))
    assert ("the teacher predicts 300 classes (its vocabulary) and the student 256: "
            "distill=kd") in capsys.readouterr().err


def test_bits_per_byte_are_the_splits_nats_over_its_bytes(hf):
    """Over uneven batches of BPE windows, ``val/bits_per_byte`` is the whole split's summed
    cross-entropy over ``ln 2`` times the bytes its targets cover."""
    from kdlab.engine.evaluate import evaluate_model

    data = TextDataModule(root=hf["corpus"], context=16, val_fraction=0.2, test_fraction=0.2,
                          eval_batch_size=7, tokenizer=f"hf:{hf['tok']}")
    data.setup()
    assert len(data.x_val) % 7 and len(data.x_val) > 7  # several batches, the last one short
    model = create(f"hf:{hf['gpt2_tok']}", input_shape=[16], num_classes=data.num_classes).eval()
    metrics = evaluate_model(model, data, data.num_classes, splits=("val",))
    with torch.no_grad():
        nats = torch.nn.functional.cross_entropy(model(data.x_val).flatten(0, 1),
                                                 data.y_val.flatten(), reduction="sum")
    expected = float(nats) / (math.log(2) * int(data.target_bytes["val"].sum()))
    assert metrics["val/bits_per_byte"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val/bits_per_token"] == pytest.approx(
        float(nats) / (math.log(2) * data.y_val.numel()), rel=1e-5)


# -- datasets -------------------------------------------------------------------------------------
def test_a_hugging_face_dataset_is_a_corpus_of_its_rows(hf, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": [f"# row {i}\n" + "\n".join(LINES[i % 3:]) * 6 for i in range(40)]
            + [""], "id": list(range(41))}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(
        tmp_path / "saved")

    def data(**kwargs) -> TextDataModule:
        module = TextDataModule(context=16, val_fraction=0.2, test_fraction=0.2,
                                hf_dataset=str(tmp_path / "saved"), **kwargs)
        module.setup()
        return module

    byte = data()
    assert sum(byte.files.values()) == 40  # the empty row is skipped
    assert byte.bytes["train"] + byte.bytes["val"] + byte.bytes["test"] == sum(
        len(t.encode()) for t in rows["text"]) + 37  # + one separator between documents
    assert "dataset" in byte.describe() and byte.identity()["tokenizer"] == "bytes"
    bpe = data(tokenizer=f"hf:{hf['tok']}")
    assert bpe.identity()["content"] == byte.identity()["content"] != data(
        max_bytes=20000).identity()["content"]
    with pytest.raises(KdlabError, match="data.hf_column=body is not a column .*text, id"):
        data(hf_column="body")
    with pytest.raises(KdlabError, match="data.hf_split=test: .* has the splits train"):
        data(hf_split="test")
    with pytest.raises(KdlabError, match="data.root=.* and data.hf_dataset="):
        TextDataModule(root=hf["corpus"], hf_dataset="wikitext")


def test_a_teacher_read_from_local_files_is_stored_under_their_content(hf, tmp_path):
    from kdlab.modes.teacher import teacher_identity, teacher_key

    folder = tmp_path / "model"
    shutil.copytree(hf["gpt2"], folder)
    overrides = quick(hf, "distill=kd", f"teacher.model.name=hf:{folder}")
    key = teacher_key(make_cfg(tmp_path, overrides))
    assert key == teacher_key(make_cfg(tmp_path, overrides))
    shutil.copy(tiny_gpt2(tmp_path / "other", seed=1) + "/model.safetensors", folder)
    assert teacher_key(make_cfg(tmp_path, overrides)) != key  # other weights, same path
    hub = quick(hf, "distill=kd", "teacher.model.name=hf:gpt2")  # a name: the config alone
    assert "model_files" not in teacher_identity(make_cfg(tmp_path, hub))
