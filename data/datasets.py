"""Readers for each dataset: scikit-learn digits (embedded), torchvision sets, and an image folder.

Each reader is ``read(root, train, download) -> Dataset`` returning (PIL image, label) pairs with
``transform`` left to be set. torchvision sets are read from ``root`` when their files are there
(only presence is checked, so reading works offline), else downloaded into ``root`` when
``download`` is on; when neither works a :class:`DataError` says which files to put where.
"""
import contextlib
import functools
import io
import os
import shutil
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets



class DataError(Exception):
    """A dataset that cannot be read: bad input like any other (``engine.errors.BAD_INPUT`` counts it, exit
    code 2); the message names the option to change and what to do."""

    exit_code = 2


def quoted(err: BaseException, limit: int = 200) -> str:
    """A library's error quoted inside one of ours: its type and first line (the lines after it are advice for
    another context), at most ``limit`` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__)[:limit]


# ----------------------------------------------------------------------------------------------
# scikit-learn digits: 1797 real 8x8 handwritten digits shipped inside scikit-learn

DIGITS_TEST_SIZE = 360  # about 20%, drawn at random once (numpy's frozen RandomState(0)): the same everywhere


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # 0..16 -> 0..255
    return images, digits.target.astype(np.int64)


class Digits(Dataset):
    """scikit-learn's digits as 8x8 grayscale PIL images: 1437 train, 360 test (a fixed random split)."""

    classes = [str(i) for i in range(10)]

    def __init__(self, train: bool = True, transform: Optional[Callable] = None):
        images, targets = _digits_arrays()
        order = np.random.RandomState(0).permutation(len(targets))
        split = np.sort(order[DIGITS_TEST_SIZE:] if train else order[:DIGITS_TEST_SIZE])
        self.data, self.targets = images[split], targets[split].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index])  # uint8 (8, 8): mode "L"
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def read_digits(root: str, train: bool, download: bool) -> Dataset:
    return Digits(train=train)


# ----------------------------------------------------------------------------------------------
# torchvision datasets, read offline by presence of their files

def _without_checksums(cls: type, lists: Sequence[str]) -> type:
    """Subclass of a torchvision dataset that checks only that its files exist (no md5: works offline
    and on files converted or copied by hand)."""
    attrs = {name: [[filename, None] for filename, _ in getattr(cls, name)] for name in lists}
    if hasattr(cls, "meta"):
        attrs["meta"] = dict(cls.meta, md5=None)
    return type(f"Local{cls.__name__}", (cls,), attrs)


LocalCIFAR10 = _without_checksums(datasets.CIFAR10, ["train_list", "test_list"])
LocalCIFAR100 = _without_checksums(datasets.CIFAR100, ["train_list", "test_list"])
# STL-10's unlabeled split (2.7 GB) is not needed for classification: leave it out of the check.
LocalSTL10 = type("LocalSTL10", (datasets.STL10,), {
    "train_list": [[f, None] for f, _ in datasets.STL10.train_list[:2]],
    "test_list": [[f, None] for f, _ in datasets.STL10.test_list],
})

CIFAR10_FILES = ["cifar-10-batches-py/" + f for f in
                 ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                  "batches.meta"]]
CIFAR100_FILES = ["cifar-100-python/" + f for f in ["train", "test", "meta"]]
STL10_FILES = ["stl10_binary/" + f for f in ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]]
FASHION_MNIST_FILES = ["FashionMNIST/raw/" + f for f in
                       ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                        "t10k-labels-idx1-ubyte"]]


