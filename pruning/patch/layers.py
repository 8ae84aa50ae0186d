"""The compressed layer, once for every model family: a pre-norm encoder layer that reduces tokens.

A family says where its layer keeps its parts, and which optional parts its attention has, in a
``LayerLayout``; ``CompressedLayer`` runs any such layer with a reduction step after attention or after the
MLP; ``patch_layers``/``unpatch_layers`` swap each layer's class for a compressing subclass and back. The
adapters (``timm.py``, ``hf.py``, ``open_clip.py``) hold only what is their library's: where the layers are,
the layout, prefix tokens, pooling and the model's shape. Nothing here names a model library's classes.

The layer computes, with ``attn`` the layout's attention module::

    h = norm1(x)
    q, k, v = heads of qkv(h) (packed) or of q_proj(h), k_proj(h), v_proj(h)
    q, k = q_norm(q), k_norm(k)                      # adjust_qk: the one place for per-family extras
    q, k = rotate(q), rotate(k)                      # rotary families: by each token's carried angles
    o = attention(q, k, v)                           # fused (SDPA) or explicit (N×N)
    o = out_proj(attn_norm(o) * sigmoid(gate(h)))    # attn_norm and gate: when the layout names them
    x = x + attn_post(o)                             # dropout, layer scale, drop path, in order
    (reduce here when reduce_at == "attn")
    x = x + mlp_post(mlp(norm2(x)))
    (reduce here when reduce_at == "block")
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.compress import reduce_tokens
from ..core.counting import Schedule, resolve_schedule
from ..core.methods import METHODS, PLACEMENTS, get_method
from ..core.scoring import class_attention, head_average
from ..core.state import CONFIG_ATTR, NO_POSITION, CompressionConfig, get_config

__all__ = ["LayerLayout", "CompressedLayer", "RotaryTable", "TokenAngles", "attend_heads", "compressed_class",
           "build_config", "patch_layers", "unpatch_layers", "without_class_token", "SizeWeightedPool", "patch_pool",
           "unpatch_pool", "get_path", "linear_flops", "mlp_hidden", "grid_of", "patch_token_mean", "MaskRefused"]


class MaskRefused(ValueError):
    """A compressing layer was given an attention mask (or causal attention, or separate keys and values)."""


_NOT_SET = object()  # an attribute that was not in the module's __dict__ before patching


def get_path(module, path: str):
    """``module.a.b`` for ``path`` ``"a.b"``; None where a part is missing."""
    for name in path.split("."):
        module = getattr(module, name, None) if module is not None else None
    return module


@dataclass(frozen=True)
class TokenAngles:
    """The rotary angles of each token, as sin and cos (B, 1 or H, N, D), and how channels pair: ``half``
    (channel i with i + D/2, "rotate half") or interleaved (2i with 2i + 1)."""

    sin: Tensor
    cos: Tensor
    half: bool

    def rotate(self, x: Tensor) -> Tensor:
        """x (B, H, N, D) rotated: x·cos + x'·sin, x' the paired channels with the first of each pair negated."""
        if self.half:
            first, second = x.chunk(2, dim=-1)
            paired = torch.cat([-second, first], dim=-1)
        else:
            paired = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
        return (x * self.cos + paired * self.sin).to(x.dtype)


@dataclass(frozen=True)
class RotaryTable:
    """One block's rotary angles of every original patch: sin and cos rows (..., P, D), the leading dimensions
    (), (H,), (B, 1) or (B, H) (per head, per image); ``half`` as ``TokenAngles``."""

    sin: Tensor
    cos: Tensor
    half: bool

    def for_tokens(self, positions: Tensor) -> TokenAngles:
        """The angles of tokens at original patches ``positions`` (B, N); ``NO_POSITION`` rotates by nothing
        (sin 0, cos 1): prefix tokens and fused tokens."""
        return TokenAngles(_rows(self.sin, positions, 0.0), _rows(self.cos, positions, 1.0), self.half)


def _rows(table: Tensor, positions: Tensor, identity: float) -> Tensor:
    """table's rows (B, 1 or H, N, D) at ``positions`` (B, N), ``identity`` everywhere for NO_POSITION."""
    table = table.reshape((1,) * (4 - table.ndim) + tuple(table.shape))
    images, heads, num_patches, dim = table.shape
    table = torch.cat([table, table.new_full((images, heads, 1, dim), identity)], dim=2)
    batch, num_tokens = positions.shape
    index = positions.masked_fill(positions == NO_POSITION, num_patches)
    # whole rows of the flattened (images · heads · (patches + 1), D) table, one index_select: several times
    # faster on CPU than gather with an index expanded over D
    image = torch.arange(batch, device=index.device) if images > 1 else torch.zeros(batch, dtype=index.dtype,
                                                                                     device=index.device)
    first_row = (image[:, None] * heads + torch.arange(heads, device=index.device)) * (num_patches + 1)
    rows = (first_row[:, :, None] + index[:, None, :]).reshape(-1)
    return table.reshape(-1, dim).index_select(0, rows).view(batch, heads, num_tokens, dim)


