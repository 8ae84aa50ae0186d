"""Export a token-compressed ViT to ONNX, check it in onnxruntime, and time it against the plain model.

    python tools/export_onnx.py --arch vit_small_patch16_224 --model tk_n --reduce_token 10 --out tk_n.onnx
    python tools/export_onnx.py --checkpoint output/latest/best.pt --out model.onnx   # method, arch from main.py's settings

The token schedule is fixed (``--reduce_token``: one int, or one value per block), so every tensor
shape in the graph is static except the batch dimension, which stays dynamic (input ``images``
(batch, C, H, W), output ``logits`` (batch, classes)). After writing the file the command

1. runs it in onnxruntime (CPU) on random inputs at batch 1 and ``--batch_size`` and compares the
   logits with PyTorch's (exit 1 if any differs by more than 1e-4);
2. exports the uncompressed model of the same arch and weights to a temporary file and times both in
   onnxruntime in interleaved rounds: measured speedup, and the ideal one (the ratio of analytic FLOPs).

Bad input is one line ``export_onnx.py: error: ...`` on stderr and exit 2.
"""
import argparse
import contextlib
import copy
import io
import os
import re
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # ``python tools/export_onnx.py`` puts tools/ first on the path, not the repo
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine import model as engine_model  # noqa: E402
from engine import zoo  # noqa: E402
from engine.checkpoint import load_weights  # noqa: E402
from engine.errors import CLIError, report_error  # noqa: E402
from engine.model import tokens_per_block, unmet_reductions  # noqa: E402
from engine.options import ArgumentParser, dests, int_at_least, reduce_token_type  # noqa: E402
from engine.report import unmet_warning  # noqa: E402
from pruning import METHOD_NAMES, get_method  # noqa: E402
from pruning.benchmark import time_interleaved  # noqa: E402
from pruning.flops import analytic_flops  # noqa: E402
from pruning.patch.layers import MaskRefused  # noqa: E402

PROG = "export_onnx.py"
TOLERANCE = 1e-4  # max |logit difference| between onnxruntime and PyTorch
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportFailed(Exception):
    """The model was built but could not be exported or does not run the same in onnxruntime (exit 1)."""

    exit_code = 1


# ----------------------------------------------------------------------------------------------
# building the model

