"""main.py's options: the parser and its value parsers, YAML config files, the settings that
checkpoints keep (and ``--resume`` restores), and the checks of options that need each other.

Defaults come from the caller (``main.DEFAULTS`` and ``main.RECIPES``), then ``--config FILE.yaml``
(its keys checked, then applied with ``parser.set_defaults``), then the command line. ``engine.config`` turns
the result into the run's one frozen configuration.

Every setting has one name (its dest): ``method`` and ``schedule`` in YAML files, config.yaml, checkpoints and
the code. The command line keeps the seed's flags for those two, ``--model`` and ``--reduce_token``
(:data:`FLAGS`); YAML files, and checkpoints written before the rename, may use either name.
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import yaml

import data
from pruning import CONTROL_NAMES, METHOD_NAMES

from . import distributed
from .checkpoint import read_resume, saved_run_settings
from .distributed import Processes
from .errors import CLIError

MAX_LR = 1e6  # far beyond any useful rate; larger ones overflow float32 inside the optimiser
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Options that may differ when a run is resumed: where and how it runs, not what it computes. Every
# setting comes from the checkpoint unless the command line gives it again; these may be given anew.
RESUME_FREE = ("resume", "config", "output_dir", "device", "threads", "num_workers", "data_root", "visualize",
               "bench_batch_size", "bench_warmup", "bench_steps", "compile", "overwrite")
# ... and these are never taken from the checkpoint (the folder is the checkpoint's own unless given)
NOT_RESTORED = ("resume", "config", "output_dir", "overwrite")
# setting name (dest) -> the command-line flag, without --, where they differ (the seed's flags)
FLAGS = {"method": "model", "schedule": "reduce_token"}
DESTS = {flag: dest for dest, flag in FLAGS.items()}


@dataclass(frozen=True)
class Recipe:
    """How to train on a dataset when --arch, --augment and --lr_base are not given."""
    arch: str  # timm model name
    augment: str  # training augmentation: paper, light or none (data/transforms.py)
    lr_base: float  # learning rate at batch size 512, scaled linearly to the batch size


# ----------------------------------------------------------------------------------------------
# value parsers

def int_at_least(minimum: int):
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


# ----------------------------------------------------------------------------------------------
# the parser

class Options(argparse.Namespace):
    """argparse's Namespace that also knows which options were given (``--config``, a caller's settings,
    the command line) rather than left at their defaults: ``--resume`` takes the others from the checkpoint.
    ``given`` is a slot, so it is not one of the options (``vars()`` leaves it out)."""
    __slots__ = ("given",)


def given_dests(args: argparse.Namespace, parser: "ArgumentParser") -> frozenset:
    """The options ``args`` were given; without that record (a Namespace built by hand), those that
    differ from their defaults."""
    given = getattr(args, "given", None)
    if given is not None:
        return given
    return frozenset(key for key, value in vars(args).items() if value != parser.get_default(key))


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`CLIError` instead of printing usage and exiting."""

    def error(self, message: str):
        raise CLIError(message)


def _per_dataset(recipes: Mapping[str, Recipe], field: str) -> str:
    """``digits a, FashionMNIST b, ...``: a recipe field for each dataset."""
    return ", ".join(f"{name} {getattr(recipe, field):g}" if field == "lr_base" else f"{name} {getattr(recipe, field)}"
                     for name, recipe in recipes.items())


