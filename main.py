"""Train, evaluate and benchmark token compression in Vision Transformers.

    python main.py                                   # ViT-Pico/2 on scikit-learn digits with tk_n
    python main.py --config configs/fashionmnist.yaml --model tk --reduce_token 4
    python main.py --eval_only --checkpoint output/latest/best.pt --model tome --reduce_token 3
    python main.py --resume output/latest/last.pt    # continue an interrupted (Ctrl-C, SIGTERM) run

Options: DEFAULTS and RECIPES below < ``--config FILE.yaml`` < the command line (``--help`` lists them).
A run, top to bottom in this file: the options become one frozen RunConfig (engine/config.py) -> its output
folder (engine/outputs.py) -> data (data/) -> the model, compressed (engine/model.py) -> train or evaluate
(engine/train.py) -> measure (engine/measure.py) -> results.json and a summary (engine/report.py). Each step
takes the configuration and returns what it made. In-process (the sweep): ``run(parse_args([...]))``, the
caller setting the threads as main() does.
"""
import argparse
import contextlib
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import data
import engine.model
from engine import distributed, options, report, train
from engine.checkpoint import check_free_space, checkpoint_bytes, seed_everything, write_json_atomic, write_text_atomic
from engine.config import RunConfig, chosen_arch, resolve_config
from engine.distributed import Processes
from engine.errors import BAD_INPUT, Interrupted, TrainingDiverged, one_line
from engine.outputs import RunFolder, plan_output_dir
from engine.measure import Bench, measure
from engine.report import RESULT_KEYS, TIMING_KEYS  # noqa: F401  (what results.json holds; TIMING_KEYS: measured times)
from engine.model import arch_label, build_model, compress, removed_per_block, tokens_per_block, unmet_reductions
from engine.options import Recipe
from engine.signals import StopSignal
from engine.zoo import backbone_of
from pruning.patch import get_config

# What a run does when no option says otherwise, by setting name (--model sets `method`, --reduce_token
# `schedule`). Edit here; --help shows them.
DEFAULTS = dict(
    method="tk_n",  # --model: none, tk, tk_n, evit, evit_n, n_wa, a_wn, tome; controls: random, low_norm
    schedule=2,  # --reduce_token: tokens removed per block; or one value per block, e.g. [0, 2, 2, 2]
    data_name="digits",  # digits, FashionMNIST, CIFAR10, CIFAR100, STL10, folder
    data_root="datasets",  # where datasets are read from and downloaded to
    batch_size=64,  # per process
    epochs=30,
    weight_decay=1e-4,
    warmup_epochs=2.0,
    seed=0,
)
SEED_LR_BASE = 5e-4  # the seed's fine-tuning rule: lr = 5e-4 * batch_size / 512
# The small pico models trained from scratch with small batches need more: 2e-3 at batch 64 reaches
# 95% on digits in 30 epochs where 5e-4 * 64 / 512 stays far below.
FROM_SCRATCH_LR_BASE = 1.6e-2
# Per dataset, when --arch, --augment and --lr_base are not given. Digits: no augmentation (a one-pixel
# shift is half a patch); Fashion-MNIST: a small shift and flips; the seed's recipe for the others.
RECIPES = {
    "digits": Recipe(arch="vit_pico_patch2_8", augment="none", lr_base=FROM_SCRATCH_LR_BASE),
    "FashionMNIST": Recipe(arch="vit_pico_patch4_28", augment="light", lr_base=FROM_SCRATCH_LR_BASE),
    "CIFAR10": Recipe(arch="vit_small_patch16_224", augment="paper", lr_base=SEED_LR_BASE),
    "CIFAR100": Recipe(arch="vit_small_patch16_224", augment="paper", lr_base=SEED_LR_BASE),
    "STL10": Recipe(arch="vit_small_patch16_224", augment="paper", lr_base=SEED_LR_BASE),
    "folder": Recipe(arch="vit_small_patch16_224", augment="paper", lr_base=SEED_LR_BASE),
}


def build_parser() -> options.ArgumentParser:
    return options.build_parser(DEFAULTS, RECIPES)


