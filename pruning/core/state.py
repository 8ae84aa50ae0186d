"""How a model is compressed, and the per-forward state its blocks share.

The patch keeps one ``CompressionConfig`` on the model (and on each patched block) under
``CONFIG_ATTR``; ``get_config`` reads it. Everything that asks "how is this model compressed"
(the patch, the FLOPs arithmetic, the visualisation) goes through here, and so do the random draws of the
``random`` control: a CPU generator on the config, seeded with ``DEFAULT_SEED`` when the model is patched,
restarted from another seed by ``seed_draws``, and from the model's seed for one evaluation pass by
``evaluation_draws``.
"""
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .methods import CompressionMethod

NO_POSITION = -1  # a token's position when it is rotated by no angle (prefix tokens, fused tokens)
CONFIG_ATTR = "_compression"  # the attribute holding the CompressionConfig of a patched model
DEFAULT_SEED = 0  # the seed of a newly patched model's random draws


def original_positions(batch: int, num_tokens: int, num_prefix_tokens: int, device=None) -> Tensor:
    """The positions (B, N) of tokens in their original order: the prefix tokens (``NO_POSITION``) followed
    by the patches 0, 1, 2, ..."""
    positions = torch.arange(-num_prefix_tokens, num_tokens - num_prefix_tokens, device=device)
    return positions.clamp(min=NO_POSITION).expand(batch, -1)


@dataclass
class CompressionState:
    """What one forward pass carries from block to block.

    size: (B, N, 1) original patches held by each token (ToMe's merge weights and proportional attention).
    source: (B, N, N0) 0/1 map of which original tokens each token carries (only with trace_source).
    positions: (B, N) long, for a model with rotary position embeddings (``carry_positions``): the original
        patch (0-based among the patches) whose rotary angles each token uses, ``NO_POSITION`` for a token
        rotated by no angle (prefix tokens, a fused token); None while no block has reduced (the original
        order).
    block_sources: ``source`` after every block, for visualisation.
    tokens_per_block: tokens leaving every block in the last forward.
    """

    size: Optional[Tensor] = None
    source: Optional[Tensor] = None
    positions: Optional[Tensor] = None
    block_sources: List[Tensor] = field(default_factory=list)
    tokens_per_block: List[int] = field(default_factory=list)

    def reset(self, x: Tensor, trace_source: bool) -> None:
        self.size = None
        self.positions = None
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
    carry_positions: the model rotates queries and keys by each patch's angles (rotary position
    embeddings), so every reduction carries each token's original patch (``CompressionState.positions``).
    seed, generator: the random draws of a stochastic method (``random``): one stream, advanced by every
    forward that reduces, so each forward (each training step, each evaluation batch) draws afresh.
    """

    method: CompressionMethod
    schedule: List[int]
    reduce_at: str
    num_prefix_tokens: int
    prop_attn: bool = True
    trace_source: bool = False
    fused_attn: bool = True
    carry_positions: bool = False
    state: CompressionState = field(default_factory=CompressionState)
    seed: int = DEFAULT_SEED
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(DEFAULT_SEED),
                                       compare=False, repr=False)

    def begin_block(self, index: int, x: Tensor) -> Tuple[int, Optional[Tensor]]:
        """What block ``index`` does to ``x``: (tokens it removes, the token sizes its attention weighs by, or
        None without proportional attention). Block 0 starts a new forward pass."""
        if index == 0:
            self.state.reset(x, self.trace_source)
        return self.schedule[index], self.state.size if self.prop_attn else None

    def reduces(self, k: int, size: Optional[Tensor]) -> bool:
        """Whether a block removing ``k`` tokens, with these sizes, differs from the plain block (which
        also rotates by the original positions, so it cannot run once tokens have moved)."""
        return not ((k == 0 or self.method.reduction == "none") and size is None and self.state.positions is None)

    def token_positions(self, x: Tensor) -> Tensor:
        """The original patch of each token of ``x`` (B, N): the state's, or, before any reduction, the prefix
        tokens (``NO_POSITION``) followed by the patches in order."""
        if self.state.positions is not None:
            return self.state.positions
        return original_positions(x.shape[0], x.shape[1], self.num_prefix_tokens, x.device)

    def pool_log_size(self, num_tokens: int) -> Optional[Tensor]:
        """log(size) (B, ``num_tokens``) of the last ``num_tokens`` tokens of the last forward, for an
        attention-pool head reading them (prefix tokens are first, so a pool that skips them reads the last
        ones): ToMe's proportional attention applied to the pool. None without merged tokens or without
        ``prop_attn``."""
        size = self.state.size
        if not self.prop_attn or size is None or size.shape[1] < num_tokens:
            return None
        return size[:, size.shape[1] - num_tokens:, 0].log()

    def compresses(self) -> bool:
        """Whether any block reduces tokens (a method other than none, some k > 0)."""
        return self.method.reduction != "none" and any(k > 0 for k in self.schedule)

    def end_block(self, x: Tensor) -> Tensor:
        """Record the tokens (and, when traced, the source map) leaving a block; returns ``x``."""
        if self.trace_source:
            self.state.block_sources.append(self.state.source)
        self.state.tokens_per_block.append(x.shape[1])
        return x


def get_config(model: nn.Module) -> Optional[CompressionConfig]:
    """The compression a model was patched with, or None."""
    return getattr(model, CONFIG_ATTR, None)


def _patched_config(model: nn.Module) -> CompressionConfig:
    cfg = get_config(model)
    if cfg is None:
        raise ValueError("model: not patched; call pruning.patch.apply_patch first")
    return cfg


def get_state(model: nn.Module) -> CompressionState:
    """The state left by the last forward pass: sizes, source map, tokens per block."""
    return _patched_config(model).state


def seed_draws(model: nn.Module, seed: int) -> None:
    """Restart the random draws of a patched model from ``seed``: from here on it keeps the same tokens as any
    model seeded alike, given the same inputs and batch size. Methods that draw nothing ignore the seed."""
    cfg = _patched_config(model)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if not -2 ** 63 <= seed < 2 ** 64:
        raise ValueError(f"seed: {seed} is outside the range a torch generator takes (-2**63 to 2**64 - 1)")
    cfg.generator.manual_seed(seed)
    cfg.seed = seed


def find_config(model: nn.Module) -> Optional[CompressionConfig]:
    """The compression of ``model`` or of the first patched module inside it (a wrapper, a transformers or
    OpenCLIP model whose backbone was patched, torch.compile's module), or None."""
    return next((cfg for cfg in map(get_config, model.modules()) if cfg is not None), None)


@contextmanager
def evaluation_draws(model: nn.Module) -> Iterator[None]:
    """One evaluation pass: inside, the random draws restart from the model's seed (as after ``seed_draws``),
    so every pass over the same batches keeps the same tokens; afterwards the stream continues where it was
    (training draws are not replayed). Does nothing for an unpatched model."""
    cfg = find_config(model)
    if cfg is None:
        yield
        return
    outside = cfg.generator.get_state()
    cfg.generator.manual_seed(cfg.seed)
    try:
        yield
    finally:
        cfg.generator.set_state(outside)
