"""Schedules as numbers: a schedule (tokens removed per block; the seed's ``pool_k``) parsed into one k per
block, and the tokens each block leaves as the patched model runs it. Pure arithmetic, below everything that
touches a model."""
from typing import List, Sequence, Tuple, Union

from .merging import merges_allowed
from .methods import CompressionMethod
from .reduction import tokens_kept

Schedule = Union[int, Sequence[int]]  # tokens removed per block: one int for every block, or one per block


def resolve_schedule(schedule: Schedule, depth: int, argument: str = "pool_k") -> List[int]:
    """``schedule`` as one non-negative int per block; ValueError naming ``argument`` (the caller's name for
    it) otherwise."""
    if isinstance(schedule, bool):
        raise ValueError(f"{argument}: expected an int or a list of {depth} ints, got {schedule!r}")
    if isinstance(schedule, int):
        per_block = [schedule] * depth
    elif isinstance(schedule, Sequence) and not isinstance(schedule, str):
        per_block = list(schedule)
        if len(per_block) != depth:
            raise ValueError(f"{argument}: the list has {len(per_block)} values but the model has {depth} blocks; "
                             f"give one value per block or a single int")
    else:
        raise ValueError(f"{argument}: expected an int or a list of {depth} ints, got {schedule!r}")
    for k in per_block:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"{argument}: every value must be an int, got {k!r}")
        if k < 0:
            raise ValueError(f"{argument}: tokens removed per block cannot be negative, got {k}")
    return per_block


def tokens_after(method: CompressionMethod, num_tokens: int, k: int, num_prefix: int) -> int:
    """Tokens left after one reduction step removing ``k`` from ``num_tokens``."""
    if k == 0 or method.reduction == "none":
        return num_tokens
    if method.reduction == "merge":
        return num_tokens - merges_allowed(num_tokens, k, num_prefix)
    kept = tokens_kept(num_tokens, k, num_prefix)
    return kept + 1 if (method.fuses and kept < num_tokens) else kept


def token_counts(method: CompressionMethod, num_tokens: int, schedule: Sequence[int], num_prefix: int,
                 reduce_at: str) -> List[Tuple[int, int]]:
    """(tokens through attention, tokens through MLP) for every block, as the patched model runs them."""
    counts = []
    for k in schedule:
        after = tokens_after(method, num_tokens, k, num_prefix)
        counts.append((num_tokens, after if reduce_at == "attn" else num_tokens))
        num_tokens = after
    return counts
