"""Pipeline schedules as data: pure functions ``(pp, microbatches, virtual_stages, rank) -> actions``.

One description drives everything: the runtime executes these lists, the simulator times them,
``plait schedule`` draws them, and the planner (later) costs them. Actions name a micro-batch and a
local model chunk; rank ``r``'s chunk ``c`` is global stage ``c * pp + r`` (the interleaved
assignment of Narayanan et al. 2021, which is the plain one when ``v = 1``).

Ops: ``F`` forward; ``B`` whole backward; ``I`` backward for the input gradient only and ``W`` for
the weight gradient only (zero bubble, Qi et al. 2024). What an action waits for and what it sends
is stated once, here (``needs``, ``awaited``, ``message``): the runtime posts and sends by it, the
simulator times by it, and the transfer order agreed between ranks is derived from it.

New schedules plug in by adding a function to ``SCHEDULES``; its name is then a valid
``parallel.schedule``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


class Action(NamedTuple):
    op: str  # "F", "B", "I" or "W"
    mb: int
    chunk: int = 0

    def __str__(self) -> str:
        """``F3``; a later chunk is a letter: ``B3b`` is the backward of micro-batch 3, chunk 1."""
        return f"{self.op}{self.mb}" + (chr(ord("a") + self.chunk) if self.chunk else "")


def stage_of(rank: int, chunk: int, pp: int) -> int:
    return chunk * pp + rank


def place(stage: int, pp: int) -> tuple[int, int]:
    """Global stage -> (rank, chunk)."""
    return stage % pp, stage // pp


# --------------------------------------------------------------------------- what actions depend on

ACT, GRAD = 0, 1  # transfer kinds: activation to stage s+1, input gradient to stage s-1
Message = tuple[int, int, int]  # (kind, receiving stage, micro-batch)
Result = tuple[str, int, int]  # what an action leaves behind: ("F" | "G" | "W", micro-batch, stage)


def message(a: Action, stage: int, last: int) -> Message | None:
    """What action ``a`` on ``stage`` sends: a forward its output to the next stage, a backward
    (B, or I) the input gradient to the previous one."""
    if a.op == "F" and stage < last:
        return ACT, stage + 1, a.mb
    if a.op in ("B", "I") and stage > 0:
        return GRAD, stage - 1, a.mb
    return None


def awaited(a: Action, stage: int, last: int) -> Message | None:
    """What action ``a`` on ``stage`` receives: the mirror of ``message``."""
    if a.op == "F" and stage > 0:
        return ACT, stage, a.mb
    if a.op in ("B", "I") and stage < last:
        return GRAD, stage, a.mb
    return None


def sender(msg: Message) -> int:
    """The stage a message comes from."""
    kind, at, _ = msg
    return at - 1 if kind == ACT else at + 1


def result(a: Action, stage: int) -> Result:
    """What ``a`` produces: an output (F), an input gradient (B or I: "G"), weight gradients (W)."""
    return {"F": "F", "B": "G", "I": "G", "W": "W"}[a.op], a.mb, stage


def needs(a: Action, stage: int, last: int) -> list[Result]:
    """The results ``a`` waits for: its own stage's forward (a backward) or input gradient (W), and
    the result of another stage that ``awaited`` brings."""
    local = [("F", a.mb, stage)] if a.op in ("B", "I") else [("G", a.mb, stage)] if a.op == "W" else []
    msg = awaited(a, stage, last)
    remote = [("F" if msg[0] == ACT else "G", a.mb, sender(msg))] if msg is not None else []
    return remote + local


def gpipe(pp: int, m: int, v: int, rank: int) -> list[Action]:
    """GPipe (Huang et al. 2019): every forward, then every backward. Holds m micro-batches."""
    return [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]


def one_f_one_b(pp: int, m: int, v: int, rank: int) -> list[Action]:
    """1F1B (PipeDream-Flush, Narayanan et al. 2019): warm up with pp-rank-1 forwards, then
    alternate one forward and one backward. Holds at most min(pp, m) micro-batches."""
    warm = min(pp - rank - 1, m)
    acts = [Action("F", i) for i in range(warm)]
    for i in range(m - warm):
        acts += [Action("F", warm + i), Action("B", i)]
    return acts + [Action("B", i) for i in range(m - warm, m)]


def _unit(k: int, pp: int, v: int, backward: bool) -> tuple[int, int]:
    """Megatron's order of (micro-batch, chunk) units: pp micro-batches per chunk, chunk by chunk."""
    chunk = (k // pp) % v
    return (k // (pp * v)) * pp + k % pp, (v - 1 - chunk if backward else chunk)


def interleaved(pp: int, m: int, v: int, rank: int) -> list[Action]:
    """Interleaved 1F1B (Narayanan et al. 2021, §2.2): v chunks per rank, bubble / v; needs m % pp == 0."""
    total = m * v
    warm = min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    acts = [Action("F", *_unit(k, pp, v, False)) for k in range(warm)]
    for k in range(total - warm):
        acts += [Action("F", *_unit(warm + k, pp, v, False)), Action("B", *_unit(k, pp, v, True))]
    return acts + [Action("B", *_unit(k, pp, v, True)) for k in range(total - warm, total)]


def zero_bubble_h1(pp: int, m: int, v: int, rank: int) -> list[Action]:
    """ZB-H1 (Qi et al. 2024, §3): 1F1B's order with each backward split into I and W.

    Only I (the input gradient) is on the critical path between stages, so I runs as soon as it
    can and rank r keeps ``r`` weight gradients (W) pending, doing each later in what would be
    idle time. With t_F = t_I = t_W the bubble is (pp-1) t_F, a third of 1F1B's, and no rank holds
    more than pp micro-batches (1F1B's peak, on its first stage).
    """
    warm = min(pp - rank - 1, m)
    acts = [Action("F", i) for i in range(warm)]
    pending: list[int] = []
    for i in range(m):
        if warm + i < m:
            acts.append(Action("F", warm + i))
        acts.append(Action("I", i))
        pending.append(i)
        if len(pending) > rank:
            acts.append(Action("W", pending.pop(0)))
    return acts + [Action("W", i) for i in pending]


@dataclass(frozen=True)
class Schedule:
    name: str
    fn: Callable[[int, int, int, int], list[Action]]
    interleaved: bool = False  # uses virtual stages; micro-batches must be a multiple of pp

    def actions(self, pp: int, m: int, v: int = 1) -> list[list[Action]]:
        """Every rank's action list."""
        return [self.fn(pp, m, v, r) for r in range(pp)]


SCHEDULES = {
    "gpipe": Schedule("gpipe", gpipe),
    "1f1b": Schedule("1f1b", one_f_one_b),
    "interleaved": Schedule("interleaved", interleaved, interleaved=True),
    "zb": Schedule("zb", zero_bubble_h1),
}


def get(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]
