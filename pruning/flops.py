"""Analytic FLOPs of a (patched) timm ViT: the matrix products, one multiply-add = 2 FLOPs.

For a plain block with N tokens, width d and MLP ratio 4 this is 24·N·d² + 4·N²·d; token
compression lowers N block by block, which is where the ideal speedup comes from.
"""
from typing import List, Optional, Sequence, Tuple

from .methods import CompressionMethod
from .schedules import token_counts


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


def _grid(model, img_size: Optional[Sequence[int]]) -> Tuple[int, int]:
    if img_size is None:
        return tuple(model.patch_embed.grid_size)
    patch_h, patch_w = model.patch_embed.patch_size
    return img_size[0] // patch_h, img_size[1] // patch_w


def model_token_counts(model, img_size: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """(tokens through attention, tokens through MLP) per block, for the model as patched."""
    from .patch import get_config  # local import keeps this module usable without timm

    grid_h, grid_w = _grid(model, img_size)
    num_tokens = grid_h * grid_w + model.num_prefix_tokens
    cfg = get_config(model)
    if cfg is None:
        return [(num_tokens, num_tokens)] * len(model.blocks)
    return token_counts(cfg.method, num_tokens, cfg.schedule, cfg.num_prefix_tokens, cfg.reduce_at)


def analytic_flops(model, img_size: Optional[Sequence[int]] = None) -> float:
    """Forward FLOPs per image: patch embedding, blocks at their token counts, reductions, classifier head."""
    from .patch import get_config

    cfg = get_config(model)
    grid_h, grid_w = _grid(model, img_size)
    patch_h, patch_w = model.patch_embed.patch_size
    dim = model.embed_dim
    flops = 2.0 * grid_h * grid_w * model.patch_embed.proj.in_channels * patch_h * patch_w * dim
    for index, (block, (n_attn, n_mlp)) in enumerate(zip(model.blocks, model_token_counts(model, img_size))):
        attn_dim = block.attn.num_heads * block.attn.head_dim
        flops += block_flops(n_attn, n_mlp, dim, attn_dim, block.mlp.fc1.out_features)
        if cfg is not None and cfg.schedule[index] > 0:
            flops += reduction_flops(cfg.method, n_attn, attn_dim, block.attn.head_dim)
    if getattr(model, "num_classes", 0):
        flops += 2.0 * dim * model.num_classes
    return flops
