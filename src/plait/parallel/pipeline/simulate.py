"""Run action lists against per-action costs: makespan, idle time, in-flight micro-batches.

The same lists the runtime executes (``schedules.py``). Each rank runs its actions in order; an
action starts when the rank is free and what it ``needs`` has been produced (the previous stage's
forward, the next stage's input gradient, plus a transfer cost). The validator is this simulation at unit cost
plus checks that every action appears exactly once where it belongs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...schedules import Action, needs, place, result, stage_of


class ScheduleError(ValueError):
    """An action list that cannot run: a missing or duplicated action, or a deadlock."""


@dataclass(frozen=True)
class Costs:
    """Time of each action. ``b`` is the whole backward; split, I costs ``b - w`` and W costs ``w``."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    comm: float = 0.0  # per transfer between stages

    def of(self, op: str) -> float:
        return {"F": self.f, "B": self.b, "I": self.b - self.w, "W": self.w}[op]


@dataclass
class Event:
    rank: int
    action: Action
    stage: int
    start: float
    end: float


@dataclass
class Timeline:
    pp: int
    events: list[Event] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        return max((e.end for e in self.events), default=0.0) - min((e.start for e in self.events), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(e.end - e.start for e in self.events if e.rank == rank)

    def idle(self) -> list[float]:
        return [self.makespan - self.busy(r) for r in range(self.pp)]

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the step over all ranks: sum(idle) / (pp * makespan)."""
        span = self.makespan
        return sum(self.idle()) / (self.pp * span) if span else 0.0

    def peak_inflight(self) -> list[int]:
        """Per rank, the most micro-batch chunks whose activations are held (forward done,
        backward, or weight gradient when split, not yet)."""
        peaks = []
        for r in range(self.pp):
            held, peak = 0, 0
            for e in sorted((e for e in self.events if e.rank == r), key=lambda e: e.start):
                held += 1 if e.action.op == "F" else -1 if e.action.op in ("B", "W") else 0
                peak = max(peak, held)
            peaks.append(peak)
        return peaks

    def summary(self) -> dict:
        return {"makespan": self.makespan, "bubble_fraction": self.bubble_fraction,
                "idle": self.idle(), "peak_inflight": self.peak_inflight()}


def simulate(actions: list[list[Action]], costs: Costs | list[Costs] | None = None,
             durations: dict[tuple[int, Action], float] | None = None) -> Timeline:
    """List-schedule every rank's actions in their order; raise ScheduleError on a deadlock.

    ``costs``: one Costs for every stage, or a list with one per global stage (measured stages
    differ: the first holds the embedding, the last the head and the loss). ``durations``, keyed
    by (rank, action), overrides the time of single actions (a replay of a measured step); the
    transfer cost still comes from ``costs``."""
    costs = costs or Costs()
    durations = durations or {}
    per_stage = costs if isinstance(costs, list) else None
    pp = len(actions)
    last = pp * (1 + max((a.chunk for acts in actions for a in acts), default=0)) - 1
    done: dict[tuple, float] = {}
    pos, free = [0] * pp, [0.0] * pp
    timeline = Timeline(pp)
    while any(pos[r] < len(actions[r]) for r in range(pp)):
        moved = False
        for r in range(pp):
            while pos[r] < len(actions[r]):
                a = actions[r][pos[r]]
                stage = stage_of(r, a.chunk, pp)
                wanted = needs(a, stage, last)
                if any(k not in done for k in wanted):
                    break
                c = per_stage[stage] if per_stage else costs
                remote = [done[k] + (c.comm if k[2] != stage else 0.0) for k in wanted]
                start = max([free[r], *remote])
                free[r] = start + durations.get((r, a), c.of(a.op))
                done[result(a, stage)] = free[r]
                timeline.events.append(Event(r, a, stage, start, free[r]))
                pos[r] += 1
                moved = True
        if not moved:
            stuck = {r: str(actions[r][pos[r]]) for r in range(pp) if pos[r] < len(actions[r])}
            raise ScheduleError(f"deadlock: every rank waits (next actions by rank: {stuck})")
    return timeline


def validate(actions: list[list[Action]], microbatches: int, virtual: int = 1) -> None:
    """Every (micro-batch, stage) has one forward and one backward (B, or I and W) on the rank that
    owns the stage, every transfer has a sender and a receiver, and the whole cannot deadlock."""
    pp = len(actions)
    seen: dict[tuple, int] = {}
    for r, acts in enumerate(actions):
        for a in acts:
            if not (0 <= a.mb < microbatches and 0 <= a.chunk < virtual) or a.op not in "FBIW":
                raise ScheduleError(f"rank {r}: action {a} outside {microbatches} micro-batches x {virtual} chunks")
            key = (a.op, a.mb, stage_of(r, a.chunk, pp))
            seen[key] = seen.get(key, 0) + 1
    for mb in range(microbatches):
        for stage in range(pp * virtual):
            _check_unit(seen, mb, stage, place(stage, pp)[0])
    simulate(actions)


def _check_unit(seen: dict, mb: int, stage: int, rank: int) -> None:
    f, b, i, w = (seen.get((op, mb, stage), 0) for op in "FBIW")
    if f != 1 or not ((b == 1 and i == w == 0) or (b == 0 and i == w == 1)):
        raise ScheduleError(f"micro-batch {mb} on stage {stage} (rank {rank}) needs one F and one B "
                            f"(or one I and one W); found F={f} B={b} I={i} W={w}")
