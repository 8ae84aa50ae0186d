"""Pruning: keep the best-scored tokens, optionally fusing the dropped ones into one token."""
from typing import Optional, Tuple

import torch
from torch import Tensor


def tokens_kept(num_tokens: int, k: int, num_prefix: int) -> int:
    """How many of ``num_tokens`` survive removing ``k``: never fewer than 2, nor than the prefix + 1."""
    return min(num_tokens, max(num_tokens - k, 2, num_prefix + 1))


def select_tokens(scores: Tensor, keep: int, num_prefix: int, want_dropped: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Indices of the tokens to keep (prefix tokens first, then the best-scored) and of those dropped.

    scores: (B, N); prefix tokens (class, register, distillation) are always kept and never ranked.
    Kept tokens after the prefix are in descending score order. Returns (B, keep), (B, N - keep).
    """
    batch, num_tokens = scores.shape
    ranked = scores[:, num_prefix:]
    if want_dropped:
        order = ranked.argsort(dim=-1, descending=True) + num_prefix
        best, dropped = order[:, :keep - num_prefix], order[:, keep - num_prefix:]
    else:
        best = ranked.topk(keep - num_prefix, dim=-1).indices + num_prefix
        dropped = None
    prefix = torch.arange(num_prefix, device=scores.device).expand(batch, num_prefix)
    return torch.cat([prefix, best], dim=1), dropped


def flat_index(index: Tensor, num_tokens: int) -> Tensor:
    """(B, M) token indices as rows of the (B * num_tokens, C) view of a batch: index[b, j] + b * num_tokens."""
    if index.shape[0] == 1:  # no offsets to add: at batch 1 each small operation costs more than its work
        return index.reshape(-1)
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * num_tokens
    return (index + offsets).reshape(-1)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, j]] for (B, N, C) x and (B, M) index -> (B, M, C)."""
    # whole rows of the flattened batch: several times faster than gather with an expanded (B, M, C)
    # index on CPU, and exported to ONNX as a plain Gather
    batch, num_tokens, channels = x.shape
    rows = x.reshape(batch * num_tokens, channels).index_select(0, flat_index(index, num_tokens))
    return rows.reshape(batch, index.shape[1], channels)


def prune_tokens(x: Tensor, keep_idx: Tensor, drop_idx: Optional[Tensor] = None,
                 fuse_weights: Optional[Tensor] = None) -> Tensor:
    """Keep ``keep_idx``; with ``fuse_weights`` (B, D), append sum_j w_j · x[drop_idx_j] as one token."""
    kept = gather_tokens(x, keep_idx)
    if fuse_weights is None or drop_idx is None or drop_idx.shape[1] == 0:
        return kept
    fused = (gather_tokens(x, drop_idx) * fuse_weights.unsqueeze(-1).to(x.dtype)).sum(dim=1, keepdim=True)
    return torch.cat([kept, fused], dim=1)
