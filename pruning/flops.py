"""Analytic FLOPs of a (patched) model: the matrix products, one multiply-add = 2 FLOPs.

The arithmetic is ``cost`` (re-exported here); this module reads a model's ``ViTShape`` (timm here,
transformers and OpenCLIP from their adapters in ``patch``) and its compression (``state``).
"""
from typing import List, Optional, Sequence, Tuple

from .cost import ViTShape, block_flops, reduction_flops, schedule_flops
from .counting import token_counts
from .methods import CompressionMethod, get_method
from .patch import family_shape
from .state import get_config

__all__ = ["ViTShape", "vit_shape", "block_flops", "reduction_flops", "schedule_flops", "model_token_counts",
           "analytic_flops"]


def vit_shape(model, img_size: Optional[Sequence[int]] = None) -> ViTShape:
    """Read the sizes from a timm VisionTransformer (``img_size`` overrides the model's own); transformers and
    OpenCLIP models get theirs from their family adapter."""
    shape = family_shape(model, img_size)
    if shape is not None:
        return shape
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


def model_token_counts(model, img_size: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """(tokens through attention, tokens through MLP) per block, for the model as patched."""
    shape = vit_shape(model, img_size)
    method, schedule, reduce_at = _compression_of(model)
    return token_counts(method, shape.num_tokens, schedule, shape.num_prefix, reduce_at)


def analytic_flops(model, img_size: Optional[Sequence[int]] = None) -> float:
    """Forward FLOPs per image of the model as patched: patch embedding, blocks, reductions, head."""
    return schedule_flops(vit_shape(model, img_size), *_compression_of(model))


def _compression_of(model) -> Tuple[CompressionMethod, List[int], str]:
    """(method, schedule, reduce_at) of the model as patched; an unpatched model removes nothing."""
    cfg = get_config(model)
    if cfg is None:
        return get_method("none"), [0] * vit_shape(model).depth, "block"
    return cfg.method, cfg.schedule, cfg.reduce_at
