"""The timm part: ``VisionTransformer`` and its ``Block``, as one family layout of ``layers.py``.

This module holds only what is timm's: where a block keeps its parts (``BLOCK_LAYOUT``), which models and
blocks are supported, the prefix tokens (class and register tokens), and the model's shape. The compressed
layer, its attention and the class swap are ``layers.py``'s, shared with every family.

Attention: timm's ``Attention`` has its own ``fused_attn`` switch. While a model is patched that attribute
reads the config's ``fused_attn``, so one switch decides the attention of every block, timm's own forward
(which a block that reduces nothing runs, bit for bit) included; ``remove_patch`` restores each block's own.
Pooling: the prefix tokens stay first, so timm's token, average or MAP pooling reads what it reads without
compression (an average then runs over the tokens left). The MAP head (``global_pool="map"``, timm's
``AttentionPoolLatent``: one learned query attending over the tokens) weighs ToMe's merged tokens by their size
while ``prop_attn`` is on, as the blocks do (log size added to its logits; ``layers.SizeWeightedPool``), and its
cost is counted in ``model_shape``: per token it reads, and once.
"""
from typing import Optional, Sequence

from timm.layers import Attention, AttentionPoolLatent
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..core.cost import ModelShape
from ..core.counting import Schedule
from .layers import LayerLayout, build_config, linear_flops, mlp_hidden, patch_layers, patch_pool, unpatch_layers, \
    unpatch_pool

__all__ = ["BLOCK_LAYOUT", "apply_patch", "remove_patch", "supports", "model_shape", "has_class_token"]

BLOCK_LAYOUT = LayerLayout(
    "timm_block", "norm1", "attn", "norm2", "mlp", qkv="qkv", qk_norm=("q_norm", "k_norm"), attn_norm="norm",
    gate="gate", out_proj="proj", scale="scale", dropout="attn_drop.p", scale_queries=True, fused_switch="fused_attn",
    attn_post=("attn.proj_drop", "ls1", "drop_path1"), mlp_post=("ls2", "drop_path2"), mask_arg="attn_mask")


def supports(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def _check(model: nn.Module) -> None:
    """ValueError (one line) unless ``model`` is a timm VisionTransformer this adapter can patch."""
    if not supports(model):
        raise ValueError(f"model: expected a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "grad_checkpointing", False):
        raise ValueError("model: gradient checkpointing re-runs blocks and would corrupt the token state; "
                         "call model.set_grad_checkpointing(False) before apply_patch")
    for block in model.blocks:
        if not isinstance(block, Block):
            raise ValueError(f"model: block type {type(block).__name__} is not supported; "
                             f"token compression patches timm's standard Block")
        if not isinstance(block.attn, Attention):
            raise ValueError(f"model: attention type {type(block.attn).__name__} is not supported; "
                             f"token compression needs timm's standard Attention")


def has_class_token(model: VisionTransformer) -> bool:
    return getattr(model, "cls_token", None) is not None


def apply_patch(model: VisionTransformer, method: str, schedule: Schedule, **options) -> VisionTransformer:
    """Make every block of a timm ``VisionTransformer`` remove tokens (arguments as ``pruning.patch.apply_patch``)."""
    _check(model)
    cfg = build_config(method, schedule, len(model.blocks), model.num_prefix_tokens,
                       class_token=has_class_token(model), **options)
    remove_patch(model)
    patch_layers(model, model.blocks, BLOCK_LAYOUT, cfg)
    patch_pool(_latent_pool(model), cfg, keys_at=0, per_head=False)
    return model


def _latent_pool(model: VisionTransformer) -> Optional[AttentionPoolLatent]:
    """The MAP head (a learned query attending over the tokens), or None."""
    pool = getattr(model, "attn_pool", None)
    return pool if isinstance(pool, AttentionPoolLatent) else None


def remove_patch(model: VisionTransformer) -> VisionTransformer:
    """Undo ``apply_patch``: the model runs exactly as before it was patched, its attention switches included."""
    unpatch_layers(model, model.blocks)
    unpatch_pool(_latent_pool(model))
    return model


def model_shape(model: VisionTransformer, img_size: Optional[Sequence[int]] = None) -> ModelShape:
    """The sizes ``pruning.flops`` needs (``img_size`` overrides the model's own)."""
    embed = model.patch_embed
    patch_h, patch_w = embed.patch_size
    grid_h, grid_w = tuple(embed.grid_size) if img_size is None else (img_size[0] // patch_h, img_size[1] // patch_w)
    block = model.blocks[0]
    dim = model.embed_dim
    pool = _latent_pool(model)
    pool_once, pool_per_token = _latent_pool_flops(pool) if pool is not None else (0.0, 0.0)
    return ModelShape(
        num_tokens=grid_h * grid_w + model.num_prefix_tokens, num_prefix=model.num_prefix_tokens, dim=dim,
        attn_dim=block.attn.num_heads * block.attn.head_dim, head_dim=block.attn.head_dim,
        hidden=block.mlp.fc1.out_features, depth=len(model.blocks),
        embed_flops=2.0 * grid_h * grid_w * embed.proj.in_channels * patch_h * patch_w * dim,
        head_flops=linear_flops(model.head) + pool_once, pool_token_flops=pool_per_token,
        pool_reads_prefix=bool(getattr(model, "pool_include_prefix", False)),
    )


def _latent_pool_flops(pool: AttentionPoolLatent) -> tuple:
    """(FLOPs once, FLOPs per token read) of timm's MAP head: the queries' projection, the output projection and
    the MLP once per latent query; per token its key/value projection and the two attention products."""
    queries = pool.latent_len
    once = queries * (linear_flops(pool.q, pool.proj) + (2 * 2 * pool.out_features * mlp_hidden(pool.mlp)
                                                          if pool.mlp is not None else 0.0))
    per_token = linear_flops(pool.kv) + 2 * 2 * queries * pool.num_heads * pool.head_dim
    return once, per_token
