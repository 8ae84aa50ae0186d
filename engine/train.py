"""The training loop: AdamW with linear warm-up and cosine decay per step, evaluation and checkpoints
after every epoch, an exact continuation of a ``--resume``d run, and stopping cleanly on SIGINT/SIGTERM.

    loop = Loop(model, train_model, eval_model, train_loader, test_loader, generator, device)
    history = fit(args, loop, resume=None, settings=settings, stop=stop)
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
from pruning import evaluation_draws

from . import distributed
from .checkpoint import append_line, rng_states, save_atomic, set_rng_states, write_text_atomic
from .distributed import Processes
from .errors import CLIError, Interrupted, TrainingDiverged, one_line
from .sampling import ResumableDistributedSampler, ResumableRandomSampler, ShardSampler
from .signals import StopSignal, ignore_stop_signals


@dataclasses.dataclass
class Loop:
    """What the loop trains and evaluates, on what, where."""
    model: nn.Module  # the plain module: checkpoints hold its state
    train_model: nn.Module  # what trains: compiled and/or wrapped in DDP
    eval_model: nn.Module  # what evaluates: compiled, not DDP
    train_loader: DataLoader
    test_loader: DataLoader
    generator: torch.Generator  # the loaders' draws (shuffling, augmentation); checkpoints keep its state
    device: torch.device
    dtype: Optional[torch.dtype] = None  # autocast dtype (--amp), None: float32
    processes: Processes = distributed.SINGLE


@dataclasses.dataclass
class Optimization:
    """What takes a training step: the optimiser, its per-step schedule, the float16 loss scaler."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


@dataclasses.dataclass
class EpochProgress:
    """Running sums of one training epoch on this process. A ``last.pt`` written part-way through an
    epoch keeps them, so that the resumed epoch reports what the uninterrupted one would have."""
    step: int = 0  # steps finished in this epoch
    loss_sum: float = 0.0  # sum over the images seen of their loss
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0  # wall time of the epoch so far


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate factor per step: linear warm-up, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype``; a no-op when it is None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@contextlib.contextmanager
def workers_stopped(*loaders: Optional[DataLoader]):
    """While inside, the loaders' persistent workers serve every epoch; on leaving, by any path, they are
    stopped. A run that failed would otherwise leave them to its exception's traceback, and as they ignore
    SIGTERM (:func:`engine.signals.ignore_stop_signals`), a process that ran it in process could not exit."""
    try:
        yield
    finally:
        for loader in loaders:
            iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps its persistent workers
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            if loader is not None:
                loader._iterator = None


def build_loaders(splits: data.Splits, args: Any, device: torch.device, processes: Processes,
                  training: bool) -> Tuple[Optional[DataLoader], DataLoader, torch.Generator]:
    """(train loader or None, test loader, the generator of their draws). Under torchrun each rank
    trains on its share and tests on its shard of the test set."""
    generator = torch.Generator().manual_seed(args.seed + processes.rank)
    kwargs = dict(batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                  persistent_workers=args.num_workers > 0,
                  worker_init_fn=ignore_stop_signals if args.num_workers > 0 else None)
    test_sampler = ShardSampler(len(splits.test), processes.rank, processes.world_size) if processes.enabled else None
    test_loader = DataLoader(splits.test, sampler=test_sampler, shuffle=False, **kwargs)
    if not training:
        return None, test_loader, generator
    if processes.enabled:
        sampler = ResumableDistributedSampler(splits.train, processes.world_size, processes.rank, shuffle=True,
                                              seed=args.seed)
    else:  # what DataLoader(shuffle=True, generator=...) builds, able to start an epoch part-way
        sampler = ResumableRandomSampler(splits.train, generator=generator)
    train_loader = DataLoader(splits.train, sampler=sampler, generator=generator,
                              drop_last=len(sampler) > args.batch_size, **kwargs)
    return train_loader, test_loader, generator


