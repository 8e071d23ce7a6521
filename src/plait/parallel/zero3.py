"""ZeRO-3 over the dp group (Rajbhandari et al. 2020, §5.3): parameters sharded too.

Units: every block of the model's description, and a root unit with everything else (the input
and output stages). Each unit keeps only this rank's slice of its flat parameters between uses.

- forward: a block's parameters are all-gathered over dp just before it runs and freed right
  after (the storage is released; tensors saved for backward keep pointing at it).
- backward: a hook on the block's output all-gathers the parameters again before the block's
  backward; once all its gradients are accumulated they are reduce-scattered (mean) over dp into
  this rank's slice, and the full parameters and gradients are freed. Under zero bubble the hook
  fires in I, and the unit waits for the W of every micro-batch whose I has run (the count adds up).
- the root unit is gathered for the whole step (an input embedding may be tied to the output
  layer) and reduce-scattered at the end.
- optimizer: AdamW on this rank's slices, as in ZeRO-1/2; nothing to gather after the step.

Model states per rank with fp32 AdamW: 16/dp bytes a parameter. Traffic: 1.5x data parallel's
(parameters gathered twice, gradients reduce-scattered once).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..comm import Tally, views_of
from ..errors import ConfigError
from .flat import FlatLayout, flatten_into, release, restore
from .protocol import DataParallelStrand


@dataclass
class Unit:
    layout: FlatLayout  # its parameters, flat over dp
    full: torch.Tensor  # flat, padded; storage released while the unit is not in use
    alias: torch.Tensor  # the same storage with its own version counter: collectives write here, so
    #                      tensors autograd saved from ``full`` are not seen as modified in place
    grad: torch.Tensor  # flat full gradient; storage released between backwards
    shard: torch.Tensor  # this rank's slice of the parameters (persistent)
    shard_grad: torch.Tensor  # this rank's slice of the gradient (persistent)
    pending: int = 0
    gathered: bool = False
    keep: bool = False  # the root unit: gathered for the whole step

    @property
    def params(self) -> tuple[nn.Parameter, ...]:
        return self.layout.params


class Zero3(DataParallelStrand):
    """Parameter, gradient and optimizer-state sharding over ``group`` (see the module docstring)."""

    shards_grads = True

    def __init__(self, module: nn.Module, group, *, units: list[nn.Module], isolate: nn.Parameter | None = None,
                 tally: Tally | None = None):
        """``units``: the modules gathered one at a time (the model's blocks); ``isolate``: a
        parameter kept in a unit of its own (see ``data.bucket_layout``); ``tally``: counts the
        bytes sent over dp."""
        self.module, self.group, self.tally = module, group, tally
        self.dp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        trained = [(u, [p for p in u.parameters() if p.requires_grad]) for u in units]
        units = [u for u, params in trained if params]  # a frozen block stays whole, outside ZeRO-3
        in_units = {id(p) for _, params in trained for p in params}
        rest = [p for p in module.parameters() if id(p) not in in_units and p is not isolate and p.requires_grad]
        self.units = [self._unit(params) for _, params in trained if params]
        kept = ([rest] if rest else []) + ([[isolate]] if isolate is not None else [])
        self.kept_units = [self._unit(ps) for ps in kept]
        for unit in self.kept_units:
            unit.keep = True  # the root, and an isolated parameter's unit: gathered for the whole step
        self.isolated = {id(isolate): self.kept_units[-1].shard_grad} if isolate is not None else {}
        for block, unit in zip(units, self.units):
            block.register_forward_pre_hook(lambda _m, _a, u=unit: self._gather(u))
            block.register_forward_hook(lambda _m, _a, out, u=unit: self._after_forward(u, out))
        for unit in self.all_units:
            for p in unit.params:
                p.register_post_accumulate_grad_hook(lambda _p, u=unit: self._grad_ready(u))
        self.segments = [seg for u in self.all_units for seg in u.layout.segments(u.shard, u.shard_grad)]
        self._starts = [start for u in self.all_units for start in u.layout.starts()]

    def places(self) -> list[tuple[torch.Tensor, int, nn.Parameter]]:
        return [(seg, start, src) for (seg, src), start in zip(self.segments, self._starts)]

    @property
    def all_units(self) -> list[Unit]:
        return self.units + self.kept_units

    def _unit(self, params: list[nn.Parameter]) -> Unit:
        if len({(p.dtype, p.device) for p in params}) > 1:
            raise ConfigError("parallel.zero", 3, "ZeRO-3 lays a block's parameters out in one flat buffer: they need "
                              f"one dtype and device, not {sorted({str(p.dtype) for p in params})}")
        layout = FlatLayout(tuple(params), self.dp, self.rank)
        full = layout.zeros()
        flatten_into(params, full)
        alias = torch.empty(0, dtype=full.dtype, device=full.device).set_(full.untyped_storage(), 0, full.shape)
        unit = Unit(layout, full, alias, layout.zeros(), layout.mine(full).clone(), layout.zeros(shard=True))
        release(unit.full)
        release(unit.grad)
        return unit

    # ---------------------------------------------------------------- gather / free

    def _gather(self, u: Unit) -> None:
        """forward and backward: all-gather the unit's parameters over dp (no-op if gathered)."""
        if u.gathered:
            return
        restore(u.full)
        if self.tally is not None:
            self.tally.all_gather(u.shard, self.dp)
        dist.all_gather_single(u.alias, u.shard, group=self.group)
        u.gathered = True

    def _free(self, u: Unit, force: bool = False) -> None:
        """Release the unit's full parameters (a kept unit only when ``force``)."""
        if u.gathered and (force or not u.keep):
            release(u.full)
            u.gathered = False

    def _after_forward(self, u: Unit, out: torch.Tensor) -> None:
        if torch.is_grad_enabled() and out.requires_grad:
            out.register_hook(lambda g, u=u: (self._gather(u), self._prepare_grads(u), g)[-1])
        self._free(u)

    def _prepare_grads(self, u: Unit) -> None:
        """Before the unit's backward: a zeroed full gradient buffer that .grad views into."""
        if u.grad.untyped_storage().size() == 0:
            restore(u.grad)
            u.grad.zero_()
            for p, view in zip(u.params, views_of(u.params, u.grad)):
                p.grad = view
        u.pending += len(u.params)  # zero bubble: I of the next micro-batch may come before this W

    def _grad_ready(self, u: Unit) -> None:
        u.pending -= 1
        if u.pending == 0 and not u.keep:
            self._reduce(u)
            self._free(u)

    def _reduce(self, u: Unit) -> None:
        """backward: reduce-scatter (mean) the unit's full gradient over dp into this rank's slice."""
        part = torch.empty_like(u.shard_grad)
        u.grad.div_(self.dp)
        if self.tally is not None:
            self.tally.reduce_scatter(u.grad, self.dp)
        dist.reduce_scatter_single(part, u.grad, group=self.group)
        u.shard_grad.add_(part)
        for p in u.params:
            p.grad = None
        release(u.grad)

    # ---------------------------------------------------------------- the step, as DataParallel's

    def begin_step(self) -> None:
        """Gather the kept units (the root, an isolated parameter) over dp for the whole step."""
        for unit in self.kept_units:
            self._gather(unit)
            self._prepare_grads(unit)

    def no_sync(self):
        return contextlib.nullcontext()  # each micro-batch's gradients are reduce-scattered at once

    def finish(self) -> None:
        """After the last backward: reduce-scatter (mean) over dp what is left (the kept units,
        and units whose backward did not run), and free the gathered parameters."""
        for u in self.units:  # units whose backward did not run (or not every parameter took part)
            if u.grad.untyped_storage().size():
                self._reduce(u)
            self._free(u)
            u.pending = 0
        for unit in self.kept_units:
            unit.pending = 0
            self._reduce(unit)
            self._free(unit, force=True)

    def zero_grad(self) -> None:
        for u in self.all_units:
            u.shard_grad.zero_()

    def after_step(self) -> None:
        """Nothing: the next forward gathers the updated slices."""

    @contextlib.contextmanager
    def gathered(self):
        """Every unit's full parameters, for reading the whole model (verify, checkpoints, sampling)."""
        for u in self.all_units:
            self._gather(u)
        try:
            yield
        finally:
            for u in self.all_units:
                self._free(u, force=True)

    def grad_bytes(self) -> int:
        return sum(u.shard_grad.numel() * u.shard_grad.element_size() + u.grad.untyped_storage().nbytes()
                   for u in self.all_units)

    def steady_grad_bytes(self) -> int:
        return sum(u.shard_grad.numel() * u.shard_grad.element_size() for u in self.all_units)

    def param_bytes(self) -> int:
        """Parameter bytes held between steps: the slices (plus any unit gathered now)."""
        return sum(u.shard.numel() * u.shard.element_size() + u.full.untyped_storage().nbytes()
                   for u in self.all_units)
