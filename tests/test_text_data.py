"""Text data for language models: the byte tokenizer, windows, the split by file, the default
standard-library corpus, identity and errors."""

from __future__ import annotations

import pytest
import torch

from kdlab.data.text import (
    SEPARATOR,
    ByteTokenizer,
    TextDataModule,
    corpus_files,
    split_of,
    stdlib_root,
    windows,
)
from kdlab.util.errors import KdlabError


def test_the_byte_tokenizer_is_lossless_on_any_text():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'ünïcode ✓ 文字'\n"
    ids = tok.encode(text)
    assert ids.dtype == torch.uint8 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 256


def test_windows_are_inputs_and_next_token_targets_with_stride_context():
    tokens = torch.arange(23, dtype=torch.uint8)
    x, y = windows(tokens, 5)
    assert x.shape == y.shape == (4, 5) and x.dtype == torch.long
    assert x[0].tolist() == [0, 1, 2, 3, 4] and y[0].tolist() == [1, 2, 3, 4, 5]
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:-1, -1], x[1:, 0])  # consecutive windows tile the text
    assert windows(torch.arange(5, dtype=torch.uint8), 5)[0].shape == (0, 5)


def test_the_split_by_file_is_seeded_and_follows_the_fractions():
    names = [f"pkg/module_{i}.py" for i in range(4000)]
    splits = [split_of(n, 0, 0.05, 0.1) for n in names]
    assert splits == [split_of(n, 0, 0.05, 0.1) for n in names]
    assert splits.count("val") / 4000 == pytest.approx(0.05, abs=0.015)
    assert splits.count("test") / 4000 == pytest.approx(0.10, abs=0.02)
    assert splits != [split_of(n, 1, 0.05, 0.1) for n in names]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for i in range(60):
        folder = root / ("tests" if i == 0 else f"part{i % 3}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"file{i:02d}.txt").write_text(f"<file {i:02d}> " + "lorem ipsum " * 40)
    return root


def test_every_file_lands_in_exactly_one_split(corpus):
    data = TextDataModule(root=str(corpus), context=32, val_fraction=0.2, test_fraction=0.2)
    data.setup()
    tok = ByteTokenizer()
    texts = {}
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        joined = torch.cat([x[:, 0], x[-1, 1:], y[-1, -1:]])  # x and y tile the split
        texts[split] = tok.decode(joined)
    for i in range(1, 60):
        found = [s for s, text in texts.items() if f"<file {i:02d}>" in text]
        assert len(found) <= 1, (i, found)
    assert not any("<file 00>" in t for t in texts.values())  # tests/ is left out
    assert sum(data.files.values()) == 59
    assert all(data.files[s] > 0 for s in ("train", "val", "test"))
    assert chr(SEPARATOR) in texts["train"]


def test_identity_follows_the_content_not_the_path(corpus, tmp_path):
    def identity(root, context=16):
        return TextDataModule(root=str(root), context=context, val_fraction=0.2,
                              test_fraction=0.2).identity()

    first = identity(corpus)
    moved = tmp_path / "elsewhere"
    corpus.rename(moved)
    assert identity(moved) == first
    (moved / "part1" / "file01.txt").write_text("changed " * 10)
    assert identity(moved)["content"] != first["content"]
    assert identity(moved, 8)["context"] == 8


def test_batches_are_token_windows_shuffled_per_epoch(corpus):
    data = TextDataModule(root=str(corpus), context=16, batch_size=8, val_fraction=0.2,
                          test_fraction=0.2)
    loader = data.train_dataloader()
    x, y, index = next(iter(loader))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(data.x_train[index], x)
    first = next(iter(loader))[2]
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[2], first)
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader))[2], first)
    assert data.num_classes == 256 and data.input_shape == (16,)
    assert "context 16" in data.describe()


def test_the_default_corpus_is_the_standard_library_without_its_tests():
    files = corpus_files(stdlib_root(), "**/*.py")
    assert len(files) > 100
    assert not any({"test", "tests", "site-packages"} & set(p.relative_to(stdlib_root()).parts)
                   for p in files)
    data = TextDataModule(context=64, max_bytes=300_000)
    data.setup()
    assert sum(data.bytes.values()) >= 300_000 - 2 * sum(data.files.values())
    assert len(data.x_train) > len(data.x_val) > 0 and len(data.x_test) > 0


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"context": 0}, "data.context"),
    ({"batch_size": 0}, "data.batch_size"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "data.val_fraction"),
    ({"max_bytes": 0}, "data.max_bytes"),
])
def test_bad_options_name_the_key(kwargs, key):
    with pytest.raises(KdlabError, match=key):
        TextDataModule(**kwargs)


def test_missing_or_too_small_corpora_fail_clearly(tmp_path, corpus):
    with pytest.raises(KdlabError, match="data.root"):
        TextDataModule(root=str(tmp_path / "nowhere")).setup()
    with pytest.raises(KdlabError, match="data.pattern"):
        TextDataModule(root=str(corpus), pattern="*.md").setup()
    with pytest.raises(KdlabError, match="data.context=4096"):
        TextDataModule(root=str(corpus), context=4096).setup()
