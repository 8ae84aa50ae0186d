"""Throughput of compressed models against the uncompressed one, measured in the same run.

    python -m pruning.benchmark --arch vit_small_patch16_224 --batch_size 32 --methods tk_n --pool_k 10

Variants are timed in interleaved rounds (baseline, method, baseline, ...) so that drift in the
machine's speed hits all of them alike; each figure is the median over rounds. The ideal speedup
is the ratio of analytic FLOPs.
"""
import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .flops import analytic_flops
from .methods import METHOD_NAMES
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


@torch.inference_mode()
def time_forward(model: nn.Module, inputs: torch.Tensor) -> float:
    """Seconds for one forward pass of ``inputs``."""
    _sync(inputs.device)
    start = time.perf_counter()
    model(inputs)
    _sync(inputs.device)
    return time.perf_counter() - start


def measure_throughput(models: Dict[str, nn.Module], inputs: torch.Tensor, warmup: int = 2, rounds: int = 7,
                       autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Images per second of each model: ``warmup`` untimed passes each, then ``rounds`` rounds in which
    every model runs once; the median time per model over the rounds."""
    for model in models.values():
        model.eval()
    with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for model in models.values():
            for _ in range(warmup):
                time_forward(model, inputs)
        times: Dict[str, List[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(time_forward(model, inputs))
    return {name: inputs.shape[0] / statistics.median(t) for name, t in times.items()}


def compare_speed(models: Dict[str, nn.Module], inputs: torch.Tensor, baseline: str, warmup: int = 2,
                  rounds: int = 7, autocast_dtype: Optional[torch.dtype] = None) -> List[SpeedResult]:
    """Throughput of every model, with speedups (measured and ideal) relative to ``models[baseline]``."""
    rate = measure_throughput(models, inputs, warmup, rounds, autocast_dtype)
    flops = {name: analytic_flops(model) for name, model in models.items()}
    return [SpeedResult(name, rate[name], flops[name] / 1e9, rate[name] / rate[baseline],
                        flops[baseline] / flops[name]) for name in models]


def build_variants(model: nn.Module, methods: Sequence[str], pool_k, explicit: bool) -> Dict[str, nn.Module]:
    """The uncompressed model and one patched copy per method; with ``explicit`` also the same pairs
    running attention that materialises the N×N matrix."""
    variants = {"none": model}
    for method in methods:
        variants[method] = apply_patch(copy.deepcopy(model), method, pool_k)
    if explicit:
        plain = copy.deepcopy(model)
        for block in plain.blocks:
            block.attn.fused_attn = False
        variants["none/explicit"] = plain
        for method in methods:
            variants[f"{method}/explicit"] = apply_patch(copy.deepcopy(model), method, pool_k, fused_attn=False)
    return variants


def main(argv: Optional[Sequence[str]] = None) -> None:
    import timm

    from . import models as _registered  # noqa: F401  (the project's small ViTs, by name)

    parser = argparse.ArgumentParser(description="Throughput of token compression methods vs the plain ViT.")
    parser.add_argument("--arch", default="vit_small_patch16_224", help="timm model name")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--methods", default="tk_n", help=f"comma list from: {', '.join(METHOD_NAMES[1:])}")
    parser.add_argument("--pool_k", type=int, default=10, help="tokens removed per block")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds (median reported)")
    parser.add_argument("--explicit", action="store_true", help="also time attention that materialises N×N")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="autocast dtype (float32: no autocast)")
    args = parser.parse_args(argv)

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHOD_NAMES:
            parser.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHOD_NAMES)}")
    device = torch.device(args.device)
    model = timm.create_model(args.arch, img_size=args.img_size).to(device).eval()
    inputs = torch.randn(args.batch_size, model.patch_embed.proj.in_channels, args.img_size, args.img_size,
                         device=device)
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    variants = build_variants(model, methods, args.pool_k, args.explicit)
    groups = [("none", [v for v in variants if "/" not in v])]
    if args.explicit:
        groups.append(("none/explicit", [v for v in variants if v.endswith("/explicit")]))
    print(f"{args.arch} @ {args.img_size}px, batch {args.batch_size}, {device}, {args.dtype}, "
          f"pool_k={args.pool_k}, threads={torch.get_num_threads()}, {args.rounds} rounds")
    print(f"{'variant':<18} {'img/s':>9} {'GFLOPs':>8} {'speedup':>8} {'ideal':>7} {'of ideal':>9}")
    for baseline, names in groups:
        for r in compare_speed({n: variants[n] for n in names}, inputs, baseline, rounds=args.rounds,
                               autocast_dtype=dtype):
            print(f"{r.name:<18} {r.images_per_s:9.1f} {r.gflops:8.3f} {r.speedup:8.3f} "
                  f"{r.ideal_speedup:7.3f} {r.efficiency:9.3f}")


if __name__ == "__main__":
    main()
