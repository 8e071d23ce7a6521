"""Every random stream of a run, derived from ``train.seed`` in one place.

| purpose      | alike over           | differs over | used for                                            |
|--------------|----------------------|--------------|-----------------------------------------------------|
| ``init``     | every rank           | -            | initial weights (each rank builds the whole model)  |
| ``data``     | every rank           | -            | the global batch of each step (sampler)             |
| ``dropout``  | tp                   | dp, pp       | the default stream: dropout on replicated tensors   |
| ``tp``       | -                    | dp, tp, pp   | tensor parallel's tracked stream (sharded dropout)  |
| ``sample``   | every rank           | -            | the text sampled at the end of a run                |

Pipeline stages hold different layers, so their streams differ too (as Megatron-LM's do); the
offsets keep the streams of different purposes and ranks apart.
"""

from __future__ import annotations

PURPOSES = ("init", "data", "dropout", "tp", "sample")


def seed_for(base: int, purpose: str, *, dp_rank: int = 0, tp_rank: int = 0, pp_rank: int = 0) -> int:
    """The seed of ``purpose`` on the rank at (pp_rank, dp_rank, tp_rank) of a run seeded with ``base``."""
    if purpose in ("init", "data", "sample"):
        return base
    if purpose == "dropout":
        return base + 1 + dp_rank + 10_007 * pp_rank
    if purpose == "tp":
        return base + 100_003 * (1 + dp_rank) + 2718 + tp_rank + 10_007 * pp_rank
    raise ValueError(f"unknown seed purpose {purpose!r}; valid: {', '.join(PURPOSES)}")
