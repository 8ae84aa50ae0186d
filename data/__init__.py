"""Datasets for ``main.py``: one table says what each ``--data_name`` is, one call reads it.

The table holds facts about the data (reader, classes, channels, normalisation, sizes); how main.py
trains on each dataset (default arch, augmentation, learning rate) is its ``RECIPES`` table.

>>> splits = build_dataset("digits", "datasets")
>>> splits.set_transforms(img_size=8, augment="light")
>>> image, label = splits.train[0]        # normalised tensor (1, 8, 8), int
"""
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset

from .datasets import (DataError, Digits, folder_split_dir, read_cifar10, read_cifar100, read_digits,
                       read_fashion_mnist, read_folder, read_stl10)
from .transforms import AUGMENTATIONS, build_transform

__all__ = ["DATASETS", "DatasetSpec", "Splits", "DataError", "Digits", "AUGMENTATIONS", "build_dataset",
           "build_transform", "class_count"]


@dataclass(frozen=True)
class DatasetSpec:
    """Facts about a dataset."""
    read: Callable[[str, bool, bool], Dataset]  # (root, train, download) -> (PIL image, label) dataset
    num_classes: Optional[int]  # None: the number of class folders
    in_chans: int  # 1 for grayscale sets (the model is built with in_chans=1)
    mean: Tuple[float, ...]  # normalisation
    std: Tuple[float, ...]
    flip: bool  # horizontal flips are label-preserving
    img_size: Optional[int]  # size of every image (square), None if they differ


# Per-channel mean and std of the training images (0..1 pixels). CIFAR and STL-10 are normalised as ImageNet
# is: their models start from ImageNet weights.
DIGITS_MEAN, DIGITS_STD = (0.3056,), (0.3761,)  # scikit-learn digits
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
DATASETS: Dict[str, DatasetSpec] = {
    "digits": DatasetSpec(read=read_digits, num_classes=10, in_chans=1, mean=DIGITS_MEAN, std=DIGITS_STD,
                          flip=False, img_size=8),
    "FashionMNIST": DatasetSpec(read=read_fashion_mnist, num_classes=10, in_chans=1, mean=FASHION_MNIST_MEAN,
                                std=FASHION_MNIST_STD, flip=True, img_size=28),
    "CIFAR10": DatasetSpec(read=read_cifar10, num_classes=10, in_chans=3, mean=IMAGENET_DEFAULT_MEAN,
                           std=IMAGENET_DEFAULT_STD, flip=True, img_size=32),
    "CIFAR100": DatasetSpec(read=read_cifar100, num_classes=100, in_chans=3, mean=IMAGENET_DEFAULT_MEAN,
                            std=IMAGENET_DEFAULT_STD, flip=True, img_size=32),
    "STL10": DatasetSpec(read=read_stl10, num_classes=10, in_chans=3, mean=IMAGENET_DEFAULT_MEAN,
                         std=IMAGENET_DEFAULT_STD, flip=True, img_size=96),
    "folder": DatasetSpec(read=read_folder, num_classes=None, in_chans=3, mean=IMAGENET_DEFAULT_MEAN,
                          std=IMAGENET_DEFAULT_STD, flip=True, img_size=None),
}


def _base(dataset: Dataset) -> Dataset:
    return dataset.dataset if isinstance(dataset, Subset) else dataset


@dataclass
class Splits:
    """The train and test split of one dataset, and what the model needs to know about it."""
    name: str
    spec: DatasetSpec
    train: Dataset
    test: Dataset
    num_classes: int

    def set_transforms(self, img_size: int, augment: Optional[str] = None) -> None:
        """Resize to ``img_size``; train with ``augment`` (one of AUGMENTATIONS; None: none)."""
        augment = augment or "none"
        common = dict(mean=self.spec.mean, std=self.spec.std, flip=self.spec.flip, native_size=self.spec.img_size)
        _base(self.train).transform = build_transform(img_size, train=True, augment=augment, **common)
        _base(self.test).transform = build_transform(img_size, train=False, augment=augment, **common)


def _subset(dataset: Dataset, size: int) -> Dataset:
    """A fixed random subset of ``size`` items (the same for every seed); all of it when size is 0 (a size
    beyond the split is refused by :func:`build_dataset`)."""
    if size <= 0 or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    return Subset(dataset, order[:size].tolist())


def build_dataset(name: str, root: str, *, download: bool = True, train_subset: int = 0,
                  test_subset: int = 0) -> Splits:
    """Read both splits of ``name`` (a key of :data:`DATASETS`) from ``root``, transforms unset."""
    if name not in DATASETS:
        raise DataError(f"--data_name: unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    spec = DATASETS[name]
    train, test = spec.read(root, True, download), spec.read(root, False, download)
    num_classes = spec.num_classes
    if num_classes is None:  # image folder: one class per sub-folder, the same in both splits
        if train.classes != test.classes:
            raise DataError(f"--data_name {name}: the class folders of the train and test splits differ "
                            f"({len(train.classes)} vs {len(test.classes)}); use the same class folder names")
        num_classes = len(train.classes)
    for option, split, size in (("--train_subset", train, train_subset), ("--test_subset", test, test_subset)):
        if size > len(split):
            raise DataError(f"{option} {size}: the {option[2:-7]} split of {name} has only {len(split)} images; use "
                            f"at most {len(split)}, or 0 for all of them")
    return Splits(name, spec, _subset(train, train_subset), _subset(test, test_subset), num_classes)


def class_count(name: str, root: str) -> int:
    """The number of classes of ``name`` without reading it: the table's, or for an image folder its
    class folders under ``train/`` (0 when there are none)."""
    if DATASETS[name].num_classes is not None:
        return DATASETS[name].num_classes
    try:
        return sum(entry.is_dir() for entry in os.scandir(folder_split_dir(root, train=True)))
    except OSError:
        return 0
