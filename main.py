"""Train, evaluate and benchmark token compression in timm Vision Transformers.

    python main.py                                   # ViT-Pico/2 on scikit-learn digits with tk_n
    python main.py --config configs/fashionmnist.yaml --model tk --reduce_token 4
    python main.py --eval_only --checkpoint output/best.pt --model tome --reduce_token 3
    python main.py --benchmark --arch vit_small_patch16_224 --reduce_token 10
    python main.py --resume output/last.pt           # continue an interrupted (Ctrl-C, SIGTERM) run
    torchrun --nproc_per_node 4 main.py --config configs/paper_cifar10.yaml   # DDP, one process per GPU

Options come from the defaults, then ``--config FILE.yaml``, then the command line (each overrides
the one before). Every run writes ``<output_dir>/results.json``; training runs also write the
checkpoints ``last.pt`` and ``best.pt``. ``python main.py --help`` lists every option and default.

In-process use (the sweep tool): ``run(parse_args([...]))`` returns the results dict.

The training loop is here; checkpoint files, torchrun processes, samplers and signal handling live
in ``engine/``.
"""
import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import socket
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm import tqdm

import data
import pruning.models  # noqa: F401  (registers the vit_pico_* models in timm's registry)
from engine import distributed
from engine.checkpoint import (append_line, check_free_space, checkpoint_bytes, first_line, load_weights,
                               prepare_output_dir, read_resume, rng_states, save_atomic, seed_everything,
                               set_rng_states, write_json_atomic, write_text_atomic)
from engine.distributed import Processes
from engine.errors import CLIError, Interrupted, TrainingDiverged
from engine.sampling import ResumableDistributedSampler, ResumableRandomSampler, ShardSampler
from engine.signals import StopSignal, ignore_stop_signals
from pruning import METHOD_NAMES
from pruning.benchmark import measure_throughput
from pruning.flops import analytic_flops
from pruning.patch import apply_patch, get_config, remove_patch

SMALL_MODEL_PARAMS = 5_000_000
DEFAULT_THREADS = torch.get_num_threads()  # PyTorch's own default: one per physical core
RESULT_KEYS = ("accuracy", "best_accuracy", "throughput", "gflops", "gmacs_thop", "params_m", "model",
               "reduce_token", "arch", "data_name", "epochs", "seed", "world_size", "baseline_throughput",
               "baseline_gflops", "speedup")
# Options that may differ when a run is resumed: where and how it runs, not what it computes.
RESUME_FREE = ("resume", "config", "output_dir", "device", "threads", "num_workers", "data_root", "visualize",
               "bench_batch_size", "bench_warmup", "bench_steps", "compile")
# results.json fields that are measured times, so differ between two runs of the same command
TIMING_KEYS = ("throughput", "baseline_throughput", "speedup")
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_LR = 1e6  # far beyond any useful rate; larger ones overflow float32 inside the optimiser


# ----------------------------------------------------------------------------------------------
# options

def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _float_at_least(minimum: float, strict: bool = False, maximum: float = math.inf):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum:g}, got {text}")
        return value
    return parse