def peek_checkpoint(path: str) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, Any]]:
    """(tensor shapes, main.py settings) of a weights file, without loading it into a model.

    Only used to choose num_classes, in_chans and the defaults a main.py checkpoint records; a file
    that cannot be read gives nothing here and is reported by ``load_weights``.
    """
    if not os.path.isfile(path):
        raise CLIError(f"--checkpoint: {path} not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, {}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return {}, {}
    settings = dests(obj["settings"]) if isinstance(obj, dict) and isinstance(obj.get("settings"), dict) else {}
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        return {}, settings
    shapes = {k.removeprefix("module.").removeprefix("_orig_mod."): tuple(v.shape)
              for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return shapes, settings


def resolve_options(args: argparse.Namespace) -> None:
    """Fill arch, method, schedule, sizes from the checkpoint where the command line leaves them open."""
    shapes, settings = peek_checkpoint(args.checkpoint) if args.checkpoint else ({}, {})
    for option in ("arch", "method", "schedule", "reduce_at", "img_size", "patch_size"):
        if getattr(args, option) is None and settings.get(option) is not None:
            setattr(args, option, settings[option])
    for option, flag in (("arch", "--arch"), ("method", "--model"), ("schedule", "--reduce_token")):
        if getattr(args, option) is None:
            raise CLIError(f"{flag} is required (it can only be taken from a checkpoint written by main.py)")
    if args.method not in METHOD_NAMES:
        raise CLIError(f"--model: unknown method {args.method!r}; choose from {', '.join(METHOD_NAMES)}")
    refuse_stochastic(args.method, "--model")
    head, embed = shapes.get("head.weight"), shapes.get("patch_embed.proj.weight")
    for option, found in (("num_classes", head[0] if head else None), ("in_chans", embed[1] if embed else None)):
        given = getattr(args, option)
        if found is not None and given is not None and given != found:
            raise CLIError(f"--{option} {given}: the checkpoint {args.checkpoint} has {found}; drop --{option}")
        setattr(args, option, given if given is not None else found)


def refuse_stochastic(method: str, option: str) -> None:
    """A method that draws its kept tokens at random on every forward cannot become a deterministic graph."""
    if get_method(method).stochastic:
        raise CLIError(f"{option} {method}: not exported to ONNX: it draws a fresh random kept set on every forward "
                       f"from torch's generator, which an ONNX graph cannot reproduce (it would freeze one draw or "
                       f"use onnxruntime's own random stream)")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The uncompressed model of ``--arch`` as main.py builds it (a timm model, or a transformers / OpenCLIP one
    inside the engine's wrapper: images in, logits or its pooled feature out) with the ``--checkpoint`` weights
    (random without one)."""
    model = engine_model.create_model(args.arch, args.num_classes, args.in_chans, img_size=args.img_size,
                                      patch_size=args.patch_size)
    if args.checkpoint:
        load_weights(model, args.checkpoint, new_head_ok=False)
    engine_model.check_schedule_length(args.schedule, zoo.backbone_of(model).shape.depth, args.arch)
    return model.eval()


def model_flops(model: torch.nn.Module) -> float:
    """Analytic FLOPs per image of the model as patched (its patched module's, and a head the wrapper adds)."""
    backbone = zoo.backbone_of(model)
    return analytic_flops(backbone.module, head=backbone.head)


def compress(model: torch.nn.Module, method: str, schedule, reduce_at: Optional[str]) -> torch.nn.Module:
    """A compressed copy of ``model`` (the original stays uncompressed), as main.py compresses."""
    settings = argparse.Namespace(method=method, schedule=schedule, reduce_at=reduce_at, prop_attn="on")
    return engine_model.compress(copy.deepcopy(model), settings).eval()


def input_shape(model: torch.nn.Module) -> Tuple[int, int, int]:
    backbone = zoo.backbone_of(model)
    return backbone.in_chans, backbone.img_size, backbone.img_size


# ----------------------------------------------------------------------------------------------
# export and onnxruntime

def export_onnx(model: torch.nn.Module, path: str, optimize: bool = True) -> None:
    """``torch.onnx.export`` (dynamo) with a dynamic batch dimension, weights inside the one file.

    The example batch is 2: exporting at batch 1 would let torch.export specialise the batch size.
    The exporter's progress lines are kept quiet; on failure ``ExportFailed`` carries the first line.
    A copy is traced: tracing leaves its placeholder tensors in a compressed model's per-forward state (ToMe's
    token sizes), which a deep copy or a training step of the caller's model could not use.
    """
    model = copy.deepcopy(model)
    example = torch.randn(2, *input_shape(model))
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), path, dynamo=True, external_data=False, optimize=optimize,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as err:
        raise ExportFailed(export_failure(err)) from None


def export_failure(err: BaseException) -> str:
    """One line saying why the export failed: the exporter's step, and the exception that started it (the
    exporter wraps it), which names the limit met."""
    root = err
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    if isinstance(root, MaskRefused):
        return ("torch.onnx.export failed: while torch.export traces, transformers builds an explicit attention "
                "mask (it cannot skip an all-allow mask without reading its values), and a compressing layer "
                "refuses masks (token compression changes the token set): this model does not export compressed")
    first = lambda e: re.sub(r"\x1b\[[0-9;]*m| Next steps:.*", "", (str(e).strip().splitlines() or [""])[0])  # noqa
    cause = "" if root is err else f"; cause: {type(root).__name__}: {first(root)}"
    return f"torch.onnx.export failed: {type(err).__name__}: {first(err)}{cause}"[:600]


def ort_session(path: str, threads: int = 0):
    """An onnxruntime CPU session with all graph optimisations; ``threads`` 0 = onnxruntime's default."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # threads busy-wait for the next operation during a run (waking a sleeping thread costs more than a small
    # operation's work: 10 % of a two-thread ViT-S forward), and stop at its end: between runs, spinning threads
    # would steal the cores the next call needs (another session's, PyTorch's, another process's)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def exported_session(model: torch.nn.Module, path: str, threads: int = 0):
    """An onnxruntime session of ``model`` exported to ``path``; a file already there is reused, not exported again
    (the benchmarks export each model once and open a session per thread count)."""
    if not os.path.exists(path):
        export_onnx(model, path)
    return ort_session(path, threads)


def ort_run(session, images: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


@torch.inference_mode()
def max_difference(model: torch.nn.Module, session, batch_sizes: Sequence[int], seed: int = 0) -> float:
    """Largest |logit difference| between PyTorch and onnxruntime over random inputs of each batch size."""
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batch_sizes:
        images = torch.randn(batch, *input_shape(model), generator=generator)
        expected = model(images).numpy()
        got = ort_run(session, images.numpy())
        if got.shape != expected.shape:
            raise ExportFailed(f"onnxruntime gives logits of shape {got.shape} at batch {batch}, PyTorch "
                               f"{expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


# ----------------------------------------------------------------------------------------------
# command line

def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", metavar="NAME", default=None,
                        help="timm model name, hf:FOLDER_OR_HUB_ID or open_clip:NAME, as main.py's --arch "
                             "(default: the checkpoint's, for a main.py checkpoint)")
    parser.add_argument("--checkpoint", metavar="FILE", default=None,
                        help="timm .pth/.safetensors or main.py checkpoint (default: random weights)")
    parser.add_argument("--model", dest="method", metavar="METHOD", default=None,
                        help=f"compression method: {', '.join(METHOD_NAMES)} (default: the checkpoint's)")
    parser.add_argument("--reduce_token", dest="schedule", metavar="K", type=reduce_token_type, default=None,
                        help="tokens removed per block: an int, or a comma list with one value per block")
    parser.add_argument("--reduce_at", default=None, choices=("block", "attn"),
                        help="where each block reduces (default: the method's own)")
    parser.add_argument("--img_size", metavar="PX", type=int_at_least(1), default=None)
    parser.add_argument("--patch_size", metavar="PX", type=int_at_least(1), default=None)
    parser.add_argument("--num_classes", metavar="N", type=int, default=None,
                        help="classes of the head (default: the checkpoint's, else the arch's)")
    parser.add_argument("--in_chans", metavar="N", type=int_at_least(1), default=None,
                        help="image channels (default: the checkpoint's, else the arch's)")
    parser.add_argument("--out", metavar="FILE.onnx", required=True)
    parser.add_argument("--batch_size", metavar="N", type=int_at_least(1), default=8,
                        help="batch of the check and of the timing (the check also runs batch 1) (default: 8)")
    parser.add_argument("--rounds", metavar="N", type=int, default=10,
                        help="interleaved timing rounds; 0 skips the timing (default: 10)")
    parser.add_argument("--threads", metavar="N", type=int, default=0,
                        help="onnxruntime and torch threads (default: 0, their defaults)")
    parser.add_argument("--seed", type=int, default=0, help="random weights (without --checkpoint) and inputs")
    return parser


def run(args: argparse.Namespace) -> Dict[str, Any]:
    resolve_options(args)
    if args.num_classes is not None and args.num_classes < 0:
        raise CLIError(f"--num_classes: must be >= 0, got {args.num_classes}")
    if not args.out.endswith(".onnx"):
        raise CLIError(f"--out: {args.out} should end with .onnx")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise CLIError(f"--out: the folder {out_dir} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    plain = build_model(args)
    model = compress(plain, args.method, args.schedule, args.reduce_at)
    unmet = unmet_reductions(model)
    if unmet:
        print(unmet_warning(args.method, args.schedule, unmet, tokens_per_block(model), prog=PROG),
              file=sys.stderr, flush=True)

    export_onnx(model, args.out)
    session = ort_session(args.out, args.threads)
    diff = max_difference(model, session, sorted({1, args.batch_size}), seed=args.seed)
    if not diff <= TOLERANCE:
        raise ExportFailed(f"onnxruntime differs from PyTorch by max |Δ| {diff:.2e} > {TOLERANCE:g} in the logits "
                           f"of {args.out}")
    flops, plain_flops = model_flops(model), model_flops(plain)
    print(f"wrote {args.out}: {args.arch} {args.method} schedule {args.schedule}, input {INPUT_NAME} "
          f"(batch, {', '.join(map(str, input_shape(model)))}), {flops / 1e9:.3f} GFLOPs per image "
          f"(uncompressed {plain_flops / 1e9:.3f})")
    print(f"onnxruntime matches PyTorch (max |Δ| {diff:.1e})")
    result: Dict[str, Any] = {"max_abs_diff": diff, "gflops": flops / 1e9, "ideal_speedup": plain_flops / flops}
    if args.rounds > 0:
        with tempfile.TemporaryDirectory() as tmp:
            plain_path = os.path.join(tmp, "uncompressed.onnx")
            export_onnx(plain, plain_path)
            sessions = {"uncompressed": ort_session(plain_path, args.threads), "compressed": session}
            images = np.random.default_rng(args.seed).standard_normal(
                (args.batch_size, *input_shape(model))).astype(np.float32)
            times = time_interleaved({name: (lambda s=s: ort_run(s, images)) for name, s in sessions.items()},
                                     args.rounds)
        median = {name: statistics.median(t) for name, t in times.items()}
        speedup = median["uncompressed"] / median["compressed"]
        result.update(speedup=speedup, ms={k: v * 1e3 for k, v in median.items()})
        print(f"onnxruntime CPU, batch {args.batch_size}, {args.rounds} interleaved rounds (median): "
              f"{median['compressed'] * 1e3:.2f} ms vs {median['uncompressed'] * 1e3:.2f} ms uncompressed: "
              f"speedup {speedup:.2f}x measured, {plain_flops / flops:.2f}x ideal (FLOPs ratio), "
              f"{speedup / (plain_flops / flops):.2f} of ideal")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run(build_parser().parse_args(argv))
    except (CLIError, ExportFailed) as err:
        return report_error(PROG, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
