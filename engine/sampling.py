"""Samplers for ``main.py``'s loaders.

- :class:`ResumableRandomSampler` and :class:`ResumableDistributedSampler` draw exactly what
  ``RandomSampler`` and ``DistributedSampler`` draw (the same order, the same generator use), and
  can leave out the first ``skip`` indices of one epoch: a run resumed from a mid-epoch ``last.pt``
  continues with the batches that epoch had not reached, without loading the ones it had.
- :class:`ShardSampler` gives each of ``world_size`` processes every ``world_size``-th test image,
  without the padding of ``DistributedSampler``: summed over ranks, each image counts exactly once.
"""
import itertools
from typing import Iterator

from torch.utils.data import DistributedSampler, RandomSampler, Sampler


class _SkipFirst:
    """Mixin: the next epoch (only) starts after ``skip`` indices."""

    skip: int = 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


class ResumableRandomSampler(_SkipFirst, RandomSampler):
    """``RandomSampler`` (what ``DataLoader(shuffle=True)`` builds) with a one-epoch ``skip``."""


class ResumableDistributedSampler(_SkipFirst, DistributedSampler):
    """``DistributedSampler`` with a one-epoch ``skip`` (counted in this rank's indices)."""


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``0 .. size-1``: a split of the test set into
    disjoint shards that together hold every index once (shard sizes differ by at most one)."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))
