"""What travels between pipeline stages, in which order, and when a sent tensor may be let go.

Order. Every transfer between two ranks is posted by both in one order they agree on
(``pair_orders``): the order of the sends in the schedule simulated at unit cost. NCCL matches
point-to-point operations between two ranks by order alone (it ignores tags) and runs each pair's
operations in order on one stream, so a receive posted before a send the peer expects first would
hang or take the wrong message. A rank can always post its transfers in this order: a receive it
needs before an action is preceded only by sends of earlier actions (in the simulation, a send of
that action or a later one ends after the action starts, so after the message it waits for).

Release.
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

from dataclasses import dataclass
from functools import cache

import torch

from ...schedules import ACT, Action, Message, Schedule, awaited, message, place, sender, stage_of
from .simulate import simulate


def pair_orders(actions: list[list[Action]], rank: int) -> dict[int, list[tuple[bool, Message]]]:
    """For each peer rank, the transfers between it and ``rank`` in the agreed order:
    (outgoing, message). Both ranks of a pair compute the same list."""
    pp = len(actions)
    last = pp * (1 + max(a.chunk for acts in actions for a in acts)) - 1
    sent = []
    for e in simulate(actions).events:
        msg = message(e.action, e.stage, last)
        if msg is not None:
            sent.append((e.end, e.rank, msg))
    orders: dict[int, list[tuple[bool, Message]]] = {}
    for _, src, msg in sorted(sent):
        dst = place(msg[1], pp)[0]
        if rank in (src, dst):
            orders.setdefault(dst if src == rank else src, []).append((src == rank, msg))
    return orders


@dataclass(frozen=True)
class StepPlan:
    """What one rank's training step follows, derived from the schedule alone: built once per
    (schedule, pp, micro-batches, v, rank) by ``step_plan`` and reused every step."""

    actions: list[Action]  # this rank's
    position: dict[tuple[int, str, int, int], int]  # (rank, op, mb, chunk) -> its number on that rank
    orders: dict[int, list[tuple[bool, Message]]]  # pair_orders for this rank
    awaits: list[Message | None]  # per action of this rank, the message it waits for
    last_backward: frozenset[int]  # numbers of each chunk's last B or W (data-parallel traffic allowed)


@cache
def step_plan(schedule: Schedule, pp: int, m: int, v: int, rank: int) -> StepPlan:
    everyone = schedule.actions(pp, m, v)
    acts = everyone[rank]
    final = {a.chunk: i for i, a in enumerate(acts) if a.op in ("B", "W")}
    return StepPlan(
        actions=acts,
        position={(r, a.op, a.mb, a.chunk): i for r in range(pp) for i, a in enumerate(everyone[r])},
        orders=pair_orders(everyone, rank),
        awaits=[awaited(a, stage_of(rank, a.chunk, pp), pp * v - 1) for a in acts],
        last_backward=frozenset(final.values()))


class SendTracker:
    """Tensors in flight per peer rank, released as the peer's progress proves them received."""

    def __init__(self, plan: StepPlan, pp: int):
        self.pp = pp
        self._index = plan.position
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

    def sent(self, work, t: torch.Tensor, msg: Message) -> None:
        peer, consumer = self._where(msg[1], msg[0], msg[2])
        self._pending.setdefault(peer, []).append((consumer, work, t))
        self.held_bytes += t.numel() * t.element_size()
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def received(self, msg: Message) -> None:
        """A message arrived: release what its sender has surely received."""
        peer, producer = self._where(sender(msg), msg[0], msg[2])
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
