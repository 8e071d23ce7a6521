"""``plait schedule``: a schedule's rank x time grid, its bubble, and its picture."""

from __future__ import annotations

from ...errors import ConfigError
from . import schedules
from .simulate import Costs, Timeline, simulate, validate


def build(name: str, pp: int, microbatches: int, virtual: int, costs: Costs) -> Timeline:
    """Validate the arguments (one-line errors), then simulate the schedule; per-chunk costs are 1/v."""
    if name not in schedules.SCHEDULES:
        raise ConfigError("--schedule", name, f"valid schedules: {', '.join(schedules.SCHEDULES)}")
    for field, value in (("--pp", pp), ("--microbatches", microbatches), ("--virtual", virtual)):
        if value < 1:
            raise ConfigError(field, value, "must be at least 1")
    sched = schedules.SCHEDULES[name]
    if virtual > 1 and not sched.interleaved:
        raise ConfigError("--virtual", virtual, f"only the interleaved schedule uses virtual stages, not {name}")
    if sched.interleaved and microbatches % pp:
        raise ConfigError("--microbatches", microbatches, f"the interleaved schedule needs a multiple of --pp={pp}")
    if costs.w >= costs.b and name == "zb":
        raise ConfigError("--tw", costs.w, f"must be less than the whole backward, --tb={costs.b}")
    actions = sched.actions(pp, microbatches, virtual)
    validate(actions, microbatches, virtual)
    per_chunk = Costs(costs.f / virtual, costs.b / virtual, costs.w / virtual, costs.comm)
    return simulate(actions, per_chunk)


def grid(tl: Timeline) -> str:
    """Text picture: one row per rank, one column per time unit (the shortest action's length)."""
    unit = min(e.end - e.start for e in tl.events)
    cols = round(tl.makespan / unit)
    width = max(len(_label(e.action)) for e in tl.events) + 1
    rows = []
    for r in range(tl.pp):
        cells = ["." * (width - 1) + " "] * cols
        for e in (e for e in tl.events if e.rank == r):
            for c in range(round(e.start / unit), round(e.end / unit)):
                cells[c] = _label(e.action).ljust(width)
        rows.append(f"rank {r} | " + "".join(cells).rstrip())
    return "\n".join(rows)


def _label(a) -> str:
    return f"{a.op}{a.mb}" + (f"{chr(ord('a') + a.chunk)}" if a.chunk else "")
