"""What a run measures of its final model: FLOPs (torch.utils.flop_counter, with the fused CPU
attention kernel it lacks), thop's MACs, parameters, and the throughput timed by
``pruning.benchmark.measure_throughput`` (of compiled models with ``--compile``)."""
import contextlib
import copy
import sys
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from pruning.benchmark import measure_throughput
from pruning.flops import analytic_flops

from .errors import CLIError, one_line
from .zoo import backbone_of


@dataclass(frozen=True)
class Bench:
    """How throughput is timed (``--bench_*``, ``--amp``, ``--compile``)."""
    batch_size: int  # images per timed forward
    warmup: int  # untimed forwards first
    steps: int  # timed forwards; the median is reported
    dtype: Optional[torch.dtype] = None  # autocast dtype, None: float32
    compile: bool = False  # time torch.compile'd models


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# The fused CPU attention kernel is missing from flop_counter's table and would count zero.
FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


@torch.inference_mode()
def count_gflops(model: nn.Module, input_shape: Sequence[int], device: torch.device) -> float:
    """Forward GFLOPs per image counted by torch.utils.flop_counter (a multiply-add counts 2)."""
    model.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's fused inference kernel (an OpenCLIP block that reduces nothing) is missing from
    # flop_counter's table too: counted on its unfused path (linear, scaled_dot_product_attention, linear)
    torch.backends.mha.set_fastpath_enabled(False)
    # flop_counter's module tracker hooks the gradients of module inputs that require them, which fails
    # without autograd when a module's input is a parameter (timm's attention-pool head expands its latent
    # query): the parameters are counted as constants
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for parameter in trainable:
            parameter.requires_grad_(True)
    return counter.get_total_flops() / 1e9


def count_gmacs_thop(model: nn.Module, input_shape: Sequence[int], device: torch.device) -> float:
    """Forward GMACs per image as thop counts them (module hooks: the attention products are not counted)."""
    with warnings.catch_warnings():  # thop's own use of distutils
        warnings.simplefilter("ignore", DeprecationWarning)
        from thop import profile

    model = copy.deepcopy(model).eval()  # thop adds buffers to the modules it profiles
    with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr):
        macs, _ = profile(model, inputs=(torch.zeros(1, *input_shape, device=device),), verbose=False)
    return float(macs) / 1e9


def compile_for_inference(model: nn.Module, images: torch.Tensor, dtype: Optional[torch.dtype]) -> nn.Module:
    """``torch.compile(model)``, compiled now (one forward as measure_throughput runs it), so that no
    timed forward includes the compilation."""
    compiled = torch.compile(model)
    compiled.eval()
    try:
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            compiled(images)
    except Exception as err:
        raise CLIError(f"--compile: torch.compile failed ({one_line(err, named=True, limit=300)}); run without "
                       f"--compile") from None
    return compiled


def measure(model: nn.Module, baseline: Optional[nn.Module], input_shape: Sequence[int], device: torch.device,
            bench: Bench) -> Dict[str, Optional[float]]:
    """Throughput and FLOPs of the final model; with a baseline (``--benchmark``) of both, in the same run.

    With ``bench.compile`` the timed models are compiled; FLOPs are counted on the plain modules.
    """
    gflops = count_gflops(model, input_shape, device)
    backbone = backbone_of(model)
    analytic = analytic_flops(backbone.module, head=backbone.head) / 1e9
    if abs(gflops - analytic) > 0.05 * analytic:
        print(f"warning: flop_counter counts {gflops:.4g} GFLOPs, the analytic count is {analytic:.4g}",
              file=sys.stderr)
    timed = {"model": model} if baseline is None else {"model": model, "baseline": baseline.to(device)}
    images = torch.randn(bench.batch_size, *input_shape, device=device)
    if bench.compile:
        timed = {name: compile_for_inference(module, images, bench.dtype) for name, module in timed.items()}
    throughput = measure_throughput(timed, images, bench.warmup, bench.steps, bench.dtype)
    figures = dict(throughput=throughput["model"], gflops=gflops, analytic_gflops=analytic,
                   gmacs_thop=count_gmacs_thop(model, input_shape, device),
                   params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    if baseline is not None:
        figures.update(baseline_throughput=throughput["baseline"], speedup=throughput["model"] / throughput["baseline"],
                       baseline_gflops=count_gflops(baseline, input_shape, device))
    return figures
