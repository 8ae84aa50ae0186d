"""How many tokens each block removes (a schedule): EViT-style keep rates and matched FLOPs for a model.

Parsing a schedule (``resolve_schedule``) and the token counts a schedule gives (``tokens_after``,
``token_counts``) live in ``core.counting``, below the patch, and are importable from here too.
"""
import math
from typing import List, Optional, Sequence

from .core.counting import Schedule, resolve_schedule, token_counts, tokens_after
from .flops import model_shape, schedule_flops
from .core.methods import get_method

__all__ = ["Schedule", "resolve_schedule", "keep_rate_schedule", "matched_flops_schedule", "token_counts",
           "tokens_after"]


def keep_rate_schedule(num_tokens: int, depth: int, keep_rate: float, at_blocks: Sequence[int],
                       num_prefix: int = 1) -> List[int]:
    """EViT-style schedule: at each block in ``at_blocks`` keep ``keep_rate`` of the non-prefix tokens.

    Returns the per-block schedule for pruning without fusion (a fused token adds one back per step).
    """
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate: expected a fraction in (0, 1], got {keep_rate}")
    for block in at_blocks:
        if not 0 <= block < depth:
            raise ValueError(f"at_blocks: block {block} is outside 0..{depth - 1}")
    schedule = [0] * depth
    patches = num_tokens - num_prefix
    for block in sorted(set(at_blocks)):
        kept = max(1, math.ceil(patches * keep_rate))  # EViT rounds up
        schedule[block] = patches - kept
        patches = kept
    return schedule


def matched_flops_schedule(model, method: str, target_flops: float, reduce_at: Optional[str] = None,
                           img_size: Optional[Sequence[int]] = None) -> List[int]:
    """The per-block schedule for ``method`` whose analytic FLOPs come closest to ``target_flops``.

    Starts from the largest uniform k that stays at or above the target, then raises k one block at a
    time, earliest block first (an early token saves the most), while the FLOPs stay at or above the
    target; finally takes one more step if that lands closer. So methods can be compared at equal cost.
    """
    chosen = get_method(method, argument="method")
    reduce_at = chosen.default_reduce_at if reduce_at is None else reduce_at
    shape = model_shape(model, img_size)
    cost = lambda schedule: schedule_flops(shape, chosen, schedule, reduce_at)  # noqa: E731
    depth, max_k = shape.depth, shape.num_tokens
    if chosen.reduction == "none" or cost([0] * depth) <= target_flops:
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
