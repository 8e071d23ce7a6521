"""Split the model into contiguous pipeline stages, balanced by an estimated cost per layer.

Units, in order: the embedding, each transformer block, the head (final norm and output layer).
Stage s holds a contiguous run of blocks; the embedding joins the first stage and the head the
last. The default split minimises the largest stage cost, where a layer's cost is its training
FLOPs (forward + backward = 3x forward, attention scores included) plus its parameters' share of
the optimizer and gradient work (memory-bound, counted as ``PARAM_COST`` FLOP-equivalents per
parameter). A large vocabulary makes the head the heaviest layer, and the split gives its stage
fewer blocks. ``parallel.stage_layers`` overrides the split.
"""

from __future__ import annotations

from functools import cache

from ...config import ModelConfig

PARAM_COST = 40.0  # FLOP-equivalents per parameter per step (AdamW, zeroing, clipping: memory-bound)


def layer_costs(m: ModelConfig, tokens: int) -> tuple[float, float, float]:
    """(embedding, one block, head) cost of one optimizer step over ``tokens`` tokens."""
    hd = m.hidden // m.heads
    attn = m.hidden * (m.heads + 2 * m.kv_heads) * hd + m.heads * hd * m.hidden
    mlp = (3 if m.flavour == "llama" else 2) * m.hidden * m.ffn_hidden
    block = 3 * (2 * tokens * (attn + mlp) + 4 * tokens * m.seq_len * m.hidden) + PARAM_COST * (attn + mlp)
    head = 3 * 2 * tokens * m.hidden * m.vocab + 3 * 5 * tokens * m.vocab + PARAM_COST * m.hidden * m.vocab
    embed = 3 * tokens * m.hidden + PARAM_COST * m.hidden * m.vocab
    return embed, block, head


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


def stage_blocks(m: ModelConfig, stages: int, tokens: int, explicit: tuple[int, ...] = ()) -> list[list[int]]:
    """Block indices of every stage, from ``explicit`` counts or the balanced split."""
    counts = list(explicit) if explicit else balanced_split(m.layers, stages, layer_costs(m, tokens))
    out, start = [], 0
    for n in counts:
        out.append(list(range(start, start + n)))
        start += n
    return out


def stage_costs(m: ModelConfig, blocks: list[list[int]], tokens: int) -> list[float]:
    """Estimated cost of each stage of a split (for reports and tests)."""
    embed, block, head = layer_costs(m, tokens)
    last = len(blocks) - 1
    return [len(b) * block + (embed if s == 0 else 0) + (head if s == last else 0) for s, b in enumerate(blocks)]
