"""The timm-specific part: patching ``VisionTransformer`` blocks so that each one reduces tokens.

Blocks and their attention are given a subclass of their own class, as ToMe does, so the
weights, hooks and ``state_dict`` are untouched and ``remove_patch`` restores the plain model.
While a model is patched, one switch decides whether its attention is fused: the config's
``fused_attn``, which every block's ``attn.fused_attn`` reads (timm's own path at k = 0 included).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from ..compress import reduce_tokens
from ..counting import PoolK, resolve_schedule
from ..methods import PLACEMENTS, get_method
from ..scoring import class_attention
from ..state import CONFIG_ATTR, CompressionConfig, get_config, get_state

__all__ = ["apply_patch", "remove_patch", "get_config", "get_state", "attend",
           "CompressedBlock", "CompressedAttention"]


def attend(attn: Attention, x: Tensor, *, size: Optional[Tensor], want_cls_attn: bool, want_keys: bool,
           fused: bool) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """timm ``Attention.forward`` that also returns the class-token attention row and the head-averaged keys.

    ``size`` adds log(size) to the attention logits (ToMe's proportional attention). With ``fused``
    the attention runs through scaled_dot_product_attention and the N×N matrix is never formed.
    """
    batch, num_tokens, _ = x.shape
    attn_dim = attn.num_heads * attn.head_dim
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    queries, keys, values = qkv.unbind(0)
    queries, keys = attn.q_norm(queries), attn.k_norm(keys)
    bias = None if size is None else size.log()[:, None, None, :, 0].to(queries.dtype)

    cls_attn = None
    if fused:
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
        if want_cls_attn:
            cls_attn = class_attention(queries, keys, attn.scale, bias)
    else:
        logits = (queries * attn.scale) @ keys.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        weights = logits.softmax(dim=-1)
        if want_cls_attn:
            cls_attn = weights[:, :, 0].mean(dim=1)
        out = attn.attn_drop(weights) @ values

    out = out.transpose(1, 2).reshape(batch, num_tokens, attn_dim)
    out = getattr(attn, "norm", torch.nn.Identity())(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, cls_attn, (keys.mean(dim=1) if want_keys else None)


class CompressedAttention(Attention):
    """A timm ``Attention`` in a patched block: ``fused_attn`` is the model's config, the one switch."""

    @property
    def fused_attn(self) -> bool:  # read by timm's own forward too
        return get_config(self).fused_attn

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        raise AttributeError("fused_attn: the blocks of a patched model share one attention switch; "
                             "set it with pruning.patch.apply_patch(model, ..., fused_attn=...)")


class CompressedBlock(Block):
    """A timm ``Block`` that reduces its tokens after attention or after the MLP."""

    _compression_index: int

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask: token compression changes the token set, so masks are not supported")
        cfg = get_config(self)
        k, size = cfg.begin_block(self._compression_index, x)  # block 0 starts a forward pass (forward_features too)
        if cfg.reduces(k, size):
            x = self._compressed_forward(cfg, x, k, size)
        else:
            x = super().forward(x)  # nothing to do: the plain block, bit for bit
        return cfg.end_block(x)

    def _compressed_forward(self, cfg: CompressionConfig, x: Tensor, k: int, size: Optional[Tensor]) -> Tensor:
        method = cfg.method
        x_attn, cls_attn, keys = attend(self.attn, self.norm1(x), size=size, fused=cfg.fused_attn,
                                        want_cls_attn=k > 0 and method.needs_cls_attention,
                                        want_keys=k > 0 and method.reduction == "merge")
        x = x + self.drop_path1(self.ls1(x_attn))
        if cfg.reduce_at == "attn" and k > 0:
            x = reduce_tokens(cfg, x, k, cls_attn, keys)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if cfg.reduce_at == "block" and k > 0:
            x = reduce_tokens(cfg, x, k, cls_attn, keys)
        return x


def _compressed_class(cls: type, compressed: type) -> type:
    """A subclass of ``cls`` (a Block or an Attention class) with the behaviour of ``compressed`` (cached,
    so that isinstance checks keep working)."""
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Compressed{cls.__name__}", (compressed, cls), {})
    return _SUBCLASSES[cls]


_SUBCLASSES: dict = {Block: CompressedBlock, Attention: CompressedAttention}
_NOT_SET = object()  # an attribute that was not in the module's __dict__ before patching


def apply_patch(model: VisionTransformer, select_method: str = "tk_n", pool_k: PoolK = 10, *,
                reduce_at: Optional[str] = None, prop_attn: bool = True, trace_source: bool = False,
                fused_attn: bool = True) -> VisionTransformer:
    """Make every block of a timm ``VisionTransformer`` remove tokens; patches ``model`` in place and returns it.

    Args:
        select_method: one of ``pruning.METHOD_NAMES`` (none, tk, tk_n, evit, evit_n, n_wa, a_wn, tome).
        pool_k: tokens removed per block: one int for every block, or a list with one int per block.
        reduce_at: ``block`` (after the MLP, the paper's placement) or ``attn`` (between attention and
            MLP); default: the method's own (``block``; ``attn`` for tome).
        prop_attn: ToMe's proportional attention (log of token sizes added to the attention logits).
        trace_source: record which original tokens every token carries (``get_state(model).source``).
        fused_attn: run attention through scaled_dot_product_attention; False materialises the N×N
            attention matrix (the plain reference implementation). It holds for every block, whether it
            reduces or not, in place of timm's own ``attn.fused_attn`` (which ``remove_patch`` restores).
    """
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"model: expected a timm VisionTransformer, got {type(model).__name__}")
    method = get_method(select_method)
    reduce_at = method.default_reduce_at if reduce_at is None else reduce_at
    if reduce_at not in PLACEMENTS:
        raise ValueError(f"reduce_at: expected one of {', '.join(PLACEMENTS)}, got {reduce_at!r}")
    depth = len(model.blocks)
    schedule = resolve_schedule(pool_k, depth)
    if method.reduction == "none":
        schedule = [0] * depth
    if method.needs_cls_attention and getattr(model, "cls_token", None) is None:
        raise ValueError(f"select_method: {method.name!r} scores tokens by class-token attention, but this model "
                         f"has no class token; use a model with class_token=True, or tk_n, evit_n or tome")
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

    remove_patch(model)
    cfg = CompressionConfig(method=method, schedule=schedule, reduce_at=reduce_at,
                            num_prefix_tokens=model.num_prefix_tokens, prop_attn=prop_attn,
                            trace_source=trace_source, fused_attn=bool(fused_attn))
    setattr(model, CONFIG_ATTR, cfg)
    for index, block in enumerate(model.blocks):
        attn = block.attn
        attn._original_fused_attn = attn.__dict__.pop("fused_attn", _NOT_SET)
        for module, compressed in ((block, CompressedBlock), (attn, CompressedAttention)):
            module._original_class = module.__class__
            module.__class__ = _compressed_class(module.__class__, compressed)
            setattr(module, CONFIG_ATTR, cfg)
        block._compression_index = index
    return model


def remove_patch(model: VisionTransformer) -> VisionTransformer:
    """Undo ``apply_patch``: the model runs exactly as before it was patched, its attention switches included."""
    for block in model.blocks:
        original = block.__dict__.pop("_original_class", None)
        if original is None:
            continue
        block.__class__ = original
        del block._compression_index
        block.__dict__.pop(CONFIG_ATTR)
        attn = block.attn
        attn.__class__ = attn.__dict__.pop("_original_class")
        attn.__dict__.pop(CONFIG_ATTR)
        fused = attn.__dict__.pop("_original_fused_attn")
        if fused is not _NOT_SET:
            attn.__dict__["fused_attn"] = fused
    model.__dict__.pop(CONFIG_ATTR, None)
    return model
