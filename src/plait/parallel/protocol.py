"""The contract of a data-parallel strand: what ``parallelize`` and ``ParallelModel`` ask of it.

Plain data parallel (``data.py``), ZeRO-1/2 (``zero.py``) and ZeRO-3 (``zero3.py``) implement it;
DiLoCo (``diloco.py``) too; a parameter server is the next. Each is built on the local model (after tensor and
pipeline parallel have split it) and the dp group, and owns everything that travels over dp.

One optimizer step, as ``ParallelModel`` drives it::

    begin_step()      before the first backward (ZeRO-2 allocates its full gradient buckets,
                      ZeRO-3 gathers what it keeps gathered for the whole step)
    forward/backward  of each micro-batch; all but the last inside ``no_sync()``, where a strand
                      may only accumulate locally (under pipeline parallel: all but each chunk's
                      last backward)
    finish()          after the last backward: every gradient in ``segments`` is final (the mean
                      over dp); tensor parallel then sums sequence-parallel partial gradients and
                      pipeline parallel a tied weight's two copies (``tied_grad``), on those tensors
    optimizer.step()  over ``param_groups()``: what this rank updates (ZeRO: its slices)
    after_step()      ZeRO-1/2 all-gather the updated parameters
    zero_grad()

``segments`` pairs each tensor the optimizer steps with the model parameter it belongs to: the
parameter itself under plain data parallel, a flat slice of it under ZeRO (``flat.py``). Clipping,
weight decay and the sums over tp and the pipeline's tied copies all work on those segments, so
they need no knowledge of how a strand shards.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import torch
from torch import nn


class DataParallelStrand(abc.ABC):
    """A data-parallel strand (see the module docstring for the order of calls)."""

    shards_grads: bool = False  # each dp rank holds a slice of every gradient: norms sum over dp
    lockstep: bool = True  # every rank takes the same steps together (an asynchronous server: False)
    averages_grads: bool = True  # a step's gradient is the mean over dp (DiLoCo, async pushes: a replica's own)
    copy: bool = False  # this rank's segments are a copy another rank writes to checkpoints (a DiLoCo replica > 0)
    clips_itself: bool = False  # the strand clips by the global norm itself (and reports it in last_norm)
    last_norm: float = 0.0
    segments: list[tuple[torch.Tensor, nn.Parameter]]  # (what the optimizer steps, its model parameter)
    isolated: Mapping[int, torch.Tensor] = MappingProxyType({})  # sharding: id(isolated param) -> grad slice

    @abc.abstractmethod
    def no_sync(self) -> contextlib.AbstractContextManager:
        """A context for accumulation micro-steps: backward inside it sends nothing over dp."""

    @abc.abstractmethod
    def finish(self) -> None:
        """After the step's last backward: wait until every gradient in ``segments`` is final."""

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Zero the gradients for the next step, in place (never ``optimizer.zero_grad()``)."""

    def tied_grad(self, param: nn.Parameter) -> torch.Tensor | None:
        """The gradient of ``param`` as the optimizer will read it, which the parallel model sums
        over the first and last pipeline stage (``groups.embed``) after ``finish``: the whole
        gradient, or under sharding the slice of the parameter built with ``isolate`` (its own
        storage, so that the two stages' slices line up)."""
        if not self.shards_grads:
            return param.grad
        if id(param) not in self.isolated:
            raise ValueError("a sharding strand sums a tied weight's slices only for the parameter built with isolate=")
        return self.isolated[id(param)]

    @abc.abstractmethod
    def param_bytes(self) -> int:
        """Parameter bytes held now (ZeRO-3: the slices, plus any unit gathered now)."""

    @abc.abstractmethod
    def grad_bytes(self) -> int:
        """Gradient bytes held now."""

    def steady_grad_bytes(self) -> int:
        """Gradient bytes held between steps."""
        return self.grad_bytes()

    def begin_step(self) -> None:  # noqa: B027 - a step with nothing to prepare is the common case
        """Before the step's first backward."""

    def after_step(self) -> None:  # noqa: B027
        """After the optimizer step."""

    def flush(self) -> None:  # noqa: B027
        """At the end of training: finish anything still in flight."""

    def loaded(self, step: int) -> None:  # noqa: B027
        """After a checkpoint of ``step`` steps was loaded into ``segments``."""

    def samples(self, global_batch: int) -> int:
        """Sequences all replicas trained on since the last call (one step: the global batch; an
        asynchronous server counts the pushes it applied)."""
        return global_batch

    def metrics(self) -> dict:
        """The strand's own columns of this step's metrics row."""
        return {}

    def running(self, step: int, steps: int) -> bool:
        """Whether this rank takes step ``step`` (0-based) of a run of ``steps`` (an asynchronous
        parameter server decides when the samples of ``steps`` steps have been used)."""
        return step < steps

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """The whole local model readable (ZeRO-3 gathers its parameters; others hold them)."""
        yield

    def places(self) -> list[tuple[torch.Tensor, int, nn.Parameter]]:
        """``(segment, start, parameter)`` for each of ``segments``: the segment holds the parameter's
        elements from ``start`` on, in its flat order (0 and the whole parameter without sharding).
        Checkpoints name every piece by it (``checkpoint/pieces.py``)."""
        if self.shards_grads:
            raise NotImplementedError(f"{type(self).__name__} shards: it must say where each segment starts")
        return [(seg, 0, src) for seg, src in self.segments]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups over ``segments`` (``decay_groups``)."""
        return decay_groups(self.segments, weight_decay)


def decay_groups(pairs, weight_decay: float) -> list[dict]:
    """AdamW parameter groups over (tensor stepped, its model parameter) pairs: weight decay on
    matrices (two or more dimensions), none on norms and biases. A flat slice has lost its shape,
    so the decision follows the model parameter."""
    pairs = [(t, src) for t, src in pairs if src.requires_grad]
    return [{"params": [t for t, src in pairs if src.dim() >= 2], "weight_decay": weight_decay},
            {"params": [t for t, src in pairs if src.dim() < 2], "weight_decay": 0.0}]