def parse_args(argv: Optional[Sequence[str]] = None, *, settings: Optional[Mapping[str, Any]] = None
               ) -> argparse.Namespace:
    """Options from the defaults, then ``--config``, then ``settings`` ({dest: value}, checked as the
    command line is: how the sweep hands over a run), then ``argv`` (default: sys.argv[1:])."""
    return options.parse_args(argv, DEFAULTS, RECIPES, settings)


def resolve(args: argparse.Namespace, processes: Processes = distributed.SINGLE,
            resume: Optional[Dict[str, Any]] = None) -> RunConfig:
    """The run's one configuration from parsed options (and the ``--resume`` checkpoint): engine.config."""
    return resolve_config(args, build_parser(), RECIPES, processes, resume)


def reference_model(args: argparse.Namespace) -> nn.Module:
    """An untrained model of the shape the options describe (``--arch`` or the dataset's recipe)."""
    return engine.model.reference_model(args, chosen_arch(args, RECIPES))


def choose_threads(args: argparse.Namespace) -> int:
    """``--threads``; 0 = auto (engine.model.auto_threads: one thread for small models)."""
    if args.threads:
        return args.threads
    try:
        if args.resume:  # the model its checkpoint describes
            args = argparse.Namespace(**{**vars(args), **options.saved_settings(args.resume)})
    except Exception:  # run() refuses the file with its own message: the thread count does not matter
        return engine.model.DEFAULT_THREADS
    return engine.model.auto_threads(args, chosen_arch(args, RECIPES))


@dataclass(frozen=True)
class Host:
    """Where the run computes: its torchrun processes (one without torchrun) and this process's device."""
    processes: Processes
    device: torch.device


@dataclass(frozen=True)
class Compressed:
    """The model step's result: the model, compressed, on the device; the same uncompressed (--benchmark);
    the tokens entering the first block, then leaving each block."""
    model: nn.Module
    baseline: Optional[nn.Module]
    tokens: List[int]


@dataclass(frozen=True)
class Outcome:
    """Top-1 accuracy: final and best (None: a benchmark alone); --save_predictions: predicted and labels."""
    accuracy: Optional[float]
    best_accuracy: Optional[float]
    predictions: Optional[Dict[str, list]] = None


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train (or evaluate, or benchmark) as ``args`` say; returns what is written to results.json.

    Under torchrun every process calls it: rank 0 prints, measures and writes the files; the other
    ranks return the same accuracies with the measured fields None. It leaves the threads as they are.
    """
    processes = distributed.from_environment()
    with contextlib.ExitStack() as stack:
        if not processes.is_main:  # one log, from rank 0
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        resume = options.load_resume(args.resume, processes) if args.resume else None
        config = resolve(args, processes, resume)
        device = options.resolve_device(config.device, processes)
        options.check_amp(config, device)
        if distributed.setup(processes, device):
            stack.callback(distributed.teardown)
        return execute(config, Host(processes, device), resume)


def execute(config: RunConfig, host: Host, resume: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The run's steps in order, each taking the configuration and returning what it made; results.json's fields."""
    started, is_main = time.time(), host.processes.is_main
    folder = plan_output_dir(config, arch_label(config.arch), host.processes, started)
    try:
        seed_everything(config.seed)
        splits = load_data(config)
        compressed = build_and_compress(config, splits, resume, host)
        if config.training:  # disk full: said now, not after the first epoch
            distributed.on_main(lambda: check_free_space(folder.path, checkpoint_bytes(compressed.model)),
                                host.processes)
        out_dir = announce(config, folder, compressed, splits, host)
        outcome = train_or_evaluate(config, compressed.model, splits, resume, host, out_dir)
        results = results_of(config, compressed, outcome, host.processes)
        if is_main:  # rank 0 measures and writes; the other ranks are done
            measure_and_report(config, compressed, splits, outcome, results, host, out_dir, started)
    except BaseException:
        if is_main:  # a run that wrote no checkpoint and no results leaves the disk as it found it
            folder.discard()
        raise
    return results


def load_data(config: RunConfig) -> Optional[data.Splits]:
    """Both splits, read before the model is built (a missing dataset is reported before weights are
    fetched); a benchmark alone reads none (None) unless the classes are counted from folders."""
    if config.training or config.eval_only or data.DATASETS[config.data_name].num_classes is None:
        return data.build_dataset(config.data_name, config.data_root, download=config.download,
                                  train_subset=config.train_subset, test_subset=config.test_subset)
    return None