def train_one_epoch(loop: Loop, opt: Optimization, progress: EpochProgress, stop: StopSignal, desc: str) -> bool:
    """Train on what the train loader yields (the rest of an epoch, when resumed part-way), adding to
    ``progress``.

    Returns True when a stop signal ended the epoch early, always after a finished step. Raises
    FloatingPointError when the loss is NaN or inf, before that step changes the weights. Under DDP
    the ranks agree on both after every forward pass, so they stop at the same step.
    """
    loop.train_model.train()
    stopping = False
    bar = tqdm(loop.train_loader, desc=desc, leave=False, disable=None if loop.processes.is_main else True,
               dynamic_ncols=True, initial=progress.step, total=progress.step + len(loop.train_loader))
    for images, targets in bar:
        images, targets = images.to(loop.device, non_blocking=True), targets.to(loop.device, non_blocking=True)
        with autocast(loop.device, loop.dtype):
            logits = loop.train_model(images)
            loss = F.cross_entropy(logits, targets)
        loss_value = loss.item()
        stopping, diverged = distributed.any_over_ranks([stop.requested, not math.isfinite(loss_value)],
                                                        loop.processes, loop.device)
        if diverged:
            where = f"{loss_value}" if not math.isfinite(loss_value) else "not finite on another process"
            raise FloatingPointError(f"the loss is {where} at step {progress.step + 1}")
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
        progress.step += 1
        progress.loss_sum += loss_value * len(targets)
        progress.correct += (logits.argmax(dim=-1) == targets).sum().item()
        progress.seen += len(targets)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{opt.scheduler.get_last_lr()[0]:.2e}")
        if stopping:
            break
    return stopping


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, dtype: Optional[torch.dtype],
             processes: Processes = distributed.SINGLE, desc: str = "test", predictions: bool = False
             ) -> Dict[str, Any]:
    """Top-1 accuracy (%) and mean loss over the whole test set: under DDP each rank evaluates its
    shard (:class:`ShardSampler`) and the sums are added up, so every image counts exactly once.

    ``predictions``: also ``predicted`` and ``labels``, lists in the order of the loader's dataset
    (under DDP gathered from every rank's shard, on every rank)."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    predicted, labels = [], []
    with evaluation_draws(model):  # the random control keeps the same tokens in every evaluation pass
        for images, targets in tqdm(loader, desc=desc, leave=False, disable=None if processes.is_main else True,
                                    dynamic_ncols=True):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast(device, dtype):
                logits = model(images)
            total_loss += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == targets).sum().item()
            seen += len(targets)
            if predictions:
                predicted.append(logits.argmax(dim=-1).cpu())
                labels.append(targets.cpu())
    total_loss, correct, seen = distributed.sum_over_ranks([total_loss, correct, seen], processes, device)
    scores: Dict[str, Any] = {"test_loss": total_loss / max(seen, 1), "test_acc": 100.0 * correct / max(seen, 1)}
    if predictions:
        own = (list(loader.sampler), torch.cat(predicted).tolist() if predicted else [],
               torch.cat(labels).tolist() if labels else [])
        shards = distributed.gather(own, processes)
        size = sum(len(order) for order, _, _ in shards)
        scores["predicted"], scores["labels"] = [0] * size, [0] * size
        for order, shard_predicted, shard_labels in shards:
            for index, p, y in zip(order, shard_predicted, shard_labels):
                scores["predicted"][index], scores["labels"][index] = p, y
    return scores


def restore(checkpoint: Dict[str, Any], path: str, loop: Loop, opt: Optimization) -> EpochProgress:
    """Put a ``--resume`` checkpoint's state back; returns the progress of the epoch it stopped in."""
    try:
        loop.model.load_state_dict(checkpoint["model"])
        opt.optimizer.load_state_dict(checkpoint["optimizer"])
        opt.scheduler.load_state_dict(checkpoint["scheduler"])
        if "scaler" in checkpoint:
            opt.scaler.load_state_dict(checkpoint["scaler"])
        own = checkpoint["ranks"][loop.processes.rank] if "ranks" in checkpoint else checkpoint
        set_rng_states(own["rng"], loop.generator)
        return EpochProgress(**own["progress"]) if own.get("progress") else EpochProgress()
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        detail = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        raise CLIError(f"--resume: {path} does not fit the model, optimiser and data its settings describe "
                       f"({detail}); it was changed after main.py wrote it, or --data_root now holds another number "
                       f"of classes: resume with the data it was trained on") from None


