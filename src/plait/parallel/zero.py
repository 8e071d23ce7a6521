"""ZeRO stages 1 and 2 over the dp group (Rajbhandari et al. 2020, §5), on data parallel's buckets.

Each bucket's gradients and parameters are laid out flat (padded to a multiple of dp, ``flat.py``);
dp rank r owns the r-th slice of every bucket. The optimizer sees only the owned slices: one segment per
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
stage 1: 4 + 4 + 8/dp bytes a parameter; stage 2: 4 + 12/dp between steps (docs/formulas.md).
Traffic: stage 1 one all-reduce plus the all-gather of parameters; stage 2 reduce-scatter plus
all-gather, the same volume as one all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import comm
from .data import Bucket, GradBuckets, all_reduce_mean, bucket_layout
from .flat import FlatLayout, flatten_into
from .protocol import DataParallelStrand


@dataclass
class _Shard:
    """One bucket's parameters, flat, and this rank's slice of their reduced gradient."""

    layout: FlatLayout
    flat: torch.Tensor  # the parameters, flat and padded; each p.data is a view into it
    grad: torch.Tensor  # this rank's slice of the reduced gradient (stage 1: a view into the bucket)


class ZeroDataParallel(DataParallelStrand):
    """Data parallel whose optimizer states (stage 1) and gradients (stage 2) are sharded over dp."""

    shards_grads = True  # the optimizer's segments are this rank's slices

    def __init__(self, module: nn.Module, group, *, stage: int, isolate: nn.Parameter | None = None,
                 bucket_mb: float = 25.0, first_bucket_mb: float = 1.0, tally: comm.Tally | None = None):
        """``isolate``: a parameter that gets a bucket of its own (see ``bucket_layout``); ``tally``:
        counts the bytes sent over dp."""
        self.stage, self.group, self.tally = stage, group, tally
        self.dp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        params = [p for p in module.parameters() if p.requires_grad]
        layouts = [FlatLayout(tuple(ps), self.dp, self.rank)
                   for ps in bucket_layout(params, bucket_mb, first_bucket_mb, isolate)]
        buckets = [Bucket(list(lay.params), lay.zeros()) for lay in layouts]
        self.shards = [self._shard(lay, b) for lay, b in zip(layouts, buckets)]
        self._shard_of = {id(b): sh for b, sh in zip(buckets, self.shards)}
        self.grads = GradBuckets(buckets, self._launch, hooked=True)
        self.segments = [seg for sh in self.shards for seg in sh.layout.segments(sh.layout.mine(sh.flat), sh.grad)]
        self.isolated = {id(isolate): self.shards[-1].grad} if isolate is not None else {}
        self._starts = [start for sh in self.shards for start in sh.layout.starts()]

    def places(self) -> list[tuple[torch.Tensor, int, nn.Parameter]]:
        return [(seg, start, src) for (seg, src), start in zip(self.segments, self._starts)]

    def _shard(self, layout: FlatLayout, bucket: Bucket) -> _Shard:
        flat = layout.zeros()
        flatten_into(layout.params, flat)
        # stage 1 keeps the reduced full bucket and reads its own slice; stage 2 receives only that
        grad = layout.zeros(shard=True) if self.stage >= 2 else layout.mine(bucket.buffer)
        return _Shard(layout, flat, grad)

    def _launch(self, b: Bucket):
        """backward, stage 1: all-reduce (mean) the bucket over dp; stage 2: reduce-scatter (mean)
        it, each rank receiving its slice."""
        if self.stage < 2:
            return all_reduce_mean(b, self.group, self.dp, self.tally)
        b.buffer.div_(self.dp)
        if self.tally is not None:
            self.tally.reduce_scatter(b.buffer, self.dp)
        return dist.reduce_scatter_single(self._shard_of[id(b)].grad, b.buffer, group=self.group, async_op=True)

    def no_sync(self):
        return self.grads.no_sync()

    def finish(self) -> None:
        self.grads.finish()
        if self.stage >= 2:  # keep only this rank's slice of the gradients between steps
            self.grads.release()

    def begin_step(self) -> None:
        """Stage 2: re-create the full gradient buckets (zeroed) for this step's backward."""
        if self.stage >= 2:
            self.grads.restore()
            self.grads.attach()

    def zero_grad(self) -> None:
        if self.stage < 2:
            return self.grads.zero()
        for sh in self.shards:
            sh.grad.zero_()

    def after_step(self) -> None:
        """All-gather every bucket's parameters from the updated slices (over dp)."""
        for sh in self.shards:
            mine = sh.layout.mine(sh.flat).clone()
            if self.tally is not None:
                self.tally.all_gather(mine, self.dp)
            dist.all_gather_single(sh.flat, mine, group=self.group)

    def loaded(self, step: int) -> None:
        """Every rank's parameters from the loaded slices (the all-gather of ``after_step``)."""
        self.after_step()

    def grad_bytes(self) -> int:
        """Gradient bytes held now: the full buckets (stage 1, or stage 2 during a step) and the
        separate slices of stage 2."""
        full = self.grads.nbytes()
        return full if self.stage < 2 else full + self._slice_bytes()

    def steady_grad_bytes(self) -> int:
        """Gradient bytes held between steps: the full buckets (stage 1) or the slices (stage 2)."""
        return self._slice_bytes() if self.stage >= 2 else self.grads.nbytes()

    def _slice_bytes(self) -> int:
        return sum(sh.grad.numel() * sh.grad.element_size() for sh in self.shards)

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for sh in self.shards for p in sh.layout.params)