def build_and_compress(config: RunConfig, splits: Optional[data.Splits], resume: Optional[Dict[str, Any]],
                       host: Host) -> Compressed:
    """The model with its starting weights, compressed, on the device; its uncompressed copy for --benchmark."""
    facts = data.DATASETS[config.data_name]
    model = build_model(config, splits.num_classes if splits else facts.num_classes, facts.in_chans,
                        resume is not None)
    baseline = copy.deepcopy(model) if config.benchmark else None
    compress(model, config).to(host.device)
    tokens = tokens_per_block(model)
    unmet = unmet_reductions(model)
    if unmet and host.processes.is_main:
        print(report.unmet_warning(config.method, config.schedule, unmet, tokens), file=sys.stderr, flush=True)
    return Compressed(model, baseline, tokens)


def announce(config: RunConfig, folder: RunFolder, compressed: Compressed, splits: Optional[data.Splits],
             host: Host) -> str:
    """The run starts: its folder is created (rank 0), config.yaml written (every setting, resolved), and
    the lines that say where it writes and what runs; returns the folder's path."""
    out_dir = folder.path
    if host.processes.is_main:
        out_dir = folder.open()
        write_text_atomic(yaml.safe_dump(config.settings(out_dir)), os.path.join(out_dir, "config.yaml"))
        pointer = folder.latest[0] if folder.latest else None
        latest = "" if pointer is None else f" ({pointer} {'names' if pointer.endswith('LATEST') else 'points to'} it)"
        print(f"run folder: {out_dir}{latest}")
    processes, model = host.processes, compressed.model
    where = f"{processes.world_size} processes ({host.device.type})" if processes.enabled else str(host.device)
    print(f"{config.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M params, {config.img_size} px, "
          f"patch {config.patch_size}, {backbone_of(model).shape.depth} blocks | {config.method} removing "
          f"{report.tokens_text(config.schedule)} per block at {config.reduce_at}: tokens "
          f"{report.arrows(compressed.tokens)} | {config.data_name}: {sizes(splits)} | {where}, "
          f"{torch.get_num_threads()} threads")
    return out_dir


def sizes(splits: Optional[data.Splits]) -> str:
    return f"{len(splits.train)} train / {len(splits.test)} test" if splits else "no images needed"


def train_or_evaluate(config: RunConfig, model: nn.Module, splits: Optional[data.Splits],
                      resume: Optional[Dict[str, Any]], host: Host, out_dir: str) -> Outcome:
    """The accuracies of the epochs trained, or of --eval_only; none to benchmark."""
    if splits is None or not (config.training or config.eval_only):
        return Outcome(None, None)
    splits.set_transforms(config.img_size, config.augment)
    if host.processes.enabled:  # the same weights everywhere (DDP starts from rank 0's), other augmentations
        seed_everything(config.seed + host.processes.rank)
    train_loader, test_loader, generator = train.build_loaders(splits, config, host.device, host.processes,
                                                               config.training)
    with train.workers_stopped(train_loader, test_loader):
        eval_model = torch.compile(model) if config.compile else model
        if config.eval_only:
            return evaluate_only(config, eval_model, test_loader, host)
        return train_loop(config, model, eval_model, (train_loader, test_loader, generator), resume, host, out_dir)


def evaluate_only(config: RunConfig, eval_model: nn.Module, test_loader, host: Host) -> Outcome:
    """--eval_only: one evaluation of the test set."""
    dtype = options.amp_dtype(config, host.device)
    scores = train.evaluate(eval_model, test_loader, host.device, dtype, host.processes,
                            predictions=config.save_predictions)
    accuracy = scores["test_acc"]
    print(f"eval: {config.method} on {config.data_name}: top-1 {accuracy:.2f}%")
    return Outcome(accuracy, accuracy, scores if config.save_predictions else None)