class LayerLayout:
    """Where a family's pre-norm layer keeps its parts, and which optional parts its attention has.

    Names are attribute paths (``"attn.proj_drop"``): ``norm1``, ``attn``, ``norm2``, ``mlp``, ``attn_post`` and
    ``mlp_post`` from the layer; the others from the attention module. Options:

    - ``qkv``: one packed Linear giving queries, keys and values (timm); else ``q_proj``/``k_proj``/``v_proj``.
    - ``qk_norm``: the (query, key) norms applied per head after the projection (timm's ``q_norm``/``k_norm``).
    - ``attn_norm``: a norm of the attention output before ``out_proj`` (timm's ``attn.norm``).
    - ``gate``: a Linear whose sigmoid, from the layer's normed input, scales the attention output (timm).
    - ``scale``, ``dropout``: the attention's logit scale and dropout probability.
    - ``scale_queries``: the explicit path scales the queries before the product (timm) instead of the
      logits after it, as the family's own forward does (so results match it bit for bit).
    - ``fused_switch``: the attention's own attribute choosing fused attention (timm's ``fused_attn``); while
      patched it reads the config's ``fused_attn``, so the family's own forward follows the one switch.
    - ``attn_post``/``mlp_post``: the modules applied to each branch in order (dropout, layer scale, drop path).
    - ``mask_arg``: the name of the layer's mask argument, for the message refusing it while compressing.
    - ``rotary_arg``: the layer's argument carrying its rotary position embeddings (timm Eva's ``rope``); a
      layout with one overrides ``rotary_table`` to read it, and the layer rotates each token's queries and
      keys by the angles of the original patch it carries (``CompressionState.positions``).

    A family whose attention differs further subclasses this and overrides ``packed_qkv`` (how the packed
    projection is computed), ``project``, ``adjust_qk`` (queries and keys before attention and rotation),
    ``rotary_table``, ``scale_of`` or ``dropout_of``.
    """

    def __init__(self, name: str, norm1: str, attn: str, norm2: str, mlp: str, *, qkv: Optional[str] = None,
                 qk_norm: Optional[Tuple[str, str]] = None, attn_norm: Optional[str] = None,
                 gate: Optional[str] = None, out_proj: str = "o_proj", scale: str = "scaling",
                 dropout: str = "attention_dropout", scale_queries: bool = False, fused_switch: Optional[str] = None,
                 attn_post: Tuple[str, ...] = (), mlp_post: Tuple[str, ...] = (), mask_arg: str = "attention_mask",
                 rotary_arg: Optional[str] = None):
        self.name, self.norm1, self.attn, self.norm2, self.mlp = name, norm1, attn, norm2, mlp
        self.qkv, self.qk_norm, self.attn_norm, self.gate = qkv, qk_norm, attn_norm, gate
        self.out_proj, self.scale, self.dropout, self.scale_queries = out_proj, scale, dropout, scale_queries
        self.fused_switch, self.attn_post, self.mlp_post, self.mask_arg = fused_switch, attn_post, mlp_post, mask_arg
        self.rotary_arg = rotary_arg

    # --- the attention's parts ---------------------------------------------------------------------------

    def packed_qkv(self, attn: nn.Module, x: Tensor) -> Tensor:
        """The packed projection (B, N, 3·H·D), queries then keys then values."""
        return get_path(attn, self.qkv)(x)

    def project(self, attn: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Queries, keys, values as (B, H, N, D)."""
        if self.qkv is None:
            shape = (*x.shape[:-1], -1, attn.head_dim)
            return tuple(proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        batch, num_tokens, _ = x.shape
        qkv = self.packed_qkv(attn, x).reshape(batch, num_tokens, 3, -1, attn.head_dim).permute(2, 0, 3, 1, 4)
        return tuple(qkv.unbind(0))

    def adjust_qk(self, attn: nn.Module, queries: Tensor, keys: Tensor) -> Tuple[Tensor, Tensor]:
        """Queries and keys as the attention uses them, before any rotation: the q/k norms where the layout has
        them."""
        if self.qk_norm is None:
            return queries, keys
        q_norm, k_norm = self.qk_norm
        return get_path(attn, q_norm)(queries), get_path(attn, k_norm)(keys)

    def rotary_table(self, attn: nn.Module, value) -> RotaryTable:
        """The block's rotary angles from the value of its ``rotary_arg`` (the family's own format)."""
        raise NotImplementedError(f"{self.name}: a layout with a rotary_arg reads it in rotary_table")

    def take_rotary(self, attn: nn.Module, kwargs: dict) -> Optional[RotaryTable]:
        """Remove the rotary argument from the layer's keyword arguments; its angles, or None."""
        value = kwargs.pop(self.rotary_arg, None) if self.rotary_arg else None
        return None if value is None else self.rotary_table(attn, value)

    def scale_of(self, attn: nn.Module) -> float:
        return get_path(attn, self.scale)

    def dropout_of(self, attn: nn.Module) -> float:
        return get_path(attn, self.dropout)

    def attention(self, attn: nn.Module, x: Tensor, *, size: Optional[Tensor], fused: bool, want_cls_attn: bool,
                  want_keys: bool, angles: Optional[TokenAngles] = None
                  ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The attention sublayer on the normed tokens ``x``: (its output after ``out_proj``, the class-token
        attention row (B, N) averaged over heads, the keys averaged over heads (B, N, D), before rotation);
        see ``attend_heads``. ``angles``: the tokens' rotary angles, for a family with rotary embeddings."""
        gate = get_path(attn, self.gate) if self.gate else None
        gate = gate(x).sigmoid() if gate is not None else None
        queries, keys, values = self.project(attn, x)
        queries, keys = self.adjust_qk(attn, queries, keys)
        mean_keys = head_average(keys) if want_keys else None  # ToMe's similarity: the keys before rotation
        if angles is not None:
            queries, keys = angles.rotate(queries), angles.rotate(keys)
        out, cls_attn, _ = attend_heads(
            queries, keys, values, scale=self.scale_of(attn), size=size,
            dropout_p=self.dropout_of(attn) if attn.training else 0.0, fused=fused, want_cls_attn=want_cls_attn,
            want_keys=False, scale_queries=self.scale_queries)
        if self.attn_norm:
            out = get_path(attn, self.attn_norm)(out)
        if gate is not None:
            out = out * gate
        return get_path(attn, self.out_proj)(out), cls_attn, mean_keys

    # --- the layer's parts -------------------------------------------------------------------------------

    def branch(self, layer: nn.Module, names: Tuple[str, ...], x: Tensor) -> Tensor:
        """The parts ``names`` applied in order: a module is called, a tensor (a layer-scale Parameter)
        multiplies, None (a part the layer was built without) is skipped."""
        for name in names:
            part = get_path(layer, name)
            if isinstance(part, Tensor):
                x = part * x
            elif part is not None:
                x = part(x)
        return x

    def check_inputs(self, args: tuple, kwargs: dict) -> None:
        """Refuse masks (any tensor argument beyond the tokens) and causal attention while compressing."""
        if any(isinstance(a, Tensor) or a is True for a in (*args, *kwargs.values())):
            raise MaskRefused(f"{self.mask_arg}: token compression changes the token set, so attention masks, "
                              f"causal attention and separate key/value inputs are not supported")


def attend_heads(queries: Tensor, keys: Tensor, values: Tensor, *, scale: float, size: Optional[Tensor],
                 dropout_p: float, fused: bool, want_cls_attn: bool, want_keys: bool,
                 scale_queries: bool = False) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Multi-head attention of (B, H, N, D) inputs: (output (B, N, H·D), class-token attention row (B, N) averaged
    over heads, keys averaged over heads (B, N, D)).

    ``size`` adds log(size) to the logits (ToMe's proportional attention). ``fused`` runs
    scaled_dot_product_attention and computes the class-token row separately, never forming N×N; otherwise
    the logits are ``(queries · scale) @ keysᵀ`` with ``scale_queries`` and ``(queries @ keysᵀ) · scale`` without.
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
        if scale_queries:
            logits = (queries * scale) @ keys.transpose(-2, -1)
        else:
            logits = (queries @ keys.transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + bias
        weights = logits.softmax(dim=-1)
        if want_cls_attn:
            cls_attn = head_average(weights[:, :, :1])[:, 0]
        out = F.dropout(weights, dropout_p) @ values if dropout_p > 0 else weights @ values
    out = out.transpose(1, 2).reshape(batch, num_tokens, heads * head_dim)
    return out, cls_attn, (head_average(keys) if want_keys else None)


class CompressedLayer:
    """Mixed into a family's layer class: reduces tokens after attention or after the MLP.

    A layer that reduces nothing (and carries no ToMe sizes) runs the family's own forward, bit for bit, when
    that forward runs the attention the config's ``fused_attn`` asks for; otherwise the layer's own projections
    with the chosen attention.
    """

    _compression_index: int
    _own_attn_fused: Optional[bool]  # None: the family's own attention follows the config's switch
    _layout: LayerLayout

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        cfg = get_config(self)
        k, size = cfg.begin_block(self._compression_index, hidden_states)  # layer 0 starts a forward pass
        own = self._own_attn_fused
        if not cfg.reduces(k, size) and (own is None or own == cfg.fused_attn):
            return cfg.end_block(super().forward(hidden_states, *args, **kwargs))  # the layer's own: bit-identical
        layout = self._layout
        rotary = layout.take_rotary(get_path(self, layout.attn), kwargs)
        layout.check_inputs(args, kwargs)
        angles = None if rotary is None else rotary.for_tokens(cfg.token_positions(hidden_states))
        return cfg.end_block(self._compressed_forward(cfg, hidden_states, k, size, angles))

    def _compressed_forward(self, cfg: CompressionConfig, x: Tensor, k: int, size: Optional[Tensor],
                            angles: Optional[TokenAngles]) -> Tensor:
        layout, method = self._layout, cfg.method
        out, cls_attn, keys = layout.attention(
            get_path(self, layout.attn), get_path(self, layout.norm1)(x), size=size, fused=cfg.fused_attn,
            want_cls_attn=k > 0 and method.needs_cls_attention, want_keys=k > 0 and method.reduction == "merge",
            angles=angles)
        x = x + layout.branch(self, layout.attn_post, out)
        if cfg.reduce_at == "attn" and k > 0:
            x = reduce_tokens(cfg, x, k, cls_attn, keys)
        x = x + layout.branch(self, layout.mlp_post, get_path(self, layout.mlp)(get_path(self, layout.norm2)(x)))
        if cfg.reduce_at == "block" and k > 0:
            x = reduce_tokens(cfg, x, k, cls_attn, keys)
        return x


class _SwitchedAttention:
    """Mixed into an attention class whose own forward reads a fused-attention attribute (the layout's
    ``fused_switch``): while patched, that attribute is the config's ``fused_attn``, the one switch."""

    _switch: str

    def _read_switch(self) -> bool:
        return get_config(self).fused_attn

    def _refuse_write(self, value: bool) -> None:
        raise AttributeError(f"{self._switch}: the layers of a patched model share one attention switch; "
                             f"set it with pruning.patch.apply_patch(model, ..., fused_attn=...)")


_SUBCLASSES: Dict[Tuple[type, type, str], type] = {}


def compressed_class(cls: type, mixin: type, tag: str = "", **attrs) -> type:
    """A cached subclass of ``cls`` with ``mixin`` first in its bases (isinstance checks keep working)."""
    key = (cls, mixin, tag)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Compressed{cls.__name__}", (mixin, cls), dict(attrs))
    return _SUBCLASSES[key]


def _switched_class(cls: type, switch: str) -> type:
    switched = property(_SwitchedAttention._read_switch, _SwitchedAttention._refuse_write)
    return compressed_class(cls, _SwitchedAttention, switch, _switch=switch, **{switch: switched})


def build_config(method: str, schedule: Schedule, depth: int, num_prefix: int, *, reduce_at: Optional[str] = None,
                 prop_attn: bool = True, trace_source: bool = False, fused_attn: bool = True, class_token: bool = True,
                 names: Tuple[str, str] = ("select_method", "pool_k"), carry_positions: bool = False
                 ) -> CompressionConfig:
    """The CompressionConfig for these arguments; ValueError naming the bad argument (``names``: what the
    caller called the method and the schedule). ``carry_positions``: the model has rotary embeddings."""
    method_arg, schedule_arg = names
    chosen = get_method(method, argument=method_arg)
    reduce_at = chosen.default_reduce_at if reduce_at is None else reduce_at
    if reduce_at not in PLACEMENTS:
        raise ValueError(f"reduce_at: expected one of {', '.join(PLACEMENTS)}, got {reduce_at!r}")
    per_block = resolve_schedule(schedule, depth, argument=schedule_arg)
    if chosen.reduction == "none":
        per_block = [0] * depth
    if chosen.needs_cls_attention and not class_token:
        raise ValueError(f"{method_arg}: {chosen.name!r} reads class-token attention, but this model has no class "
                         f"token; methods that work without one: {', '.join(without_class_token())}")
    return CompressionConfig(method=chosen, schedule=per_block, reduce_at=reduce_at, num_prefix_tokens=num_prefix,
                             prop_attn=prop_attn, trace_source=trace_source, fused_attn=bool(fused_attn),
                             carry_positions=carry_positions)


def without_class_token() -> Tuple[str, ...]:
    """The methods (controls included) that reduce tokens without reading class-token attention."""
    return tuple(name for name, m in METHODS.items() if m.reduction != "none" and not m.needs_cls_attention)


class SizeWeightedPool:
    """Mixed into an attention-pool head's attention (one learned query over the tokens: timm's
    ``AttentionPoolLatent``, the ``nn.MultiheadAttention`` of SigLIP's head): with ToMe's merged tokens and
    proportional attention, log(size) is added to its logits (``attn_mask``), as the blocks weigh merged tokens.
    ``_keys_at``: the position of the keys among the forward's arguments; ``_per_head``: the mask is
    (B·heads, queries, N) (``nn.MultiheadAttention``) rather than (B, 1, 1, N)."""

    _keys_at: int
    _per_head: bool

    def forward(self, *args, attn_mask: Optional[Tensor] = None, **kwargs):
        keys = args[self._keys_at]
        log_size = get_config(self).pool_log_size(keys.shape[1])
        if log_size is not None:
            log_size = log_size.to(keys.dtype)
            if self._per_head:
                queries = args[0].shape[1]
                bias = log_size[:, None, :].repeat_interleave(self.num_heads, dim=0).expand(-1, queries, -1)
            else:
                bias = log_size[:, None, None, :]
            attn_mask = bias if attn_mask is None else attn_mask + bias
        return super().forward(*args, attn_mask=attn_mask, **kwargs)


def patch_pool(pool: Optional[nn.Module], cfg: CompressionConfig, *, keys_at: int, per_head: bool) -> None:
    """Make an attention-pool head's attention ``pool`` weigh merged tokens by their size (``SizeWeightedPool``);
    None (no such head) is left alone."""
    if pool is None:
        return
    pool._original_class = pool.__class__
    pool.__class__ = compressed_class(pool.__class__, SizeWeightedPool, f"pool:{keys_at}:{per_head}",
                                      _keys_at=keys_at, _per_head=per_head)
    setattr(pool, CONFIG_ATTR, cfg)


def unpatch_pool(pool: Optional[nn.Module]) -> None:
    """Undo ``patch_pool``; a pool never patched (or None) is left as it is."""
    original = None if pool is None else pool.__dict__.pop("_original_class", None)
    if original is not None:
        pool.__class__ = original
        pool.__dict__.pop(CONFIG_ATTR)


def patch_layers(model: nn.Module, layers: Sequence[nn.Module], layout: LayerLayout, cfg: CompressionConfig,
                 own_attn_fused: Optional[bool] = None) -> None:
    """Give every layer the compressed subclass of its class and the shared config.

    ``cfg.fused_attn`` is the one switch. With a ``fused_switch`` layout the attention's own attribute reads
    it; otherwise ``own_attn_fused`` says whether the layers' own forward runs fused attention, and a layer
    that reduces nothing runs its own forward only when that agrees with the switch.
    """
    setattr(model, CONFIG_ATTR, cfg)
    for index, layer in enumerate(layers):
        layer._original_class = layer.__class__
        layer.__class__ = compressed_class(layer.__class__, CompressedLayer, layout.name, _layout=layout)
        setattr(layer, CONFIG_ATTR, cfg)
        layer._compression_index = index
        layer._own_attn_fused = None if layout.fused_switch else own_attn_fused
        if layout.fused_switch:
            attn = get_path(layer, layout.attn)
            attn._original_switch = attn.__dict__.pop(layout.fused_switch, _NOT_SET)
            attn._original_class = attn.__class__
            attn.__class__ = _switched_class(attn.__class__, layout.fused_switch)
            setattr(attn, CONFIG_ATTR, cfg)


def unpatch_layers(model: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Undo ``patch_layers`` (and a swapped model class); a model never patched is left as it is."""
    for layer in layers:
        original = layer.__dict__.pop("_original_class", None)
        if original is None:
            continue
        layout = layer._layout
        layer.__class__ = original
        del layer._compression_index, layer._own_attn_fused
        layer.__dict__.pop(CONFIG_ATTR)
        if layout.fused_switch:
            attn = get_path(layer, layout.attn)
            attn.__class__ = attn.__dict__.pop("_original_class")
            attn.__dict__.pop(CONFIG_ATTR)
            switch = attn.__dict__.pop("_original_switch")
            if switch is not _NOT_SET:
                attn.__dict__[layout.fused_switch] = switch
    original = model.__dict__.pop("_original_class", None)
    if original is not None:
        model.__class__ = original
    model.__dict__.pop(CONFIG_ATTR, None)


def linear_flops(*modules: Optional[nn.Module]) -> float:
    """2·in·out for each Linear given (None and other modules count 0)."""
    return float(sum(2 * m.in_features * m.out_features for m in modules if isinstance(m, nn.Linear)))


def mlp_hidden(mlp: nn.Module) -> float:
    """The MLP width in fc1/fc2 units (``block_flops`` counts 4·N·d·hidden): the products of all its Linears
    over 2·d, d the first one's input width; so a plain MLP's is fc1's width and SwiGLU's three products (packed
    or not) count 1.5× the width of its gated product."""
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    return sum(m.in_features * m.out_features for m in linears) / (2 * linears[0].in_features)


def patch_token_mean(cfg: Optional[CompressionConfig], tokens: Tensor, num_prefix: int) -> Tensor:
    """Mean of the non-prefix tokens of ``tokens`` (B, N, C) as a patched model left them: weighted by the
    patches each holds when ToMe merged (so it is the mean over the original patches), else each token once
    (a fused token too). Without compression (``cfg`` None, or no sizes) it is exactly
    ``tokens[:, num_prefix:].mean(dim=1)``."""
    patches = tokens[:, num_prefix:]
    size = cfg.state.size if cfg is not None else None
    if size is None or size.shape[1] != tokens.shape[1]:
        return patches.mean(dim=1)
    weights = size[:, num_prefix:].to(patches.dtype)
    return (patches * weights).sum(dim=1) / weights.sum(dim=1)


def grid_of(image_size, patch_size, img_size: Optional[Sequence[int]]) -> Tuple[int, int, int, int]:
    """(grid_h, grid_w, patch_h, patch_w) for the model's own image size or ``img_size``."""
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    (patch_h, patch_w), (height, width) = pair(patch_size), pair(image_size if img_size is None else img_size)
    return height // patch_h, width // patch_w, patch_h, patch_w