def build_parser(defaults: Mapping[str, Any], recipes: Mapping[str, Recipe]) -> ArgumentParser:
    """The parser of main.py; ``defaults`` (by dest) replace the parser's own, ``recipes`` are named in --help."""
    start = recipes[defaults["data_name"]]
    parser = ArgumentParser(
        prog="main.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train, evaluate and benchmark token compression in timm Vision Transformers.",
        epilog=f"Defaults < --config FILE.yaml < command line. With no options: {start.arch} on "
               f"{defaults['data_name']}, {defaults['method']} removing {defaults['schedule']} tokens per block, "
               f"{defaults['epochs']} epochs. Several GPUs: torchrun --nproc_per_node N main.py ... (--batch_size "
               f"is per process).")
    bool_flag = dict(action=argparse.BooleanOptionalAction, default=False)

    group = parser.add_argument_group("compression")
    group.add_argument("--model", dest="method", choices=METHOD_NAMES, metavar="METHOD",
                       help=f"compression method: {', '.join(METHOD_NAMES)}; {' and '.join(CONTROL_NAMES)} are "
                            f"controls (random keep drawn from --seed, lowest norm kept) (default: %(default)s)")
    group.add_argument("--reduce_token", dest="schedule", type=reduce_token_type, metavar="K",
                       help="tokens removed per block: an int, or a comma list with one value per block "
                            "(default: %(default)s)")
    group.add_argument("--reduce_at", default=None, choices=("block", "attn"),
                       help="reduce after the whole block, or between attention and MLP (default: the "
                            "method's own: block; attn for tome)")
    group.add_argument("--prop_attn", default="auto", choices=("auto", "on", "off"),
                       help="ToMe's proportional attention (only tome uses it): auto = on when evaluating or "
                            "benchmarking without training (ToMe's off-the-shelf protocol), off while training "
                            "and for the evaluation at the end of training (as ToMe advises); the run records the "
                            "resolved on/off (default: %(default)s)")

    group = parser.add_argument_group("model")
    group.add_argument("--arch", metavar="NAME", default=None,
                       help="timm ViT name, e.g. vit_small_patch16_224.augreg_in21k (default: per dataset: "
                            f"{_per_dataset(recipes, 'arch')})")
    group.add_argument("--img_size", metavar="PX", type=int_at_least(1), default=None,
                       help="input size in pixels; images are resized to it (default: the arch's)")
    group.add_argument("--patch_size", metavar="PX", type=int_at_least(1), default=None,
                       help="patch size (default: the arch's)")
    group.add_argument("--pretrained", **bool_flag, help="start from timm hub weights (needs the internet "
                                                         "or the Hugging Face cache) (default: off)")
    group.add_argument("--checkpoint", default=None, metavar="FILE",
                       help="weights to start from or to evaluate: timm .pth/.safetensors or a main.py "
                            "checkpoint; a classifier head of another size is left out for training, refused "
                            "by --eval_only (default: none)")

    group = parser.add_argument_group("data")
    group.add_argument("--data_name", choices=tuple(data.DATASETS),
                       help=f"dataset: {', '.join(data.DATASETS)} (default: %(default)s)")
    group.add_argument("--data_root", metavar="DIR",
                       help="where datasets are read from and downloaded to; for folder: the folder with "
                            "train/<class>/ and val/<class>/ (default: %(default)s)")
    group.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                       help="download a torchvision dataset into --data_root when it is not there "
                            "(default: on)")
    group.add_argument("--augment", default=None, choices=data.AUGMENTATIONS,
                       help="training augmentation: paper (RandomResizedCrop, flip, RandAugment, "
                            "RandomErasing), light (random shift, flip), none (default: per dataset: "
                            f"{_per_dataset(recipes, 'augment')})")
    group.add_argument("--train_subset", type=int_at_least(0), default=0, metavar="N",
                       help="train on a fixed random subset of N images, 0 = all (default: %(default)s)")
    group.add_argument("--test_subset", type=int_at_least(0), default=0, metavar="N",
                       help="test on a fixed random subset of N images, 0 = all (default: %(default)s)")
    group.add_argument("--num_workers", metavar="N", type=int_at_least(0), default=0,
                       help="data loading processes (default: %(default)s)")

    group = parser.add_argument_group("training")
    group.add_argument("--batch_size", metavar="N", type=int_at_least(1), help="(default: %(default)s)")
    group.add_argument("--epochs", metavar="N", type=int_at_least(1), help="(default: %(default)s)")
    group.add_argument("--lr", metavar="LR", type=_float_at_least(0.0, strict=True, maximum=MAX_LR), default=None,
                       help="AdamW peak learning rate, cosine decay per step (default: --lr_base * batch_size / 512)")
    group.add_argument("--lr_base", metavar="LR", type=_float_at_least(0.0, strict=True, maximum=MAX_LR),
                       default=None,
                       help="learning rate at batch size 512, scaled linearly to the batch size when --lr is "
                            f"not given (default: per dataset: {_per_dataset(recipes, 'lr_base')})")
    group.add_argument("--weight_decay", metavar="WD", type=_float_at_least(0.0),
                       help="AdamW weight decay, not applied to norms, biases and embeddings "
                            "(default: %(default)s)")
    group.add_argument("--warmup_epochs", metavar="N", type=_float_at_least(0.0),
                       help="linear learning-rate warm-up (default: %(default)s)")
    group.add_argument("--seed", metavar="N", type=int, help="(default: %(default)s)")
    group.add_argument("--device", metavar="DEVICE", default="auto",
                       help="auto (cuda if there is one, else cpu), cpu, cuda, cuda:N (default: %(default)s)")
    group.add_argument("--threads", metavar="N", type=int_at_least(0), default=0,
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
                       help="results.json, checkpoints and logs; refused if it holds another run's files (see "
                            "--overwrite) (default: a new folder output/<time>_<arch>_<method>_k<tokens>, "
                            "output/latest points to it when the run trains; with --resume the checkpoint's folder)")
    group.add_argument("--config", default=None, metavar="FILE.yaml",
                       help="YAML file of options (keys as above, without --); the command line overrides it "
                            "(default: none)")
    group.add_argument("--resume", default=None, metavar="FILE",
                       help="continue an interrupted run from its last.pt, exactly, with its settings, in its folder "
                            "(default: none)")
    group.add_argument("--overwrite", **bool_flag, help="let --output_dir be a folder that holds another run's files "
                                                        "(results.json, config.yaml, last.pt, best.pt, log.jsonl): "
                                                        "they are removed when this run starts (default: off)")
    group.add_argument("--eval_only", **bool_flag, help="evaluate --checkpoint (or --pretrained) with the "
                                                        "chosen compression, no training (default: off)")
    group.add_argument("--benchmark", **bool_flag, help="no training: throughput and FLOPs of the chosen method "
                                                        "and of the uncompressed model (default: off)")
    group.add_argument("--save_predictions", **bool_flag,
                       help="write <output_dir>/predictions.npz: the test labels and predicted classes in test-set "
                            "order (and the test-set indices with --test_subset), for per-image statistics; under "
                            "torchrun gathered to rank 0 (default: off)")
    group.add_argument("--visualize", type=int_at_least(0), default=0, metavar="N",
                       help="write <output_dir>/visualization.png for the first N test images, 0 = off "
                            "(default: %(default)s)")

    group = parser.add_argument_group("throughput measurement")
    group.add_argument("--bench_batch_size", metavar="N", type=int_at_least(1), default=None,
                       help="images per timed forward (default: --batch_size)")
    group.add_argument("--bench_warmup", metavar="N", type=int_at_least(0), default=5,
                       help="untimed forwards first (default: %(default)s)")
    group.add_argument("--bench_steps", metavar="N", type=int_at_least(1), default=20,
                       help="timed forwards; the median is reported (default: %(default)s)")

    unknown = set(defaults) - {action.dest for action in parser._actions}
    if unknown:
        raise ValueError(f"defaults: no option has the dest {sorted(unknown)}")
    parser.set_defaults(**defaults)
    return parser


