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
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .core.counting import Schedule
from .flops import analytic_flops
from .patch import apply_patch


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


def _sync(device: torch.device) -> None:
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
            _sync(inputs.device)
        return call

    for model in models.values():
        model.eval()
    with torch.inference_mode(), torch.autocast(inputs.device.type, dtype=autocast_dtype,
                                                enabled=autocast_dtype is not None):
        _sync(inputs.device)
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
