"""Training and evaluation transforms (torchvision ``transforms.v2``).

Two training recipes:

- ``paper``: the seed's recipe for natural images resized to the model:
  RandomResizedCrop to the model size, horizontal flip, RandAugment (3 ops), normalisation,
  RandomErasing.
- ``light``: for tiny images trained at (about) their own size: a random shift by padding and
  cropping, an optional horizontal flip, normalisation.
- ``none``: resize and normalise only (as at evaluation).

Evaluation always resizes the short side to the model size, center-crops and normalises.
"""
from typing import Callable, Sequence

import torch
from torchvision.transforms import v2

AUGMENTATIONS = ("paper", "light", "none")


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def build_transform(img_size: int, *, train: bool, augment: str, mean: Sequence[float], std: Sequence[float],
                    flip: bool = True) -> Callable:
    """Transform from a PIL image to a normalised float tensor (C, img_size, img_size)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    resize = [v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]
    flip_ops = [v2.RandomHorizontalFlip()] if flip else []
    if not train or augment == "none":
        return v2.Compose(resize + _to_normalized_tensor(mean, std))
    if augment == "paper":
        return v2.Compose([v2.RandomResizedCrop(img_size, antialias=True), *flip_ops, v2.RandAugment(num_ops=3),
                           *_to_normalized_tensor(mean, std), v2.RandomErasing(p=0.25, value=0)])
    # light: shift by up to 1/8 of the image (1 pixel at 8x8, 3-4 pixels at 28-32)
    return v2.Compose(resize + [v2.RandomCrop(img_size, padding=max(1, img_size // 8)), *flip_ops,
                                *_to_normalized_tensor(mean, std)])
