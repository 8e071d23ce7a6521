"""Process-group start-up and the collectives plait uses; gloo's gaps are handled here only.

Known gloo facts (DESIGN.md): all_reduce, broadcast, reduce and scatter give silently wrong
results on non-contiguous views, so every collective here works on a contiguous tensor and
copies back when it had to make one.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def pick_device() -> torch.device:
    """CUDA (one GPU per local rank) when there is one, else CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group described by the torchrun environment (RANK, WORLD_SIZE, MASTER_*).

    ``timeout_s`` bounds every collective, so a lost peer ends in an error, not a hang.
    """
    if dist.is_initialized():
        return
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend=backend_for(device),
        init_method="env://",
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )


def shutdown() -> None:
    """Destroy the process group before exit (an abort at exit was seen without it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM, async_op: bool = False):
    """In-place all-reduce over ``group``; safe on non-contiguous views (gloo would corrupt them).

    Returns the work handle when ``async_op`` (the tensor must then be contiguous).
    """
    if tensor.is_contiguous():
        return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)
    if async_op:
        raise ValueError("async all-reduce needs a contiguous tensor")
    flat = tensor.contiguous()
    dist.all_reduce(flat, op=op, group=group)
    tensor.copy_(flat)
    return None


def all_reduce_scalar(value: float, group, op=dist.ReduceOp.SUM) -> float:
    """All-reduce one Python number (in float64) over ``group``."""
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op, group=group)
    return float(t.item())
