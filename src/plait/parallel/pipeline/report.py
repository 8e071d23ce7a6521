"""``plait schedule``: a schedule's rank x time grid, its bubble, and its picture."""

from __future__ import annotations

from ... import schedules
from ...errors import ConfigError
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
    width = max(len(str(e.action)) for e in tl.events) + 1
    rows = []
    for r in range(tl.pp):
        cells = ["." * (width - 1) + " "] * cols
        for e in (e for e in tl.events if e.rank == r):
            for c in range(round(e.start / unit), round(e.end / unit)):
                cells[c] = str(e.action).ljust(width)
        rows.append(f"rank {r} | " + "".join(cells).rstrip())
    return "\n".join(rows)


def measured(traces: list[list[tuple]]) -> Timeline:
    """A Timeline from each rank's recorded (action, start, end), times from one host's clock."""
    from ...schedules import stage_of
    from .simulate import Event

    pp = len(traces)
    tl = Timeline(pp)
    for rank, trace in enumerate(traces):
        tl.events += [Event(rank, a, stage_of(rank, a.chunk, pp), start, end) for a, start, end in trace]
    return tl


def mean_costs(tl: Timeline, comm: float = 0.0) -> list[Costs]:
    """Average time of each kind of action on each stage of a measured step."""
    def mean(op: str, stage: int) -> float:
        times = [e.end - e.start for e in tl.events if e.action.op == op and e.stage == stage]
        return sum(times) / len(times) if times else 0.0

    stages = range(max(e.stage for e in tl.events) + 1)
    return [Costs(f=mean("F", s), b=mean("B", s) or mean("I", s) + mean("W", s), w=mean("W", s), comm=comm)
            for s in stages]


def transfer_latency(tl: Timeline) -> float:
    """Mean time from a result's end on one stage to the start of the action on the next stage
    that was waiting for it (its own rank was free earlier)."""
    from statistics import mean

    from ...schedules import needs, result

    last = max(e.stage for e in tl.events)
    done = {result(e.action, e.stage): e.end for e in tl.events}
    delays = []
    for r in range(tl.pp):
        prev = None
        for e in sorted((e for e in tl.events if e.rank == r), key=lambda e: e.start):
            remote = [done[k] for k in needs(e.action, e.stage, last) if k[2] != e.stage and k in done]
            if remote and (prev is None or max(remote) >= prev):  # waited for the transfer
                delays.append(e.start - max(remote))
            prev = e.end
    return max(0.0, mean(delays)) if delays else 0.0


def expected(tl: Timeline, actions: list[list], comm: float, draws: int = 100, seed: int = 0) -> dict:
    """The bubble to expect from the measured spread of action times: the mean over ``draws``
    simulations in which every action takes a time drawn from the measured times of its kind on
    its stage. Typically above the bubble at mean times: a long action on the critical path delays
    the step, a short one off it gains nothing."""
    import random
    from statistics import mean

    pool: dict[tuple[int, str], list[float]] = {}
    for e in tl.events:
        pool.setdefault((e.stage, e.action.op), []).append(e.end - e.start)
    rng, costs = random.Random(seed), mean_costs(tl, comm)
    sims = [simulate(actions, costs, {(e.rank, e.action): rng.choice(pool[(e.stage, e.action.op)])
                                      for e in tl.events}) for _ in range(draws)]
    bubbles = sorted(t.bubble_fraction for t in sims)
    at = lambda q: bubbles[round(q * (len(bubbles) - 1))]  # noqa: E731 - a nearest-rank percentile
    return {"makespan": mean(t.makespan for t in sims), "bubble_fraction": mean(bubbles),
            "bubble_p10_p90": [at(0.1), at(0.9)], "draws": draws}


def compare(traces: list[list[tuple]], actions: list[list]) -> dict:
    """The measured step beside simulations of the same action lists, all with the measured
    transfer latency:

    - ``simulated`` replays each action's own measured time. It checks the runtime: any idle beyond
      what the schedule's dependencies imply shows as a difference.
    - ``expected`` draws each action's time from the measured times of its kind on its stage
      (``expected()``): the bubble to expect at this spread.
    - ``predicted`` gives each action the mean time of its kind on its stage (the planner's view:
      it cannot know which single action runs long)."""
    real = measured(traces)
    comm = transfer_latency(real)
    costs = mean_costs(real, comm)
    replay = simulate(actions, costs, {(e.rank, e.action): e.end - e.start for e in real.events})
    predicted = simulate(actions, costs)
    t0 = min(e.start for e in real.events)
    events = [[e.rank, e.action.op, e.action.mb, e.action.chunk, e.start - t0, e.end - t0] for e in real.events]
    return {"measured": real.summary(), "simulated": replay.summary(), "expected": expected(real, actions, comm),
            "predicted": predicted.summary(), "events": events, "busy_s": [real.busy(r) for r in range(real.pp)],
            "stage_costs_s": [{"f": c.f, "b": c.b, "w": c.w} for c in costs], "comm_s": comm,
            "timelines": (real, replay, predicted)}
