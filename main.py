"""Train, evaluate and benchmark token compression in Vision Transformers.

    python main.py                                   # ViT-Pico/2 on scikit-learn digits with tk_n
    python main.py --config configs/fashionmnist.yaml --model tk --reduce_token 4
    python main.py --eval_only --checkpoint output/latest/best.pt --model tome --reduce_token 3
    python main.py --resume output/latest/last.pt    # continue an interrupted (Ctrl-C, SIGTERM) run

Options: DEFAULTS and RECIPES below < ``--config FILE.yaml`` < the command line (``--help`` lists them).
A run: output folder -> data -> model, compressed -> train or evaluate -> measure -> results.json and a
summary; ``engine/`` does the work. In-process (the sweep): ``run(parse_args([...]))``, the caller setting
the threads as main() does.
"""
import argparse
import contextlib
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import yaml
from timm.models.vision_transformer import VisionTransformer
from torch.nn.parallel import DistributedDataParallel

import data
import engine.model
from engine import distributed, options, report, train
from engine.checkpoint import check_free_space, checkpoint_bytes, seed_everything, write_json_atomic, write_text_atomic
from engine.distributed import Processes
from engine.errors import BAD_INPUT, Interrupted, TrainingDiverged, one_line
from engine.outputs import RunFolder, plan_output_dir
from engine.measure import Bench, measure
from engine.report import RESULT_KEYS, TIMING_KEYS  # noqa: F401  (what results.json holds; TIMING_KEYS: measured times)
from engine.model import (arch_label, build_model, compress, geometry, tokens_per_block,
                          unmet_reductions)
from engine.options import Recipe
from engine.signals import StopSignal
from pruning.patch import get_config

