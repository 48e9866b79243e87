"""Distributed set-up and teardown, rank-0 printing, and sharding of work across ranks.

`python x.py` runs one process; `torchrun --nproc_per_node=N x.py` runs N, each with RANK,
LOCAL_RANK and WORLD_SIZE set. NCCL on CUDA, gloo on the CPU.
"""
import datetime
import os
import signal
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
        # not TORCH_NCCL_BLOCKING_WAIT=1 by default: it would give a timeout's one line instead of the
        # watchdog's SIGABRT, but every wait would hold the CPU, serialising FSDP's collectives (README)
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


def leave(code=0):
    """End a torchrun worker whose work is done (process group destroyed, files closed) without
    the interpreter's teardown: there, with torch 2.13 and gloo, a process group's C++ threads
    can still be joinable when their objects are destroyed, and the worker aborts ("terminate
    called without an active exception", SIGABRT) after a run that succeeded, about once in
    seven 2-rank FSDP runs; torchrun then reports the job failed. One process (no torchrun)
    exits normally."""
    sys.stdout.flush()
    sys.stderr.flush()
    if "RANK" in os.environ:
        os._exit(code)
    if code:
        sys.exit(code)


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


# ----------------------------------------------------------------------------- preemption
# Slurm and Kubernetes send SIGTERM before they kill a job (Slurm can send SIGUSR1 earlier,
# with --signal); torchrun forwards SIGTERM to every rank and kills them --shutdown-timeout
# seconds later (30 by default). Once the scripts call catch_preemption, either signal is
# recorded instead of killing: training checkpoints at the end of its current optimizer
# step and stops; scoring stops before its next batch (its output is written only at the
# end, so nothing partial is left, and a rerun scores again).

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received = []  # the signal numbers received, oldest first


class Preempted(Exception):
    """A run stopped by a preemption signal; the scripts print the message as one line and
    exit with 128 + the signal's number (143 for SIGTERM), as if the signal had killed them."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


def catch_preemption():
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, lambda signum, frame: _received.append(signum))


def preemption_signal(world):
    """The signal all ranks stop for at this step, or None. Under torchrun the ranks agree (a
    collective: one rank's signal can arrive a step before another's), so every rank
    checkpoints the same step."""
    signum = _received[0] if _received else 0
    if world.ddp:
        flag = torch.tensor([signum], device=world.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
    return signum or None


def stop_if_preempted(world, what):
    """Raise Preempted when a signal came, on every rank at once (a collective under torchrun),
    for work that a rerun does again: nothing is saved."""
    signum = preemption_signal(world)
    if signum:
        raise Preempted(f"stopped by {signal.Signals(signum).name} while {what}; no partial output was written: "
                        f"rerun the same command to continue", signum)
