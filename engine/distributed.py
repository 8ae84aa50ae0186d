"""Processes started by ``torchrun`` (DistributedDataParallel): who is who, and what they share.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process's environment; without them
a run is one process and every helper here is a no-op (no process group, no collective calls), so
single-process runs compute exactly what they computed before DDP support existed.
"""
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import CLIError

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of one run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index on this machine: the GPU it uses

    @property
    def enabled(self) -> bool:
        """More than one process: DDP, sharded evaluation, collective calls."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, measures and writes files."""
        return self.rank == 0


SINGLE = Processes()


def from_environment() -> Processes:
    """The ranks torchrun set in the environment; one process when it did not."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    try:
        rank, world_size, local_rank = (int(os.environ.get(name, "0")) for name in names)
    except ValueError:
        raise CLIError(f"torchrun: RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                       f"{[os.environ.get(name) for name in names]}; start main.py with torchrun or python") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise CLIError(f"torchrun: RANK {rank} does not fit WORLD_SIZE {world_size}")
    return Processes(rank, world_size, local_rank)


def device_for(processes: Processes, device: torch.device, option: str) -> torch.device:
    """Under torchrun each process takes the GPU of its local rank (``--device cuda`` or ``auto``)."""
    if not processes.enabled or device.type != "cuda":
        return device
    if device.index is not None and option not in ("auto", "cuda"):
        raise CLIError(f"--device {option}: under torchrun every process uses the GPU of its LOCAL_RANK; "
                       f"use --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if processes.local_rank >= torch.cuda.device_count():
        raise CLIError(f"torchrun --nproc_per_node: local rank {processes.local_rank} has no GPU (this machine has "
                       f"{torch.cuda.device_count()}); start at most one process per GPU")
    return torch.device("cuda", processes.local_rank)


def setup(processes: Processes, device: torch.device) -> bool:
    """Join the process group (nccl on CUDA, gloo on CPU); returns whether this call created it."""
    if not processes.enabled or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_over_ranks(values: Sequence[float], processes: Processes, device: torch.device) -> List[float]:
    """Element-wise sums over all ranks (float64: counts of up to 2**53 stay exact)."""
    if not processes.enabled:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_over_ranks(flags: Sequence[bool], processes: Processes, device: torch.device) -> List[bool]:
    """Element-wise "on any rank": every rank takes the same decision (stop, diverged) at the same step."""
    if not processes.enabled:
        return [bool(flag) for flag in flags]
    return [total > 0 for total in sum_over_ranks([float(bool(flag)) for flag in flags], processes, device)]


def gather(obj: Any, processes: Processes) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (plain data and tensors)."""
    if not processes.enabled:
        return [obj]
    gathered: List[Any] = [None] * processes.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def on_main(fn: Callable[[], T], processes: Processes) -> T:
    """Run ``fn`` on rank 0 only (a check of the output folder, say); a :class:`CLIError` it raises
    is raised on every rank, so that all of them stop instead of waiting for rank 0."""
    if not processes.enabled:
        return fn()
    result, message = None, None
    if processes.is_main:
        try:
            result = fn()
        except CLIError as err:
            message = str(err)
    shared = [message]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise CLIError(shared[0])
    return result
