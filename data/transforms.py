"""Training and evaluation transforms (torchvision ``transforms.v2``).

Two training recipes:

- ``paper``: the seed's recipe for natural images resized to the model:
  RandomResizedCrop to the model size, horizontal flip, RandAugment (3 ops), normalisation,
  RandomErasing.
- ``light``: for small images trained at (about) their own size: a random shift of up to 1/16 of
  the image (by padding and cropping: 1 pixel at 28, 2 at 32), a horizontal flip where that keeps
  the label, normalisation.
- ``none``: resize and normalise only (as at evaluation).

Evaluation always resizes the short side to the model size, center-crops and normalises.
"""
from typing import Callable, Optional, Sequence

import torch
from torchvision.transforms import v2

AUGMENTATIONS = ("paper", "light", "none")


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def build_transform(img_size: int, *, train: bool, augment: str, mean: Sequence[float], std: Sequence[float],
                    flip: bool = True, native_size: Optional[int] = None) -> Callable:
    """Transform from a PIL image to a normalised float tensor (C, img_size, img_size).

    ``native_size``: the size of every image in the dataset, if they share one; at that size no resize is needed.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    resize = [] if native_size == img_size else [v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]
    flip_ops = [v2.RandomHorizontalFlip()] if flip else []
    if not train or augment == "none":
        return v2.Compose(resize + _to_normalized_tensor(mean, std))
    if augment == "paper":
        return v2.Compose([v2.RandomResizedCrop(img_size, antialias=True), *flip_ops, v2.RandAugment(num_ops=3),
                           *_to_normalized_tensor(mean, std), v2.RandomErasing(p=0.25, value=0)])
    shift = [v2.RandomCrop(img_size, padding=img_size // 16)] if img_size >= 16 else []
    return v2.Compose(resize + shift + flip_ops + _to_normalized_tensor(mean, std))