def train_loop(config: RunConfig, model: nn.Module, eval_model: nn.Module, loaders: Tuple,
               resume: Optional[Dict[str, Any]], host: Host, out_dir: str) -> Outcome:
    """The training loop over the loaders (train, test, their generator); final and best top-1."""
    (train_loader, test_loader, generator), device, processes = loaders, host.device, host.processes
    dtype = options.amp_dtype(config, device)
    # from here on SIGINT/SIGTERM mean "stop after this step, with last.pt"; under torchrun every rank
    # has its handler before the DDP constructor synchronises them
    with StopSignal() as stop:
        train_model = DistributedDataParallel(eval_model, device_ids=[device] if device.type == "cuda" else None) \
            if processes.enabled else eval_model
        loop = train.Loop(model, train_model, eval_model, train_loader, test_loader, generator, device, dtype,
                          processes)
        history = train.fit(config, out_dir, loop, resume, stop)
    predictions = None
    if config.save_predictions:  # the final model's, as its last evaluation saw them (evaluation is deterministic)
        predictions = train.evaluate(eval_model, test_loader, device, dtype, processes, desc="predictions",
                                     predictions=True)
    return Outcome(history[-1]["test_acc"], max(h["test_acc"] for h in history), predictions)


def results_of(config: RunConfig, compressed: Compressed, outcome: Outcome, processes: Processes) -> Dict[str, Any]:
    """results.json's fields that every rank knows (the measured ones stay None): the settings, the schedule
    asked and what each block really removed, the accuracies."""
    compression = get_config(compressed.model)
    results: Dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    results.update(
        accuracy=outcome.accuracy, best_accuracy=outcome.best_accuracy, method=config.method,
        schedule=config.schedule if isinstance(config.schedule, int) else list(config.schedule),
        schedule_per_block=None if compression is None else [int(k) for k in compression.schedule],
        removed_per_block=removed_per_block(compressed.tokens), tokens_per_block=compressed.tokens,
        arch=config.arch, data_name=config.data_name, epochs=config.epochs if config.training else 0,
        seed=config.seed, world_size=processes.world_size, prop_attn=config.prop_attn)
    return results


def measure_and_report(config: RunConfig, compressed: Compressed, splits: Optional[data.Splits], outcome: Outcome,
                       results: Dict[str, Any], host: Host, out_dir: str, started: float) -> None:
    """FLOPs, MACs, parameters and throughput into ``results``; results.json, the visualisation, the summary."""
    dtype = options.amp_dtype(config, host.device)
    bench = Bench(config.bench_batch_size or config.batch_size, config.bench_warmup, config.bench_steps, dtype,
                  config.compile)
    input_shape = (data.DATASETS[config.data_name].in_chans, config.img_size, config.img_size)
    figures = measure(compressed.model, compressed.baseline, input_shape, host.device, bench)
    results.update({k: v for k, v in figures.items() if k in results})
    results["environment"] = report.environment(host.device)
    if outcome.predictions is not None:
        results["predictions"] = report.save_predictions(
            os.path.join(out_dir, "predictions.npz"), outcome.predictions["predicted"],
            outcome.predictions["labels"], getattr(splits.test, "indices", None))
    results_path = os.path.join(out_dir, "results.json")
    write_json_atomic(results, results_path)
    if config.visualize:
        print(f"visualization: {report.save_visualization(compressed.model, config, splits, host.device, out_dir)}")
    amp = f", amp {dtype}".replace("torch.", "") if config.amp else ""
    print(report.summary(results, {
        "reduce_at": config.reduce_at, "shape": f"{config.img_size} px, patch {config.patch_size}, "
                                                f"{backbone_of(compressed.model).shape.depth} blocks",
        "sizes": sizes(splits), "analytic": f"{figures['analytic_gflops']:.4g}",
        "ideal": f"{figures['baseline_gflops'] / figures['gflops']:.3f}x" if compressed.baseline is not None else "-",
        "bench": f"batch {bench.batch_size}, {host.device.type}{amp}{', compiled' if config.compile else ''}, "
                 f"median of {bench.steps}", "time": f"{time.time() - started:.1f} s", "results": results_path}),
        flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: bad input ends as one line on stderr and exit code 2, never a traceback;
    a diverged run exits with 3, one stopped by SIGINT/SIGTERM (after writing last.pt) with 128 + signal."""
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    tag = f"[rank {rank}] " if rank != "0" else ""  # under torchrun every process reports its own error
    try:
        args = parse_args(argv)
        torch.set_num_threads(choose_threads(args))
        run(args)
    except (*BAD_INPUT, TrainingDiverged) as err:
        print(f"main.py: error: {tag}{one_line(err)}", file=sys.stderr)
        return err.exit_code
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