# ----------------------------------------------------------------------------------------------
# setting names (dests) and the flags users type

def flag_of(dest: str) -> str:
    """The command-line flag of a setting: ``--model`` for ``method``, ``--epochs`` for ``epochs``."""
    return f"--{FLAGS.get(dest, dest)}"


def flag_names(values: Mapping[str, Any]) -> Dict[str, Any]:
    """``{dest: value}`` keyed by the flags' names, without -- (``method`` -> ``model``): for command lines."""
    return {FLAGS.get(key, key): value for key, value in values.items()}


def dests(values: Mapping[str, Any]) -> Dict[str, Any]:
    """``{name: value}`` keyed by dest, a flag's name (``model``, ``reduce_token``: YAML files, checkpoints
    written before the rename) taken as its setting's; the inverse of :func:`flag_names`."""
    return {DESTS.get(key, key): value for key, value in values.items()}


def _tokens(parser: ArgumentParser, values: Mapping[str, Any], where: str) -> List[str]:
    """``{setting or flag name: value}`` (a YAML mapping) as command-line tokens; unknown names and
    non-boolean values of on/off options are refused, naming ``where``."""
    actions = {action.option_strings[0][2:]: action for action in parser._actions
               if action.option_strings and action.option_strings[0].startswith("--")}
    actions.update({dest: actions[flag] for dest, flag in FLAGS.items()})
    tokens: List[str] = []
    for key, value in values.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in actions or name in ("help", "config"):
            raise CLIError(f"{where}: unknown option {key!r}; see python main.py --help")
        if value is None:
            continue
        flag = actions[name].option_strings[0]
        if isinstance(actions[name], argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise CLIError(f"{where}: {key} must be true or false, got {value!r}")
            tokens.append(flag if value else f"--no-{flag[2:]}")
        else:
            tokens += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return tokens


def given(parser: ArgumentParser, argv: Sequence[str]) -> Dict[str, Any]:
    """The options ``argv`` gives (none of the defaults), checked and converted as on the command line, by dest."""
    parsed = parser.parse_args(list(argv))
    named = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    return {action.dest: getattr(parsed, action.dest) for action in parser._actions
            if named & set(action.option_strings)}


given_by = given


def read_yaml_mapping(path: str, shape: str = "option: value") -> Dict[str, Any]:
    """The mapping the ``--config`` YAML file at ``path`` holds (empty file: none); CLIError when it is missing,
    not YAML, or not a mapping (``shape`` shows what it should hold)."""
    if not os.path.isfile(path):
        raise CLIError(f"--config: {path} not found")
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise CLIError(f"--config: {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise CLIError(f"--config: {path} must hold a mapping of {shape}")
    return config


def read_config(parser: ArgumentParser, path: str) -> Dict[str, Any]:
    """The options of a YAML file, checked as the command line would be, by dest."""
    config = read_yaml_mapping(path)
    tokens = _tokens(parser, config, f"--config: {path}")
    try:
        return given(parser, tokens)
    except CLIError as err:
        raise CLIError(f"--config {path}: {err}") from None


def parse_args(argv: Optional[Sequence[str]], defaults: Mapping[str, Any], recipes: Mapping[str, Recipe],
               options: Optional[Mapping[str, Any]] = None) -> argparse.Namespace:
    """Options from ``defaults``, then ``--config``, then ``options`` (by dest: a caller's settings as
    data), then ``argv`` (default: sys.argv[1:])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(defaults, recipes)
    pre = ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    config = pre.parse_known_args(argv)[0].config
    given = set()
    if config:
        from_file = read_config(parser, config)
        parser.set_defaults(**from_file)
        given |= set(from_file)
    if options:
        from_caller = given_by(parser, _tokens(parser, options, "options"))
        parser.set_defaults(**from_caller)
        given |= set(from_caller)
    args = parser.parse_args(argv, namespace=Options())
    strings = parser._option_string_actions
    given |= {strings[token.split("=", 1)[0]].dest for token in argv
              if token.startswith("--") and token.split("=", 1)[0] in strings}
    args.given = frozenset(given)
    return args


# ----------------------------------------------------------------------------------------------
# resume

def restored(values: Mapping[str, Any], given: frozenset, checkpoint: Dict[str, Any], path: str) -> Dict[str, Any]:
    """``values`` (the options by dest) with the resumed run's settings taken: every one of them, ``data_root``
    included, unless given again (only the RESUME_FREE ones may be given anew); a setting given with another
    value is refused. ``given``: the dests the command line, ``--config`` or the caller gave."""
    saved = checkpoint.get("settings")
    if not isinstance(saved, dict):
        raise CLIError(f"--resume: {path} is not a checkpoint written by main.py (no settings)")
    saved = {key: value for key, value in dests(saved).items() if key not in NOT_RESTORED and key in values}
    changed = [key for key, value in saved.items()
               if key in given and key not in RESUME_FREE and values[key] != value]
    if "epochs" in changed:
        raise CLIError(f"--resume: --epochs {values['epochs']} differs from the run's {saved['epochs']}; a resumed "
                       f"run keeps its settings and its learning-rate schedule (cosine over {saved['epochs']} "
                       f"epochs), so --epochs cannot change on --resume; to train longer, fine-tune from the "
                       f"checkpoint into a new folder: --checkpoint {path} --epochs N")
    if changed:
        names = ", ".join(f"{flag_of(key)} {values[key]} (the run's: {saved[key]})" for key in changed)
        raise CLIError(f"--resume: {names}: a resumed run keeps its settings; only where and how it runs may "
                       f"change ({', '.join(flag_of(k) for k in RESUME_FREE[2:])}); drop them, or start a new run "
                       f"from its weights with --checkpoint {path}")
    return {**values, **{key: value for key, value in saved.items() if not (key in RESUME_FREE and key in given)}}


def load_resume(path: str, processes: Processes) -> Dict[str, Any]:
    """The ``--resume`` checkpoint; the number of processes must match the run that wrote it."""
    checkpoint = read_resume(path)
    trained_by = checkpoint.get("world_size", 1)
    if trained_by != processes.world_size:
        raise CLIError(f"--resume: {path} was written by a run of {trained_by} process(es), this one has "
                       f"{processes.world_size}; resume with as many (torchrun --nproc_per_node, or python main.py "
                       f"for 1): the data order and the learning-rate schedule depend on it")
    return checkpoint


def saved_settings(path: str) -> Dict[str, Any]:
    """The settings of a main.py checkpoint by dest, its tensors left on disk (mmap); {} if it has none."""
    saved = saved_run_settings(path)
    return dests(saved["settings"]) if saved else {}


# ----------------------------------------------------------------------------------------------
# options that need each other, or the machine

def check_options(args: argparse.Namespace) -> None:
    """Combinations of options that cannot work."""
    if args.resume and (args.eval_only or args.benchmark):
        raise CLIError("--resume continues training; to evaluate or benchmark a checkpoint use "
                       "--eval_only/--benchmark with --checkpoint FILE")
    if args.eval_only and not (args.checkpoint or args.pretrained):
        raise CLIError("--eval_only needs weights to evaluate: --checkpoint FILE (e.g. output/latest/best.pt) or "
                       "--pretrained")
    if args.checkpoint and not args.resume and not os.path.isfile(args.checkpoint):
        raise CLIError(f"--checkpoint: {args.checkpoint} not found")
    if args.save_predictions and args.benchmark and not args.eval_only:
        raise CLIError("--save_predictions needs test images: use it when training or with --eval_only, not with "
                       "--benchmark alone")
    if args.visualize and args.benchmark and not args.eval_only:
        raise CLIError("--visualize needs test images: use it when training or with --eval_only, not with "
                       "--benchmark alone")


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


def amp_dtype(args: argparse.Namespace, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``--amp``/``--amp_dtype`` on ``device``: None when --amp is off."""
    if not args.amp:
        return None
    if args.amp_dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return AMP_DTYPES[args.amp_dtype]


def check_amp(args: argparse.Namespace, device: torch.device) -> None:
    if args.amp:
        check_autocast(amp_dtype(args, device), device, auto=True)


def check_autocast(dtype: Optional[torch.dtype], device: torch.device, auto: bool = False) -> None:
    """Refuse an autocast type ``device`` cannot run: float16 on the CPU, bfloat16 on a GPU without it.
    ``auto``: the command also offers ``--amp_dtype auto``, so the message names it."""
    or_auto = " (or auto)" if auto else ""
    if device.type == "cpu" and dtype == torch.float16:
        raise CLIError(f"--amp_dtype float16: autocast on CPU runs bfloat16; use --amp_dtype bfloat16{or_auto}, "
                       f"or --device cuda")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise CLIError(f"--amp_dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16; use "
                       f"--amp_dtype float16{or_auto}")
