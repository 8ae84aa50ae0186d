"""Analytic FLOPs of a (patched) model: the matrix products, one multiply-add = 2 FLOPs.

The arithmetic is ``core.cost`` (re-exported here); this module reads a model's ``ModelShape`` (``model_shape``, from
its family's adapter in ``patch``) and its compression (``core.state``).
"""
from typing import List, Optional, Sequence, Tuple

from torch import nn

from .core.cost import ModelShape, block_flops, reduction_flops, schedule_flops
from .core.counting import token_counts
from .core.methods import CompressionMethod, get_method
from .patch import model_shape
from .core.state import get_config

__all__ = ["ModelShape", "model_shape", "block_flops", "reduction_flops", "schedule_flops", "model_token_counts",
           "analytic_flops"]


def model_token_counts(model, img_size: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """(tokens through attention, tokens through MLP) per block, for the model as patched."""
    shape = model_shape(model, img_size)
    method, schedule, reduce_at = _compression_of(model, shape.depth)
    return token_counts(method, shape.num_tokens, schedule, shape.num_prefix, reduce_at)


def analytic_flops(model, img_size: Optional[Sequence[int]] = None, *, head: Optional[nn.Module] = None) -> float:
    """Forward FLOPs per image of the model as patched: patch embedding, blocks, reductions, its own head, and
    ``head``, a Linear added on the model's output by its caller (2·in·out; None adds nothing)."""
    shape = model_shape(model, img_size)
    added = 0.0 if head is None else 2.0 * head.in_features * head.out_features
    return schedule_flops(shape, *_compression_of(model, shape.depth)) + added


def _compression_of(model, depth: int) -> Tuple[CompressionMethod, List[int], str]:
    """(method, schedule, reduce_at) of the model as patched; an unpatched model removes nothing."""
    cfg = get_config(model)
    if cfg is None:
        return get_method("none"), [0] * depth, "block"
    return cfg.method, cfg.schedule, cfg.reduce_at
