"""Pipeline schedules as data: pure functions ``(pp, microbatches, virtual_stages, rank) -> actions``.

One description drives everything: the runtime executes these lists, the simulator times them,
``plait schedule`` draws them, and the planner (later) costs them. Actions name a micro-batch and a
local model chunk; rank ``r``'s chunk ``c`` is global stage ``c * pp + r`` (the interleaved
assignment of Narayanan et al. 2021, which is the plain one when ``v = 1``).

Ops: ``F`` forward; ``B`` whole backward; ``I`` backward for the input gradient only and ``W`` for
the weight gradient only (zero bubble, Qi et al. 2024). Transfers are implied: a forward on stage
s > 0 receives the activation of stage s-1, a backward (B or I) on stage s < last receives the
gradient of stage s+1, and each sends its result on.

New schedules plug in by adding a function to ``SCHEDULES``.
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
        return f"{self.op}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


def stage_of(rank: int, chunk: int, pp: int) -> int:
    return chunk * pp + rank


def place(stage: int, pp: int) -> tuple[int, int]:
    """Global stage -> (rank, chunk)."""
    return stage % pp, stage // pp


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
