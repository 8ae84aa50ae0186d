"""Family-neutral patching of pre-norm encoder layers, shared by the transformers and OpenCLIP adapters.

A family describes where its layer keeps its parts (``LayerLayout``); ``CompressedLayer`` runs such a
layer with a reduction step after attention or after the MLP; ``patch_layers``/``unpatch_layers`` swap
each layer's class for a compressing subclass and back. Nothing here names a model library's classes.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ..compress import reduce_tokens
from ..counting import PoolK, resolve_schedule
from ..methods import PLACEMENTS, get_method
from ..scoring import class_attention
from ..state import CONFIG_ATTR, CompressionConfig, get_config

__all__ = ["LayerLayout", "CompressedLayer", "attend_heads", "compressed_class", "build_config", "patch_layers",
           "unpatch_layers", "linear_flops", "mlp_hidden", "grid_of"]


class LayerLayout:
    """Where a family's pre-norm layer keeps its parts, by attribute name.

    The layer computes ``x + attn_post(out_proj(attention(norm1(x))))`` and then
    ``x + mlp_post(mlp(norm2(x)))``; ``attn_post``/``mlp_post`` are the modules applied to each branch in
    order (dropout, layer scale, drop path). Attention modules with separate q/k/v projections are read
    here; a family whose attention differs overrides ``project``, ``scale_of`` and ``dropout_of``.
    """

    def __init__(self, name: str, norm1: str, attn: str, norm2: str, mlp: str, out_proj: str = "o_proj",
                 scale: str = "scaling", dropout: str = "attention_dropout",
                 attn_post: Tuple[str, ...] = (), mlp_post: Tuple[str, ...] = ()):
        self.name, self.norm1, self.attn, self.norm2, self.mlp = name, norm1, attn, norm2, mlp
        self.out_proj, self.scale, self.dropout = out_proj, scale, dropout
        self.attn_post, self.mlp_post = attn_post, mlp_post

    def project(self, attn: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Queries, keys, values as (B, H, N, D)."""
        shape = (*x.shape[:-1], -1, attn.head_dim)
        return tuple(proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def scale_of(self, attn: nn.Module) -> float:
        return getattr(attn, self.scale)

    def dropout_of(self, attn: nn.Module) -> float:
        return getattr(attn, self.dropout)

    def branch(self, layer: nn.Module, names: Tuple[str, ...], x: Tensor) -> Tensor:
        for name in names:
            x = getattr(layer, name)(x)
        return x


def attend_heads(queries: Tensor, keys: Tensor, values: Tensor, *, scale: float, size: Optional[Tensor],
                 dropout_p: float, fused: bool, want_cls_attn: bool,
                 want_keys: bool) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Multi-head attention of (B, H, N, D) inputs: (output (B, N, H·D), class-token attention row (B, N) averaged
    over heads, keys averaged over heads (B, N, D)).

    ``size`` adds log(size) to the logits (ToMe's proportional attention). ``fused`` runs
    scaled_dot_product_attention and computes the class-token row separately, never forming N×N.
    """
    batch, heads, num_tokens, head_dim = queries.shape
    bias = None if size is None else size.log()[:, None, None, :, 0].to(queries.dtype)
    cls_attn = None
    if fused:
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias, dropout_p=dropout_p,
                                             scale=scale)
        if want_cls_attn:
            cls_attn = class_attention(queries, keys, scale, bias)
    else:
        logits = (queries @ keys.transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + bias
        weights = logits.softmax(dim=-1)
        if want_cls_attn:
            cls_attn = weights[:, :, 0].mean(dim=1)
        out = F.dropout(weights, dropout_p) @ values if dropout_p > 0 else weights @ values
    out = out.transpose(1, 2).reshape(batch, num_tokens, heads * head_dim)
    return out, cls_attn, (keys.mean(dim=1) if want_keys else None)


class CompressedLayer:
    """Mixed into a family's layer class: reduces tokens after attention or after the MLP.

    A layer that reduces nothing (and carries no ToMe sizes) runs the family's own forward, bit for bit.
    """

    _compression_index: int
    _layout: LayerLayout

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        cfg = get_config(self)
        k, size = cfg.begin_block(self._compression_index, hidden_states)  # layer 0 starts a forward pass
        if not cfg.reduces(k, size) and cfg.fused_attn == self._own_attn_fused:
            return cfg.end_block(super().forward(hidden_states, *args, **kwargs))  # the layer's own: bit-identical
        if any(isinstance(a, Tensor) for a in (*args, *kwargs.values())):
            raise ValueError("attention_mask: token compression changes the token set, so attention masks "
                             "and separate key/value inputs are not supported")
        return cfg.end_block(self._compressed_forward(cfg, hidden_states, k, size))

    def _compressed_forward(self, cfg: CompressionConfig, x: Tensor, k: int, size: Optional[Tensor]) -> Tensor:
        layout, method = self._layout, cfg.method
        attn = getattr(self, layout.attn)
        queries, keys, values = layout.project(attn, getattr(self, layout.norm1)(x))
        out, cls_attn, keys = attend_heads(
            queries, keys, values, scale=layout.scale_of(attn), size=size,
            dropout_p=layout.dropout_of(attn) if self.training else 0.0, fused=cfg.fused_attn,
            want_cls_attn=k > 0 and method.needs_cls_attention, want_keys=k > 0 and method.reduction == "merge")
        x = x + layout.branch(self, layout.attn_post, getattr(attn, layout.out_proj)(out))
        if cfg.reduce_at == "attn" and k > 0:
            x = reduce_tokens(cfg, x, k, cls_attn, keys)
        mlp_out = getattr(self, layout.mlp)(getattr(self, layout.norm2)(x))
        x = x + layout.branch(self, layout.mlp_post, mlp_out)
        if cfg.reduce_at == "block" and k > 0:
            x = reduce_tokens(cfg, x, k, cls_attn, keys)
        return x


_SUBCLASSES: Dict[Tuple[type, type, str], type] = {}


def compressed_class(cls: type, mixin: type, tag: str = "", **attrs) -> type:
    """A cached subclass of ``cls`` with ``mixin`` first in its bases (isinstance checks keep working)."""
    key = (cls, mixin, tag)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Compressed{cls.__name__}", (mixin, cls), dict(attrs))
    return _SUBCLASSES[key]


def build_config(select_method: str, pool_k: PoolK, depth: int, num_prefix: int, *, reduce_at: Optional[str],
                 prop_attn: bool, trace_source: bool, fused_attn: bool) -> CompressionConfig:
    """The CompressionConfig for these arguments; ValueError naming the bad argument."""
    method = get_method(select_method)
    reduce_at = method.default_reduce_at if reduce_at is None else reduce_at
    if reduce_at not in PLACEMENTS:
        raise ValueError(f"reduce_at: expected one of {', '.join(PLACEMENTS)}, got {reduce_at!r}")
    schedule = resolve_schedule(pool_k, depth)
    if method.reduction == "none":
        schedule = [0] * depth
    return CompressionConfig(method=method, schedule=schedule, reduce_at=reduce_at, num_prefix_tokens=num_prefix,
                             prop_attn=prop_attn, trace_source=trace_source, fused_attn=bool(fused_attn))


def patch_layers(model: nn.Module, layers: Sequence[nn.Module], layout: LayerLayout, cfg: CompressionConfig,
                 own_attn_fused: bool) -> None:
    """Give every layer the compressed subclass of its class and the shared config.

    ``own_attn_fused`` says whether the layers' own forward runs fused attention. ``cfg.fused_attn`` is the
    one switch: a layer that reduces nothing runs its own forward only when that agrees with the switch,
    and the same projections with the chosen attention otherwise.
    """
    setattr(model, CONFIG_ATTR, cfg)
    for index, layer in enumerate(layers):
        layer._original_class = layer.__class__
        layer.__class__ = compressed_class(layer.__class__, CompressedLayer, layout.name, _layout=layout)
        setattr(layer, CONFIG_ATTR, cfg)
        layer._compression_index = index
        layer._own_attn_fused = own_attn_fused


def unpatch_layers(model: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Undo ``patch_layers`` (and a swapped model class); a model never patched is left as it is."""
    for layer in layers:
        original = layer.__dict__.pop("_original_class", None)
        if original is None:
            continue
        layer.__class__ = original
        del layer._compression_index, layer._own_attn_fused
        layer.__dict__.pop(CONFIG_ATTR)
    original = model.__dict__.pop("_original_class", None)
    if original is not None:
        model.__class__ = original
    model.__dict__.pop(CONFIG_ATTR, None)


def linear_flops(*modules: Optional[nn.Module]) -> float:
    """2·in·out for each Linear given (None and other modules count 0)."""
    return float(sum(2 * m.in_features * m.out_features for m in modules if isinstance(m, nn.Linear)))


def mlp_hidden(mlp: nn.Module) -> float:
    """The MLP width in fc1/fc2 units (``block_flops`` counts 4·N·d·hidden): SwiGLU's three products count 1.5×."""
    if hasattr(mlp, "gate_proj"):
        return 1.5 * mlp.gate_proj.out_features
    first = getattr(mlp, "fc1", None) or getattr(mlp, "c_fc")
    return first.out_features


def grid_of(image_size, patch_size, img_size: Optional[Sequence[int]]) -> Tuple[int, int, int, int]:
    """(grid_h, grid_w, patch_h, patch_w) for the model's own image size or ``img_size``."""
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    (patch_h, patch_w), (height, width) = pair(patch_size), pair(image_size if img_size is None else img_size)
    return height // patch_h, width // patch_w, patch_h, patch_w