def reduce_token_type(text: str) -> Union[int, List[int]]:
    """``10`` (every block) or ``0,2,2,2,2,2`` (one value per block)."""
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or a comma list of ints (one per block), got {text!r}") \
            from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"tokens removed per block must be >= 0, got {text!r}")
    return values if "," in str(text) else values[0]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`CLIError` instead of printing usage and exiting."""

    def error(self, message: str):
        raise CLIError(message)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="main.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train, evaluate and benchmark token compression in timm Vision Transformers.",
        epilog="Defaults < --config FILE.yaml < command line. With no options: ViT-Pico/2 on scikit-learn "
               "digits, tk_n removing 2 tokens per block, 30 epochs. Several GPUs: torchrun --nproc_per_node N "
               "main.py ... (--batch_size is per process).")
    bool_flag = dict(action=argparse.BooleanOptionalAction, default=False)

    group = parser.add_argument_group("compression")
    group.add_argument("--model", default="tk_n", choices=METHOD_NAMES, metavar="METHOD",
                       help=f"compression method: {', '.join(METHOD_NAMES)} (default: %(default)s)")
    group.add_argument("--reduce_token", type=reduce_token_type, default=2, metavar="K",
                       help="tokens removed per block: an int, or a comma list with one value per block "
                            "(default: %(default)s)")
    group.add_argument("--reduce_at", default=None, choices=("block", "attn"),
                       help="reduce after the whole block, or between attention and MLP (default: the "
                            "method's own: block; attn for tome)")

    group = parser.add_argument_group("model")
    group.add_argument("--arch", metavar="NAME", default=None,
                       help="timm ViT name, e.g. vit_small_patch16_224.augreg_in21k (default: per dataset: "
                            + ", ".join(f"{name} {spec.arch}" for name, spec in data.DATASETS.items()) + ")")
    group.add_argument("--img_size", metavar="PX", type=_int_at_least(1), default=None,
                       help="input size in pixels; images are resized to it (default: the arch's)")
    group.add_argument("--patch_size", metavar="PX", type=_int_at_least(1), default=None,
                       help="patch size (default: the arch's)")
    group.add_argument("--pretrained", **bool_flag, help="start from timm hub weights (needs the internet "
                                                         "or the Hugging Face cache) (default: off)")
    group.add_argument("--checkpoint", default=None, metavar="FILE",
                       help="weights to start from or to evaluate: timm .pth/.safetensors or a main.py "
                            "checkpoint; a classifier head of another size is left out for training, refused "
                            "by --eval_only (default: none)")

    group = parser.add_argument_group("data")
    group.add_argument("--data_name", default="digits", choices=tuple(data.DATASETS),
                       help=f"dataset: {', '.join(data.DATASETS)} (default: %(default)s)")
    group.add_argument("--data_root", metavar="DIR", default="data",
                       help="where datasets are read from and downloaded to; for folder: the folder with "
                            "train/<class>/ and val/<class>/ (default: %(default)s)")
    group.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                       help="download a torchvision dataset into --data_root when it is not there "
                            "(default: on)")
    group.add_argument("--augment", default=None, choices=data.AUGMENTATIONS,
                       help="training augmentation: paper (RandomResizedCrop, flip, RandAugment, "
                            "RandomErasing), light (random shift, flip), none (default: per dataset: none for "
                            "digits, where a one-pixel shift is half a patch; light for FashionMNIST; paper for "
                            "the others)")
    group.add_argument("--train_subset", type=_int_at_least(0), default=0, metavar="N",
                       help="train on a fixed random subset of N images, 0 = all (default: %(default)s)")
    group.add_argument("--test_subset", type=_int_at_least(0), default=0, metavar="N",
                       help="test on a fixed random subset of N images, 0 = all (default: %(default)s)")
    group.add_argument("--num_workers", metavar="N", type=_int_at_least(0), default=0,
                       help="data loading processes (default: %(default)s)")

    group = parser.add_argument_group("training")
    group.add_argument("--batch_size", metavar="N", type=_int_at_least(1), default=64, help="(default: %(default)s)")
    group.add_argument("--epochs", metavar="N", type=_int_at_least(1), default=30, help="(default: %(default)s)")
    group.add_argument("--lr", metavar="LR", type=_float_at_least(0.0, strict=True, maximum=MAX_LR), default=None,
                       help="AdamW peak learning rate, cosine decay per step (default: --lr_base * batch_size / 512)")
    group.add_argument("--lr_base", metavar="LR", type=_float_at_least(0.0, strict=True, maximum=MAX_LR),
                       default=None,
                       help="learning rate at batch size 512, scaled linearly to the batch size when --lr is "
                            "not given (default: per dataset: the seed's 5e-4 for CIFAR10, CIFAR100, STL10 and "
                            f"folder; {data.FROM_SCRATCH_LR_BASE:g} for digits and FashionMNIST, whose small "
                            "models train from scratch)")
    group.add_argument("--weight_decay", metavar="WD", type=_float_at_least(0.0), default=1e-4,
                       help="AdamW weight decay, not applied to norms, biases and embeddings "
                            "(default: %(default)s)")
    group.add_argument("--warmup_epochs", metavar="N", type=_float_at_least(0.0), default=2.0,
                       help="linear learning-rate warm-up (default: %(default)s)")
    group.add_argument("--seed", metavar="N", type=int, default=0, help="(default: %(default)s)")
    group.add_argument("--device", metavar="DEVICE", default="auto",
                       help="auto (cuda if there is one, else cpu), cpu, cuda, cuda:N (default: %(default)s)")
    group.add_argument("--threads", metavar="N", type=_int_at_least(0), default=0,
                       help="CPU threads for PyTorch; 0 = auto: 1 for models under 5 M parameters (their "
                            "matrices are too small to split, and spare cores stay free), else one per core "
                            "(default: %(default)s)")
    group.add_argument("--amp", **bool_flag, help="mixed precision (autocast): bf16 on CPU, --amp_dtype on CUDA "
                                                  "(default: off)")
    group.add_argument("--amp_dtype", default="auto", choices=("auto", "float16", "bfloat16"),
                       help="--amp's type: auto = float16 (with loss scaling) on CUDA, bfloat16 on CPU; bfloat16 "
                            "on CUDA needs no loss scaling (Ampere or newer) (default: %(default)s)")
    group.add_argument("--compile", **bool_flag, help="torch.compile the model for training, evaluation and the "
                                                      "throughput measurement (default: off)")

    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", metavar="DIR", default=None,
                       help="results.json, checkpoints and logs (default: output, or the folder of --resume)")
    group.add_argument("--config", default=None, metavar="FILE.yaml",
                       help="YAML file of options (keys as above, without --); the command line overrides it "
                            "(default: none)")
    group.add_argument("--resume", default=None, metavar="FILE",
                       help="continue an interrupted run from its last.pt, exactly, with its settings (default: none)")
    group.add_argument("--eval_only", **bool_flag, help="evaluate --checkpoint (or --pretrained) with the "
                                                        "chosen compression, no training (default: off)")
    group.add_argument("--benchmark", **bool_flag, help="no training: throughput and FLOPs of the chosen method "
                                                        "and of the uncompressed model (default: off)")
    group.add_argument("--visualize", type=_int_at_least(0), default=0, metavar="N",
                       help="write <output_dir>/visualization.png for the first N test images, 0 = off "
                            "(default: %(default)s)")

    group = parser.add_argument_group("throughput measurement")
    group.add_argument("--bench_batch_size", metavar="N", type=_int_at_least(1), default=None,
                       help="images per timed forward (default: --batch_size)")
    group.add_argument("--bench_warmup", metavar="N", type=_int_at_least(0), default=5,
                       help="untimed forwards first (default: %(default)s)")
    group.add_argument("--bench_steps", metavar="N", type=_int_at_least(1), default=20,
                       help="timed forwards; the median is reported (default: %(default)s)")
    return parser


def _config_tokens(parser: ArgumentParser, path: str) -> List[str]:
    """The options in a YAML file, as command-line tokens."""
    if not os.path.isfile(path):
        raise CLIError(f"--config: {path} not found")
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise CLIError(f"--config: {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise CLIError(f"--config: {path} must hold a mapping of option: value")
    actions = {action.dest: action for action in parser._actions}
    tokens: List[str] = []
    for key, value in config.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions or dest in ("help", "config"):
            raise CLIError(f"--config: {path}: unknown option {key!r}; see python main.py --help")
        if value is None:
            continue
        if isinstance(actions[dest], argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise CLIError(f"--config: {path}: {key} must be true or false, got {value!r}")
            tokens.append(f"--{dest}" if value else f"--no-{dest}")
        else:
            text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
            tokens += [f"--{dest}", text]
    try:
        parser.parse_args(tokens)
    except CLIError as err:
        raise CLIError(f"--config {path}: {err}") from None
    return tokens


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Options from the defaults, then ``--config``, then ``argv`` (default: sys.argv[1:])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    tokens = _config_tokens(parser, known.config) if known.config else []
    return parser.parse_args(tokens + argv)


# ----------------------------------------------------------------------------------------------
# model and checkpoints

def _hub_unreachable() -> Optional[str]:
    """Why the Hugging Face hub cannot be reached (its host name does not resolve), or None.

    Checked before timm tries, since the hub client retries for over a minute when offline.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false"):
        return None  # the user asked for the local cache
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"{host} cannot be reached ({err.strerror or err})"
    return None


