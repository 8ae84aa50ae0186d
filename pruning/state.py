"""How a model is compressed, and the per-forward state its blocks share.

The patch keeps one ``CompressionConfig`` on the model (and on each patched block) under
``CONFIG_ATTR``; ``get_config`` reads it. Everything that asks "how is this model compressed"
(the patch, the FLOPs arithmetic, the visualisation) goes through here.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .methods import CompressionMethod

CONFIG_ATTR = "_compression"  # the attribute holding the CompressionConfig of a patched model


@dataclass
class CompressionState:
    """What one forward pass carries from block to block.

    size: (B, N, 1) original patches held by each token (ToMe's merge weights and proportional attention).
    source: (B, N, N0) 0/1 map of which original tokens each token carries (only with trace_source).
    block_sources: ``source`` after every block, for visualisation.
    tokens_per_block: tokens leaving every block in the last forward.
    """

    size: Optional[Tensor] = None
    source: Optional[Tensor] = None
    block_sources: List[Tensor] = field(default_factory=list)
    tokens_per_block: List[int] = field(default_factory=list)

    def reset(self, x: Tensor, trace_source: bool) -> None:
        self.size = None
        self.block_sources = []
        self.tokens_per_block = []
        self.source = None
        if trace_source:
            batch, num_tokens = x.shape[:2]
            self.source = torch.eye(num_tokens, device=x.device, dtype=x.dtype).expand(batch, -1, -1)


@dataclass
class CompressionConfig:
    """How a model is compressed: one object shared by all its patched blocks.

    method: the compression method; schedule: tokens removed by each block; fused_attn: whether
    every block's attention runs through scaled_dot_product_attention (the one switch for it).
    """

    method: CompressionMethod
    schedule: List[int]
    reduce_at: str
    num_prefix_tokens: int
    prop_attn: bool = True
    trace_source: bool = False
    fused_attn: bool = True
    state: CompressionState = field(default_factory=CompressionState)

    def begin_block(self, index: int, x: Tensor) -> Tuple[int, Optional[Tensor]]:
        """What block ``index`` does to ``x``: (tokens it removes, the token sizes its attention weighs by, or
        None without proportional attention). Block 0 starts a new forward pass."""
        if index == 0:
            self.state.reset(x, self.trace_source)
        return self.schedule[index], self.state.size if self.prop_attn else None

    def reduces(self, k: int, size: Optional[Tensor]) -> bool:
        """Whether a block removing ``k`` tokens, with these sizes, differs from the plain block."""
        return not ((k == 0 or self.method.reduction == "none") and size is None)

    def end_block(self, x: Tensor) -> Tensor:
        """Record the tokens (and, when traced, the source map) leaving a block; returns ``x``."""
        if self.trace_source:
            self.state.block_sources.append(self.state.source)
        self.state.tokens_per_block.append(x.shape[1])
        return x


def get_config(model: nn.Module) -> Optional[CompressionConfig]:
    """The compression a model was patched with, or None."""
    return getattr(model, CONFIG_ATTR, None)


def get_state(model: nn.Module) -> CompressionState:
    """The state left by the last forward pass: sizes, source map, tokens per block."""
    cfg = get_config(model)
    if cfg is None:
        raise ValueError("model: not patched; call pruning.patch.apply_patch first")
    return cfg.state
