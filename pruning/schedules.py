"""How many tokens each block removes: parsing ``pool_k`` and predicting token counts."""
import math
from typing import List, Optional, Sequence, Tuple, Union

from .merging import merges_allowed
from .methods import CompressionMethod
from .reduction import tokens_kept

PoolK = Union[int, Sequence[int]]


def resolve_schedule(pool_k: PoolK, depth: int) -> List[int]:
    """``pool_k`` as one non-negative int per block; ValueError naming ``pool_k`` otherwise."""
    if isinstance(pool_k, bool):
        raise ValueError(f"pool_k: expected an int or a list of {depth} ints, got {pool_k!r}")
    if isinstance(pool_k, int):
        schedule = [pool_k] * depth
    elif isinstance(pool_k, Sequence) and not isinstance(pool_k, str):
        schedule = list(pool_k)
        if len(schedule) != depth:
            raise ValueError(f"pool_k: the list has {len(schedule)} values but the model has {depth} blocks; "
                             f"give one value per block or a single int")
    else:
        raise ValueError(f"pool_k: expected an int or a list of {depth} ints, got {pool_k!r}")
    for k in schedule:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"pool_k: every value must be an int, got {k!r}")
        if k < 0:
            raise ValueError(f"pool_k: tokens removed per block cannot be negative, got {k}")
    return schedule


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


def keep_rate_schedule(num_tokens: int, depth: int, keep_rate: float, at_blocks: Sequence[int],
                       num_prefix: int = 1) -> List[int]:
    """EViT-style schedule: at each block in ``at_blocks`` keep ``keep_rate`` of the non-prefix tokens.

    Returns per-block ``pool_k`` for pruning without fusion (a fused token adds one back per step).
    """
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate: expected a fraction in (0, 1], got {keep_rate}")
    for b in at_blocks:
        if not 0 <= b < depth:
            raise ValueError(f"at_blocks: block {b} is outside 0..{depth - 1}")
    schedule = [0] * depth
    patches = num_tokens - num_prefix
    for b in sorted(set(at_blocks)):
        kept = max(1, math.ceil(patches * keep_rate))  # EViT rounds up
        schedule[b] = patches - kept
        patches = kept
    return schedule


def matched_flops_schedule(model, select_method: str, target_flops: float, reduce_at: Optional[str] = None,
                           img_size: Optional[Sequence[int]] = None) -> List[int]:
    """Per-block ``pool_k`` for ``select_method`` whose analytic FLOPs come closest to ``target_flops``.

    Starts from the largest uniform k that stays at or above the target, then raises k one block at a
    time, earliest block first (an early token saves the most), while the FLOPs stay at or above the
    target; finally takes one more step if that lands closer. So methods can be compared at equal cost.
    """
    from .flops import schedule_flops, vit_shape  # flops builds on this module's token counts
    from .methods import get_method

    method = get_method(select_method)
    reduce_at = method.default_reduce_at if reduce_at is None else reduce_at
    shape = vit_shape(model, img_size)
    cost = lambda schedule: schedule_flops(shape, method, schedule, reduce_at)  # noqa: E731
    depth, max_k = shape.depth, shape.num_tokens
    if method.reduction == "none" or cost([0] * depth) <= target_flops:
        return [0] * depth
    k = 0
    while k < max_k and cost([k + 1] * depth) >= target_flops:
        k += 1
    schedule = [k] * depth
    for index in range(depth):
        raised = schedule[:index] + [schedule[index] + 1] + schedule[index + 1:]
        if target_flops <= cost(raised) < cost(schedule):
            schedule = raised
    steps = [schedule[:i] + [schedule[i] + 1] + schedule[i + 1:] for i in range(depth)]
    return min([schedule] + steps, key=lambda s: (abs(cost(s) - target_flops), sum(s)))