def create_model(args: argparse.Namespace, num_classes: int, in_chans: int, pretrained: bool) -> VisionTransformer:
    """The timm model named by ``--arch`` for this dataset, optionally with hub weights."""
    name = args.arch
    if not timm.is_model(name.split(".")[0]):
        raise CLIError(f"--arch: {name!r} is not a timm model; list ViTs with "
                       f"python -c \"import timm; print(timm.list_models('vit_*'))\"")
    if pretrained and not any(n == name or n.startswith(name + ".") for n in timm.list_pretrained(name + "*")):
        raise CLIError(f"--pretrained: timm has no pretrained weights for --arch {name}; drop --pretrained, "
                       f"or load weights with --checkpoint FILE")
    if pretrained and (why := _hub_unreachable()):
        raise CLIError(f"--pretrained: cannot fetch the timm weights of {name}: {why}; fetch them once online "
                       f"(they stay in the Hugging Face cache; offline, set HF_HUB_OFFLINE=1 to use it), or pass a "
                       f"local weights file with --checkpoint FILE and drop --pretrained")
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans)
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    if args.patch_size is not None:
        kwargs["patch_size"] = args.patch_size
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise CLIError(f"--arch {name}: {first_line(err)}; --arch must be a timm VisionTransformer") from None
    except Exception as err:
        if not pretrained:
            raise
        raise CLIError(f"--pretrained: could not fetch the timm weights of {name} ({first_line(err)}); "
                       f"fetch them once online (they are kept in the Hugging Face cache), or pass a local "
                       f"weights file with --checkpoint FILE and drop --pretrained") from None
    if not isinstance(model, VisionTransformer):
        raise CLIError(f"--arch: {name} is a {type(model).__name__}; token compression needs a timm "
                       f"VisionTransformer (vit_*, deit_*)")
    img_size, patch_size = model.patch_embed.img_size, model.patch_embed.patch_size
    if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
        raise CLIError(f"--img_size {img_size[0]} is not a multiple of --patch_size {patch_size[0]}")
    return model


# ----------------------------------------------------------------------------------------------
# training and evaluation

