"""Throughput of compressed models against the uncompressed one, measured in the same run.

The command line is ``tools/benchmark.py``:

    python tools/benchmark.py --arch vit_small_patch16_224 --batch_size 32 --methods tk_n --pool_k 10

Variants are timed in interleaved rounds (baseline, method, baseline, ...) so that drift in the
machine's speed hits all of them alike; each figure is the median over rounds. The ideal speedup
is the ratio of analytic FLOPs.
"""
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .core.counting import Schedule, tokens_after
from .core.state import get_config
from .flops import analytic_flops, model_token_counts
from .patch import apply_patch
from .patch.timm import supports as is_timm_vit


@dataclass
class SpeedResult:
    name: str
    images_per_s: float
    gflops: float
    speedup: float
    ideal_speedup: float

    @property
    def efficiency(self) -> float:
        """Measured speedup as a fraction of the ideal (FLOPs ratio)."""
        return self.speedup / self.ideal_speedup


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a timer read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(calls: Dict[str, Callable[[], Any]], rounds: int, warmup: int = 2) -> Dict[str, List[float]]:
    """Seconds of each call over ``rounds`` rounds in which every call runs once; ``warmup`` untimed calls
    each first. The order rotates from round to round, so no call always runs right after the same other
    one (whose threads, or another runtime's, may still be spinning down)."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def measure_throughput(models: Dict[str, nn.Module], inputs: torch.Tensor, warmup: int = 2, rounds: int = 7,
                       autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Images per second of each model: the median over interleaved rounds (:func:`time_interleaved`) of
    one forward pass, finished on the device before the clock stops."""
    def forward(model: nn.Module) -> Callable[[], None]:
        def call() -> None:
            model(inputs)
            synchronize(inputs.device)
        return call

    for model in models.values():
        model.eval()
    with torch.inference_mode(), torch.autocast(inputs.device.type, dtype=autocast_dtype,
                                                enabled=autocast_dtype is not None):
        synchronize(inputs.device)
        times = time_interleaved({name: forward(model) for name, model in models.items()}, rounds, warmup)
    return {name: inputs.shape[0] / statistics.median(t) for name, t in times.items()}


def compare_speed(models: Dict[str, nn.Module], inputs: torch.Tensor, baseline: str, warmup: int = 2,
                  rounds: int = 7, autocast_dtype: Optional[torch.dtype] = None,
                  flops_of: Callable[[nn.Module], float] = analytic_flops) -> List[SpeedResult]:
    """Throughput of every model, with speedups (measured and ideal) relative to ``models[baseline]``;
    ``flops_of``: a model's FLOPs per image (a caller's wrapper of a patched model counts its own way)."""
    rate = measure_throughput(models, inputs, warmup, rounds, autocast_dtype)
    flops = {name: flops_of(model) for name, model in models.items()}
    return [SpeedResult(name, rate[name], flops[name] / 1e9, rate[name] / rate[baseline],
                        flops[baseline] / flops[name]) for name in models]


def build_variants(model: nn.Module, method_names: Sequence[str], schedule: Schedule,
                   explicit: bool) -> Dict[str, nn.Module]:
    """The uncompressed model and one patched copy per method name; with ``explicit`` also the same
    pairs running attention that materialises the N×N matrix (``none/explicit``, ``tk_n/explicit``, ...).

    ``none`` is ``model`` as it is; ``none/explicit`` a copy patched with ``none`` and ``fused_attn=False``, so
    its blocks run their own forward with the attention matrix materialised, whatever the family."""
    variants = {"none": model}
    for name in method_names:
        variants[name] = apply_patch(copy.deepcopy(model), name, schedule)
    if explicit:
        variants["none/explicit"] = apply_patch(copy.deepcopy(model), "none", 0, fused_attn=False)
        for name in method_names:
            variants[f"{name}/explicit"] = apply_patch(copy.deepcopy(model), name, schedule, fused_attn=False)
    return variants


class SlicedBlock(nn.Module):
    """A timm ``Block`` run by its own parts, keeping the first ``after_attn`` tokens between its attention and
    its MLP and the first ``after_block`` tokens after it: a slice, a view that costs nothing."""

    def __init__(self, block: nn.Module, after_attn: int, after_block: int):
        super().__init__()
        self.block, self.after_attn, self.after_block = block, after_attn, after_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.block
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        x = x[:, :self.after_attn]
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x[:, :self.after_block]


def bound_token_counts(compressed: nn.Module) -> List[Tuple[int, int]]:
    """(tokens left after the attention, tokens left after the block) for every block of a patched model."""
    cfg = get_config(compressed)
    if cfg is None:
        raise ValueError("model: not patched; the schedule-only bound follows a patched model's token counts")
    counts = model_token_counts(compressed)  # (tokens through attention, through the MLP) per block
    last_attn, last_mlp = counts[-1]
    last_out = (last_mlp if cfg.reduce_at == "attn" else
                tokens_after(cfg.method, last_attn, cfg.schedule[-1], cfg.num_prefix_tokens))
    outputs = [n_attn for n_attn, _ in counts[1:]] + [last_out]
    return [(n_mlp, n_out) for (_, n_mlp), n_out in zip(counts, outputs)]


def schedule_only(model: nn.Module, compressed: nn.Module) -> nn.Module:
    """The schedule-only bound of ``compressed``: a copy of the uncompressed timm ``model`` whose plain blocks
    run at the token counts ``compressed`` leaves, each reduction done for free.

    Every block of the copy is timm's own attention (no proportional-attention bias, no class-token row, no
    key average) and MLP; where the method reduces (after attention or after the block, as it is patched) the
    copy keeps the first n tokens (a slice), n being what the method leaves (its fused token and ToMe's merges
    included). So the time of the copy is what the method's token counts allow, and the compressed model's
    time beyond it is the cost of choosing, gathering and merging tokens. The weights are ``model``'s (copied).
    """
    if not is_timm_vit(model) or get_config(model) is not None:
        raise ValueError(f"model: the schedule-only bound is built from an unpatched timm VisionTransformer, "
                         f"got {type(model).__name__}")
    counts = bound_token_counts(compressed)
    bound = copy.deepcopy(model)
    bound.blocks = nn.Sequential(*(SlicedBlock(block, after_attn, after_block)
                                   for block, (after_attn, after_block) in zip(bound.blocks, counts)))
    return bound
