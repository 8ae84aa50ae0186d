"""Token scores: what decides which tokens survive, and the weights of a fused token."""
from typing import Optional

import torch
from torch import Tensor


def token_norm(x: Tensor) -> Tensor:
    """L2 norm of each token vector: (B, N, C) -> (B, N).

    While exporting to ONNX it is the square root of the summed squares: onnxruntime's ReduceL2 took 44 µs at
    ViT-S shapes against 26 µs for the three plain nodes. Eager and compiled models keep ``vector_norm``.
    """
    if torch.onnx.is_in_onnx_export():
        return (x * x).sum(dim=-1).sqrt()
    return torch.linalg.vector_norm(x, dim=-1)


def class_attention(q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor] = None) -> Tensor:
    """Softmax attention of the class token (query 0) to every token, averaged over heads.

    Only the class-token row is computed (O(N·d)), so the block's own attention can run through a
    fused kernel that never forms the N×N matrix. q, k: (B, H, N, D); bias: additive logits
    broadcastable to (B, H, 1, N). Returns (B, N).
    """
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return head_average(logits.softmax(dim=-1))[:, 0]


def head_average(per_head: Tensor) -> Tensor:
    """An average over heads, (B, H, N, D) -> (B, N, D): ToMe's similarity metric (the keys), and the class
    token's attention row.

    ``per_head.mean(dim=1)``, except while exporting to ONNX, where it is the same average as one (1, H) × (H, N·D)
    product: onnxruntime's ReduceMean over the head axis took 53-55 µs at ViT-S shapes against 11-16 µs for the
    product (the profile's costliest node of ToMe's step). Eager and compiled models keep ``mean``, bit for bit;
    the exported one differs from it by rounding (within the export's conformance check).
    """
    if not torch.onnx.is_in_onnx_export():
        return per_head.mean(dim=1)
    batch, heads, num_tokens, dim = per_head.shape
    weights = per_head.new_full((1, 1, heads), 1.0 / heads)
    return (weights @ per_head.reshape(batch, heads, num_tokens * dim)).reshape(batch, num_tokens, dim)


def keep_scores(criterion: str, x: Tensor, cls_attn: Optional[Tensor], norms: Optional[Tensor],
                generator: torch.Generator) -> Tensor:
    """The score by which tokens are kept, highest first, (B, N).

    ``attn``: class-token attention; ``norm``: L2 norm; ``low_norm``: the negated L2 norm (the smallest
    norms kept); ``random``: independent uniform draws, one per token and image, from ``generator`` (a CPU
    generator, so that a seed gives the same draws on every device), whose top-k is a uniformly random
    subset. The draws are float64, so ties (which would favour the lower index) practically never occur.
    """
    if criterion == "attn":
        return cls_attn
    if criterion == "norm":
        return norms
    if criterion == "low_norm":
        return -norms
    if criterion == "random":
        return torch.rand(x.shape[:2], generator=generator, dtype=torch.float64).to(x.device)
    raise ValueError(f"keep_by: unknown criterion {criterion!r}; expected 'attn', 'norm', 'low_norm' or 'random'")


def fusion_weights(criterion: str, keep_idx: Tensor, cls_attn: Optional[Tensor], norms: Optional[Tensor]) -> Tensor:
    """Weights of every token in the fused token, (B, N): 0 at the kept tokens (``keep_idx`` (B, K)), and at
    the dropped ones ``attn``: their class-token attention as it is (not renormalised, as in EViT);
    ``norm``: softmax of their norms, over the dropped tokens only.
    """
    # one scatter into a copy of the scores, not a kept mask and a masked_fill: at batch 1 each operation costs
    # more than its work
    if criterion == "attn":
        return cls_attn.scatter(1, keep_idx, 0.0)
    if criterion == "norm":
        return norms.scatter(1, keep_idx, -torch.inf).softmax(dim=-1)
    raise ValueError(f"fuse_by: unknown criterion {criterion!r}; expected 'attn' or 'norm'")
