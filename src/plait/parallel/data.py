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
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import comm


@dataclass
class Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor  # flat; each param's .grad is a view into it
    pending: int = 0  # gradients not yet final in this backward
    ready: bool = False  # every gradient final; launched once all earlier buckets are
    work: object | None = None  # the async all-reduce in flight
    flat: torch.Tensor | None = None  # ZeRO: the parameters, flat (each p.data is a view)
    shard_grad: torch.Tensor | None = None  # ZeRO: this rank's slice of the reduced gradient


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


class DataParallel:
    """Gradient averaging over ``group`` for ``module``'s parameters (see the module docstring)."""

    shards_grads = False  # whether each dp rank holds a slice of every gradient (ZeRO), or all of it

    def __init__(self, module: nn.Module, group, bucket_mb: float = 25.0, first_bucket_mb: float = 1.0,
                 isolate: nn.Parameter | None = None):
        """``isolate``: a parameter that gets a bucket of its own, last (a tied embedding split over
        pipeline stages: its ZeRO slices then line up between the two stages)."""
        self.module, self.group = module, group
        self.dp = dist.get_world_size(group) if dist.is_initialized() else 1
        params = [p for p in module.parameters() if p.requires_grad]
        rest = [p for p in reversed(params) if p is not isolate]
        groups = plan_buckets(rest, int(bucket_mb * 2**20), int(first_bucket_mb * 2**20))
        groups += [[isolate]] if isolate is not None else []
        self.isolated = isolate
        self.segments = [(p, p) for p in params]  # (what the optimizer steps, its model parameter)
        self.buckets = [self._make_bucket(ps) for ps in groups]
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._sync = True
        self._next = 0
        hook = self._on_grad_ready
        if self.dp > 1:
            for p in params:
                p.register_post_accumulate_grad_hook(hook)
        self._reset()

    @staticmethod
    def _make_bucket(params: list[nn.Parameter]) -> Bucket:
        total = sum(p.numel() for p in params)
        buffer = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        bucket = Bucket(params=params, buffer=buffer)
        _attach_views(bucket)
        return bucket

    def _reset(self) -> None:
        for b in self.buckets:
            b.pending, b.ready, b.work = len(b.params), False, None
        self._next = 0

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally; nothing travels until the next backward outside."""
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
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, b: Bucket) -> None:
        if self.dp > 1:
            b.buffer.div_(self.dp)
            b.work = comm.all_reduce_(b.buffer, self.group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket (launching any whose parameters took no part in this backward)."""
        for b in self.buckets:
            b.ready = True
        self._launch_ready()
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
        self._reset()

    def zero_grad(self) -> None:
        """Zero the buckets in place and (re)attach every ``.grad`` as a view into its bucket.

        Use this, never ``optimizer.zero_grad()``, whose ``set_to_none`` would detach the views.
        """
        for b in self.buckets:
            b.buffer.zero_()
            _attach_views(b)

    def grad_bytes(self) -> int:
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)

    def param_bytes(self) -> int:
        """Parameter bytes held (ZeRO-3: the slices)."""
        return sum(p.numel() * p.element_size() for b in self.buckets for p in b.params)

    @contextlib.contextmanager
    def gathered(self):
        """The whole local model readable (a no-op here; ZeRO-3 gathers its parameters)."""
        yield

    def steady_grad_bytes(self) -> int:
        """Gradient bytes held between steps (the buckets)."""
        return self.grad_bytes()

    def begin_step(self) -> None:
        """Before the step's first backward: nothing for plain data parallel (ZeRO-2 allocates)."""

    def after_step(self) -> None:
        """After the optimizer step: nothing to do for plain data parallel (ZeRO gathers here)."""

    def optimizer_params(self) -> list[nn.Parameter]:
        """What the optimizer updates: every parameter (ZeRO: this rank's slices)."""
        return [p for b in self.buckets for p in b.params]

    def decays(self) -> set[int] | None:
        """ids of the optimizer's parameters that take weight decay; None: decide by shape."""
        return None


def flatten_into(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    """Copy each parameter into its place in ``flat`` and make its ``.data`` that view."""
    for p, view in zip(params, comm.views_of(params, flat)):
        view.copy_(p.detach())
        p.data = view


def _attach_views(b: Bucket) -> None:
    for p, view in zip(b.params, comm.views_of(b.params, b.buffer)):
        p.grad = view
