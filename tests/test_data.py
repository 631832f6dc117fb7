"""The Fashion-MNIST datamodule: splits, labelled subset, transfer set, augmentation."""

import logging

import pytest
import torch

from kdlab.data import UNLABELLED, FashionMNISTDataModule
from kdlab.data.memory import random_shift_flip, stratified_subset
from kdlab.util.errors import KdlabError


@pytest.fixture(scope="module")
def transfer_dm():
    dm = FashionMNISTDataModule(num_labels=1000, transfer=True, label_seed=3)
    dm.setup()
    return dm


def test_split_sizes_and_normalisation(transfer_dm):
    dm = transfer_dm
    assert (len(dm.x_train), len(dm.x_val), len(dm.x_test)) == (55000, 5000, 10000)
    assert dm.x_train.dtype == torch.float32
    assert abs(dm.x_train.mean().item()) < 0.05 and abs(dm.x_train.std().item() - 1) < 0.05


def test_validation_split_is_disjoint_from_training_and_fixed_by_split_seed():
    a = FashionMNISTDataModule(split_seed=0)
    a.setup()
    b = FashionMNISTDataModule(split_seed=0, label_seed=9, num_labels=500, transfer=True)
    b.setup()
    train, val = a.split_indices["train"], a.split_indices["val"]
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert len(train) + len(val) == 60000
    assert torch.equal(val, b.split_indices["val"]) and torch.equal(a.x_val, b.x_val)
    c = FashionMNISTDataModule(split_seed=1)
    c.setup()
    assert not torch.equal(val, c.split_indices["val"])


def test_labelled_subset_is_stratified_and_seeded(transfer_dm):
    dm = transfer_dm
    labelled = dm.targets[dm.targets != UNLABELLED]
    assert len(labelled) == 1000
    assert torch.bincount(labelled, minlength=10).tolist() == [100] * 10
    again = stratified_subset(dm.y_train, 1000, 10, seed=3)
    assert torch.equal(again, dm.labelled)
    other = stratified_subset(dm.y_train, 1000, 10, seed=4)
    assert not torch.equal(other, dm.labelled)


def test_transfer_set_hides_labels_and_labelled_only_mode_repeats_to_same_epoch(transfer_dm):
    batch = next(iter(transfer_dm.train_dataloader()))
    x, y, idx = batch
    assert x.shape == (128, 1, 28, 28) and y.shape == idx.shape == (128,)
    assert torch.equal(y, transfer_dm.targets[idx])
    labelled_only = FashionMNISTDataModule(num_labels=1000, transfer=False, label_seed=3)
    labelled_only.setup()
    assert len(labelled_only.train_dataloader()) == len(transfer_dm.train_dataloader())
    seen = torch.cat([b[2] for b in labelled_only.train_dataloader()])
    assert set(seen.tolist()) == set(transfer_dm.labelled.tolist())
    assert (torch.cat([b[1] for b in labelled_only.train_dataloader()]) >= 0).all()


def test_random_shift_flip_moves_pixels_and_keeps_shape():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = random_shift_flip(x, pad=1, fill=-1.0, flip=True)
    assert out.shape == x.shape
    assert (out == -1).any()  # some samples were shifted in from the padding
    assert not torch.equal(out, x)
    assert torch.equal(random_shift_flip(x, pad=0, fill=0.0, flip=False), x)


def test_missing_data_names_the_key_and_how_to_get_it(tmp_path, monkeypatch):
    import kdlab.data.fashion_mnist as fm

    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    dm = fm.FashionMNISTDataModule(root=str(tmp_path / "empty"))
    with pytest.raises(KdlabError, match=r"data.root=.*empty does not exist: .*apt-get install "
                                         r"dataset-fashion-mnist"):
        dm.setup()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(KdlabError, match=r"holds no Fashion-MNIST idx files"):
        fm.FashionMNISTDataModule(root=str(other)).setup()
    missing = fm.FashionMNISTDataModule(root=None, download_dir=str(tmp_path / "nothing"))
    with pytest.raises(KdlabError, match=r"not found in .*nothing \(paths.data_dir\) nor in"):
        missing.setup()


def test_a_data_root_without_the_files_never_falls_back_to_another_folder(tmp_path):
    """Debian's copy is there, but data.root names another folder: that is an error."""
    import kdlab.data.fashion_mnist as fm

    assert fm.locate(None) == fm.DEBIAN_DIR  # the default finds the installed dataset
    with pytest.raises(KdlabError, match=r"data.root=.*elsewhere does not exist"):
        fm.FashionMNISTDataModule(root=str(tmp_path / "elsewhere")).setup()


def test_bad_num_labels_is_reported():
    with pytest.raises(KdlabError, match="data.num_labels=5"):
        FashionMNISTDataModule(num_labels=5)


def test_a_batch_larger_than_the_data_is_one_full_batch_with_a_note(caplog):
    dm = FashionMNISTDataModule(batch_size=100_000, num_labels=None)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert dm.batch_size == 55_000 and len(dm.train_dataloader()) == 1
    assert "data.batch_size=100000 is more than the 55000 training samples" in caplog.text


def test_example_input_loads_the_splits_of_a_fresh_datamodule(transfer_dm):
    # kdlab-eval probes a network's outputs before Lightning has called setup()
    fresh = FashionMNISTDataModule(num_labels=1000, transfer=True, label_seed=3)
    x = fresh.example_input(3)
    assert x.shape == (3, 1, 28, 28)
    assert torch.equal(x, transfer_dm.x_train[:3])
