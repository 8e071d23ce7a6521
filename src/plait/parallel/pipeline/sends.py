"""When a sent activation or gradient may be let go: the schedule says when its transfer is done.

A stage sends its output (or input gradient) with ``isend`` and must keep the tensor until the
transfer is complete. gloo completes a send only once the receiver has posted the matching receive,
and tells so only through ``wait()``, which blocks until then; waiting on every send at the end of
the step (the simple way) holds all ``m`` micro-batches' transfers, not the O(pp) in flight.

The action lists of every rank are known here, so completion can be inferred without blocking: a
message from peer rank R produced by R's action number x means R has started all its actions up to
x, and the runtime posts each action's receive at the latest when the action starts. Every send to
R consumed by one of those actions is therefore matched, and ``wait()`` on it returns at once (or
after the bytes already in flight). Sends that no later message vouches for are waited on at the
end of the step, as before. On NCCL the same waits only order streams.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .schedules import place

ACT, GRAD = 0, 1  # transfer kinds: activation to stage s+1, input gradient to stage s-1


class SendTracker:
    """Tensors in flight per peer rank, released as the peer's progress proves them received."""

    def __init__(self, actions_of: Callable[[int], list], pp: int):
        self.pp = pp
        self._index = {(r, a.op, a.mb, a.chunk): i for r in range(pp) for i, a in enumerate(actions_of(r))}
        self._pending: dict[int, list[tuple[int, object, torch.Tensor]]] = {}  # peer -> (consumer index, work, t)
        self._progress: dict[int, int] = {}  # peer -> highest action number known started
        self.held_bytes = 0
        self.peak_bytes = 0  # most bytes held by unfinished sends at once

    def _where(self, stage: int, kind: int, mb: int) -> tuple[int, int]:
        """(rank, action number) of the action that consumes (or produces) this transfer on ``stage``:
        its forward for an activation, its backward (B or I) for a gradient."""
        rank, chunk = place(stage, self.pp)
        ops = "F" if kind == ACT else "BI"
        return rank, min(self._index[(rank, op, mb, chunk)] for op in ops if (rank, op, mb, chunk) in self._index)

    def sent(self, work, t: torch.Tensor, to_stage: int, kind: int, mb: int) -> None:
        peer, consumer = self._where(to_stage, kind, mb)
        self._pending.setdefault(peer, []).append((consumer, work, t))
        self.held_bytes += t.numel() * t.element_size()
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def received(self, from_stage: int, kind: int, mb: int) -> None:
        """A message from ``from_stage`` arrived: release what its sender has surely received."""
        peer, producer = self._where(from_stage, kind, mb)
        self._progress[peer] = max(self._progress.get(peer, -1), producer)
        keep = []
        for consumer, work, t in self._pending.get(peer, []):
            if consumer <= self._progress[peer]:
                work.wait()
                self.held_bytes -= t.numel() * t.element_size()
            else:
                keep.append((consumer, work, t))
        self._pending[peer] = keep

    def finish(self) -> None:
        """Wait for every send still held (the end of the step)."""
        for pending in self._pending.values():
            for _, work, _ in pending:
                work.wait()
        self._pending.clear()
        self.held_bytes = 0
