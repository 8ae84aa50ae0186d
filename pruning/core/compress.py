"""One compression step, whatever the model family: a method's reduction applied to the tokens.

Pruning keeps the best-scored tokens (by class-token attention, by norm, by the smallest norm or at
random) and may fuse the dropped ones into one token; merging is ToMe's bipartite soft matching. The
per-forward state (token sizes, source maps) is updated on the way.
"""
from typing import Optional

import torch
from torch import Tensor

from .merging import bipartite_soft_matching, merge_positions, merge_source, merge_wavg
from .reduction import dropped_indicator, gather_tokens, prune_tokens, select_tokens, tokens_kept
from .scoring import fusion_weights, keep_scores, token_norm
from .state import NO_POSITION, CompressionConfig

__all__ = ["reduce_tokens"]


def reduce_tokens(cfg: CompressionConfig, x: Tensor, k: int, cls_attn: Optional[Tensor],
                  keys: Optional[Tensor]) -> Tensor:
    """Apply the method's reduction (prune, prune + fuse, or merge) to x, updating the state."""
    method, state, num_prefix = cfg.method, cfg.state, cfg.num_prefix_tokens
    if method.reduction == "merge":
        matching = bipartite_soft_matching(keys, k, num_prefix)
        if matching.k == 0:
            return x
        if state.source is not None:
            state.source = merge_source(matching, state.source)
        if cfg.carry_positions:
            state.positions = merge_positions(matching, cfg.token_positions(x))
        x, state.size = merge_wavg(matching, x, state.size)
        return x

    keep = tokens_kept(x.shape[1], k, num_prefix)
    if keep == x.shape[1]:
        return x
    norms = token_norm(x) if method.needs_norms else None
    scores = keep_scores(method.keep_by, x, cls_attn, norms, cfg.generator)
    keep_idx = select_tokens(scores, keep, num_prefix)
    weights = fusion_weights(method.fuse_by, keep_idx, cls_attn, norms) if method.fuses else None
    if state.source is not None:
        counts = None if weights is None else dropped_indicator(keep_idx, x.shape[1], state.source.dtype)
        state.source = prune_tokens(state.source, keep_idx, counts)
    if cfg.carry_positions:
        state.positions = _pruned_positions(cfg.token_positions(x), keep_idx, fused=weights is not None)
    return prune_tokens(x, keep_idx, weights)


def _pruned_positions(positions: Tensor, keep_idx: Tensor, fused: bool) -> Tensor:
    """The kept tokens' positions, then ``NO_POSITION`` for the fused token (a mix of patches: not rotated)."""
    kept = gather_tokens(positions.unsqueeze(-1), keep_idx)[..., 0]
    return torch.cat([kept, kept.new_full((kept.shape[0], 1), NO_POSITION)], dim=1) if fused else kept
