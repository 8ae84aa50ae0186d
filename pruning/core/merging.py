"""Token Merging (Bolya et al., ICLR 2023): bipartite soft matching and size-weighted merging."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .reduction import flat_index


def merges_allowed(num_tokens: int, k: int, num_prefix: int) -> int:
    """``k`` (ToMe's r) capped so that at most half of the non-prefix tokens merge: min(k, (N - prefix) // 2)."""
    return max(0, min(k, (num_tokens - num_prefix) // 2))


def first_non_prefix(num_prefix: int) -> Tuple[int, int]:
    """Positions of the first non-prefix A (even-position) token and the first non-prefix B (odd-position) token;
    the prefix tokens fill positions 0..num_prefix-1, in both sets."""
    return 2 * ((num_prefix + 1) // 2), 2 * (num_prefix // 2) + 1


_EMPTY_SLOT = {"sum": 0.0, "amax": -torch.inf}  # what an unmerged A token's slot holds before it arrives


@dataclass
class Matching:
    """One bipartite soft matching, as the output slot of every non-prefix A (even-position) token.

    The merged sequence of ``num_out`` tokens is: the ``num_prefix`` prefix tokens as they were, then the
    unmerged A tokens in their original order, then the non-prefix B (odd-position) tokens in order, each B slot
    also receiving the A tokens merged into it. ``a_dest`` (B, A) holds the slot of each non-prefix A token.
    With one prefix token (the class token) this is ToMe's order; keeping further prefix tokens (registers,
    distillation) in front is what timm's pooling and heads expect.
    """

    a_dest: Tensor
    num_prefix: int
    num_out: int
    k: int  # tokens merged away (ToMe's r)

    @property
    def a_first(self) -> int:
        return first_non_prefix(self.num_prefix)[0]

    @property
    def b_first(self) -> int:
        return first_non_prefix(self.num_prefix)[1]

    def merge(self, x: Tensor, reduce: str = "sum") -> Tensor:
        """(B, N, C) -> (B, N - k, C), reducing the tokens that share a slot (``sum`` or ``amax``)."""
        batch, _, channels = x.shape
        num_prefix, b_tokens = self.num_prefix, x[:, self.b_first::2]
        # the prefix and B tokens go to their slots whole, the A tokens are added in: a few large operations
        # instead of a destination map for every token (fewer kernels at batch 1, where each costs more than its work)
        empty = x.new_full((batch, self.num_out - num_prefix - b_tokens.shape[1], channels), _EMPTY_SLOT[reduce])
        out = torch.cat([x[:, :num_prefix], empty, b_tokens], dim=1)
        a_tokens = x[:, self.a_first::2]
        if reduce == "sum":  # whole rows of the flattened batch: several times faster than scatter_add_
            # a strided source (every other token) makes index_add_ several times slower than copying it first
            sources = a_tokens.reshape(-1, channels).contiguous()
            out.view(batch * self.num_out, channels).index_add_(0, flat_index(self.a_dest, self.num_out), sources)
            return out
        index = self.a_dest.unsqueeze(-1).expand(-1, -1, channels)
        return out.scatter_reduce_(1, index, a_tokens, reduce=reduce, include_self=True)


def bipartite_soft_matching(metric: Tensor, k: int, num_prefix: int) -> Matching:
    """Match each A token to its most similar B token (cosine similarity of ``metric`` (B, N, C)) and
    merge the ``k`` best-matched A tokens into their partners. Prefix tokens (class, distillation,
    registers) are protected: they neither merge away nor receive merges.
    """
    num_tokens = metric.shape[1]
    k = merges_allowed(num_tokens, k, num_prefix)
    a_first, b_first = first_non_prefix(num_prefix)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = torch.bmm(metric[:, a_first::2], metric[:, b_first::2].transpose(1, 2))  # non-prefix A × B
        best_score, best_match = scores.max(dim=-1)
        unmerged = torch.ones_like(best_score, dtype=torch.bool)
        if k > 0:
            unmerged.scatter_(1, best_score.topk(k, dim=-1, sorted=False).indices, False)
        num_unmerged = unmerged.shape[1] - k
        unmerged_slot = unmerged.cumsum(dim=1) + (num_prefix - 1)  # in original order, after the prefix
        a_dest = torch.where(unmerged, unmerged_slot, best_match + (num_prefix + num_unmerged))
    return Matching(a_dest, num_prefix, num_tokens - k, k)


def merge_wavg(matching: Matching, x: Tensor, size: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Size-weighted average merge of x (B, N, C); ``size`` (B, N, 1) counts the patches in each token."""
    # the weighted tokens and their sizes merged together, as one tensor with the size as its last channel
    weighted = F.pad(x, (0, 1), value=1.0) if size is None else torch.cat([x * size, size], dim=-1)
    merged = matching.merge(weighted, reduce="sum")
    size = merged[..., -1:]
    return merged[..., :-1] / size, size


def merge_positions(matching: Matching, positions: Tensor) -> Tensor:
    """The position (B, N) carried by each merged token: its slot's B token's own (the destination's), or, in a
    slot no B token holds (a prefix token, an unmerged A token), that token's own."""
    num_prefix, b_positions = matching.num_prefix, positions[:, matching.b_first::2]
    out = positions.new_empty(positions.shape[0], matching.num_out)
    out.scatter_(1, matching.a_dest, positions[:, matching.a_first::2])  # merged A tokens: B rewrites them below
    out[:, :num_prefix] = positions[:, :num_prefix]
    out[:, matching.num_out - b_positions.shape[1]:] = b_positions
    return out


def merge_source(matching: Matching, source: Tensor) -> Tensor:
    """Carry the source map (B, N, N0) (which original tokens each token holds) through a merge."""
    return matching.merge(source, reduce="amax")