def _is_compile_error(err: BaseException) -> bool:
    return type(err).__module__.startswith(("torch._dynamo", "torch._inductor"))


def _interrupted(stop: StopSignal, when: str, out_dir: str, processes: Processes) -> Interrupted:
    """What a stop signal ends the run with, once last.pt is written."""
    signum = stop.signum or signal.SIGTERM  # None: the signal came to another rank
    launcher = "the same torchrun command with" if processes.enabled else "python main.py"
    return Interrupted(f"stopped by {signal.Signals(signum).name} {when}; last.pt holds that state; continue with "
                       f"{launcher} --resume {os.path.join(out_dir, 'last.pt')}", signum)


def _diverged(err: FloatingPointError, args: Any, loop: Loop, epoch: int, steps: int,
              resumed: bool) -> TrainingDiverged:
    kept = "last.pt is left as it was (the last good state)" if epoch or resumed else "no checkpoint was written yet"
    amp = ", or drop --amp (float16 overflows; --amp_dtype bfloat16 has float32's range)" \
        if loop.dtype == torch.float16 else (", or drop --amp" if loop.dtype is not None else "")
    return TrainingDiverged(f"training diverged: {err} of {steps} in epoch {epoch + 1}/{args.epochs}; {kept}; lower "
                            f"--lr (now {args.lr:.3g}) or lengthen --warmup_epochs{amp}")


def _optimization(args: Any, loop: Loop, steps_per_epoch: int) -> Optimization:
    """AdamW at ``args.lr``, linear warm-up then cosine decay per step, and the loss scaler of float16 autocast."""
    optimizer = create_optimizer_v2(loop.model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    return Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch)),
        torch.amp.GradScaler(loop.device.type, enabled=loop.dtype == torch.float16))


def _epoch_stats(loop: Loop, opt: Optimization, progress: EpochProgress, epoch: int, clock: float
                 ) -> Dict[str, float]:
    """An epoch's log line: train loss and accuracy over every rank's steps, the test set's, the rate, the time."""
    loss_sum, correct, seen = distributed.sum_over_ranks([progress.loss_sum, progress.correct, progress.seen],
                                                         loop.processes, loop.device)
    stats = {"train_loss": loss_sum / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1)}
    stats.update(evaluate(loop.eval_model, loop.test_loader, loop.device, loop.dtype, loop.processes))
    stats.update(epoch=epoch + 1, lr=opt.scheduler.get_last_lr()[0], time_s=time.time() - clock)
    return stats