def _outermost_missing(root: str) -> Optional[str]:
    """The outermost folder of ``root`` (itself or an ancestor) that does not exist yet, or None."""
    path, missing = os.path.abspath(root), None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_new(root: str, before: Optional[set], created: Optional[str]) -> None:
    """Remove what a failed download made: ``created`` (a folder that did not exist), or the entries of
    ``root`` that were not in ``before``."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for entry in set(os.listdir(root)) - (before or set()) if os.path.isdir(root) else ():
        path = os.path.join(root, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def _read_or_download(name: str, root: str, files: List[str], read: Callable[[], Dataset],
                      fetch: Callable[[], Dataset], download: bool, how: str) -> Dataset:
    """Read the dataset if all ``files`` are under ``root``; else download it; else explain."""
    missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if not missing:
        try:
            return read()
        except Exception as err:  # damaged or truncated files
            raise DataError(f"--data_name {name}: the files under {os.path.abspath(root)} cannot be read "
                            f"({quoted(err)}); delete them to download again, or "
                            f"replace them") from None
    reason = "downloading is off"
    if download:
        # torchvision creates its folders before it downloads: a failed download (a mistyped --data_root,
        # offline) must not leave them behind
        before = set(os.listdir(root)) if os.path.isdir(root) else None
        created = _outermost_missing(root)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints its download attempts
                return fetch()
        except Exception as err:
            reason = f"download failed: {quoted(err)}"
            _remove_new(root, before, created)
    raise DataError(f"--data_name {name}: {missing[0]} not found under --data_root {os.path.abspath(root)} "
                    f"and {reason}; {how}, or point --data_root at the folder that holds {files[0].split('/')[0]}/")


def read_fashion_mnist(root: str, train: bool, download: bool) -> Dataset:
    return _read_or_download(
        "FashionMNIST", root, FASHION_MNIST_FILES,
        read=lambda: datasets.FashionMNIST(root, train=train),
        fetch=lambda: datasets.FashionMNIST(root, train=train, download=True), download=download,
        how="put the four uncompressed idx files (train-images-idx3-ubyte, ...) in <data_root>/FashionMNIST/raw/")


def read_cifar10(root: str, train: bool, download: bool) -> Dataset:
    return _read_or_download(
        "CIFAR10", root, CIFAR10_FILES,
        read=lambda: LocalCIFAR10(root, train=train),
        fetch=lambda: datasets.CIFAR10(root, train=train, download=True), download=download,
        how="extract cifar-10-python.tar.gz (the 'python version') into <data_root> so that "
            "<data_root>/cifar-10-batches-py/data_batch_1 exists")


def read_cifar100(root: str, train: bool, download: bool) -> Dataset:
    return _read_or_download(
        "CIFAR100", root, CIFAR100_FILES,
        read=lambda: LocalCIFAR100(root, train=train),
        fetch=lambda: datasets.CIFAR100(root, train=train, download=True), download=download,
        how="extract cifar-100-python.tar.gz (the 'python version') into <data_root> so that "
            "<data_root>/cifar-100-python/train exists")


def read_stl10(root: str, train: bool, download: bool) -> Dataset:
    split = "train" if train else "test"
    return _read_or_download(
        "STL10", root, STL10_FILES,
        read=lambda: LocalSTL10(root, split=split),
        fetch=lambda: datasets.STL10(root, split=split, download=True), download=download,
        how="extract stl10_binary.tar.gz into <data_root> so that <data_root>/stl10_binary/train_X.bin exists")


# ----------------------------------------------------------------------------------------------
# an ImageFolder: <data_root>/train/<class>/*.jpg and <data_root>/val/<class>/* (or test/)

FOLDER_TEST_SPLITS = ("val", "test")


def folder_split_dir(root: str, train: bool) -> str:
    """The folder of one split: ``train/``, or ``val/`` (``test/`` if there is no ``val/``)."""
    if train:
        return os.path.join(root, "train")
    for split in FOLDER_TEST_SPLITS:
        if os.path.isdir(os.path.join(root, split)):
            return os.path.join(root, split)
    return os.path.join(root, FOLDER_TEST_SPLITS[0])


def load_image(path: str) -> Image.Image:
    """An image file as RGB; a file that does not decode stops the run with its path (not a traceback
    from deep inside the loader)."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")  # decodes the whole file: truncated data fails here
    except Exception as err:
        raise DataError(f"--data_name folder: cannot decode {path} ({quoted(err)}); "
                        f"replace or delete the file") from None


def read_folder(root: str, train: bool, download: bool) -> Dataset:
    path = folder_split_dir(root, train)
    layout = "<data_root>/train/<class>/<image> and <data_root>/val/<class>/<image>"
    if not os.path.isdir(path):
        raise DataError(f"--data_name folder: {path} is not a folder; --data_root must hold {layout}")
    try:
        dataset = datasets.ImageFolder(path, loader=load_image)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"--data_name folder: {path}: {quoted(err)}; --data_root must "
                        f"hold {layout}") from None
    if len(dataset.classes) < 2:
        raise DataError(f"--data_name folder: {path} has one class folder ({dataset.classes[0]}/); classification "
                        f"needs at least two: --data_root must hold {layout}, one sub-folder per class")
    return dataset
