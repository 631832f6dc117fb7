"""Datamodules of the model zoo: CIFAR pickles, synthetic images, ImageNet-style folders, the
per-channel normalisation and padding, and the ${scaled_lr:...} resolver."""

import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdlab.data import (
    CIFAR100DataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
)
from kdlab.data.memory import random_shift_flip
from kdlab.engine.loop import ChunkedLoader
from kdlab.modes.teacher import teacher_key
from kdlab.util.errors import KdlabError
from kdlab.util.resolvers import scaled_lr
from tests.conftest import make_cfg


def _fake_cifar100(root, n_train=40, n_test=20):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": [i % 100 for i in range(n)],
                 "coarse_labels": [0] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return folder


def test_cifar100_reads_torchvision_pickles_and_normalises_per_channel(tmp_path):
    folder = _fake_cifar100(tmp_path)
    dm = CIFAR100DataModule(root=str(tmp_path), val_size=10, augment=False)
    dm.setup()
    assert (len(dm.x_train), len(dm.x_val), len(dm.x_test)) == (30, 10, 20)
    assert dm.x_train.shape[1:] == (3, 32, 32) and dm.num_classes == 100
    raw = pickle.load(open(folder / "test", "rb"), encoding="latin1")
    first = torch.from_numpy(raw["data"][0].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor(dm.mean).view(3, 1, 1)
    std = torch.tensor(dm.std).view(3, 1, 1)
    torch.testing.assert_close(dm.x_test[0], (first - mean) / std)
    assert dm.y_test.tolist() == [i % 100 for i in range(20)]


def test_cifar_missing_names_root_and_the_synthetic_fallback(tmp_path):
    dm = CIFAR100DataModule(root=str(tmp_path))
    with pytest.raises(KdlabError, match="data.root=.*cifar-100-python.*synthetic_cifar100"):
        dm.setup()


def test_per_channel_padding_fills_each_channel_with_its_own_black():
    x = torch.full((64, 3, 8, 8), 5.0)
    fill = torch.tensor([1.0, 2.0, 3.0])
    torch.manual_seed(0)
    out = random_shift_flip(x, 2, fill, flip=False)
    for c in range(3):
        values = set(out[:, c].unique().tolist())
        assert values <= {5.0, fill[c].item()} and fill[c].item() in values
    # a black pixel (0 before normalisation) pads a CIFAR image, as RandomCrop(padding=4) does
    dm = CIFAR100DataModule(root=None)
    black = dm.black
    expected = -torch.tensor(dm.mean) / torch.tensor(dm.std)
    torch.testing.assert_close(black, expected)


def test_synthetic_data_is_seeded_balanced_and_shaped():
    a = SyntheticDataModule(input_shape=[3, 16, 16], num_classes=5, train_size=100,
                            test_size=50, val_size=10, seed=1)
    a.setup()
    b = SyntheticDataModule(input_shape=[3, 16, 16], num_classes=5, train_size=100,
                            test_size=50, val_size=10, seed=1)
    b.setup()
    assert torch.equal(a.x_test, b.x_test) and a.x_train.shape == (90, 3, 16, 16)
    assert torch.bincount(a.y_test, minlength=5).tolist() == [10] * 5
    c = SyntheticDataModule(input_shape=[3, 16, 16], num_classes=5, train_size=100,
                            test_size=50, val_size=10, seed=2)
    c.setup()
    assert not torch.equal(a.x_test, c.x_test)
    # the class patterns make it learnable: nearest class mean on the test set beats chance
    means = torch.stack([a.x_train[a.y_train == k].mean(0) for k in range(5)])
    dist = ((a.x_test[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (dist.argmin(1) == a.y_test).float().mean() > 0.9
    with pytest.raises(KdlabError, match="data.input_shape"):
        SyntheticDataModule(input_shape=[16, 16])


def test_teacher_store_keys_tell_synthetic_datasets_apart(tmp_path):
    base = ["data=synthetic_cifar100", "teacher=zoo", "teacher.model.name=resnet8"]
    keys = {teacher_key(make_cfg(tmp_path, [*base, *extra])) for extra in
            ([], ["data.num_classes=10"], ["data.seed=1"], ["data.train_size=1000"],
             ["teacher.model.name=resnet14"])}
    assert len(keys) == 5
    assert all(k.startswith(("resnet8-", "resnet14-")) for k in keys)


def _image_folder(root, classes=3, train=6, test=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", test)):
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_image_folder_streams_indexed_batches(tmp_path):
    root = _image_folder(tmp_path)
    dm = ImageFolderDataModule(root=str(root), image_size=32, resize=36, val_size=3,
                               batch_size=4, eval_batch_size=4, num_workers=0)
    dm.setup()
    assert dm.num_classes == 3 and dm.input_shape == (3, 32, 32)
    assert (dm.num_train_samples, len(dm.val_indices)) == (15, 3)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, tuple) and len(batch) == 3  # a list would read as a chunk
    x, y, idx = batch
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long and idx.shape == (4,)
    test_labels = torch.cat([b[1] for b in dm.test_dataloader()])
    assert test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    # the order of an epoch depends on (seed, epoch) only: a resumed run sees the same batches
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    first = [int(i) for i in loader.sampler]
    loader.sampler.set_epoch(3)
    assert [int(i) for i in loader.sampler] == first and sorted(first) == list(range(15))
    chunked = ChunkedLoader(dm.train_dataloader(), 2)  # the engine's chunks of a DataLoader
    assert len(chunked) == 2 and [len(c) for c in chunked] == [2, 2]
    assert dm.example_input(2).shape == (2, 3, 32, 32)


def test_image_folder_refuses_what_it_cannot_do(tmp_path):
    root = _image_folder(tmp_path)
    with pytest.raises(KdlabError, match="data.num_labels=100 is not supported"):
        ImageFolderDataModule(root=str(root), num_labels=100)
    with pytest.raises(KdlabError, match="data.root=.*not a folder"):
        ImageFolderDataModule(root=str(tmp_path / "nowhere"))


def test_scaled_lr_follows_the_global_batch(tmp_path):
    cfg = make_cfg(tmp_path, ["experiment=cifar100", "data=synthetic_cifar100"])
    assert cfg.optimizer.lr == pytest.approx(0.05)  # the paper's batch 64 on one device
    assert cfg.teacher.train.optimizer.lr == pytest.approx(0.05)
    cfg = make_cfg(tmp_path, ["experiment=cifar100", "data=synthetic_cifar100",
                              "data.batch_size=128", "trainer.devices=2"])
    assert cfg.optimizer.lr == pytest.approx(0.2)
    bad = make_cfg(tmp_path, ["experiment=cifar100", "trainer.devices=auto"])
    with pytest.raises(Exception, match="trainer.devices=auto"):
        OmegaConf.to_container(bad.optimizer, resolve=True)
    root = OmegaConf.create({"data": {"batch_size": 32},
                             "trainer": {"devices": [0, 1], "accumulate_grad_batches": 2}})
    assert scaled_lr(0.1, 256, _root_=root) == pytest.approx(0.1 * 128 / 256)


def test_a_light_student_lr_leaves_the_cifar_teacher_alone(tmp_path):
    """MobileNet/ShuffleNet students run at LR 0.01; their teacher is the one trained at 0.05."""
    base = ["experiment=cifar100", "data=synthetic_cifar100", "teacher.model.name=vgg13"]
    plain = make_cfg(tmp_path, base)
    light = make_cfg(tmp_path, [*base, "student.model.name=mobilenetv2",
                                "optimizer.lr=${scaled_lr:0.01,64}"])
    assert light.optimizer.lr == pytest.approx(0.01)
    assert light.teacher.train.optimizer.lr == pytest.approx(0.05)
    assert teacher_key(plain) == teacher_key(light)
