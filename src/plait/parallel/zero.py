"""ZeRO stages 1 and 2 over the dp group (Rajbhandari et al. 2020, §5), on data parallel's buckets.

Each bucket's gradients and parameters are laid out flat (padded to a multiple of dp); dp rank r
owns the r-th slice of every bucket. The optimizer sees only the owned slices: one segment per
parameter that overlaps the slice (so weight decay still applies per parameter), sharing storage
with the flat parameters.

- backward, stage 1: as plain data parallel, each full bucket is all-reduced (mean) over dp as
  soon as it is ready; the optimizer reads this rank's slice of it (DeepSpeed's stage 1).
- backward, stage 2: each full bucket is reduce-scattered (mean) over dp instead; each rank
  receives the gradient of its slice only, and the full bucket is freed after the step's last
  backward and re-created at the next step's first.
- optimizer step: AdamW on the owned slices only; Adam's moments exist for 1/dp of the model.
- after the step: each bucket's parameters are all-gathered from the slices over dp.
Model states per rank with fp32 AdamW (4 bytes a parameter, 4 a gradient, 8 of moments):
stage 1: 4 + 4 + 8/dp bytes a parameter; stage 2: 4 + 12/dp between steps (REFERENCE.md).
Traffic: stage 1 one all-reduce plus the all-gather of parameters; stage 2 reduce-scatter plus
all-gather, the same volume as one all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .data import Bucket, DataParallel, _attach_views, flatten_into


class ZeroDataParallel(DataParallel):
    """Data parallel whose optimizer states (stage 1) and gradients (stage 2) are sharded over dp."""

    shards_grads = True  # the optimizer's segments are this rank's slices

    def __init__(self, module: nn.Module, group, stage: int, **kw):
        self.stage = stage
        self.rank = dist.get_rank(group)
        super().__init__(module, group, **kw)
        self.isolated_grad = self.buckets[-1].shard_grad if self.isolated is not None else None
        self.segments = [seg for b in self.buckets for seg in self._segments(b)]

    def _make_bucket(self, params: list[nn.Parameter]) -> Bucket:
        total = sum(p.numel() for p in params)
        padded = -(-total // self.dp) * self.dp
        kind = {"dtype": params[0].dtype, "device": params[0].device}
        bucket = Bucket(params=params, buffer=torch.zeros(padded, **kind))
        bucket.flat = torch.zeros(padded, **kind)  # the parameters, flat; each p.data is a view
        size = padded // self.dp
        if self.stage >= 2:
            bucket.shard_grad = torch.zeros(size, **kind)
        else:  # the reduced full bucket is kept: read this rank's slice of it
            bucket.shard_grad = bucket.buffer[self.rank * size:(self.rank + 1) * size]
        flatten_into(params, bucket.flat)
        _attach_views(bucket)
        return bucket

    def _segments(self, b: Bucket) -> list[tuple[nn.Parameter, nn.Parameter]]:
        size = len(b.shard_grad)
        return owned_segments(b.params, b.flat[self.rank * size:(self.rank + 1) * size], b.shard_grad, self.rank)

    def _launch(self, b: Bucket) -> None:
        if self.stage < 2:
            return super()._launch(b)
        b.buffer.div_(self.dp)
        b.work = dist.reduce_scatter_single(b.shard_grad, b.buffer, group=self.group, async_op=True)

    def finish(self) -> None:
        super().finish()
        if self.stage >= 2:  # keep only this rank's slice of the gradients between steps
            for b in self.buckets:
                b.buffer.untyped_storage().resize_(0)

    def begin_step(self) -> None:
        """Stage 2: re-create the full gradient buckets (zeroed) for this step's backward."""
        if self.stage < 2:
            return
        for b in self.buckets:
            storage = b.buffer.untyped_storage()
            if storage.size() == 0:
                storage.resize_(b.buffer.numel() * b.buffer.element_size())
                b.buffer.zero_()
                _attach_views(b)

    def zero_grad(self) -> None:
        if self.stage < 2:
            return super().zero_grad()
        for b in self.buckets:
            b.shard_grad.zero_()

    def after_step(self) -> None:
        """All-gather every bucket's parameters from the updated slices (over dp)."""
        for b in self.buckets:
            size = len(b.shard_grad)
            mine = b.flat[self.rank * size:(self.rank + 1) * size].clone()
            dist.all_gather_single(b.flat, mine, group=self.group)

    def grad_bytes(self) -> int:
        """Gradient bytes held now: the full buckets (stage 1, or stage 2 during a step) and the
        separate slices of stage 2."""
        full = sum(b.buffer.untyped_storage().nbytes() for b in self.buckets)
        if self.stage < 2:  # the slices are views into the full buckets
            return full
        return full + sum(b.shard_grad.numel() * b.shard_grad.element_size() for b in self.buckets)

    def steady_grad_bytes(self) -> int:
        """Gradient bytes held between steps: the full buckets (stage 1) or the slices (stage 2)."""
        if self.stage >= 2:
            return sum(b.shard_grad.numel() * b.shard_grad.element_size() for b in self.buckets)
        return super().steady_grad_bytes()

    def optimizer_params(self) -> list[nn.Parameter]:
        return [seg for seg, _ in self.segments]

    def decays(self) -> set[int]:
        """ids of the segments whose source parameter takes weight decay (two or more dims)."""
        return {id(seg) for seg, src in self.segments if src.dim() >= 2}


def owned_segments(params: list[nn.Parameter], values: torch.Tensor, grads: torch.Tensor,
                   rank: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(segment, source) for each of ``params`` (laid out flat, in order) that overlaps rank
    ``rank``'s slice; ``values`` and ``grads`` are that slice. Segments share their storage."""
    size = len(values)
    lo, hi = rank * size, (rank + 1) * size
    out, offset = [], 0
    for p in params:
        a, z = max(lo, offset), min(hi, offset + p.numel())
        if a < z:
            seg = nn.Parameter(values[a - lo:z - lo])
            seg.grad = grads[a - lo:z - lo]
            out.append((seg, p))
        offset += p.numel()
    return out
