"""Analytic FLOPs arithmetic for a ViT of a given shape: the matrix products, one multiply-add = 2 FLOPs.

For a plain block with N tokens, width d and MLP ratio 4 this is 24·N·d² + 4·N²·d; token
compression lowers N block by block, which is where the ideal speedup comes from. No model objects
here: ``flops`` reads a model's ``ModelShape`` and compression, the family adapters build ``ModelShape``.
"""
from dataclasses import dataclass
from typing import Sequence

from .counting import token_counts, tokens_after
from .methods import CompressionMethod


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a ViT that its FLOPs depend on. ``head_flops`` is the heads' cost that does not depend on the
    tokens; an attention-pool head (one learned query over the tokens left, SigLIP's) adds ``pool_token_flops``
    per token it reads."""

    num_tokens: int
    num_prefix: int
    dim: int
    attn_dim: int
    head_dim: int
    hidden: int
    depth: int
    embed_flops: float
    head_flops: float
    pool_token_flops: float = 0.0  # an attention-pool head: its FLOPs per token it reads (keys, values, products)
    pool_reads_prefix: bool = True  # whether that pool reads the prefix tokens too (timm's pool_include_prefix)


def block_flops(n_attn: int, n_mlp: int, dim: int, attn_dim: int, hidden: int) -> float:
    """One block: qkv and output projections and the two attention products at ``n_attn`` tokens, MLP at ``n_mlp``."""
    projections = 2 * n_attn * dim * 3 * attn_dim + 2 * n_attn * attn_dim * dim
    attention = 2 * 2 * n_attn * n_attn * attn_dim
    mlp = 2 * 2 * n_mlp * dim * hidden
    return float(projections + attention + mlp)


def reduction_flops(method: CompressionMethod, n: int, attn_dim: int, head_dim: int, num_prefix: int = 1) -> float:
    """Products a reduction adds: the class-token attention row, or ToMe's A×B similarities of the
    head-averaged keys (the ``num_prefix`` prefix tokens take no part in them)."""
    if method.reduction == "merge":
        return float(2 * ((n + 1) // 2 - (num_prefix + 1) // 2) * (n // 2 - num_prefix // 2) * head_dim)
    if method.needs_cls_attention:
        return float(2 * n * attn_dim)
    return 0.0


def schedule_flops(shape: ModelShape, method: CompressionMethod, schedule: Sequence[int], reduce_at: str) -> float:
    """Forward FLOPs per image of a ViT of ``shape`` compressed by ``method`` with per-block ``schedule``."""
    flops = shape.embed_flops + shape.head_flops
    counts = token_counts(method, shape.num_tokens, schedule, shape.num_prefix, reduce_at)
    for k, (n_attn, n_mlp) in zip(schedule, counts):
        flops += block_flops(n_attn, n_mlp, shape.dim, shape.attn_dim, shape.hidden)
        if k > 0:
            flops += reduction_flops(method, n_attn, shape.attn_dim, shape.head_dim, shape.num_prefix)
    if shape.pool_token_flops:
        left = tokens_after(method, counts[-1][0], schedule[-1], shape.num_prefix) if counts else shape.num_tokens
        pooled = left if shape.pool_reads_prefix else left - shape.num_prefix
        flops += shape.pool_token_flops * pooled
    return flops
