"""Used by train.py (and support/train_checks.py, support/metrics_file.py): the few values the ranks of a run agree
on, one call each, taking train.py's Dist (rank, world_size, local_rank, cpu_group); in one process each is the
value itself and no process group is needed.

What it adds to train.py: this rank's device (rank_device), a barrier, every rank's value of a number or an object
(gather_over_ranks, all_gather) and their mean, the processes as support/stepdir.py's functions take them
(ranks_of), and the stop signal every rank agrees on before a step (stop_requested).
"""

import torch
import torch.distributed as dist

import kernels
from support.stepdir import Ranks


def rank_device(d) -> torch.device:
    kind = kernels.device_type()
    return torch.device(kind, d.local_rank) if kind in ("cuda", "npu") else torch.device(kind)


def barrier(d):
    if d.world_size > 1:
        dist.barrier()


def mean_over_ranks(x: float, d) -> float:
    return sum(gather_over_ranks(x, d)) / d.world_size


def gather_over_ranks(x: float, d) -> list[float]:
    """Every rank's value of x, in rank order (a collective: every rank calls it)."""
    if d.world_size == 1:
        return [x]
    t = torch.tensor([x], dtype=torch.float64, device=rank_device(d))
    out = [torch.zeros_like(t) for _ in range(d.world_size)]
    dist.all_gather(out, t)
    return [v.item() for v in out]


def all_gather(obj, d) -> list:
    """Every rank's obj in rank order (a list of one in a single process)."""
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def ranks_of(d) -> Ranks:
    """The processes of this run as support/stepdir.py's functions take them: rank, count and collectives."""
    return Ranks(d.rank, d.world_size, lambda: barrier(d), lambda obj: all_gather(obj, d))


def stop_requested(run) -> int:
    """The signal every rank stops on, 0 for none: the largest any rank has received (a scheduler may signal some
    ranks only), agreed by an all-reduce on the CPU before each step, which waits for no device."""
    signum = run.stop.signum if run.stop else 0
    if run.d.world_size == 1:
        return signum
    flag = torch.tensor([signum], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=run.d.cpu_group)
    return int(flag.item())