# What a run does when no option says otherwise (by dest: --model is `method`). Edit here; --help shows them.
DEFAULTS = dict(
    method="tk_n",  # --model: none, tk, tk_n, evit, evit_n, n_wa, a_wn, tome
    reduce_token=2,  # tokens removed per block; or one value per block, e.g. [0, 2, 2, 2]
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


def reference_model(args: argparse.Namespace) -> VisionTransformer:
    """An untrained model of the shape the options describe (``--arch`` or the dataset's recipe)."""
    return engine.model.reference_model(args, args.arch or RECIPES[args.data_name].arch)


def choose_threads(args: argparse.Namespace) -> int:
    """``--threads``; 0 = auto (engine.model.auto_threads: one thread for small models)."""
    if args.threads:
        return args.threads
    try:
        if args.resume:  # the model its checkpoint describes
            args = argparse.Namespace(**{**vars(args), **options.saved_settings(args.resume)})
    except Exception:  # run() refuses the file with its own message: the thread count does not matter
        return engine.model.DEFAULT_THREADS
    return engine.model.auto_threads(args, args.arch or RECIPES[args.data_name].arch)


@dataclass
class Run:
    """What a run has resolved so far."""
    args: argparse.Namespace  # every option, resolved in place (arch, sizes, learning rate, placement)
    processes: Processes
    device: torch.device
    resume: Optional[Dict[str, Any]] = None  # the --resume checkpoint
    splits: Optional[data.Splits] = None  # None: a benchmark alone needs no images
    folder: Optional[RunFolder] = None  # the output folder, created when training or evaluating starts
    model: Optional[VisionTransformer] = None  # compressed, on the device
    tokens: Optional[list] = None  # tokens entering the first block, then leaving each block
    baseline: Optional[VisionTransformer] = None  # --benchmark: the same model uncompressed
    predictions: Optional[Dict[str, list]] = None  # --save_predictions: train.evaluate's predicted and labels

    @property
    def training(self) -> bool:
        return not (self.args.eval_only or self.args.benchmark)

    @property
    def sizes(self) -> str:
        return f"{len(self.splits.train)} train / {len(self.splits.test)} test" if self.splits else "no images needed"


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train (or evaluate, or benchmark) as ``args`` say; returns what is written to results.json.

    Under torchrun every process calls it: rank 0 prints, measures and writes the files; the other
    ranks return the same accuracies with the measured fields None. It leaves the threads as they are.
    """
    args = options.copy_options(args)
    processes = distributed.from_environment()
    with contextlib.ExitStack() as stack:
        if not processes.is_main:  # one log, from rank 0
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        resume = options.load_resume(args, processes, build_parser()) if args.resume else None
        options.check_options(args)
        device = options.resolve_device(args.device, processes)
        options.check_amp(args, device)
        if distributed.setup(processes, device):
            stack.callback(distributed.teardown)
        return _run(Run(args, processes, device, resume))


def _run(r: Run) -> Dict[str, Any]:
    started, args = time.time(), r.args
    r.folder = plan_output_dir(args, arch_label(args.arch or RECIPES[args.data_name].arch), r.processes, started)
    try:
        seed_everything(args.seed)
        load_data(r)
        build_and_compress(r)
        announce(r)
        accuracy, best_accuracy = train_or_evaluate(r)
        results: Dict[str, Any] = dict.fromkeys(RESULT_KEYS)
        config = get_config(r.model)
        results.update(accuracy=accuracy, best_accuracy=best_accuracy, model=args.method,
                       reduce_token=args.reduce_token, tokens_per_block=r.tokens, arch=args.arch,
                       data_name=args.data_name, epochs=args.epochs if r.training else 0, seed=args.seed,
                       world_size=r.processes.world_size, prop_attn=args.prop_attn,
                       reduce_schedule=None if config is None else [int(k) for k in config.schedule])
        if r.processes.is_main:  # rank 0 measures and writes; the other ranks are done
            measure_and_report(r, results, started)
    except BaseException:
        if r.processes.is_main:  # a run that wrote no checkpoint and no results leaves the disk as it found it
            r.folder.discard()
        raise
    return results


def load_data(r: Run) -> None:
    """Both splits, read before the model is built (a missing dataset is reported before weights are
    fetched); a benchmark alone reads none unless the classes are counted from folders."""
    if r.training or r.args.eval_only or data.DATASETS[r.args.data_name].num_classes is None:
        r.splits = data.build_dataset(r.args.data_name, r.args.data_root, download=r.args.download,
                                      train_subset=r.args.train_subset, test_subset=r.args.test_subset)


def build_and_compress(r: Run) -> None:
    """The model with its starting weights, compressed; every setting resolved as checkpoints keep it."""
    args, facts, recipe = r.args, data.DATASETS[r.args.data_name], RECIPES[r.args.data_name]
    args.arch = args.arch or recipe.arch
    r.model = build_model(args, r.splits.num_classes if r.splits else facts.num_classes, facts.in_chans,
                          r.resume is not None)
    r.baseline = copy.deepcopy(r.model) if args.benchmark else None
    args.prop_attn = options.resolve_prop_attn(args, r.training)  # auto: off when training, else on
    compress(r.model, args).to(r.device)
    r.tokens = tokens_per_block(r.model)
    unmet = unmet_reductions(r.model)
    if unmet and r.processes.is_main:
        print(report.unmet_warning(args.method, args.reduce_token, unmet, r.tokens), file=sys.stderr, flush=True)
    if r.training:  # disk full: said now, not after the first epoch
        distributed.on_main(lambda: check_free_space(args.output_dir, checkpoint_bytes(r.model)), r.processes)
    args.img_size, args.patch_size = geometry(r.model).img_size, geometry(r.model).patch_size
    args.reduce_at, args.augment = get_config(r.model).reduce_at, args.augment or recipe.augment
    args.lr_base = args.lr_base or recipe.lr_base
    args.lr = args.lr or args.lr_base * args.batch_size * r.processes.world_size / 512  # the global batch


def train_or_evaluate(r: Run) -> Tuple[Optional[float], Optional[float]]:
    """(final, best) top-1 accuracy: of the epochs trained, or of --eval_only; (None, None) to benchmark."""
    args, device, processes = r.args, r.device, r.processes
    if r.splits is None or not (r.training or args.eval_only):
        return None, None
    r.splits.set_transforms(args.img_size, args.augment)
    if processes.enabled:  # the same weights everywhere (DDP starts from rank 0's), other augmentations
        seed_everything(args.seed + processes.rank)
    train_loader, test_loader, generator = train.build_loaders(r.splits, args, device, processes, r.training)
    with train.workers_stopped(train_loader, test_loader):
        return run_loops(r, train_loader, test_loader, generator)


def run_loops(r: Run, train_loader, test_loader, generator) -> Tuple[Optional[float], Optional[float]]:
    """The evaluation (--eval_only) or the training loop, over the loaders; (final, best) top-1."""
    args, device, processes = r.args, r.device, r.processes
    eval_model = torch.compile(r.model) if args.compile else r.model
    dtype = options.amp_dtype(args, device)
    if args.eval_only:
        scores = train.evaluate(eval_model, test_loader, device, dtype, processes, predictions=args.save_predictions)
        r.predictions = scores if args.save_predictions else None
        accuracy = scores["test_acc"]
        print(f"eval: {args.method} on {args.data_name}: top-1 {accuracy:.2f}%")
        return accuracy, accuracy
    # from here on SIGINT/SIGTERM mean "stop after this step, with last.pt"; under torchrun every rank
    # has its handler before the DDP constructor synchronises them
    with StopSignal() as stop:
        train_model = DistributedDataParallel(eval_model, device_ids=[device] if device.type == "cuda" else None) \
            if processes.enabled else eval_model
        loop = train.Loop(r.model, train_model, eval_model, train_loader, test_loader, generator, device, dtype,
                          processes)
        history = train.fit(args, loop, r.resume, options.settings_of(args), stop)
    if args.save_predictions:  # the final model's, as its last evaluation saw them (evaluation is deterministic)
        r.predictions = train.evaluate(eval_model, test_loader, device, dtype, processes, desc="predictions",
                                       predictions=True)
    return history[-1]["test_acc"], max(h["test_acc"] for h in history)


def announce(r: Run) -> None:
    """The run starts: its folder is created (rank 0), config.yaml written (every setting, resolved), and
    the lines that say where it writes and what runs."""
    args = r.args
    if r.processes.is_main:
        args.output_dir = r.folder.open()
        settings = {k: v for k, v in options.settings_of(args).items() if k not in ("config", "resume", "overwrite")}
        write_text_atomic(yaml.safe_dump(settings), os.path.join(args.output_dir, "config.yaml"))
        pointer = r.folder.latest[0] if r.folder.latest else None
        latest = "" if pointer is None else f" ({pointer} {'names' if pointer.endswith('LATEST') else 'points to'} it)"
        print(f"run folder: {args.output_dir}{latest}")
    where = f"{r.processes.world_size} processes ({r.device.type})" if r.processes.enabled else str(r.device)
    print(f"{args.arch}: {sum(p.numel() for p in r.model.parameters()) / 1e6:.3f} M params, {args.img_size} px, "
          f"patch {args.patch_size}, {geometry(r.model).depth} blocks | {args.method} removing "
          f"{report.tokens_text(args.reduce_token)} per block at {args.reduce_at}: tokens {report.arrows(r.tokens)} | "
          f"{args.data_name}: {r.sizes} | {where}, {torch.get_num_threads()} threads")


def measure_and_report(r: Run, results: Dict[str, Any], started: float) -> None:
    """FLOPs, MACs, parameters and throughput into ``results``; results.json, the visualisation, the summary."""
    args, dtype = r.args, options.amp_dtype(r.args, r.device)
    bench = Bench(args.bench_batch_size or args.batch_size, args.bench_warmup, args.bench_steps, dtype, args.compile)
    input_shape = (data.DATASETS[args.data_name].in_chans, args.img_size, args.img_size)
    figures = measure(r.model, r.baseline, input_shape, r.device, bench)
    results.update({k: v for k, v in figures.items() if k in results})
    results["environment"] = report.environment(r.device)
    if r.predictions is not None:
        results["predictions"] = report.save_predictions(
            os.path.join(args.output_dir, "predictions.npz"), r.predictions["predicted"], r.predictions["labels"],
            getattr(r.splits.test, "indices", None))
    results_path = os.path.join(args.output_dir, "results.json")
    write_json_atomic(results, results_path)
    if args.visualize:
        print(f"visualization: {report.save_visualization(r.model, args, r.splits, r.device)}")
    amp = f", amp {dtype}".replace("torch.", "") if args.amp else ""
    print(report.summary(results, {
        "reduce_at": args.reduce_at, "geometry": f"{args.img_size} px, patch {args.patch_size}, "
                                                 f"{geometry(r.model).depth} blocks",
        "sizes": r.sizes, "analytic": f"{figures['analytic_gflops']:.4g}",
        "ideal": f"{figures['baseline_gflops'] / figures['gflops']:.3f}x" if r.baseline is not None else "-",
        "bench": f"batch {bench.batch_size}, {r.device.type}{amp}{', compiled' if args.compile else ''}, median "
                 f"of {bench.steps}", "time": f"{time.time() - started:.1f} s", "results": results_path}), flush=True)


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
