"""Process-group start-up and the collectives plait uses; gloo's gaps are handled here only.

Known gloo facts (measured; docs/architecture.md): all_reduce, broadcast, reduce and scatter give silently wrong
results on non-contiguous views, so every collective here works on a contiguous tensor and
copies back when it had to make one.
"""

from __future__ import annotations

import datetime
import os
from collections import defaultdict

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


def all_reduce_(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM, async_op: bool = False,
                tally: Tally | None = None):
    """In-place all-reduce over ``group``; safe on non-contiguous views (gloo would corrupt them).

    Returns the work handle when ``async_op`` (the tensor must then be contiguous). ``tally``:
    the strand's counter of bytes sent.
    """
    if tally is not None:
        tally.all_reduce(tensor, dist.get_world_size(group))
    if tensor.is_contiguous():
        return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)
    if async_op:
        raise ValueError("async all-reduce needs a contiguous tensor")
    flat = tensor.contiguous()
    dist.all_reduce(flat, op=op, group=group)
    tensor.copy_(flat)
    return None


def weighted_mean(value: float, weight: float, group=None) -> float:
    """sum(value) / sum(weight) over ``group`` (default: every rank), one all-reduce in float64.
    A rank that holds nothing gives (0, 0)."""
    t = torch.tensor([value, weight], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=group)
    return float(t[0] / t[1])


# --------------------------------------------------------------------------- traffic


class Tally:
    """Bytes one strand sends from this rank, counted where each collective is issued, by the
    collective's closed-form volume per rank for ``n`` ranks and ``S`` bytes (ring algorithms,
    which NCCL and gloo use for large messages; docs/formulas.md):

    all-reduce 2(n-1)/n S; all-gather (n-1) S of its own input; reduce-scatter and all-to-all
    (n-1)/n S of its input; a point-to-point send S. A group of one sends nothing."""

    def __init__(self) -> None:
        self.sent = 0

    def all_reduce(self, t: torch.Tensor, n: int) -> None:
        self.sent += 2 * (n - 1) * _nbytes(t) // n

    def all_gather(self, t: torch.Tensor, n: int) -> None:
        self.sent += (n - 1) * _nbytes(t)

    def reduce_scatter(self, t: torch.Tensor, n: int) -> None:
        self.sent += (n - 1) * _nbytes(t) // n

    all_to_all = reduce_scatter

    def send(self, t: torch.Tensor) -> None:
        self.sent += _nbytes(t)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Traffic:
    """One rank's communication, a :class:`Tally` per strand (``dp``, ``zero``, ``tp``, ``pp``,
    ``ps``, ``diloco``); ``take()`` reads what was sent since the previous take. Made by
    ``parallelize()`` and handed to each strand: no global counter."""

    def __init__(self) -> None:
        self.tallies: dict[str, Tally] = defaultdict(Tally)
        self._taken: dict[str, int] = defaultdict(int)

    def tally(self, strand: str) -> Tally:
        return self.tallies[strand]

    def take(self) -> dict[str, int]:
        """Bytes sent per strand since the previous call (strands that sent nothing left out)."""
        out = {}
        for name, t in self.tallies.items():
            if t.sent != self._taken[name]:
                out[name] = t.sent - self._taken[name]
                self._taken[name] = t.sent
        return out

    def totals(self) -> dict[str, int]:
        """Bytes sent per strand since the start."""
        return {name: t.sent for name, t in self.tallies.items() if t.sent}


def group_size(group) -> int:
    return dist.get_world_size(group)


def views_of(tensors: list[torch.Tensor], flat: torch.Tensor) -> list[torch.Tensor]:
    """Consecutive views of the flat buffer ``flat`` (one collective's worth), one shaped like each
    of ``tensors``."""
    sizes = [t.numel() for t in tensors]
    return [v.view_as(t) for v, t in zip(flat[:sum(sizes)].split(sizes), tensors)]


# --------------------------------------------------------------------------- tensor-parallel collectives
# Megatron's conjugate pairs (Shoeybi et al. 2019, §3; Korthikanti et al. 2022, §4.2.2 for the
# sequence-parallel pair). Each works over one group, in place where autograd allows it, and is the
# identity on a group of one. Tensors are (batch, seq, features): "seq" is dim 1, "last" is dim -1.


def all_gather_dim(x: torch.Tensor, group, dim: int, tally: Tally | None = None) -> torch.Tensor:
    """All-gather along ``dim`` (rank order). One copy: the ranks' slices arrive stacked in front
    and are interleaved into place by the final reshape."""
    n = group_size(group)
    if n == 1:
        return x
    dim = dim % x.dim()
    x = x.contiguous()
    if tally is not None:
        tally.all_gather(x, n)
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))  # the concatenated form gloo accepts
    dist.all_gather_single(out, x, group=group)
    return out.view(n, *x.shape).movedim(0, dim).flatten(dim, dim + 1)


