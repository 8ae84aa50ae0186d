"""The data/ loaders, on tiny files written in each dataset's real on-disk format."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import data
import main
from data.datasets import DataError

RNG = np.random.default_rng(0)


def write_cifar(root, name: str, n: int = 6) -> None:
    """cifar-10-batches-py/ or cifar-100-python/ with n images per file (the python-pickle version)."""
    if name == "CIFAR10":
        folder, files, key, meta = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], \
            "labels", ("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    else:
        folder, files, key, meta = "cifar-100-python", ["train", "test"], "fine_labels", \
            ("meta", {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": ["x"] * 20})
    os.makedirs(root / folder)
    for filename in files:
        entry = {"data": RNG.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 key: RNG.integers(0, 10, n).tolist(), "filenames": [f"{i}.png" for i in range(n)]}
        with open(root / folder / filename, "wb") as f:
            pickle.dump(entry, f)
    with open(root / folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f)


def write_stl10(root, n: int = 4) -> None:
    os.makedirs(root / "stl10_binary")
    for split in ("train", "test"):
        RNG.integers(0, 256, n * 3 * 96 * 96, dtype=np.uint8).tofile(root / "stl10_binary" / f"{split}_X.bin")
        np.arange(1, n + 1, dtype=np.uint8).tofile(root / "stl10_binary" / f"{split}_y.bin")  # labels 1..10


def write_idx(root, n: int = 5) -> None:
    """FashionMNIST/raw/ with the four uncompressed idx files."""
    raw = root / "FashionMNIST" / "raw"
    os.makedirs(raw)
    for prefix in ("train", "t10k"):
        with open(raw / f"{prefix}-images-idx3-ubyte", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + RNG.integers(0, 256, n * 28 * 28, dtype=np.uint8).tobytes())
        with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + np.arange(n, dtype=np.uint8).tobytes())


def write_folder(root, classes=("cat", "dog"), per_class: int = 3, test_split: str = "val") -> None:
    for split in ("train", test_split):
        for name in classes:
            os.makedirs(root / split / name)
            for i in range(per_class):
                pixels = RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_digits_splits_and_transforms():
    splits = data.build_dataset("digits", "unused")
    assert (len(splits.train), len(splits.test), splits.num_classes, splits.spec.in_chans) == (1437, 360, 10, 1)
    splits.set_transforms(8, "light")
    image, label = splits.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and 0 <= label < 10
    splits.set_transforms(16)
    assert splits.test[0][0].shape == (1, 16, 16)
    assert set(splits.test.targets) == set(range(10))


@pytest.mark.parametrize("name, writer, sizes, classes", [
    ("CIFAR10", lambda root: write_cifar(root, "CIFAR10"), (30, 6), 10),
    ("CIFAR100", lambda root: write_cifar(root, "CIFAR100"), (6, 6), 100),
    ("STL10", write_stl10, (4, 4), 10),
    ("FashionMNIST", write_idx, (5, 5), 10),
    ("folder", write_folder, (6, 6), 2),
])
def test_torchvision_formats_are_read_offline(tmp_path, name, writer, sizes, classes):
    writer(tmp_path)
    splits = data.build_dataset(name, str(tmp_path), download=False)
    assert (len(splits.train), len(splits.test)) == sizes and splits.num_classes == classes
    splits.set_transforms(32, "paper")
    image, label = splits.train[0]
    assert image.shape == (splits.spec.in_chans, 32, 32) and 0 <= label < classes
    image, _ = splits.test[len(splits.test) - 1]
    assert image.shape == (splits.spec.in_chans, 32, 32)


def test_folder_with_a_test_split(tmp_path):
    write_folder(tmp_path, test_split="test")
    assert len(data.build_dataset("folder", str(tmp_path)).test) == 6


def test_folder_errors_name_the_layout(tmp_path):
    with pytest.raises(DataError, match="train/<class>"):
        data.build_dataset("folder", str(tmp_path))
    os.makedirs(tmp_path / "train" / "a")
    os.makedirs(tmp_path / "val" / "a")
    with pytest.raises(DataError, match="--data_name folder"):
        data.build_dataset("folder", str(tmp_path))  # class folders without images


def test_missing_files_offline_say_where_to_put_them(tmp_path, monkeypatch):
    for name, expected in [("CIFAR10", "cifar-10-batches-py"), ("CIFAR100", "cifar-100-python"),
                           ("STL10", "stl10_binary"), ("FashionMNIST", "FashionMNIST/raw")]:
        with pytest.raises(DataError) as err:
            data.build_dataset(name, str(tmp_path), download=False)
        message = str(err.value)
        assert f"--data_name {name}" in message and expected in message and "--data_root" in message
        assert "\n" not in message

    # with downloading on and no network: the failure is reported the same way
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="download failed.*cifar-10-batches-py"):
        data.build_dataset("CIFAR10", str(tmp_path), download=True)


def test_damaged_files_are_reported(tmp_path):
    write_cifar(tmp_path, "CIFAR10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"truncated")
    with pytest.raises(DataError, match="cannot be read"):
        data.build_dataset("CIFAR10", str(tmp_path))


def test_subsets_are_fixed(tmp_path):
    a = data.build_dataset("digits", "unused", train_subset=100, test_subset=50)
    b = data.build_dataset("digits", "unused", train_subset=100, test_subset=50)
    assert (len(a.train), len(a.test)) == (100, 50) and a.train.indices == b.train.indices
    a.set_transforms(8)
    assert a.train[0][0].shape == (1, 8, 8)


@pytest.mark.parametrize("name, writer, arch", [
    ("CIFAR10", lambda root: write_cifar(root, "CIFAR10"), "vit_pico_patch4_32"),
    ("folder", write_folder, "vit_pico_patch4_32"),
    ("FashionMNIST", write_idx, "vit_pico_patch4_28"),
])
def test_main_trains_on_each_format(tmp_path, name, writer, arch):
    writer(tmp_path / "data")
    results = main.run(main.parse_args([
        "--data_name", name, "--data_root", str(tmp_path / "data"), "--arch", arch, "--epochs", "1",
        "--batch_size", "4", "--bench_steps", "1", "--bench_warmup", "0", "--output_dir", str(tmp_path / "out")]))
    assert results["data_name"] == name and 0.0 <= results["accuracy"] <= 100.0
