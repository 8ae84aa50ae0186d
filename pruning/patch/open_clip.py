"""The OpenCLIP part: every method on ``open_clip.transformer.VisionTransformer`` (the image tower, ``model.visual``).

This is the only module that knows OpenCLIP's classes. Its blocks (``ResidualAttentionBlock``: ``ln_1``, an
``nn.MultiheadAttention``, layer scale ``ls_1``, ``ln_2``, the ``c_fc``/``c_proj`` MLP, ``ls_2``) are patched
as one layout of the shared compressed layer (``layers.py``, as timm and transformers are): a block that
reduces nothing runs OpenCLIP's own forward, bit for bit; a block that reduces runs the packed in-projection
itself and scaled_dot_product_attention (``fused_attn=False``: the N×N matrix, materialised), computing the
class-token attention row separately.

Pooling: only class-token pooling (``pool_type='tok'``, no attention pooler) is supported; the class token
stays first, so ``ln_post`` and ``proj`` are unchanged. Other poolings are refused.
"""
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..core.cost import ModelShape
from ..core.counting import Schedule
from .layers import LayerLayout, build_config, grid_of, mlp_hidden, patch_layers, unpatch_layers

__all__ = ["apply_patch", "remove_patch", "supports", "model_shape", "has_class_token"]


class _MultiheadLayout(LayerLayout):
    """``nn.MultiheadAttention``: one packed in-projection held as weight and bias, not as a Linear."""

    def packed_qkv(self, attn: nn.Module, x: Tensor) -> Tensor:
        return F.linear(x, attn.in_proj_weight, attn.in_proj_bias)

    def scale_of(self, attn: nn.Module) -> float:
        return attn.head_dim ** -0.5

    def dropout_of(self, attn: nn.Module) -> float:
        return attn.dropout


_LAYOUT = _MultiheadLayout("open_clip", "ln_1", "attn", "ln_2", "mlp", qkv="in_proj", out_proj="out_proj",
                           attn_post=("ls_1",), mlp_post=("ls_2",))


def supports(model: nn.Module) -> bool:
    from open_clip.transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _check(model: nn.Module) -> None:
    """ValueError (one line) unless ``model`` is an OpenCLIP VisionTransformer this adapter can patch."""
    from open_clip.transformer import ResidualAttentionBlock

    if not supports(model):
        hint = "; pass its image tower, model.visual" if isinstance(getattr(model, "visual", None), nn.Module) else ""
        raise ValueError(f"model: OpenCLIP class {type(model).__name__} is not supported; "
                         f"supported: open_clip.transformer.VisionTransformer{hint}")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("model: this OpenCLIP VisionTransformer pools with an attention pooler (attn_pool); "
                         "token compression supports class-token pooling (pool_type='tok') only")
    if model.pool_type != "tok":
        raise ValueError(f"model: OpenCLIP pool_type {model.pool_type!r} is not supported; token compression "
                         f"supports class-token pooling (pool_type='tok') only")
    transformer = model.transformer
    if not getattr(transformer, "batch_first", True):
        raise ValueError("model: the OpenCLIP transformer runs sequence-first (batch_first=False); "
                         "token compression needs batch_first=True")
    if getattr(transformer, "grad_checkpointing", False):
        raise ValueError("model: gradient checkpointing re-runs blocks and would corrupt the token state; "
                         "call model.set_grad_checkpointing(False) before apply_patch")
    for block in transformer.resblocks:
        attn = getattr(block, "attn", None)
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(attn, nn.MultiheadAttention):
            raise ValueError(f"model: OpenCLIP block type {type(block).__name__} is not supported; token "
                             f"compression patches ResidualAttentionBlock with nn.MultiheadAttention")
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or hasattr(block, "ln_1_kv"):
            raise ValueError("model: OpenCLIP attention with separate key/value projections or key/value "
                             "biases is not supported")


def has_class_token(model: nn.Module) -> bool:
    return True  # class-token pooling is the only one supported


def apply_patch(model: nn.Module, method: str, schedule: Schedule, **options) -> nn.Module:
    """Make every block of an OpenCLIP ``VisionTransformer`` remove tokens (arguments as
    ``pruning.patch.apply_patch``); the model returns its pooled features (and tokens) as before."""
    _check(model)
    blocks = model.transformer.resblocks
    cfg = build_config(method, schedule, len(blocks), 1, **options)
    remove_patch(model)
    patch_layers(model, blocks, _LAYOUT, cfg, own_attn_fused=True)  # nn.MultiheadAttention runs SDPA
    return model


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo ``apply_patch``: the model runs exactly as before it was patched."""
    if not supports(model):
        _check(model)
    unpatch_layers(model, model.transformer.resblocks)
    return model


def model_shape(model: nn.Module, img_size: Optional[Sequence[int]] = None) -> ModelShape:
    """The sizes ``pruning.flops`` needs."""
    _check(model)
    grid_h, grid_w, patch_h, patch_w = grid_of(model.image_size, model.patch_size, img_size)
    block = model.transformer.resblocks[0]
    conv, proj = model.conv1, model.proj
    return ModelShape(
        num_tokens=grid_h * grid_w + 1, num_prefix=1, dim=model.transformer.width,
        attn_dim=block.attn.num_heads * block.attn.head_dim, head_dim=block.attn.head_dim,
        hidden=mlp_hidden(block.mlp), depth=len(model.transformer.resblocks),
        embed_flops=2.0 * grid_h * grid_w * conv.in_channels * patch_h * patch_w * conv.out_channels,
        head_flops=0.0 if proj is None else 2.0 * proj.shape[0] * proj.shape[1],
    )
