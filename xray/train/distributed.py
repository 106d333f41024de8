"""Training in several processes (torchrun, DDP): the collective helpers every rank calls at the same
points, so all ranks stop, fail and decide together. Each is a no-op with one process."""
from __future__ import annotations

import numpy as np
import torch


class Cancelled(Exception):
    """Training was asked to stop (a stop file appeared or SIGTERM)."""


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any: all ranks stop together or none does."""
    if world == 1:
        return flag
    import torch.distributed as dist
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def raise_together(failure: BaseException | None, world: int) -> None:
    """Raise on every rank when any rank failed: a lone failure would leave the others waiting."""
    if world > 1:
        import torch.distributed as dist
        reports: list = [None] * world
        dist.all_gather_object(reports, None if failure is None else (type(failure).__name__, str(failure)))
        if failure is None:
            kind, message = next(iter(filter(None, reports)), (None, ""))
            if kind == "Cancelled":
                failure = Cancelled()
            elif kind is not None:
                failure = ValueError(f"another training process failed: {message}")
    if failure is not None:
        raise failure


def average_buffers(tensors: list[torch.Tensor], world: int) -> None:
    """Average BatchNorm running statistics over ranks, in place (each rank saw only its batches)."""
    if world == 1:
        return
    import torch.distributed as dist
    for t in tensors:
        if t.dtype.is_floating_point:
            dist.all_reduce(t)
            t.div_(world)


def gather_logits(local: np.ndarray, n: int, world: int) -> np.ndarray:
    """Rank r scored positions r::world of n; every rank gets all n logits, in order."""
    if world == 1:
        return local
    import torch.distributed as dist
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    out = np.zeros(n, np.float32)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def from_rank0(obj, world: int):
    """Rank 0's value of ``obj`` on every rank (the run folder, a checkpoint read from its disk)."""
    if world == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
