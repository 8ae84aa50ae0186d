"""Pruning: keep the best-scored tokens, optionally fusing the dropped ones into one token."""
from typing import Optional

import torch
from torch import Tensor


def tokens_kept(num_tokens: int, k: int, num_prefix: int) -> int:
    """How many of ``num_tokens`` survive removing ``k``: never fewer than 2, nor than the prefix + 1."""
    return min(num_tokens, max(num_tokens - k, 2, num_prefix + 1))


def select_tokens(scores: Tensor, keep: int, num_prefix: int) -> Tensor:
    """Indices of the tokens to keep (B, keep): prefix tokens first, then the best-scored in descending order.

    scores: (B, N); prefix tokens (class, register, distillation) are always kept and never ranked.
    """
    batch = scores.shape[0]
    best = scores[:, num_prefix:].topk(keep - num_prefix, dim=-1).indices + num_prefix
    prefix = torch.arange(num_prefix, device=scores.device).expand(batch, num_prefix)
    return torch.cat([prefix, best], dim=1)


def dropped_indicator(keep_idx: Tensor, num_tokens: int, dtype: torch.dtype) -> Tensor:
    """(B, N) 1 at the dropped tokens, 0 at the kept ones: the fusion weights of a map that counts tokens."""
    return torch.ones(keep_idx.shape[0], num_tokens, dtype=dtype, device=keep_idx.device).scatter_(1, keep_idx, 0.0)


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


def prune_tokens(x: Tensor, keep_idx: Tensor, fuse_weights: Optional[Tensor] = None) -> Tensor:
    """Keep ``keep_idx``; with ``fuse_weights`` (B, N), zero at the kept tokens, append sum_j w_j · x_j as one token."""
    kept = gather_tokens(x, keep_idx)
    if fuse_weights is None:
        return kept
    return torch.cat([kept, weighted_token_sum(fuse_weights.to(x.dtype), x)], dim=1)


def weighted_token_sum(weights: Tensor, x: Tensor) -> Tensor:
    """sum_j weights[b, j] · x[b, j] for (B, N) weights and (B, N, C) x -> (B, 1, C).

    A sum over all tokens (the kept ones weigh 0) instead of gathering the dropped ones first. Element by
    element, not as a (1, N) x (N, C) product, which would add 2·N·C to the FLOPs torch.utils.flop_counter
    counts (and so move the FLOPs-matched schedules of the committed experiments); but the product while
    exporting to ONNX, where onnxruntime's ReduceSum over the token axis took 79 µs at ViT-S shapes against 14 µs.
    """
    if torch.onnx.is_in_onnx_export():
        return weights.unsqueeze(1) @ x
    return (weights.unsqueeze(-1) * x).sum(dim=1, keepdim=True)