def reduce_scatter_dim(x: torch.Tensor, group, dim: int, tally: Tally | None = None) -> torch.Tensor:
    """Sum over the group, each rank keeping its 1/n slice along ``dim``. One copy: the slices are
    stacked in front so that the result lands contiguous."""
    n = group_size(group)
    if n == 1:
        return x
    dim = dim % x.dim()
    stacked = x.unflatten(dim, (n, x.shape[dim] // n)).movedim(dim, 0).contiguous()
    out = stacked.new_empty(stacked.shape[1:])
    if tally is not None:
        tally.reduce_scatter(stacked, n)
    dist.reduce_scatter_single(out, stacked.flatten(0, 1), group=group)
    return out


def split_dim(x: torch.Tensor, group, dim: int, tally: Tally | None = None) -> torch.Tensor:
    """This rank's 1/n slice along ``dim`` (no communication), in storage of its own: a view
    would keep the whole of ``x`` alive for as long as autograd holds the slice."""
    n = group_size(group)
    if n == 1:
        return x
    piece = x.chunk(n, dim=dim)[dist.get_rank(group)]
    return piece.clone() if piece.is_contiguous() else piece.contiguous()


def _all_reduce(x: torch.Tensor, group, tally: Tally | None = None) -> torch.Tensor:
    if group_size(group) > 1:
        all_reduce_(x, group, tally=tally)
    return x


def _conjugate(name: str, forward, backward) -> type:
    """An autograd Function over one group: ``forward(x, group, tally)``, and
    ``backward(grad, group, tally)`` for the gradient of x (``tally`` counts the bytes sent)."""

    def fwd(ctx, x, group, tally):
        ctx.group, ctx.tally = group, tally
        return forward(x, group, tally)

    def bwd(ctx, grad):
        return backward(grad, ctx.group, ctx.tally), None, None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def _identity(x: torch.Tensor, group, tally=None) -> torch.Tensor:
    return x


def _all_reduce_copy(grad: torch.Tensor, group, tally: Tally | None = None) -> torch.Tensor:
    """All-reduce a copy: the incoming gradient may be shared, e.g. the caller's own."""
    if group_size(group) == 1:
        return grad
    return _all_reduce(grad.clone(memory_format=torch.contiguous_format), group, tally)


_CopyToTP = _conjugate("CopyToTP", _identity, _all_reduce_copy)
_ReduceFromTP = _conjugate("ReduceFromTP", lambda x, g, c: _all_reduce(x.contiguous(), g, c), _identity)
_GatherLast = _conjugate("GatherLast", lambda x, g, c: all_gather_dim(x, g, -1, c),
                         lambda d, g, c: split_dim(d, g, -1))
_ScatterLast = _conjugate("ScatterLast", lambda x, g, c: split_dim(x, g, -1),
                          lambda d, g, c: all_gather_dim(d, g, -1, c))
_GatherSeq = _conjugate("GatherSeq", lambda x, g, c: all_gather_dim(x, g, 1, c),
                        lambda d, g, c: reduce_scatter_dim(d, g, 1, c))
_ReduceScatterSeq = _conjugate("ReduceScatterSeq", lambda x, g, c: reduce_scatter_dim(x, g, 1, c),
                               lambda d, g, c: all_gather_dim(d, g, 1, c))
_ScatterSeq = _conjugate("ScatterSeq", lambda x, g, c: split_dim(x, g, 1),
                         lambda d, g, c: all_gather_dim(d, g, 1, c))


def copy_to_tp(x: torch.Tensor, group, tally: Tally | None = None) -> torch.Tensor:
    """Megatron's f. forward: identity; backward: all-reduce (sum) over ``group``."""
    return _CopyToTP.apply(x, group, tally)


def reduce_from_tp(x: torch.Tensor, group, tally: Tally | None = None) -> torch.Tensor:
    """Megatron's g. forward: all-reduce (sum) over ``group``; backward: identity.

    The sum is written into ``x`` when it is contiguous (no copy): pass a fresh partial result,
    such as a layer's output, not a tensor needed again."""
    return _ReduceFromTP.apply(x, group, tally)


def gather_last(x: torch.Tensor, group, tally: Tally | None = None) -> torch.Tensor:
    """forward: all-gather along the last dim over ``group``; backward: keep this rank's slice."""
    return _GatherLast.apply(x, group, tally)


def scatter_last(x: torch.Tensor, group, tally: Tally | None = None) -> torch.Tensor:
    """forward: keep this rank's slice of the last dim (no traffic); backward: all-gather it."""
    return _ScatterLast.apply(x, group, tally)


def gather_seq(x: torch.Tensor, group, tally: Tally | None = None) -> torch.Tensor:
    """Sequence parallel's entry to a tp region (replaces f).
    forward: all-gather along seq (dim 1); backward: reduce-scatter along seq."""
    return _GatherSeq.apply(x, group, tally)


def reduce_scatter_seq(x: torch.Tensor, group, tally: Tally | None = None) -> torch.Tensor:
    """Sequence parallel's exit from a tp region (replaces g).
    forward: reduce-scatter along seq (dim 1); backward: all-gather along seq."""
    return _ReduceScatterSeq.apply(x, group, tally)


def scatter_seq(x: torch.Tensor, group, tally: Tally | None = None) -> torch.Tensor:
    """Enter the sequence-parallel region from a replicated tensor.
    forward: keep this rank's seq slice (no traffic); backward: all-gather along seq."""
    return _ScatterSeq.apply(x, group, tally)
