"""The run configuration: every setting of one main.py run, resolved once, before anything runs, into a
frozen :class:`RunConfig`, by :func:`resolve_config` alone.

Where a setting comes from, later winning: main.py's ``DEFAULTS``, the dataset's recipe (``main.RECIPES``:
arch, augmentation, learning rate), ``--config FILE.yaml``, the command line (``engine.options`` parses
those), and on ``--resume`` the checkpoint's settings; then what follows from the others: the learning rate
from the batch, the placement from the method, ToMe's proportional attention from the mode, the image and
patch size from the model. The steps of a run read it and return values; none of them writes settings.
"""
import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from pruning import get_method

from . import options
from .distributed import Processes
from .model import check_schedule_length, reference_model
from .zoo import backbone_of

Schedule = Union[int, Tuple[int, ...]]  # tokens removed per block: one int for every block, or one per block
UNSAVED = ("config", "resume", "overwrite")  # how this one run was started, not what it computes


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, resolved; the names are the options' dests (``method`` is ``--model``,
    ``schedule`` is ``--reduce_token``)."""
    # compression
    method: str
    schedule: Schedule  # as asked; a block removes fewer when too few tokens are left (results.json says)
    reduce_at: str  # block or attn: the method's own unless given
    prop_attn: str  # on or off (auto: off when training, on when evaluating or benchmarking)
    # model
    arch: str
    img_size: int
    patch_size: int
    pretrained: bool
    checkpoint: Optional[str]
    # data
    data_name: str
    data_root: str
    download: bool
    augment: str
    train_subset: int
    test_subset: int
    num_workers: int
    # training
    batch_size: int  # per process
    epochs: int
    lr: float  # the peak learning rate of the global batch
    lr_base: float
    weight_decay: float
    warmup_epochs: float
    seed: int
    device: str
    threads: int
    amp: bool
    amp_dtype: str
    compile: bool
    # the run
    output_dir: Optional[str]  # as given; the folder the run writes is engine.outputs' RunFolder
    config: Optional[str]
    resume: Optional[str]
    overwrite: bool
    eval_only: bool
    benchmark: bool
    save_predictions: bool
    visualize: int
    # throughput measurement
    bench_batch_size: Optional[int]
    bench_warmup: int
    bench_steps: int

    @property
    def training(self) -> bool:
        return not (self.eval_only or self.benchmark)

    def settings(self, output_dir: str) -> Dict[str, Any]:
        """What config.yaml and checkpoints keep: every setting by name, sorted (a per-block schedule as a
        list), ``output_dir`` the folder the run wrote; ``--resume`` reads them back."""
        values = {**dataclasses.asdict(self), "output_dir": output_dir}
        values["schedule"] = list(self.schedule) if isinstance(self.schedule, tuple) else self.schedule
        return dict(sorted((key, value) for key, value in values.items() if key not in UNSAVED))


def chosen_arch(args: Any, recipes: Mapping[str, "options.Recipe"]) -> str:
    """``--arch``, else the dataset's recipe's."""
    return args.arch or recipes[args.data_name].arch


def resolve_prop_attn(prop_attn: str, training: bool) -> str:
    """``--prop_attn`` as the run uses it: auto is on without training (evaluation, benchmark), off when training."""
    if prop_attn == "auto":
        return "off" if training else "on"
    return prop_attn


def model_sizes(values: Mapping[str, Any], arch: str) -> Tuple[int, int, int]:
    """(image size, patch size, blocks) of the model the settings describe, read from a weightless (meta) copy
    built as the run builds it: bad sizes and unknown archs are refused here, before any data is read."""
    with torch.device("meta"):
        backbone = backbone_of(reference_model(argparse.Namespace(**values), arch))
        depth = backbone.shape.depth
    return backbone.img_size, backbone.patch_size, depth


def resolve_config(args: argparse.Namespace, parser: "options.ArgumentParser", recipes: Mapping[str, "options.Recipe"],
                   processes: Processes, resume: Optional[Dict[str, Any]] = None) -> RunConfig:
    """The one configuration of a run from its parsed options (``parser``: the parser that parsed them; its
    defaults tell given options from default ones), the dataset recipes, the processes (the learning rate is
    the global batch's) and, on ``--resume``, the checkpoint (its settings win over everything not given again)."""
    values = {action.dest: getattr(args, action.dest) for action in parser._actions if action.dest != "help"}
    if resume is not None:
        values = options.restored(values, options.given_dests(args, parser), resume, args.resume)
    options.check_options(argparse.Namespace(**values))
    recipe, arch = recipes[values["data_name"]], chosen_arch(argparse.Namespace(**values), recipes)
    img_size, patch_size, depth = model_sizes(values, arch)
    schedule = values["schedule"]
    check_schedule_length(schedule, depth, arch)
    lr_base = values["lr_base"] or recipe.lr_base
    training = not (values["eval_only"] or values["benchmark"])
    values.update(
        arch=arch, img_size=img_size, patch_size=patch_size, augment=values["augment"] or recipe.augment,
        schedule=tuple(schedule) if isinstance(schedule, (list, tuple)) else schedule,
        reduce_at=values["reduce_at"] or get_method(values["method"]).default_reduce_at,
        prop_attn=resolve_prop_attn(values["prop_attn"], training), lr_base=lr_base,
        lr=values["lr"] or lr_base * values["batch_size"] * processes.world_size / 512)
    return RunConfig(**values)
