"""What one block's token reduction costs at batch 1: in a loop of its own, and right after a transformer block,
as inside the model.

    python tools/reduction_probe.py --arch vit_small_patch16_224 --threads 1 --rounds 300

For each method, the library's reduction step (``pruning.core.compress.reduce_tokens``: scoring, selection,
gathering, fusing or ToMe's matching and merge) is timed on one block's tokens (batch 1, random values) right
after each of these untimed calls, in turn in every round:

    warm     the same step, so what it touches was touched last
    block    a forward of the model's first block on the same tokens, as inside the model
    matmul   the block's largest matrix product alone (its MLP's first linear layer on the block's tokens)
    sweep    one sum over a buffer of as many floats as the block has weights: as much data through the caches
             as the block, without a matrix product

Three more steps tell what is slowed: a one-element ``add`` (the cost of dispatching one operation), ten of them
in a row (whether every call pays that cost, or only the first) and a loop of plain Python with no torch in it
(whether code that shares nothing with torch is slowed too). Each condition's time over the warm one comes with
a 95 % bootstrap interval over the rounds. ``aten ops`` counts the operations the step dispatches. Random
weights and inputs: which tokens are kept does not change the step's operations.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import timm  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from engine.errors import CLIError, report_error  # noqa: E402
from engine.options import ArgumentParser  # noqa: E402
import pruning.models  # noqa: E402,F401  (registers the vit_pico_* models)
from pruning import METHOD_NAMES, METHODS  # noqa: E402
from pruning.core.compress import reduce_tokens  # noqa: E402
from pruning.core.state import CompressionConfig, CompressionState  # noqa: E402
from pruning.patch.timm import BLOCK_LAYOUT  # noqa: E402
from stats import bootstrap_ratio_of_medians  # noqa: E402

PROG = "reduction_probe.py"
AFTER = ("block", "matmul", "sweep")  # the untimed calls whose effect is measured, each against "warm"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_small_patch16_224", help="timm ViT name (default: %(default)s)")
    parser.add_argument("--methods", default="tk_n,evit,evit_n,tome", help="comma list (default: %(default)s)")
    parser.add_argument("--reduce_token", type=int, default=10, help="tokens the step removes (default: 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=300,
                        help="rounds, each timing every step under every condition (default: 300)")
    parser.add_argument("--json", metavar="OUT.json", default=None)
    parser.add_argument("--md", metavar="OUT.md", default=None, help="also write the markdown table here")
    return parser


def check(args: argparse.Namespace) -> None:
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    choices = ", ".join(n for n in METHOD_NAMES if METHODS[n].reduction != "none" and not METHODS[n].stochastic)
    for m in args.methods:
        if m not in METHOD_NAMES:
            raise CLIError(f"--methods: unknown method {m!r}; choose from {choices}")
        if METHODS[m].reduction == "none" or METHODS[m].stochastic:
            raise CLIError(f"--methods: {m!r} has no deterministic reduction step; choose from {choices}")
    if not args.methods:
        raise CLIError("--methods: name one or more methods")
    for option in ("reduce_token", "threads", "rounds"):
        if getattr(args, option) < 1:
            raise CLIError(f"--{option}: must be >= 1")
    if args.arch not in timm.list_models():
        raise CLIError(f"--arch: {args.arch!r} is not a timm model name; try vit_small_patch16_224")
    for option in ("json", "md"):
        path = getattr(args, option)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise CLIError(f"--{option}: the folder of {path} does not exist")


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def reduction_step(name: str, block: torch.nn.Module, x: torch.Tensor, k: int) -> Callable[[], Any]:
    """One block's reduction of ``x`` by method ``name``, with the inputs the patched block would give it: the
    class-token attention row and the keys averaged over heads, from the patched layer's own attention."""
    method = METHODS[name]
    _, cls_attn, mean_keys = BLOCK_LAYOUT.attention(block.attn, block.norm1(x), size=None, fused=True,
                                                    want_cls_attn=method.needs_cls_attention,
                                                    want_keys=method.reduction == "merge")
    cfg = CompressionConfig(method, [k], method.default_reduce_at, num_prefix_tokens=1)  # the class token

    def step() -> Any:
        cfg.state = CompressionState()  # a fresh forward's state: ToMe's sizes start at one patch a token
        return reduce_tokens(cfg, x, k, cls_attn, mean_keys)
    return step


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def cache_sweep(block: torch.nn.Module) -> Callable[[], Any]:
    """One sum over a buffer of as many floats as the block has weights: it streams as much data through the
    caches as the block's forward does, in one cheap operation."""
    buffer = torch.ones(sum(p.numel() for p in block.parameters()))
    return buffer.sum


