"""Split the model into contiguous pipeline stages, balanced by an estimated cost per layer.

Units, in order: the input stage, each block, the output stage (a model's description names them).
Stage s holds a contiguous run of blocks; the input stage joins the first stage and the output
stage the last. The default split minimises the largest stage cost, the costs coming from the
model (plait's GPT: training FLOPs plus the optimizer's memory-bound work per parameter,
``models/gpt.py: layer_costs``; any other model: an estimate from its parameter counts). A large
vocabulary makes the output stage the heaviest, and the split gives its stage fewer blocks.
``parallel.stage_layers`` overrides the split.
"""

from __future__ import annotations

from functools import cache


def balanced_split(layers: int, stages: int, costs: tuple[float, float, float]) -> list[int]:
    """Blocks per stage minimising the largest stage cost (every stage gets at least one block);
    ties go to the split with the smaller sum of squared stage costs (the more even one)."""
    embed, block, head = costs

    def stage_cost(first: int, n: int) -> float:
        return n * block + (embed if first == 0 else 0) + (head if first + n == layers else 0)

    @cache
    def best(start: int, k: int) -> tuple[float, float, tuple[int, ...]]:
        if k == 1:
            c = stage_cost(start, layers - start)
            return c, c * c, (layers - start,)
        options = []
        for n in range(1, layers - start - k + 2):
            c = stage_cost(start, n)
            worst, squares, split = best(start + n, k - 1)
            options.append((max(c, worst), c * c + squares, (n, *split)))
        return min(options)

    return list(best(0, stages)[2])


def blocks_of_stages(counts: list[int]) -> list[list[int]]:
    """Block indices of every stage from the number of blocks in each."""
    out, start = [], 0
    for n in counts:
        out.append(list(range(start, start + n)))
        start += n
    return out


def stage_costs(blocks: list[list[int]], costs: tuple[float, float, float]) -> list[float]:
    """Estimated cost of each stage of a split (for reports and tests)."""
    embed, block, head = costs
    last = len(blocks) - 1
    return [len(b) * block + (embed if s == 0 else 0) + (head if s == last else 0) for s, b in enumerate(blocks)]
