"""The timm ``Eva`` part: EVA-02, DINOv3, RoPE-ViT (axial and mixed) and EVA, as one layout of ``layers.py``.

This module holds only what is timm Eva's: where an ``EvaBlock`` keeps its parts (layer scale as the Parameters
``gamma_1``/``gamma_2``), its attention's projections (packed with separate q/v biases, or one Linear each), how
its rotary embeddings are given (the ``rope`` argument of every block: sin and cos rows of every patch,
concatenated, one table per block and head for RoPE-mixed), the prefix tokens, pooling and the model's shape.
The compressed layer, the rotation by each token's carried angles and the class swap are ``layers.py``'s.

Rotary angles: each token keeps the angles of the original patch it carries (``CompressionState.positions``);
prefix tokens and fused tokens are not rotated; a merged token keeps its destination's. The rope module computes
the table for the actual grid (``dynamic_img_size`` included); every block gathers its rows from it.

Pooling: token pooling reads the class token as it is; average pooling weights each token by the patches it
holds (``layers.patch_token_mean``). Attention pooling (``map``), max pooling, post-norm blocks, grouped-query
attention and gradient checkpointing are refused.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import Tensor, nn

from ..core.cost import ModelShape
from ..core.counting import Schedule
from ..core.state import get_config
from .layers import (LayerLayout, RotaryTable, build_config, compressed_class, linear_flops, mlp_hidden,
                     patch_layers, patch_token_mean, unpatch_layers)

__all__ = ["BLOCK_LAYOUT", "apply_patch", "remove_patch", "supports", "model_shape", "has_class_token"]

_POOLS = ("avg", "token", "")


class _EvaLayout(LayerLayout):
    """``EvaAttention``/``AttentionRope``: a packed projection with separate q/v biases (EVA-02, DINOv3), or
    separate projections; rotary rows given as [sin, cos] concatenated, interleaved or rotate-half pairs."""

    def packed_qkv(self, attn: nn.Module, x: Tensor) -> Tensor:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            return attn.qkv(x)
        bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
        return attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)

    def project(self, attn: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if attn.qkv is not None:
            return super().project(attn, x)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        return tuple(proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def rotary_table(self, attn: nn.Module, value: Tensor) -> RotaryTable:
        sin, cos = value.chunk(2, dim=-1)
        return RotaryTable(sin, cos, half=bool(attn.rotate_half))


BLOCK_LAYOUT = _EvaLayout(
    "timm_eva", "norm1", "attn", "norm2", "mlp", qkv="qkv", qk_norm=("q_norm", "k_norm"), attn_norm="norm",
    gate="gate", out_proj="proj", scale="scale", dropout="attn_drop.p", scale_queries=True, fused_switch="fused_attn",
    attn_post=("attn.proj_drop", "gamma_1", "drop_path1"), mlp_post=("gamma_2", "drop_path2"), mask_arg="attn_mask",
    rotary_arg="rope")


class _SizeWeightedPool:
    """Mixed into a patched Eva: average pooling counts each token once per patch it holds."""

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if self.attn_pool is None and pool_type == "avg":
            return patch_token_mean(get_config(self), x, self.num_prefix_tokens)
        return super().pool(x, pool_type)


def supports(model: nn.Module) -> bool:
    return isinstance(model, Eva)


def _check(model: nn.Module) -> None:
    """ValueError (one line) unless ``model`` is a timm Eva this adapter can patch."""
    if not supports(model):
        raise ValueError(f"model: expected a timm Eva, got {type(model).__name__}")
    if getattr(model, "grad_checkpointing", False):
        raise ValueError("model: gradient checkpointing re-runs blocks and would corrupt the token state; "
                         "call model.set_grad_checkpointing(False) before apply_patch")
    if model.attn_pool is not None or model.global_pool not in _POOLS:
        raise ValueError(f"model: Eva global_pool {model.global_pool!r} is not supported; token compression "
                         f"supports {', '.join(repr(p) for p in _POOLS)}")
    for block in model.blocks:
        if not isinstance(block, EvaBlock):
            raise ValueError(f"model: Eva block type {type(block).__name__} is not supported; token compression "
                             f"patches the pre-norm EvaBlock (a post-norm model normalises after each branch)")
        if not isinstance(block.attn, (EvaAttention, AttentionRope)):
            raise ValueError(f"model: Eva attention type {type(block.attn).__name__} is not supported; token "
                             f"compression needs EvaAttention or AttentionRope")
        if getattr(block.attn, "num_kv_groups", 1) != 1:
            raise ValueError("model: grouped-query attention (num_kv_heads < num_heads) is not supported; "
                             "token compression needs as many key/value heads as query heads")


def has_class_token(model: Eva) -> bool:
    return model.cls_token is not None


def apply_patch(model: Eva, method: str, schedule: Schedule, **options) -> Eva:
    """Make every block of a timm ``Eva`` remove tokens (arguments as ``pruning.patch.apply_patch``)."""
    _check(model)
    cfg = build_config(method, schedule, len(model.blocks), model.num_prefix_tokens,
                       class_token=has_class_token(model), carry_positions=model.rope is not None, **options)
    remove_patch(model)
    patch_layers(model, model.blocks, BLOCK_LAYOUT, cfg)
    model._original_class = model.__class__
    model.__class__ = compressed_class(model.__class__, _SizeWeightedPool, "eva_pool")
    return model


def remove_patch(model: Eva) -> Eva:
    """Undo ``apply_patch``: the model runs exactly as before it was patched, its attention switches included."""
    unpatch_layers(model, model.blocks)
    return model


def _grid(model: Eva, img_size: Optional[Sequence[int]]) -> Tuple[int, int, int, int]:
    embed = model.patch_embed
    patch_h, patch_w = embed.patch_size
    if img_size is None:
        return (*embed.grid_size, patch_h, patch_w)
    return img_size[0] // patch_h, img_size[1] // patch_w, patch_h, patch_w


def model_shape(model: Eva, img_size: Optional[Sequence[int]] = None) -> ModelShape:
    """The sizes ``pruning.flops`` needs (``img_size`` overrides the model's own)."""
    grid_h, grid_w, patch_h, patch_w = _grid(model, img_size)
    attn = model.blocks[0].attn
    conv = model.patch_embed.proj
    return ModelShape(
        num_tokens=grid_h * grid_w + model.num_prefix_tokens, num_prefix=model.num_prefix_tokens,
        dim=model.embed_dim, attn_dim=attn.num_heads * attn.head_dim, head_dim=attn.head_dim,
        hidden=mlp_hidden(model.blocks[0].mlp), depth=len(model.blocks),
        embed_flops=2.0 * grid_h * grid_w * conv.in_channels * patch_h * patch_w * conv.out_channels,
        head_flops=linear_flops(model.head),
    )
