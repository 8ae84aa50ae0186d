"""Train, evaluate and benchmark token compression in timm Vision Transformers.

    python main.py                                   # ViT-Pico/2 on scikit-learn digits with tk_n
    python main.py --config configs/fashionmnist.yaml --model tk --reduce_token 4
    python main.py --eval_only --checkpoint output/best.pt --model tome --reduce_token 3
    python main.py --benchmark --arch vit_small_patch16_224 --reduce_token 10
    python main.py --resume output/last.pt           # continue an interrupted run

Options come from the defaults, then ``--config FILE.yaml``, then the command line (each overrides
the one before). Every run writes ``<output_dir>/results.json``; training runs also write the
checkpoints ``last.pt`` and ``best.pt``. ``python main.py --help`` lists every option and default.

In-process use (the sweep tool): ``run(parse_args([...]))`` returns the results dict.
"""
import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import pickle
import random
import socket
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union
from urllib.parse import urlparse

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm import tqdm

import data
import pruning.models  # noqa: F401  (registers the vit_pico_* models in timm's registry)
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
               "bench_batch_size", "bench_warmup", "bench_steps")


class CLIError(Exception):
    """Bad input: ``main()`` prints the message (which names the option) as one line and exits non-zero."""


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


def _float_at_least(minimum: float, strict: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
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
               "digits, tk_n removing 2 tokens per block, 30 epochs.")
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
                            "checkpoint; a classifier head of another size is left out (default: none)")

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
    group.add_argument("--lr", metavar="LR", type=_float_at_least(0.0, strict=True), default=None,
                       help="AdamW peak learning rate, cosine decay per step (default: --lr_base * batch_size / 512)")
    group.add_argument("--lr_base", metavar="LR", type=_float_at_least(0.0, strict=True), default=None,
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
    group.add_argument("--amp", **bool_flag, help="mixed precision: bf16 on CPU, fp16 on CUDA (default: off)")

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

def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


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
        raise CLIError(f"--arch {name}: {_first_line(err)}; --arch must be a timm VisionTransformer") from None
    except Exception as err:
        if not pretrained:
            raise
        raise CLIError(f"--pretrained: could not fetch the timm weights of {name} ({_first_line(err)}); "
                       f"fetch them once online (they are kept in the Hugging Face cache), or pass a local "
                       f"weights file with --checkpoint FILE and drop --pretrained") from None
    if not isinstance(model, VisionTransformer):
        raise CLIError(f"--arch: {name} is a {type(model).__name__}; token compression needs a timm "
                       f"VisionTransformer (vit_*, deit_*)")
    img_size, patch_size = model.patch_embed.img_size, model.patch_embed.patch_size
    if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
        raise CLIError(f"--img_size {img_size[0]} is not a multiple of --patch_size {patch_size[0]}")
    return model


def torch_load(path: str, option: str) -> Any:
    """``torch.load`` of tensors and plain containers only (nothing in the file can run code)."""
    if not os.path.isfile(path):
        raise CLIError(f"{option}: {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CLIError(f"{option}: {path} holds more than tensors and plain data, so it is not loaded "
                       f"(safe loading: {_first_line(err)[:200]}); save its state_dict() instead") from None
    except Exception as err:
        raise CLIError(f"{option}: {path} cannot be read, it is damaged or not a PyTorch file "
                       f"({_first_line(err)[:200]})") from None


def load_weights(model: VisionTransformer, path: str) -> List[str]:
    """Load a timm .pth/.safetensors file or a main.py checkpoint; returns the keys left out (a head of
    another size)."""
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise CLIError(f"--checkpoint: {path} not found")
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except Exception as err:
            raise CLIError(f"--checkpoint: {path} cannot be read ({_first_line(err)[:200]})") from None
    else:
        state = torch_load(path, "--checkpoint")
    for key in ("model", "state_dict", "model_ema"):  # main.py / DeiT / other training scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"--checkpoint: {path} holds no state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = checkpoint_filter_fn(state, model)  # timm: resamples position and patch embeddings to this model
    own = model.state_dict()
    left_out = [k for k in ("head.weight", "head.bias") if k in state and k in own and state[k].shape != own[k].shape]
    for key in left_out:
        del state[key]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CLIError(f"--checkpoint: {path} does not fit --arch {model.default_cfg.get('architecture', '')} "
                       f"({detail}); use the --arch, --img_size and --patch_size it was trained with") from None
    missing = [k for k in missing if k not in left_out]
    if missing or unexpected:
        raise CLIError(f"--checkpoint: {path} does not fit this model (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}); use the --arch it was trained with")
    return left_out


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def rng_states(loader_generator: torch.Generator) -> Dict[str, Any]:
    """Every random number generator a run draws from, as tensors and plain data."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [version, list(internal), gauss],
        "loader": loader_generator.get_state(),
    }


def set_rng_states(states: Dict[str, Any], loader_generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    loader_generator.set_state(states["loader"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def amp_dtype(device: torch.device, enabled: bool) -> Optional[torch.dtype]:
    """The --amp autocast dtype: fp16 on CUDA, bf16 on CPU; None when off."""
    if not enabled:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CPU, fp16 on CUDA; a no-op when not enabled."""
    dtype = amp_dtype(device, enabled)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    device: torch.device, amp: bool, desc: str) -> Dict[str, float]:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=None, dynamic_ncols=True)
    for images, targets in bar:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
            loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(dim=-1) == targets).sum().item()
        seen += len(targets)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    return {"train_loss": total_loss / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1)}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool,
             desc: str = "test") -> Dict[str, float]:
    """Top-1 accuracy (%) and mean loss over the whole loader."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=None, dynamic_ncols=True):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        total_loss += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == targets).sum().item()
        seen += len(targets)
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

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA device is available; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


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


def _prepare_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise CLIError(f"--output_dir: cannot write to {path} ({err.strerror or err}); choose another folder") \
            from None


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
        left_out = load_weights(model, args.checkpoint)
        if left_out:
            print(f"--checkpoint: {', '.join(left_out)} left out (another number of classes); the head starts "
                  f"from scratch for {num_classes} classes")
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


def fit(args: argparse.Namespace, model: nn.Module, train_loader: DataLoader, test_loader: DataLoader,
        loader_generator: torch.Generator, device: torch.device, resume: Optional[Dict[str, Any]],
        settings: Dict[str, Any]) -> List[Dict[str, float]]:
    """The training loop: AdamW, warm-up + cosine per step, evaluation and checkpoints after every epoch.

    Returns the per-epoch history (the resumed run's earlier epochs included).
    """
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    start_epoch, best_accuracy, history = 0, None, []
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        set_rng_states(resume["rng"], loader_generator)
        start_epoch, best_accuracy, history = resume["epoch"], resume["best_accuracy"], list(resume["history"])
        print(f"resumed from {args.resume} after epoch {start_epoch}/{args.epochs}")
    print(f"training {args.epochs} epochs of {steps_per_epoch} steps, batch {args.batch_size}, AdamW lr "
          f"{args.lr:.3g}, weight decay {args.weight_decay}, warm-up {args.warmup_epochs:g} epochs")

    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        desc = f"epoch {epoch + 1}/{args.epochs}"
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, device, args.amp, desc)
        stats.update(evaluate(model, test_loader, device, args.amp))
        stats.update(epoch=epoch + 1, lr=scheduler.get_last_lr()[0], time_s=time.time() - epoch_start)
        history.append(stats)
        improved = best_accuracy is None or stats["test_acc"] > best_accuracy
        best_accuracy = stats["test_acc"] if improved else best_accuracy
        print(f"{desc}  train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.2f}%  "
              f"test loss {stats['test_loss']:.4f} acc {stats['test_acc']:.2f}%  "
              f"(best {best_accuracy:.2f}%)  {stats['time_s']:.1f}s", flush=True)

        checkpoint = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch + 1, "best_accuracy": best_accuracy, "history": history,
            "rng": rng_states(loader_generator), "settings": settings,
        }
        save_atomic(checkpoint, os.path.join(args.output_dir, "last.pt"))
        if improved:
            save_atomic(checkpoint, os.path.join(args.output_dir, "best.pt"))
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(stats) + "\n")
    return history


def measure(args: argparse.Namespace, model: nn.Module, baseline: Optional[nn.Module],
            input_shape: Sequence[int], device: torch.device) -> Dict[str, Optional[float]]:
    """Throughput and FLOPs of the final model; with a baseline (``--benchmark``) of both, in the same run."""
    gflops = count_gflops(model, input_shape, device)
    analytic = analytic_flops(model) / 1e9
    if abs(gflops - analytic) > 0.05 * analytic:
        print(f"warning: flop_counter counts {gflops:.4g} GFLOPs, the analytic count is {analytic:.4g}",
              file=sys.stderr)
    timed = {"model": model} if baseline is None else {"model": model, "baseline": baseline.to(device)}
    images = torch.randn(args.bench_batch_size or args.batch_size, *input_shape, device=device)
    throughput = measure_throughput(timed, images, args.bench_warmup, args.bench_steps, amp_dtype(device, args.amp))
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
    """Train (or evaluate, or benchmark) as ``args`` say; returns what is written to results.json."""
    args = argparse.Namespace(**vars(args))
    started = time.time()
    resume = None
    if args.resume:
        resume = torch_load(args.resume, "--resume")
        if not isinstance(resume, dict) or "model" not in resume:
            raise CLIError(f"--resume: {args.resume} is not a checkpoint written by main.py")
        _restore_settings(args, resume)
    check_options(args)
    device = resolve_device(args.device)
    training = not (args.eval_only or args.benchmark)
    args.output_dir = args.output_dir or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else "output")
    _prepare_output_dir(args.output_dir)
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

    # every setting resolved (arch, sizes, learning rate, placement), as checkpoints and config.yaml keep it
    args.img_size, args.patch_size, args.reduce_at = img_size, patch_size, get_config(model).reduce_at
    args.augment = args.augment or spec.augment
    args.lr_base = args.lr_base or spec.lr_base
    args.lr = args.lr or args.lr_base * args.batch_size / 512
    settings = dict(sorted(vars(args).items()))
    with open(os.path.join(args.output_dir, "config.yaml"), "w") as f:
        yaml.safe_dump({k: v for k, v in settings.items() if k not in ("config", "resume")}, f)

    sizes = f"{len(splits.train)} train / {len(splits.test)} test" if splits else "no images needed"
    print(f"{args.arch}: {n_params / 1e6:.3f} M params, {img_size} px, patch {patch_size}, {len(model.blocks)} "
          f"blocks | {args.model} removing {args.reduce_token} tokens per block at {args.reduce_at} | "
          f"{args.data_name}: {sizes} | {device}, {torch.get_num_threads()} threads")

    accuracy = best_accuracy = None
    if splits is not None:
        splits.set_transforms(img_size, args.augment)
        loader_generator = torch.Generator().manual_seed(args.seed)
        loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.num_workers,
                             pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)
        test_loader = DataLoader(splits.test, shuffle=False, **loader_kwargs)
        if training:
            train_loader = DataLoader(splits.train, shuffle=True, drop_last=len(splits.train) > args.batch_size,
                                      generator=loader_generator, **loader_kwargs)
            history = fit(args, model, train_loader, test_loader, loader_generator, device, resume, settings)
            accuracy, best_accuracy = history[-1]["test_acc"], max(h["test_acc"] for h in history)
        elif args.eval_only:
            accuracy = best_accuracy = evaluate(model, test_loader, device, args.amp)["test_acc"]
            print(f"eval: {args.model} on {args.data_name}: top-1 {accuracy:.2f}%")

    figures = measure(args, model, baseline, input_shape, device)
    results: Dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    results.update({k: v for k, v in figures.items() if k in results})
    results.update(accuracy=accuracy, best_accuracy=best_accuracy, model=args.model, reduce_token=args.reduce_token,
                   arch=args.arch, data_name=args.data_name, epochs=args.epochs if training else 0, seed=args.seed,
                   world_size=1)
    results_path = os.path.join(args.output_dir, "results.json")
    write_json_atomic(results, results_path)
    if args.visualize:
        print(f"visualization: {visualize(args, model, splits, device)}")

    ideal = f"{figures['baseline_gflops'] / figures['gflops']:.3f}x" if baseline is not None else "-"
    print(_summary(results, {
        "reduce_at": args.reduce_at, "geometry": f"{img_size} px, patch {patch_size}, {len(model.blocks)} blocks",
        "sizes": sizes, "analytic": f"{figures['analytic_gflops']:.4g}", "ideal": ideal,
        "bench": f"batch {args.bench_batch_size or args.batch_size}, {device.type}{', amp' if args.amp else ''}, "
                 f"median of {args.bench_steps}",
        "time": f"{time.time() - started:.1f} s", "results": results_path}), flush=True)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: bad input ends as one line on stderr and exit code 2, never a traceback."""
    try:
        run(parse_args(argv))
    except (CLIError, data.DataError) as err:
        print(f"main.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("main.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