def preceding_calls(block: torch.nn.Module, x: torch.Tensor) -> Dict[str, Callable[[], Any]]:
    """The untimed call of each condition but "warm", by name (``AFTER``)."""
    normed = block.norm2(x)
    return {"block": lambda: block(x), "matmul": lambda: block.mlp.fc1(normed), "sweep": cache_sweep(block)}


def python_loop() -> int:
    """Plain Python work that touches nothing of torch's."""
    return sum(i * i for i in range(100))


def measure(steps: Dict[str, Callable[[], Any]], before: Dict[str, Callable[[], Any]], rounds: int
            ) -> Dict[str, Dict[str, List[float]]]:
    """Seconds of each step right after each condition's call; in every round each step runs under every
    condition in turn, "warm" (right after itself) first."""
    before = {"warm": None, **before}
    times = {name: {c: [] for c in before} for name in steps}
    for step in steps.values():
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            for condition, call in before.items():
                (call or step)()
                times[name][condition].append(timed(step))
    return times


def probed_model(arch: str) -> torch.nn.Module:
    """The timm ViT whose first block the probe runs; CLIError for a model without one the step fits."""
    model = timm.create_model(arch, pretrained=False).eval()
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(getattr(blocks[0], "attn", None), "qkv") or model.num_prefix_tokens != 1:
        raise CLIError(f"--arch: {arch!r} is not a timm VisionTransformer with a class token and a packed qkv; "
                       "try vit_small_patch16_224")
    return model


def run(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, Any]:
    check(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = probed_model(args.arch)
    block = model.blocks[0]
    with torch.inference_mode():
        x = model._pos_embed(model.patch_embed(torch.randn(1, *model.default_cfg["input_size"])))
        one = torch.ones(1)
        steps = {"python loop": python_loop, "one add": lambda: one.add(1),
                 "ten adds": lambda: [one.add(1) for _ in range(10)]}
        steps.update({m: reduction_step(m, block, x, args.reduce_token) for m in args.methods})
        ops = {}
        for name, step in steps.items():
            with CountOps() as counter:
                step()
            ops[name] = counter.count
        start = time.perf_counter()
        times = measure(steps, preceding_calls(block, x), args.rounds)
        seconds = time.perf_counter() - start
    rows = []
    for name, by_condition in times.items():
        warm = by_condition["warm"]
        row = {"step": name, "aten_ops": ops[name], "warm_us": 1e6 * statistics.median(warm)}
        for condition in AFTER:
            ratio, low, high = bootstrap_ratio_of_medians(by_condition[condition], warm)
            row.update({f"after_{condition}_us": 1e6 * statistics.median(by_condition[condition]),
                        f"{condition}_ratio": ratio, f"{condition}_ratio_ci": [low, high]})
        rows.append(row)
    return {"settings": {"arch": args.arch, "tokens": x.shape[1], "reduce_token": args.reduce_token,
                         "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
                         "command": " ".join(["python", f"tools/{PROG}", *argv])},
            "seconds": seconds, "rows": rows}


def markdown(report: Dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"{s['arch']}, {s['tokens']} tokens, batch 1, {s['threads']} thread(s), {s['rounds']} rounds; "
             f"medians, [95 % interval]", "",
             "| step | aten ops | warm µs | after block µs | after matmul µs | after sweep µs | block / warm | "
             "matmul / warm | sweep / warm |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        times = " | ".join(f"{r[f'after_{c}_us']:.1f}" for c in AFTER)
        ratios = " | ".join(f"{r[f'{c}_ratio']:.2f} [{r[f'{c}_ratio_ci'][0]:.2f}, {r[f'{c}_ratio_ci'][1]:.2f}]"
                            for c in AFTER)
        lines.append(f"| {r['step']} | {r['aten_ops']} | {r['warm_us']:.1f} | {times} | {ratios} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        report = run(args, argv)
    except CLIError as err:
        return report_error(PROG, err)
    table = markdown(report)
    print(table, end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
