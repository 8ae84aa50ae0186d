"""Token Merging (Bolya et al., ICLR 2023): bipartite soft matching and size-weighted merging."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .reduction import flat_index


def merges_allowed(num_tokens: int, k: int, num_prefix: int) -> int:
    """``k`` (ToMe's r) capped so that at most half of the non-prefix tokens merge: min(k, (N - prefix) // 2)."""
    return max(0, min(k, (num_tokens - num_prefix) // 2))


@dataclass
class Matching:
    """One bipartite soft matching, as the output slot of every input token.

    ``dest`` (B, N) sends each token to its slot in the merged sequence of ``num_out`` tokens: the
    prefix tokens as they were, then the unmerged A (even-position) tokens in their original order,
    then the B (odd-position) tokens, each B slot also receiving the A tokens merged into it. With one
    prefix token (the class token) this is ToMe's order; keeping further prefix tokens (registers,
    distillation) in front is what timm's pooling and heads expect.
    """

    dest: Tensor
    num_out: int
    k: int  # tokens merged away (ToMe's r)

    def merge(self, x: Tensor, reduce: str = "sum") -> Tensor:
        """(B, N, C) -> (B, N - k, C), reducing the tokens that share a slot (``sum``, ``amax``, ...)."""
        batch, num_tokens, channels = x.shape
        if reduce == "sum":  # whole rows of the flattened batch: several times faster than scatter_add_
            out = x.new_zeros(batch * self.num_out, channels)
            out.index_add_(0, flat_index(self.dest, self.num_out), x.reshape(batch * num_tokens, channels))
            return out.reshape(batch, self.num_out, channels)
        index = self.dest.unsqueeze(-1).expand(-1, -1, channels)
        out = x.new_zeros(batch, self.num_out, channels)
        return out.scatter_reduce_(1, index, x, reduce=reduce, include_self=False)


def bipartite_soft_matching(metric: Tensor, k: int, num_prefix: int) -> Matching:
    """Match each A token to its most similar B token (cosine similarity of ``metric`` (B, N, C)) and
    merge the ``k`` best-matched A tokens into their partners. Prefix tokens (class, distillation,
    registers) are protected: they neither merge away nor receive merges.
    """
    batch, num_tokens, _ = metric.shape
    k = merges_allowed(num_tokens, k, num_prefix)
    prefix_in_a, prefix_in_b = (num_prefix + 1) // 2, num_prefix // 2
    num_a, num_b = (num_tokens + 1) // 2, num_tokens // 2
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        scores[:, :prefix_in_a, :] = -torch.inf  # prefix tokens in A never merge away
        scores[:, :, :prefix_in_b] = -torch.inf  # prefix tokens in B receive nothing
        best_score, best_match = scores.max(dim=-1)
        ranked = best_score.argsort(dim=-1, descending=True)
        src_idx = ranked[:, :k]
        unmerged = ranked[:, k:].sort(dim=-1).values[:, prefix_in_a:]  # non-prefix A tokens kept, in order

        arange = torch.arange(num_tokens, device=metric.device)
        num_unmerged = unmerged.shape[1]
        b_slot = arange[:num_b] + (num_prefix + num_unmerged - prefix_in_b)
        b_slot[:prefix_in_b] = 2 * arange[:prefix_in_b] + 1  # prefix tokens keep their positions
        a_slot = (2 * arange[:num_a]).expand(batch, num_a).clone()
        a_slot.scatter_(1, unmerged, (arange[:num_unmerged] + num_prefix).expand(batch, -1))
        a_slot.scatter_(1, src_idx, b_slot[best_match.gather(1, src_idx)])
        dest = torch.empty(batch, num_tokens, dtype=torch.long, device=metric.device)
        dest[:, ::2] = a_slot
        dest[:, 1::2] = b_slot
    return Matching(dest, num_tokens - k, k)


def merge_wavg(matching: Matching, x: Tensor, size: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Size-weighted average merge of x (B, N, C); ``size`` (B, N, 1) counts the patches in each token."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = matching.merge(x * size, reduce="sum")
    size = matching.merge(size, reduce="sum")
    return x / size, size


def merge_positions(matching: Matching, positions: Tensor) -> Tensor:
    """The position (B, N) carried by each merged token: its slot's B token's own (the destination's), or, in a
    slot no B token holds (a prefix token, an unmerged A token), that token's own."""
    out = positions.new_empty(positions.shape[0], matching.num_out)
    out.scatter_(1, matching.dest[:, ::2], positions[:, ::2])  # several A tokens may share a B slot: B rewrites it
    out.scatter_(1, matching.dest[:, 1::2], positions[:, 1::2])
    return out


def merge_source(matching: Matching, source: Tensor) -> Tensor:
    """Carry the source map (B, N, N0) (which original tokens each token holds) through a merge."""
    return matching.merge(source, reduce="amax")
