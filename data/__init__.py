"""Datasets for ``main.py``: one table says what each ``--data_name`` is, one call reads it.

>>> splits = build_dataset("digits", "data")
>>> splits.set_transforms(img_size=8, augment="light")
>>> image, label = splits.train[0]        # normalised tensor (1, 8, 8), int
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset

from .datasets import (DataError, Digits, read_cifar10, read_cifar100, read_digits, read_fashion_mnist,
                       read_folder, read_stl10)
from .transforms import AUGMENTATIONS, build_transform

__all__ = ["DATASETS", "DatasetSpec", "Splits", "DataError", "Digits", "AUGMENTATIONS", "SEED_LR_BASE",
           "FROM_SCRATCH_LR_BASE", "build_dataset", "build_transform"]


@dataclass(frozen=True)
class DatasetSpec:
    """What main.py needs to know about a dataset."""
    read: Callable[[str, bool, bool], Dataset]  # (root, train, download) -> (PIL image, label) dataset
    num_classes: Optional[int]  # None: the number of class folders
    in_chans: int  # 1 for grayscale sets (the model is built with in_chans=1)
    mean: Tuple[float, ...]  # normalisation
    std: Tuple[float, ...]
    augment: str  # default training augmentation: "paper", "light" or "none" (see data/transforms.py)
    flip: bool  # horizontal flips are label-preserving
    arch: str  # default --arch
    img_size: Optional[int]  # size of every image (square), None if they differ
    lr_base: float  # default learning rate at batch size 512 (scaled linearly to the batch size)


SEED_LR_BASE = 5e-4  # the seed's fine-tuning rule: lr = 5e-4 * batch_size / 512
# The small models of pruning/models.py trained from scratch with small batches need a larger rate:
# 2e-3 at batch 64 reaches 95% on digits in 30 epochs where 5e-4 * 64 / 512 stays far below.
FROM_SCRATCH_LR_BASE = 1.6e-2

DATASETS: Dict[str, DatasetSpec] = {
    "digits": DatasetSpec(read_digits, 10, 1, (0.3056,), (0.3761,), "none", False, "vit_pico_patch2_8", 8,
                          FROM_SCRATCH_LR_BASE),
    "FashionMNIST": DatasetSpec(read_fashion_mnist, 10, 1, (0.2860,), (0.3530,), "light", True,
                                "vit_pico_patch4_28", 28, FROM_SCRATCH_LR_BASE),
    "CIFAR10": DatasetSpec(read_cifar10, 10, 3, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "paper", True,
                           "vit_small_patch16_224", 32, SEED_LR_BASE),
    "CIFAR100": DatasetSpec(read_cifar100, 100, 3, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "paper", True,
                            "vit_small_patch16_224", 32, SEED_LR_BASE),
    "STL10": DatasetSpec(read_stl10, 10, 3, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "paper", True,
                         "vit_small_patch16_224", 96, SEED_LR_BASE),
    "folder": DatasetSpec(read_folder, None, 3, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "paper", True,
                          "vit_small_patch16_224", None, SEED_LR_BASE),
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

    @property
    def in_chans(self) -> int:
        return self.spec.in_chans

    def set_transforms(self, img_size: int, augment: Optional[str] = None) -> None:
        """Resize to ``img_size``; train with ``augment`` (default: the dataset's own recipe)."""
        augment = augment or self.spec.augment
        common = dict(mean=self.spec.mean, std=self.spec.std, flip=self.spec.flip, native_size=self.spec.img_size)
        _base(self.train).transform = build_transform(img_size, train=True, augment=augment, **common)
        _base(self.test).transform = build_transform(img_size, train=False, augment=augment, **common)


def _subset(dataset: Dataset, size: int) -> Dataset:
    """A fixed random subset of ``size`` items (the same for every seed); all of it when size is 0."""
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
    return Splits(name, spec, _subset(train, train_subset), _subset(test, test_subset), num_classes)
