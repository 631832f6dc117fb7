"""A small text corpus written into a test's folder, so text runs take seconds: 30 short
Python-like files, split 70 / 15 / 15 by file (``data.val_fraction``/``test_fraction``)."""

from __future__ import annotations

from pathlib import Path


def write_corpus(folder: Path, files: int = 30, functions: int = 30) -> Path:
    """``folder/corpus`` with ``files`` files of ``functions`` small functions each."""
    root = folder / "corpus"
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        body = "".join(f"def function_{i}_{j}(value):\n    return value * {j} + {i}\n\n"
                       for j in range(functions))
        (root / f"module_{i:02d}.py").write_text(f'"""Module {i}."""\n\n{body}')
    return root


def text_overrides(folder: Path) -> list[str]:
    """Overrides of a tiny text run on :func:`write_corpus`'s corpus: a gpt_nano teacher
    (dim 32) and a smaller student (dim 16), context 16, three training batches per stage."""
    root = write_corpus(folder)
    return ["data=text", f"data.root={root}", "data.context=16", "data.batch_size=8",
            "data.eval_batch_size=64", "data.val_fraction=0.15", "data.test_fraction=0.15",
            "student=zoo", "student.model.name=gpt_nano", "+student.model.dim=16",
            "+student.model.depth=1", "teacher=zoo", "teacher.model.name=gpt_nano",
            "+teacher.model.dim=32", "teacher.train.max_epochs=1",
            "teacher.train.augment=false", "teacher.train.batch_size=8",
            "trainer.max_epochs=1", "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
            "trainer.enable_progress_bar=false", "logger=none", "latency.repeats=1",
            "latency.batch_size=2", "baseline=false", "channels_last=false"]
