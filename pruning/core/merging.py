"""Token Merging (Bolya et al., ICLR 2023): bipartite soft matching and size-weighted merging."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .reduction import flat_index
from .scoring import token_norm


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


def first_non_prefix(num_prefix: int) -> Tuple[int, int]:
    """Positions of the first non-prefix A (even-position) token and of the first non-prefix B (odd-position)
    token; the prefix tokens fill positions 0..num_prefix-1 of both sets."""
    return 2 * ((num_prefix + 1) // 2), 2 * (num_prefix // 2) + 1


def bipartite_soft_matching(metric: Tensor, k: int, num_prefix: int) -> Matching:
    """Match each A token to its most similar B token (cosine similarity of ``metric`` (B, N, C)) and
    merge the ``k`` best-matched A tokens into their partners. Prefix tokens (class, distillation,
    registers) are protected: they neither merge away nor receive merges.
    """
    batch, num_tokens, _ = metric.shape
    k = merges_allowed(num_tokens, k, num_prefix)
    a_first, b_first = first_non_prefix(num_prefix)
    # few, whole-tensor operations (at batch 1 each small kernel costs more than its work): the prefix tokens
    # are left out of the scores rather than masked, and a mask of the k best (topk) replaces sorting
    with torch.no_grad():
        metric = metric / token_norm(metric).unsqueeze(-1)
        scores = torch.bmm(metric[:, a_first::2], metric[:, b_first::2].transpose(1, 2))  # non-prefix A × B
        best_score, best_match = scores.max(dim=-1)
        unmerged = torch.ones_like(best_score, dtype=torch.bool)
        if k > 0:
            unmerged.scatter_(1, best_score.topk(k, dim=-1, sorted=False).indices, False)
        num_unmerged, num_b = unmerged.shape[1] - k, scores.shape[2]
        b_start = num_prefix + num_unmerged  # the B tokens' slots follow the prefix and the unmerged A tokens
        unmerged_slot = unmerged.cumsum(dim=1) + (num_prefix - 1)  # in their original order, after the prefix
        a_dest = torch.where(unmerged, unmerged_slot, best_match + b_start)
        b_dest = torch.arange(b_start, b_start + num_b, device=metric.device).expand(batch, num_b)
        # the prefix tokens keep their slots
        prefix_dest = torch.arange(num_prefix, device=metric.device).expand(batch, num_prefix)
        dest = in_token_order(prefix_dest, a_dest, b_dest, num_prefix)
    return Matching(dest, num_tokens - k, k)


def in_token_order(prefix: Tensor, a_set: Tensor, b_set: Tensor, num_prefix: int) -> Tensor:
    """(B, N): the prefix tokens' values, then the A (even-position) and B (odd-position) tokens' values
    alternating from position ``num_prefix`` on, as the tokens lie in the sequence. Built by stacking whole
    sets (few operations; slice assignments would export to ONNX as a chain of scatters)."""
    a_first, b_first = first_non_prefix(num_prefix)
    first, second = (a_set, b_set) if a_first < b_first else (b_set, a_set)  # the set at position num_prefix
    pairs = second.shape[1]  # the first set has as many tokens, or one more
    alternating = torch.stack([first[:, :pairs], second], dim=2).flatten(1)
    return torch.cat([prefix, alternating, first[:, pairs:]], dim=1)


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