def fit(args: Any, out_dir: str, loop: Loop, resume: Optional[Dict[str, Any]], stop: StopSignal
        ) -> List[Dict[str, float]]:
    """Train ``args.epochs`` epochs (the rest of them, resumed), evaluating and writing ``last.pt`` (and
    ``best.pt`` when the test accuracy improved) into ``out_dir`` after each; ``args``: the run's settings
    (``engine.config.RunConfig``), kept in the checkpoints.

    A SIGINT/SIGTERM caught by ``stop`` ends the run after the step in progress, ``last.pt`` holding
    that step. Returns the per-epoch history (the resumed run's earlier epochs included).
    """
    processes, steps_per_epoch, settings = loop.processes, len(loop.train_loader), args.settings(out_dir)
    opt = _optimization(args, loop, steps_per_epoch)
    start_epoch, best_accuracy, history, progress = 0, None, [], EpochProgress()
    if resume:
        progress = restore(resume, args.resume, loop, opt)
        start_epoch, best_accuracy, history = resume["epoch"], resume["best_accuracy"], list(resume["history"])
        where = f", step {progress.step} of epoch {start_epoch + 1}" if progress.step else ""
        print(f"resumed from {args.resume} after epoch {start_epoch}/{args.epochs}{where}")
        if processes.is_main:  # log.jsonl holds this run's epochs and nothing else, whatever was appended since
            write_text_atomic("".join(json.dumps(h) + "\n" for h in history), os.path.join(out_dir, "log.jsonl"))

    def save(epoch: int, loader_state: torch.Tensor, paths: Sequence[str]) -> None:
        """Checkpoint after ``epoch`` epochs and ``progress.step`` steps (every rank calls it)."""
        own = {"rng": dict(rng_states(loop.generator), loader=loader_state), "progress": dataclasses.asdict(progress)}
        ranks = distributed.gather(own, processes)
        checkpoint = {
            "model": loop.model.state_dict(), "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(), "scaler": opt.scaler.state_dict(), "epoch": epoch,
            "step": progress.step, "best_accuracy": best_accuracy, "history": history, "rng": ranks[0]["rng"],
            "progress": ranks[0]["progress"], "settings": settings, "world_size": processes.world_size,
        }
        if processes.enabled:
            checkpoint["ranks"] = ranks

        def write() -> None:
            for path in paths:
                save_atomic(checkpoint, os.path.join(out_dir, path))
        distributed.on_main(write, processes)

    global_batch = f"{args.batch_size} x {processes.world_size} processes" if processes.enabled else args.batch_size
    print(f"training {args.epochs} epochs of {steps_per_epoch} steps, batch {global_batch}, AdamW lr "
          f"{args.lr:.3g}, weight decay {args.weight_decay}, warm-up {args.warmup_epochs:g} epochs", flush=True)
    for epoch in range(start_epoch, args.epochs):
        desc = f"epoch {epoch + 1}/{args.epochs}"
        if isinstance(loop.train_loader.sampler, DistributedSampler):
            loop.train_loader.sampler.set_epoch(epoch)
        loop.train_loader.sampler.skip = progress.step * args.batch_size  # resumed part-way: the steps not yet done
        loader_state = loop.generator.get_state()  # before this epoch's shuffle: a mid-epoch last.pt keeps it
        clock = time.time() - progress.seconds
        try:
            stopped = train_one_epoch(loop, opt, progress, stop, desc)
        except FloatingPointError as err:
            raise _diverged(err, args, loop, epoch, steps_per_epoch, resume is not None) from None
        except Exception as err:
            if args.compile and _is_compile_error(err):
                raise CLIError(f"--compile: torch.compile failed ({one_line(err, named=True, limit=300)}); run "
                               f"without --compile") from None
            raise
        progress.seconds = time.time() - clock
        if stopped:
            save(epoch, loader_state, ["last.pt"])
            raise _interrupted(stop, f"after step {progress.step} of {steps_per_epoch} in epoch {epoch + 1}/"
                                     f"{args.epochs}", out_dir, processes)

        stats = _epoch_stats(loop, opt, progress, epoch, clock)
        history.append(stats)
        improved = best_accuracy is None or stats["test_acc"] > best_accuracy
        best_accuracy = stats["test_acc"] if improved else best_accuracy
        print(f"{desc}  train loss {stats['train_loss']:.4f} acc {stats['train_acc']:.2f}%  "
              f"test loss {stats['test_loss']:.4f} acc {stats['test_acc']:.2f}%  "
              f"(best {best_accuracy:.2f}%)  {stats['time_s']:.1f}s", flush=True)

        progress = EpochProgress()
        save(epoch + 1, loop.generator.get_state(), ["last.pt", "best.pt"] if improved else ["last.pt"])
        if processes.is_main:
            append_line(json.dumps(stats), os.path.join(out_dir, "log.jsonl"))
        if distributed.any_over_ranks([stop.requested], processes, loop.device)[0]:  # came during evaluation
            raise _interrupted(stop, f"after epoch {epoch + 1}/{args.epochs}", out_dir, processes)
    return history
