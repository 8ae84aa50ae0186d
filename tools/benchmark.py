"""Throughput of token compression methods against the plain ViT, measured in one run.

    python tools/benchmark.py --arch vit_small_patch16_224 --batch_size 32 --methods tk_n --pool_k 10
    python tools/benchmark.py --arch hf:path/to/saved_vit --pool_k 10        # a transformers model folder
    python tools/benchmark.py --arch open_clip:ViT-B-32 --pool_k 10          # an OpenCLIP model (random weights)

``--arch`` takes what main.py's does (``engine/zoo.py``): a timm name, ``hf:FOLDER_OR_HUB_ID``,
``open_clip:NAME`` or ``open_clip:local-dir:FOLDER``; weights are random (speed does not depend on them). Every
family is timed as main.py runs it: images in (a transformers or OpenCLIP model inside the engine's wrapper, which
hands them over as the model takes them, e.g. SigLIP 2's patchified inputs), the module the library patches
compressed (OpenCLIP's image tower; a transformers model itself), its pooled feature out. The model is timed at
its own input size and channels (``vit_pico_patch4_28``: 1 x 28 x 28) unless ``--img_size`` says otherwise
(timm only: the other families run at their own size). Variants are timed in
interleaved rounds so that drift in the machine's speed hits all of them alike (``pruning.benchmark``); each
figure is the median over rounds, and the ideal speedup is the ratio of analytic FLOPs. Bad input ends as one line on stderr
(``benchmark.py: error: ...``) and exit code 2.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ``python tools/benchmark.py`` puts tools/ first on the path, not the repo
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine import model as engine_model  # noqa: E402
from engine import zoo  # noqa: E402
from engine.errors import CLIError, report_error  # noqa: E402
from engine.options import ArgumentParser, int_at_least, resolve_device  # noqa: E402
from pruning import METHOD_NAMES  # noqa: E402
from pruning.benchmark import build_variants, compare_speed  # noqa: E402
from pruning.flops import analytic_flops  # noqa: E402
from pruning.schedules import resolve_schedule  # noqa: E402

PROG = "benchmark.py"
DTYPES = ("float32", "float16", "bfloat16")


def _pool_k(text: str) -> Union[int, List[int]]:
    """One int for every block, or a comma list with one int per block."""
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise ValueError(text)
    return values[0] if len(values) == 1 else values


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Throughput of token compression methods vs the plain ViT.")
    parser.add_argument("--arch", default="vit_small_patch16_224",
                        help="timm VisionTransformer name (vit_pico_* included), hf:FOLDER_OR_HUB_ID or "
                             "open_clip:NAME / open_clip:local-dir:FOLDER (default: %(default)s)")
    parser.add_argument("--img_size", type=int_at_least(1), default=None,
                        help="input height and width in pixels (default: the model's own input size)")
    parser.add_argument("--batch_size", type=int_at_least(1), default=32,
                        help="images per forward (default: %(default)s)")
    parser.add_argument("--methods", default="tk_n",
                        help=f"comma list from: {', '.join(METHOD_NAMES[1:])} (default: %(default)s)")
    parser.add_argument("--pool_k", type=_pool_k, default=10,
                        help="tokens removed per block: an int, or a comma list with one per block "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int_at_least(1), default=7,
                        help="interleaved timed rounds, the median reported (default: %(default)s)")
    parser.add_argument("--explicit", action="store_true",
                        help="also time attention that materialises the N×N matrix (default: off)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or "
                                                       "cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="autocast dtype; float32 runs without autocast (default: %(default)s)")
    return parser


def parse_methods(text: str) -> List[str]:
    """The method names of ``--methods``; CLIError naming the option for an unknown one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise CLIError("--methods: give at least one method")
    for name in names:
        if name not in METHOD_NAMES:
            raise CLIError(f"--methods: unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    return names


def create_model(arch: str, img_size: Optional[int] = None) -> torch.nn.Module:
    """The model ``arch`` as main.py builds it (at ``img_size`` if given, else at its own size), in eval mode,
    random weights: a timm model, or the engine's wrapper (images in, pooled feature out, no head added) of a
    transformers or OpenCLIP one (``hf:``, ``open_clip:``, a model folder)."""
    return engine_model.create_model(arch, None, None, img_size=img_size).eval()


def input_shape(model: torch.nn.Module) -> Tuple[int, int, int]:
    """(channels, height, width) the model was built for."""
    backbone = zoo.backbone_of(model)
    return backbone.in_chans, backbone.img_size, backbone.img_size


def benchmark_inputs(model: torch.nn.Module, batch_size: int, device: torch.device) -> torch.Tensor:
    """A random batch of the model's own input shape."""
    return torch.randn(batch_size, *input_shape(model), device=device)


def variants_of(model: torch.nn.Module, names: Sequence[str], pool_k, explicit: bool) -> dict:
    """``pruning.benchmark.build_variants`` of the module the library patches, each inside the model's wrapper
    (a timm model is its own)."""
    module = zoo.backbone_of(model).module
    variants = build_variants(module, names, pool_k, explicit)
    if module is model:
        return variants
    return {name: model.with_backbone(variant) for name, variant in variants.items()}


def flops_of(model: torch.nn.Module) -> float:
    """Analytic FLOPs per image of a variant: its patched module's (``pruning.flops``)."""
    backbone = zoo.backbone_of(model)
    return analytic_flops(backbone.module, head=backbone.head)


def run(args: argparse.Namespace) -> None:
    names = parse_methods(args.methods)
    device = resolve_device(args.device)
    model = create_model(args.arch, args.img_size).to(device)
    shape = zoo.backbone_of(model).shape
    try:
        resolve_schedule(args.pool_k, shape.depth)
        variants = variants_of(model, names, args.pool_k, args.explicit)
    except ValueError as err:  # the library names the argument: pool_k, select_method or model
        message = str(err)
        if message.startswith("select_method: "):  # the tool's name for the method is --methods
            message = f"methods: {message[len('select_method: '):]}"
        if message.startswith("model: "):
            message = f"arch {args.arch}: {message[len('model: '):]}"
        raise CLIError(f"--{message}") from None
    inputs = benchmark_inputs(model, args.batch_size, device)
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    groups = [("none", [v for v in variants if "/" not in v])]
    if args.explicit:
        groups.append(("none/explicit", [v for v in variants if v.endswith("/explicit")]))
    channels, height, width = input_shape(model)
    print(f"{args.arch} @ {height}x{width} px, {channels} channel(s), {shape.num_tokens} tokens, "
          f"batch {args.batch_size}, {device}, {args.dtype}, pool_k={args.pool_k}, "
          f"threads={torch.get_num_threads()}, {args.rounds} rounds")
    print(f"{'variant':<18} {'img/s':>9} {'GFLOPs':>8} {'speedup':>8} {'ideal':>7} {'of ideal':>9}")
    for baseline, group in groups:
        for result in compare_speed({n: variants[n] for n in group}, inputs, baseline, rounds=args.rounds,
                                    autocast_dtype=dtype, flops_of=flops_of):
            print(f"{result.name:<18} {result.images_per_s:9.1f} {result.gflops:8.3f} {result.speedup:8.3f} "
                  f"{result.ideal_speedup:7.3f} {result.efficiency:9.3f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: bad input ends as one line on stderr and exit code 2, never a traceback."""
    try:
        run(build_parser().parse_args(argv))
    except CLIError as err:
        return report_error(PROG, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
