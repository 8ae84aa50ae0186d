"""Token Merging (Bolya et al., ICLR 2023): bipartite soft matching and size-weighted merging."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor


def merges_allowed(num_tokens: int, r: int, num_prefix: int) -> int:
    """r capped so that at most half of the non-prefix tokens merge: min(r, (t - prefix) // 2)."""
    return max(0, min(r, (num_tokens - num_prefix) // 2))


@dataclass
class Matching:
    """One bipartite soft matching: tokens at even positions form set A, odd positions set B.

    ``src_idx`` (B, r) are the A tokens merged into the B tokens ``dst_idx`` (B, r); ``unm_idx``
    (B, |A| - r) are the A tokens left alone, in their original order, prefix tokens first.
    Apply it with ``merge``.
    """

    unm_idx: Tensor
    src_idx: Tensor
    dst_idx: Tensor
    num_prefix: int

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    def merge(self, x: Tensor, reduce: str = "sum") -> Tensor:
        """Merge (B, N, C) -> (B, N - r, C): the prefix tokens as they were, then the unmerged A tokens in
        their original order, then the B tokens with the A tokens matched to them reduced in.

        With one prefix token (the class token) this is ToMe's order; with more (registers, distillation)
        keeping the prefix in front is what timm's pooling and heads expect.
        """
        a, b = x[:, ::2], x[:, 1::2]
        channels = x.shape[-1]
        unmerged = a.gather(1, self.unm_idx[..., None].expand(-1, -1, channels))
        src = a.gather(1, self.src_idx[..., None].expand(-1, -1, channels))
        b = b.scatter_reduce(1, self.dst_idx[..., None].expand(-1, -1, channels), src, reduce=reduce)
        prefix_in_a, prefix_in_b = (self.num_prefix + 1) // 2, self.num_prefix // 2
        return torch.cat([x[:, :self.num_prefix], unmerged[:, prefix_in_a:], b[:, prefix_in_b:]], dim=1)


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int) -> Matching:
    """Match each A token to its most similar B token (cosine similarity of ``metric`` (B, N, C)) and
    choose the r best-matched A tokens to merge. Prefix tokens (class, distillation, registers) are
    protected: they neither merge away nor receive merges.
    """
    batch, num_tokens, _ = metric.shape
    r = merges_allowed(num_tokens, r, num_prefix)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        if num_prefix:
            scores[:, : (num_prefix + 1) // 2, :] = -torch.inf  # prefix tokens in A never merge away
            scores[:, :, : num_prefix // 2] = -torch.inf  # prefix tokens in B receive nothing
        best_score, best_match = scores.max(dim=-1)
        ranked = best_score.argsort(dim=-1, descending=True)
        src_idx = ranked[:, :r]
        unm_idx = ranked[:, r:].sort(dim=-1).values
        dst_idx = best_match.gather(1, src_idx)
    return Matching(unm_idx, src_idx, dst_idx, num_prefix)


def merge_wavg(matching: Matching, x: Tensor, size: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Size-weighted average merge of x (B, N, C); ``size`` (B, N, 1) counts the patches in each token."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = matching.merge(x * size, reduce="sum")
    size = matching.merge(size, reduce="sum")
    return x / size, size


def merge_source(matching: Matching, source: Tensor) -> Tensor:
    """Carry the source map (B, N, N0) (which original tokens each token holds) through a merge."""
    return matching.merge(source, reduce="amax")
