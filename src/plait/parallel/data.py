"""Data parallel: bucketed gradient all-reduce over the dp group, overlapped with backward.

Every dp rank holds the whole model and sees its own share of the batch (Li et al. 2020, the
design of PyTorch DDP): gradients are laid out in a few flat buckets, ``param.grad`` being a view
into its bucket, so a ready bucket is sent as one message with no copy.

- forward: nothing travels.
- backward: once every gradient in a bucket is final, the bucket is divided by dp and
  all-reduced (sum) over ``groups.dp`` asynchronously, while autograd goes on with the earlier
  layers. Buckets are launched strictly in index order, so every rank issues the same collectives
  in the same order (gloo and NCCL both need that).
- ``finish()`` waits for every bucket: after it each rank holds the mean gradient over dp.
- inside ``no_sync()`` (gradient-accumulation micro-steps) nothing travels; the last micro-step,
  outside it, sends the accumulated sum once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import comm
from .flat import release, restore
from .protocol import DataParallelStrand


@dataclass
class Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor  # flat; each param's .grad is a view into it
    pending: int = 0  # gradients not yet final in this backward
    ready: bool = False  # every gradient final; launched once all earlier buckets are
    work: object | None = None  # the collective in flight


def plan_buckets(params: list[nn.Parameter], cap_bytes: int, first_cap_bytes: int) -> list[list[nn.Parameter]]:
    """Group parameters, in the order given, into buckets of at most ``cap_bytes`` (one dtype each).

    The first bucket is smaller (as in DDP) so that communication starts early in backward.
    """
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if buckets:
            cur = buckets[-1]
            cap = first_cap_bytes if len(buckets) == 1 else cap_bytes
            if cur[0].dtype == p.dtype and cur[0].device == p.device and size + nbytes <= cap:
                cur.append(p)
                size += nbytes
                continue
        buckets.append([p])
        size = nbytes
    return buckets


def bucket_layout(params: list[nn.Parameter], bucket_mb: float, first_bucket_mb: float,
                  isolate: nn.Parameter | None = None) -> list[list[nn.Parameter]]:
    """Buckets in the order backward produces gradients (parameters reversed); ``isolate`` alone
    in the last bucket (a tied embedding split over pipeline stages: its ZeRO slices then line up
    between the two stages)."""
    rest = [p for p in reversed(params) if p is not isolate]
    groups = plan_buckets(rest, int(bucket_mb * 2**20), int(first_bucket_mb * 2**20))
    return groups + ([[isolate]] if isolate is not None else [])


class GradBuckets:
    """Gradients as views into flat buckets; a bucket is launched (``launch(bucket)`` returns the
    work in flight) once every gradient in it is final and every earlier bucket has been launched,
    so all ranks issue the same collectives in the same order."""

    def __init__(self, buckets: list[Bucket], launch: Callable[[Bucket], object], hooked: bool):
        self.buckets, self._launch = buckets, launch
        self._bucket_of = {p: b for b in buckets for p in b.params}
        self._sync, self._next = True, 0
        if hooked:
            for p in self._bucket_of:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self.attach()
        self._reset()

    def attach(self) -> None:
        """(Re)attach every ``.grad`` as a view into its bucket."""
        for b in self.buckets:
            for p, view in zip(b.params, comm.views_of(b.params, b.buffer)):
                p.grad = view

    def _reset(self) -> None:
        for b in self.buckets:
            b.pending, b.ready, b.work = len(b.params), False, None
        self._next = 0

    @contextlib.contextmanager
    def no_sync(self):
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        b = self._bucket_of[p]
        b.pending -= 1
        if b.pending == 0:
            b.ready = True
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].ready:
            b = self.buckets[self._next]
            b.work = self._launch(b)
            self._next += 1

    def finish(self) -> None:
        """Launch what is left (buckets whose parameters took no part in this backward), wait for all."""
        for b in self.buckets:
            g = b.params[0].grad
            if g is None or g.untyped_storage().data_ptr() != b.buffer.untyped_storage().data_ptr():
                raise RuntimeError("gradients are no longer views into plait's buckets (optimizer.zero_grad() "
                                   "sets them to None): zero them with the parallel model's zero_grad()")
            b.ready = True
        self._launch_ready()
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
        self._reset()

    def zero(self) -> None:
        """Zero the buckets in place and (re)attach every ``.grad`` as a view into its bucket."""
        for b in self.buckets:
            b.buffer.zero_()
        self.attach()

    def release(self) -> None:
        """Free the buckets' storage (ZeRO-2 between steps); ``.grad`` views stay attached."""
        for b in self.buckets:
            release(b.buffer)

    def restore(self) -> None:
        """Give released buckets their storage back, zeroed."""
        for b in self.buckets:
            if restore(b.buffer):
                b.buffer.zero_()

    def nbytes(self) -> int:
        """Bytes of the full buckets held now (ZeRO-2 releases them between steps)."""
        return sum(b.buffer.untyped_storage().nbytes() for b in self.buckets)


def all_reduce_mean(b: Bucket, group, dp: int, tally: comm.Tally | None = None):
    """backward: divide the bucket by dp and all-reduce (sum) it over ``group``, asynchronously."""
    b.buffer.div_(dp)
    return comm.all_reduce_(b.buffer, group, async_op=True, tally=tally)


class DataParallel(DataParallelStrand):
    """Gradient averaging over ``group`` for ``module``'s parameters (see the module docstring)."""

    def __init__(self, module: nn.Module, group, *, bucket_mb: float = 25.0, first_bucket_mb: float = 1.0,
                 tally: comm.Tally | None = None):
        """``tally``: counts the bytes sent over dp."""
        self.module, self.group, self.tally = module, group, tally
        self.dp = dist.get_world_size(group) if dist.is_initialized() else 1
        params = [p for p in module.parameters() if p.requires_grad]
        buckets = [Bucket(ps, torch.zeros(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device))
                   for ps in bucket_layout(params, bucket_mb, first_bucket_mb)]
        self.grads = GradBuckets(buckets, self._launch, hooked=self.dp > 1)
        self.buckets = self.grads.buckets
        self.segments = [(p, p) for p in params]

    def _launch(self, b: Bucket):
        """backward: the bucket's mean over dp (``all_reduce_mean``); nothing with one rank."""
        return all_reduce_mean(b, self.group, self.dp, self.tally) if self.dp > 1 else None

    def no_sync(self):
        """Accumulate gradients locally; nothing travels until the next backward outside."""
        return self.grads.no_sync()

    def finish(self) -> None:
        """Wait for every bucket: each rank then holds the mean gradient over dp."""
        self.grads.finish()

    def zero_grad(self) -> None:
        """Zero the buckets in place (``.grad`` stay views into them)."""
        self.grads.zero()

    def grad_bytes(self) -> int:
        return self.grads.nbytes()

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p, _ in self.segments)
