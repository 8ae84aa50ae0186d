"""Analytic FLOPs of a (patched) timm ViT: the matrix products, one multiply-add = 2 FLOPs.

For a plain block with N tokens, width d and MLP ratio 4 this is 24·N·d² + 4·N²·d; token
compression lowers N block by block, which is where the ideal speedup comes from.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .methods import CompressionMethod, get_method
from .schedules import token_counts


@dataclass(frozen=True)
class ViTShape:
    """The sizes of a ViT that its FLOPs depend on."""

    num_tokens: int
    num_prefix: int
    dim: int
    attn_dim: int
    head_dim: int
    hidden: int
    depth: int
    embed_flops: float
    head_flops: float


def vit_shape(model, img_size: Optional[Sequence[int]] = None) -> ViTShape:
    """Read the sizes from a timm VisionTransformer (``img_size`` overrides the model's own)."""
    embed = model.patch_embed
    patch_h, patch_w = embed.patch_size
    grid_h, grid_w = tuple(embed.grid_size) if img_size is None else (img_size[0] // patch_h, img_size[1] // patch_w)
    block = model.blocks[0]
    dim = model.embed_dim
    return ViTShape(
        num_tokens=grid_h * grid_w + model.num_prefix_tokens,
        num_prefix=model.num_prefix_tokens,
        dim=dim,
        attn_dim=block.attn.num_heads * block.attn.head_dim,
        head_dim=block.attn.head_dim,
        hidden=block.mlp.fc1.out_features,
        depth=len(model.blocks),
        embed_flops=2.0 * grid_h * grid_w * embed.proj.in_channels * patch_h * patch_w * dim,
        head_flops=2.0 * dim * getattr(model, "num_classes", 0),
    )


def block_flops(n_attn: int, n_mlp: int, dim: int, attn_dim: int, hidden: int) -> float:
    """One block: qkv and output projections and the two attention products at ``n_attn`` tokens, MLP at ``n_mlp``."""
    projections = 2 * n_attn * dim * 3 * attn_dim + 2 * n_attn * attn_dim * dim
    attention = 2 * 2 * n_attn * n_attn * attn_dim
    mlp = 2 * 2 * n_mlp * dim * hidden
    return float(projections + attention + mlp)


def reduction_flops(method: CompressionMethod, n: int, attn_dim: int, head_dim: int) -> float:
    """Products a reduction adds: the class-token attention row, or ToMe's A×B similarities of the
    head-averaged keys."""
    if method.reduction == "merge":
        return float(2 * ((n + 1) // 2) * (n // 2) * head_dim)
    if method.needs_cls_attention:
        return float(2 * n * attn_dim)
    return 0.0


def schedule_flops(shape: ViTShape, method: CompressionMethod, schedule: Sequence[int], reduce_at: str) -> float:
    """Forward FLOPs per image of a ViT of ``shape`` compressed by ``method`` with per-block ``schedule``."""
    flops = shape.embed_flops + shape.head_flops
    counts = token_counts(method, shape.num_tokens, schedule, shape.num_prefix, reduce_at)
    for k, (n_attn, n_mlp) in zip(schedule, counts):
        flops += block_flops(n_attn, n_mlp, shape.dim, shape.attn_dim, shape.hidden)
        if k > 0:
            flops += reduction_flops(method, n_attn, shape.attn_dim, shape.head_dim)
    return flops


def model_token_counts(model, img_size: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """(tokens through attention, tokens through MLP) per block, for the model as patched."""
    shape = vit_shape(model, img_size)
    method, schedule, reduce_at = _compression_of(model)
    return token_counts(method, shape.num_tokens, schedule, shape.num_prefix, reduce_at)


def analytic_flops(model, img_size: Optional[Sequence[int]] = None) -> float:
    """Forward FLOPs per image of the model as patched: patch embedding, blocks, reductions, head."""
    return schedule_flops(vit_shape(model, img_size), *_compression_of(model))


def _compression_of(model) -> Tuple[CompressionMethod, List[int], str]:
    from .patch import get_config  # local import keeps the arithmetic above free of timm

    cfg = get_config(model)
    if cfg is None:
        return get_method("none"), [0] * len(model.blocks), "block"
    return cfg.method, cfg.schedule, cfg.reduce_at
