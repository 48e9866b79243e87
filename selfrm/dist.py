"""Distributed set-up and teardown, rank-0 printing, and sharding of work across ranks.

`python x.py` runs one process; `torchrun --nproc_per_node=N x.py` runs N, each with RANK,
LOCAL_RANK and WORLD_SIZE set. NCCL on CUDA, gloo on the CPU.
"""
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0


def compute_init(timeout_s=1800):
    """Start the process group when launched by torchrun; pick this rank's device. A
    collective that waits `timeout_s` for a rank that stopped answering fails (see
    timed_out) instead of hanging for ever."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, local_rank, world_size, device)


def timed_out(error):
    """Whether an exception is a collective's timeout (gloo and NCCL word it differently)."""
    text = str(error).lower()
    return isinstance(error, (RuntimeError, dist.DistError)) and ("timed out" in text or "timeout" in text)


def compute_cleanup():
    """Tear the process group down; called from a `finally`. On a clean exit the ranks first
    meet at a barrier: torch 2.13's gloo can deadlock in the process group's destructor while
    its worker thread still finishes a rank's last collective (seen as 2-rank LoRA runs that
    hung at exit). After an exception there is no barrier, so a failing rank never waits for
    one that is stuck elsewhere."""
    if dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def is_master():
    """Rank 0, also before the process group starts (torchrun's RANK says which)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op on one process) and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value, world):
    """The largest of an integer over ranks (the value itself on one process)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def gather_shards(local, world):
    """Each rank holds a list for its shard `range(rank, n, world_size)`; return the whole
    list in the original order, on every rank."""
    if not world.ddp:
        return local
    parts = [None] * world.world_size
    dist.all_gather_object(parts, local)
    merged = [None] * sum(len(p) for p in parts)
    for rank, part in enumerate(parts):
        merged[rank::world.world_size] = part
    return merged