def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate factor per step: linear warm-up, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def amp_dtype(device: torch.device, args: argparse.Namespace) -> Optional[torch.dtype]:
    """The autocast dtype of ``--amp``/``--amp_dtype`` on ``device``: None when --amp is off."""
    if not args.amp:
        return None
    if args.amp_dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return AMP_DTYPES[args.amp_dtype]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` (see :func:`amp_dtype`); a no-op when it is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@dataclasses.dataclass
class EpochProgress:
    """Running sums of one training epoch on this process. A ``last.pt`` written part-way through an
    epoch keeps them, so that the resumed epoch reports what the uninterrupted one would have."""
    step: int = 0  # steps finished in this epoch
    loss_sum: float = 0.0  # sum over the images seen of their loss
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0  # wall time of the epoch so far


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    device: torch.device, dtype: Optional[torch.dtype], desc: str, progress: EpochProgress,
                    stop: StopSignal, processes: Processes) -> bool:
    """Train on what ``loader`` yields (the rest of an epoch, when resumed part-way), adding to ``progress``.

    Returns True when a stop signal ended the epoch early, always after a finished step. Raises
    FloatingPointError when the loss is NaN or inf, before that step changes the weights. Under DDP
    the ranks agree on both after every forward pass, so they stop at the same step.
    """
    model.train()
    stopping = False
    bar = tqdm(loader, desc=desc, leave=False, disable=None if processes.is_main else True, dynamic_ncols=True,
               initial=progress.step, total=progress.step + len(loader))
    for images, targets in bar:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images)
            loss = F.cross_entropy(logits, targets)
        loss_value = loss.item()
        stopping, diverged = distributed.any_over_ranks([stop.requested, not math.isfinite(loss_value)],
                                                        processes, device)
        if diverged:
            where = f"{loss_value}" if not math.isfinite(loss_value) else "not finite on another process"
            raise FloatingPointError(f"the loss is {where} at step {progress.step + 1}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        progress.step += 1
        progress.loss_sum += loss_value * len(targets)
        progress.correct += (logits.argmax(dim=-1) == targets).sum().item()
        progress.seen += len(targets)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if stopping:
            break
    return stopping


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, dtype: Optional[torch.dtype],
             processes: Processes = distributed.SINGLE, desc: str = "test") -> Dict[str, float]:
    """Top-1 accuracy (%) and mean loss over the whole test set: under DDP each rank evaluates its
    shard (:class:`ShardSampler`) and the sums are added up, so every image counts exactly once."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=None if processes.is_main else True,
                                dynamic_ncols=True):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images)
        total_loss += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == targets).sum().item()
        seen += len(targets)
    total_loss, correct, seen = distributed.sum_over_ranks([total_loss, correct, seen], processes, device)
    return {"test_loss": total_loss / max(seen, 1), "test_acc": 100.0 * correct / max(seen, 1)}


# ----------------------------------------------------------------------------------------------
# measurements

def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# The fused CPU attention kernel is missing from flop_counter's table and would count zero.
FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


@torch.inference_mode()
def count_gflops(model: nn.Module, input_shape: Sequence[int], device: torch.device) -> float:
    """Forward GFLOPs per image counted by torch.utils.flop_counter (a multiply-add counts 2)."""
    model.eval()
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        model(torch.zeros(1, *input_shape, device=device))
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


# ----------------------------------------------------------------------------------------------
# the run

def resolve_device(name: str, processes: Processes = distributed.SINGLE) -> torch.device:
    """``--device``; under torchrun, each process's own GPU (its LOCAL_RANK)."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise CLIError(f"--device: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA device is available; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return distributed.device_for(processes, device, name)


def _restore_settings(args: argparse.Namespace, checkpoint: Dict[str, Any]) -> None:
    """Take the resumed run's settings (all but RESUME_FREE) and say which command-line values lose."""
    saved = checkpoint.get("settings")
    if not isinstance(saved, dict):
        raise CLIError(f"--resume: {args.resume} is not a checkpoint written by main.py (no settings)")
    defaults = build_parser()
    changed = [key for key, value in saved.items() if key not in RESUME_FREE and hasattr(args, key)
               and getattr(args, key) not in (value, defaults.get_default(key))]  # given, and lost
    for key, value in saved.items():
        if key not in RESUME_FREE and hasattr(args, key):
            setattr(args, key, value)
    if changed:
        print(f"resume: using the checkpoint's {', '.join(changed)} (a resumed run keeps its settings)")


def load_resume(args: argparse.Namespace, processes: Processes) -> Dict[str, Any]:
    """The ``--resume`` checkpoint, its settings taken into ``args``; the number of processes must match."""
    checkpoint = read_resume(args.resume)
    _restore_settings(args, checkpoint)
    trained_by = checkpoint.get("world_size", 1)
    if trained_by != processes.world_size:
        raise CLIError(f"--resume: {args.resume} was written by a run of {trained_by} process(es), this one has "
                       f"{processes.world_size}; resume with as many (torchrun --nproc_per_node, or python main.py "
                       f"for 1): the data order and the learning-rate schedule depend on it")
    return checkpoint


def check_options(args: argparse.Namespace) -> None:
    """Combinations of options that cannot work."""
    if args.resume and (args.eval_only or args.benchmark):
        raise CLIError("--resume continues training; to evaluate or benchmark a checkpoint use "
                       "--eval_only/--benchmark with --checkpoint FILE")
    if args.eval_only and not (args.checkpoint or args.pretrained):
        raise CLIError("--eval_only needs weights to evaluate: --checkpoint FILE (e.g. output/best.pt) or "
                       "--pretrained")
    if args.checkpoint and not args.resume and not os.path.isfile(args.checkpoint):
        raise CLIError(f"--checkpoint: {args.checkpoint} not found")
    if args.visualize and args.benchmark and not args.eval_only:
        raise CLIError("--visualize needs test images: use it when training or with --eval_only, not with "
                       "--benchmark alone")
    if args.visualize and importlib.util.find_spec("pruning.visualize") is None:
        raise CLIError("--visualize: pruning/visualize.py is not in this checkout yet; run without --visualize")


def check_amp(args: argparse.Namespace, device: torch.device) -> None:
    if args.amp and device.type == "cpu" and args.amp_dtype == "float16":
        raise CLIError("--amp_dtype float16: autocast on CPU runs bfloat16; use --amp_dtype bfloat16 (or auto), "
                       "or --device cuda")
    if args.amp and device.type == "cuda" and amp_dtype(device, args) == torch.bfloat16 \
            and not torch.cuda.is_bf16_supported():
        raise CLIError(f"--amp_dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16; use "
                       f"--amp_dtype float16 (or auto)")


def _summary(results: Dict[str, Any], extra: Dict[str, str]) -> str:
    """The end-of-run table."""
    def num(value: Optional[float], fmt: str, unit: str = "") -> str:
        return "-" if value is None else f"{value:{fmt}}{unit}"

    rows = [
        ("method", f"{results['model']} (reduce_token {results['reduce_token']}, at {extra['reduce_at']})"),
        ("arch", f"{results['arch']} ({extra['geometry']})"),
        ("data", f"{results['data_name']} ({extra['sizes']})"),
        ("epochs", str(results["epochs"])),
        ("accuracy", f"{num(results['accuracy'], '.2f', ' %')} (best {num(results['best_accuracy'], '.2f', ' %')})"),
        ("throughput", f"{num(results['throughput'], ',.0f', ' img/s')} ({extra['bench']})"),
        ("GFLOPs / image", f"{num(results['gflops'], '.4g')} (analytic {extra['analytic']})"),
        ("GMACs (thop)", num(results["gmacs_thop"], ".4g")),
        ("params", num(results["params_m"], ".3f", " M")),
    ]
    if results["speedup"] is not None:
        rows += [("baseline", f"{num(results['baseline_throughput'], ',.0f', ' img/s')}, "
                              f"{num(results['baseline_gflops'], '.4g')} GFLOPs (method none)"),
                 ("speedup", f"{results['speedup']:.3f}x (ideal by FLOPs {extra['ideal']})")]
    rows += [("time", extra["time"]), ("results", extra["results"])]
    width = max(len(name) for name, _ in rows)
    line = "-" * (width + 2 + max(len(value) for _, value in rows))
    return "\n".join(["Summary", line] + [f"{name:<{width}}  {value}" for name, value in rows] + [line])


def build_model(args: argparse.Namespace, num_classes: int, in_chans: int, resumed: bool) -> VisionTransformer:
    """The model of ``--arch`` with its starting weights (hub, ``--checkpoint``; none when resuming)."""
    model = create_model(args, num_classes, in_chans, pretrained=args.pretrained and not resumed)
    if args.checkpoint and not resumed:
        left_out = load_weights(model, args.checkpoint, new_head_ok=not args.eval_only)
        if left_out:
            print(f"--checkpoint: loaded all but {', '.join(left_out)} (another number of classes); the head "
                  f"starts from scratch for {num_classes} classes")
    if isinstance(args.reduce_token, list) and len(args.reduce_token) != len(model.blocks):
        raise CLIError(f"--reduce_token: {len(args.reduce_token)} values given, but --arch {args.arch} has "
                       f"{len(model.blocks)} blocks; give one value per block, or a single int")
    return model


def compress(model: VisionTransformer, args: argparse.Namespace, trace_source: bool = False) -> VisionTransformer:
    """Patch ``model`` in place with the method of ``--model``, ``--reduce_token`` and ``--reduce_at``."""
    try:
        return apply_patch(model, args.model, args.reduce_token, reduce_at=args.reduce_at, trace_source=trace_source)
    except ValueError as err:
        raise CLIError(f"--model {args.model} / --reduce_token / --reduce_at: {err}") from None


def _is_compile_error(err: BaseException) -> bool:
    return type(err).__module__.startswith(("torch._dynamo", "torch._inductor"))


def _interrupted(stop: StopSignal, when: str, args: argparse.Namespace, processes: Processes) -> Interrupted:
    """What a stop signal ends the run with, once last.pt is written."""
    signum = stop.signum or signal.SIGTERM  # None: the signal came to another rank
    launcher = "the same torchrun command with" if processes.enabled else "python main.py"
    return Interrupted(f"stopped by {signal.Signals(signum).name} {when}; last.pt holds that state; continue with "
                       f"{launcher} --resume {os.path.join(args.output_dir, 'last.pt')}", signum)


def _restore(checkpoint: Dict[str, Any], path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
             loader_generator: torch.Generator, processes: Processes) -> EpochProgress:
    """Put a ``--resume`` checkpoint's state back; returns the progress of the epoch it stopped in."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        own = checkpoint["ranks"][processes.rank] if "ranks" in checkpoint else checkpoint
        set_rng_states(own["rng"], loader_generator)
        progress = EpochProgress(**own["progress"]) if own.get("progress") else EpochProgress()
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        detail = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        raise CLIError(f"--resume: {path} does not fit the model, optimiser and data its settings describe "
                       f"({detail}); it was changed after main.py wrote it, or --data_root now holds another number "
                       f"of classes: resume with the data it was trained on") from None
    return progress


def fit(args: argparse.Namespace, model: nn.Module, train_model: nn.Module, eval_model: nn.Module,
        train_loader: DataLoader, test_loader: DataLoader, loader_generator: torch.Generator, device: torch.device,
        processes: Processes, resume: Optional[Dict[str, Any]], settings: Dict[str, Any],
        stop: StopSignal) -> List[Dict[str, float]]:
    """The training loop: AdamW, warm-up + cosine per step, evaluation and checkpoints after every epoch.

    ``model`` is the plain module (its state is what checkpoints hold); ``train_model`` the one that
    trains (compiled, wrapped in DDP) and ``eval_model`` the one that evaluates (compiled, not DDP).
    A SIGINT/SIGTERM caught by ``stop`` ends the run after the step in progress, ``last.pt`` holding that step.
    Returns the per-epoch history (the resumed run's earlier epochs included).
    """
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch))
    dtype = amp_dtype(device, args)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_epoch, best_accuracy, history, progress = 0, None, [], EpochProgress()
    if resume:
        progress = _restore(resume, args.resume, model, optimizer, scheduler, scaler, loader_generator, processes)
        start_epoch, best_accuracy, history = resume["epoch"], resume["best_accuracy"], list(resume["history"])
        where = f", step {progress.step} of epoch {start_epoch + 1}" if progress.step else ""
        print(f"resumed from {args.resume} after epoch {start_epoch}/{args.epochs}{where}")

    def save(epoch: int, loader_state: torch.Tensor, paths: Sequence[str]) -> None:
        """Checkpoint after ``epoch`` epochs and ``progress.step`` steps (every rank calls it)."""
        own = {"rng": dict(rng_states(loader_generator), loader=loader_state), "progress": dataclasses.asdict(progress)}
        ranks = distributed.gather(own, processes)
        checkpoint = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "step": progress.step, "best_accuracy": best_accuracy,
            "history": history, "rng": ranks[0]["rng"], "progress": ranks[0]["progress"], "settings": settings,
            "world_size": processes.world_size,
        }
        if processes.enabled:
            checkpoint["ranks"] = ranks

        def write() -> None:
            for path in paths:
                save_atomic(checkpoint, os.path.join(args.output_dir, path))
        distributed.on_main(write, processes)

    global_batch = f"{args.batch_size} x {processes.world_size} processes" if processes.enabled else args.batch_size
    print(f"training {args.epochs} epochs of {steps_per_epoch} steps, batch {global_batch}, AdamW lr "
          f"{args.lr:.3g}, weight decay {args.weight_decay}, warm-up {args.warmup_epochs:g} epochs", flush=True)
    for epoch in range(start_epoch, args.epochs):
        desc = f"epoch {epoch + 1}/{args.epochs}"
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        train_loader.sampler.skip = progress.step * args.batch_size  # resumed part-way: the steps not yet done
        loader_state = loader_generator.get_state()  # before this epoch's shuffle: a mid-epoch last.pt keeps it
        clock = time.time() - progress.seconds
        try:
            stopped = train_one_epoch(train_model, train_loader, optimizer, scheduler, scaler, device, dtype, desc,
                                      progress, stop, processes)
        except FloatingPointError as err:
            kept = "last.pt is left as it was (the last good state)" if epoch or resume else \
                "no checkpoint was written yet"
            amp = ", or drop --amp (float16 overflows; --amp_dtype bfloat16 has float32's range)" \
                if dtype == torch.float16 else (", or drop --amp" if dtype is not None else "")
            raise TrainingDiverged(f"training diverged: {err} of {steps_per_epoch} in epoch {epoch + 1}/"
                                   f"{args.epochs}; {kept}; lower --lr (now {args.lr:.3g}) or lengthen "
                                   f"--warmup_epochs{amp}") from None
        except Exception as err:
            if args.compile and _is_compile_error(err):
                raise CLIError(f"--compile: torch.compile failed ({first_line(err)[:300]}); run without "
                               f"--compile") from None
            raise
        progress.seconds = time.time() - clock
        if stopped:
            save(epoch, loader_state, ["last.pt"])
            raise _interrupted(stop, f"after step {progress.step} of {steps_per_epoch} in epoch {epoch + 1}/"
                                     f"{args.epochs}", args, processes)

        loss_sum, correct, seen = distributed.sum_over_ranks([progress.loss_sum, progress.correct, progress.seen],
                                                             processes, device)
        stats = {"train_loss": loss_sum / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1)}
        stats.update(evaluate(eval_model, test_loader, device, dtype, processes))
        stats.update(epoch=epoch + 1, lr=scheduler.get_last_lr()[0], time_s=time.time() - clock)
        history.append(stats)
        improved = best_accuracy is None or stats["test_acc"] > best_accuracy
        best_accuracy = stats["test_acc"] if improved else best_accuracy
        print(f"{desc}  train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.2f}%  "
              f"test loss {stats['test_loss']:.4f} acc {stats['test_acc']:.2f}%  "
              f"(best {best_accuracy:.2f}%)  {stats['time_s']:.1f}s", flush=True)

        progress = EpochProgress()
        save(epoch + 1, loader_generator.get_state(), ["last.pt", "best.pt"] if improved else ["last.pt"])
        if processes.is_main:
            append_line(json.dumps(stats), os.path.join(args.output_dir, "log.jsonl"))
        if distributed.any_over_ranks([stop.requested], processes, device)[0]:  # came during evaluation
            raise _interrupted(stop, f"after epoch {epoch + 1}/{args.epochs}", args, processes)
    return history


def compile_for_inference(model: nn.Module, images: torch.Tensor, dtype: Optional[torch.dtype]) -> nn.Module:
    """``torch.compile(model)``, compiled now (one forward as measure_throughput runs it), so that no
    timed forward includes the compilation."""
    compiled = torch.compile(model)
    compiled.eval()
    try:
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            compiled(images)
    except Exception as err:
        raise CLIError(f"--compile: torch.compile failed ({first_line(err)[:300]}); run without --compile") from None
    return compiled


def measure(args: argparse.Namespace, model: nn.Module, baseline: Optional[nn.Module],
            input_shape: Sequence[int], device: torch.device) -> Dict[str, Optional[float]]:
    """Throughput and FLOPs of the final model; with a baseline (``--benchmark``) of both, in the same run.

    With ``--compile`` the timed models are compiled; FLOPs are counted on the plain modules.
    """
    gflops = count_gflops(model, input_shape, device)
    analytic = analytic_flops(model) / 1e9
    if abs(gflops - analytic) > 0.05 * analytic:
        print(f"warning: flop_counter counts {gflops:.4g} GFLOPs, the analytic count is {analytic:.4g}",
              file=sys.stderr)
    timed = {"model": model} if baseline is None else {"model": model, "baseline": baseline.to(device)}
    images = torch.randn(args.bench_batch_size or args.batch_size, *input_shape, device=device)
    dtype = amp_dtype(device, args)
    if args.compile:
        timed = {name: compile_for_inference(module, images, dtype) for name, module in timed.items()}
    throughput = measure_throughput(timed, images, args.bench_warmup, args.bench_steps, dtype)
    figures = dict(throughput=throughput["model"], gflops=gflops, analytic_gflops=analytic,
                   gmacs_thop=count_gmacs_thop(model, input_shape, device),
                   params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    if baseline is not None:
        figures.update(baseline_throughput=throughput["baseline"], speedup=throughput["model"] / throughput["baseline"],
                       baseline_gflops=count_gflops(baseline, input_shape, device))
    return figures


def visualize(args: argparse.Namespace, model: VisionTransformer, splits: data.Splits, device: torch.device) -> str:
    """``<output_dir>/visualization.png``: what the compressed model keeps of the first N test images."""
    from pruning.visualize import save_token_grid  # written separately; imported only when asked for

    traced = compress(remove_patch(copy.deepcopy(model)), args, trace_source=True)
    images = torch.stack([splits.test[i][0] for i in range(min(args.visualize, len(splits.test)))]).to(device)
    return save_token_grid(traced, images, os.path.join(args.output_dir, "visualization.png"),
                           mean=splits.spec.mean, std=splits.spec.std)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train (or evaluate, or benchmark) as ``args`` say; returns what is written to results.json.

    Under torchrun every process calls it: rank 0 prints, measures and writes the files; the other
    ranks return the same accuracies with the measured fields None.
    """
    args = argparse.Namespace(**vars(args))
    processes = distributed.from_environment()
    with contextlib.ExitStack() as stack:
        if not processes.is_main:  # one log, from rank 0
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        resume = load_resume(args, processes) if args.resume else None
        check_options(args)
        device = resolve_device(args.device, processes)
        check_amp(args, device)
        if distributed.setup(processes, device):
            stack.callback(distributed.teardown)
        return _run(args, processes, device, resume)


def _run(args: argparse.Namespace, processes: Processes, device: torch.device,
         resume: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    started = time.time()
    training = not (args.eval_only or args.benchmark)
    args.output_dir = args.output_dir or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else "output")
    distributed.on_main(lambda: prepare_output_dir(args.output_dir), processes)
    seed_everything(args.seed)

    # data before the model, so a missing dataset is reported before weights are fetched; a benchmark
    # alone needs no images
    spec = data.DATASETS[args.data_name]
    splits = None
    if training or args.eval_only or spec.num_classes is None:
        splits = data.build_dataset(args.data_name, args.data_root, download=args.download,
                                    train_subset=args.train_subset, test_subset=args.test_subset)
    args.arch = args.arch or spec.arch
    model = build_model(args, splits.num_classes if splits else spec.num_classes, spec.in_chans, resume is not None)
    n_params = sum(p.numel() for p in model.parameters())
    torch.set_num_threads(args.threads or (1 if n_params < SMALL_MODEL_PARAMS else DEFAULT_THREADS))
    img_size, patch_size = model.patch_embed.img_size[0], model.patch_embed.patch_size[0]
    input_shape = (spec.in_chans, img_size, img_size)
    baseline = copy.deepcopy(model) if args.benchmark else None
    compress(model, args).to(device)
    if training:  # disk full: said now, not after the first epoch
        distributed.on_main(lambda: check_free_space(args.output_dir, checkpoint_bytes(model)), processes)

    # every setting resolved (arch, sizes, learning rate, placement), as checkpoints and config.yaml keep it
    args.img_size, args.patch_size, args.reduce_at = img_size, patch_size, get_config(model).reduce_at
    args.augment = args.augment or spec.augment
    args.lr_base = args.lr_base or spec.lr_base
    args.lr = args.lr or args.lr_base * args.batch_size * processes.world_size / 512  # the global batch
    settings = dict(sorted(vars(args).items()))
    if processes.is_main:
        write_text_atomic(yaml.safe_dump({k: v for k, v in settings.items() if k not in ("config", "resume")}),
                          os.path.join(args.output_dir, "config.yaml"))

    sizes = f"{len(splits.train)} train / {len(splits.test)} test" if splits else "no images needed"
    where = f"{processes.world_size} processes ({device.type})" if processes.enabled else str(device)
    print(f"{args.arch}: {n_params / 1e6:.3f} M params, {img_size} px, patch {patch_size}, {len(model.blocks)} "
          f"blocks | {args.model} removing {args.reduce_token} tokens per block at {args.reduce_at} | "
          f"{args.data_name}: {sizes} | {where}, {torch.get_num_threads()} threads")

    accuracy = best_accuracy = None
    if splits is not None:
        splits.set_transforms(img_size, args.augment)
        if processes.enabled:  # the same weights everywhere (DDP starts from rank 0's), other augmentations
            seed_everything(args.seed + processes.rank)
        loader_generator = torch.Generator().manual_seed(args.seed + processes.rank)
        loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.num_workers,
                             pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0,
                             worker_init_fn=ignore_stop_signals if args.num_workers > 0 else None)
        test_sampler = ShardSampler(len(splits.test), processes.rank, processes.world_size) \
            if processes.enabled else None
        test_loader = DataLoader(splits.test, sampler=test_sampler, shuffle=False, **loader_kwargs)
        eval_model = torch.compile(model) if args.compile else model
        if training:
            # from here on SIGINT/SIGTERM mean "stop after this step, with last.pt"; under torchrun every
            # rank has its handler before the DDP constructor synchronises them
            with StopSignal() as stop:
                if processes.enabled:
                    train_sampler = ResumableDistributedSampler(splits.train, processes.world_size, processes.rank,
                                                                shuffle=True, seed=args.seed)
                else:  # what DataLoader(shuffle=True, generator=...) builds, able to start an epoch part-way
                    train_sampler = ResumableRandomSampler(splits.train, generator=loader_generator)
                train_loader = DataLoader(splits.train, sampler=train_sampler, generator=loader_generator,
                                          drop_last=len(train_sampler) > args.batch_size, **loader_kwargs)
                train_model = eval_model
                if processes.enabled:
                    train_model = DistributedDataParallel(
                        train_model, device_ids=[device] if device.type == "cuda" else None)
                history = fit(args, model, train_model, eval_model, train_loader, test_loader, loader_generator,
                              device, processes, resume, settings, stop)
            accuracy, best_accuracy = history[-1]["test_acc"], max(h["test_acc"] for h in history)
        elif args.eval_only:
            accuracy = best_accuracy = evaluate(eval_model, test_loader, device, amp_dtype(device, args),
                                                processes)["test_acc"]
            print(f"eval: {args.model} on {args.data_name}: top-1 {accuracy:.2f}%")

    results: Dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    results.update(accuracy=accuracy, best_accuracy=best_accuracy, model=args.model, reduce_token=args.reduce_token,
                   arch=args.arch, data_name=args.data_name, epochs=args.epochs if training else 0, seed=args.seed,
                   world_size=processes.world_size)
    if not processes.is_main:  # rank 0 measures and writes; the others are done
        return results
    figures = measure(args, model, baseline, input_shape, device)
    results.update({k: v for k, v in figures.items() if k in results})
    results_path = os.path.join(args.output_dir, "results.json")
    write_json_atomic(results, results_path)
    if args.visualize:
        print(f"visualization: {visualize(args, model, splits, device)}")

    ideal = f"{figures['baseline_gflops'] / figures['gflops']:.3f}x" if baseline is not None else "-"
    amp = f", amp {amp_dtype(device, args)}".replace("torch.", "") if args.amp else ""
    print(_summary(results, {
        "reduce_at": args.reduce_at, "geometry": f"{img_size} px, patch {patch_size}, {len(model.blocks)} blocks",
        "sizes": sizes, "analytic": f"{figures['analytic_gflops']:.4g}", "ideal": ideal,
        "bench": f"batch {args.bench_batch_size or args.batch_size}, {device.type}{amp}"
                 f"{', compiled' if args.compile else ''}, median of {args.bench_steps}",
        "time": f"{time.time() - started:.1f} s", "results": results_path}), flush=True)
    return results


def _one_line(err: BaseException) -> str:
    """The message of ``err`` as one line; an error re-raised from a DataLoader worker carries the worker's
    traceback, of which the last line is the message."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return re.sub(r"^[\w.]+: ", "", lines[-1].strip())
    return " ".join(line.strip() for line in lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: bad input ends as one line on stderr and exit code 2, never a traceback;
    a diverged run exits with 3, one stopped by SIGINT/SIGTERM (after writing last.pt) with 128 + signal."""
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    tag = f"[rank {rank}] " if rank != "0" else ""  # under torchrun every process reports its own error
    try:
        run(parse_args(argv))
    except (CLIError, data.DataError) as err:
        print(f"main.py: error: {tag}{_one_line(err)}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except Interrupted as err:
        if not tag:  # every rank stops at the same step; one message is enough
            print(f"main.py: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"main.py: {tag}interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
